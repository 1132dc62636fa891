from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from distckpt import faults


@pytest.fixture(autouse=True)
def _no_armed_faults() -> Iterator[None]:
    # Faults armed in this process (single-process tests) must not leak into the next test;
    # those armed inside forked ranks die with the rank.
    faults.disarm()
    yield
    faults.disarm()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A checkpoint root that does not exist yet, in its own temporary directory."""
    return tmp_path / "ckpt"
