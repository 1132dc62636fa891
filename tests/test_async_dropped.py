"""An async manager dropped without close(): its background thread ends, at once when idle,
else once its save in flight committed."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import torch

import distckpt
from distckpt import background
from tests.test_async_handoff_interrupts import BACKGROUND_THREAD_PREFIX
from tests.test_async_interrupts import _held_after_writing
from tests.test_coord import TIMEOUT


def _background_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith(BACKGROUND_THREAD_PREFIX)}


def _dropped_with_its_thread(root: Path, *, wait: bool) -> threading.Thread:
    """Save step 1 async on a new manager (waiting for it or not), drop the manager and
    collect it; the manager's background thread."""
    before = _background_threads()
    manager = distckpt.CheckpointManager(root, timeout=TIMEOUT, async_save=True, fsync=False)
    manager.save(1, {"w": torch.ones(4)})
    if wait:
        manager.wait()
    (thread,) = _background_threads() - before
    del manager
    gc.collect()
    return thread


def test_a_dropped_async_manager_ends_its_idle_thread(tmp_path: Path) -> None:
    open_before = len(background._open_saves)
    thread = _dropped_with_its_thread(tmp_path, wait=True)
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert len(background._open_saves) == open_before


def test_a_manager_dropped_with_a_save_in_flight_commits_it_then_ends_its_thread(
    tmp_path: Path,
) -> None:
    with _held_after_writing(1) as release:
        thread = _dropped_with_its_thread(tmp_path, wait=False)
        assert thread.is_alive()
        release.set()
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    with distckpt.CheckpointManager(tmp_path, timeout=TIMEOUT, read_only=True) as reader:
        assert reader.steps() == [1]
