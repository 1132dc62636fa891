"""Waiting in a test for something another process or thread does, for as long as a loaded
machine makes it take, instead of sleeping a fixed time that is too short there.

Kept free of heavy imports (torch): test modules of every kind import it.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from distckpt import CheckpointManager


class RunningJob(Protocol):
    """A job another process runs (``tests.test_launch.Job``): its process and output so far."""

    process: subprocess.Popen[str]

    @property
    def output(self) -> str: ...


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


def wait_while_running(
    running: Sequence[RunningJob], condition: Callable[[], object], what: str, timeout: float
) -> None:
    """:func:`wait_until`, failing at once (with their output) if every job of ``running``
    ended before ``condition`` came true: a job that crashed fails the test with its own
    traceback, not with a timeout minutes later."""
    deadline = time.monotonic() + timeout
    while not condition():
        if all(job.process.poll() is not None for job in running) and not condition():
            outputs = "\n".join(job.output for job in running)
            raise AssertionError(f"{what}: the job(s) ended first:\n{outputs[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(POLL_SECONDS)


def after_rank_0_removals(mgr: CheckpointManager) -> None:
    """Wait for what rank 0 removes in the background after a start, a commit, a delete or a
    prune (the trash, dead writers' leftovers: :mod:`distckpt.tidying`), so that a test looks
    at the root after them. Through the manager's private runner: nothing public waits for
    those removals alone (``gc`` and ``close`` change the root too). Nothing on other ranks."""
    mgr._tidying.wait()
