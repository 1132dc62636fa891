"""Waiting in a test for something another process or thread does, for as long as a loaded
machine makes it take, instead of sleeping a fixed time that is too short there.

Kept free of heavy imports (torch): test modules of every kind import it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: How often a condition is checked again.
POLL_SECONDS = 0.05


def wait_until(condition: Callable[[], object], what: str, timeout: float) -> None:
    """Return as soon as ``condition()`` is true; fail the test, naming ``what`` was awaited,
    if it is still false after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(POLL_SECONDS)
