"""An async manager dropped without close(): its background thread ends, at once when idle,
else once its save in flight committed."""

from __future__ import annotations

import gc
import logging
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import distckpt
from distckpt import background, faults
from tests import job_servers
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


def test_the_failure_of_a_dropped_managers_save_before_exit_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """README: the save of a manager dropped without close() is finished "or reported as
    failed", also when it fails long before the exit: no one can wait for it any more."""
    faults.arm("before_agreement", "raise")
    with caplog.at_level(logging.ERROR, logger="distckpt"), _held_after_writing(1) as release:
        thread = _dropped_with_its_thread(tmp_path, wait=False)
        release.set()
        thread.join(TIMEOUT)  # it ends once the failed save's manager is found dropped
        assert not thread.is_alive()
    assert caplog.text.count("fault injected at before_agreement") == 1, caplog.text


#: A script (argv: the root) whose manager is dropped with an async save in flight that fails
#: while the interpreter exits.
_DROPPED_FAILING_AT_EXIT = textwrap.dedent(
    """
    import gc, sys, threading, torch, distckpt
    from distckpt import events, faults

    exiting = threading.Event()

    def hold_until_exiting(event):
        # Held until the exit began, so that the exit hook waits for the save as it fails.
        if event.phase == "save.write" and threading.current_thread().name.startswith(
            "distckpt-commit"
        ):
            exiting.wait(60)

    events.add_listener(hold_until_exiting)
    mgr = distckpt.CheckpointManager(sys.argv[1], async_save=True, timeout=60, fsync=False)
    faults.arm("before_agreement", "raise")
    mgr.save(1, {"w": torch.ones(4)})
    threading._register_atexit(exiting.set)  # the exit's first moment (test_async_exit.py)
    del mgr
    gc.collect()
    """
)


def test_the_failure_of_a_dropped_managers_save_is_logged_once_at_exit(tmp_path: Path) -> None:
    """README: the save of a manager dropped without close() is finished at exit "or reported
    as failed": once, although both the exit and the dropped manager's thread see it end."""
    done = job_servers.run_script_preloaded(
        _DROPPED_FAILING_AT_EXIT, [str(tmp_path / "root")], tmp_path, stderr_apart=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("fault injected at before_agreement") == 1, done.stderr
