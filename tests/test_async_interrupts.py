"""A Ctrl-C that lands in an async save's wait() (also the one save() and close() make) while
the save runs or just as it ends: the save stays in flight and counted, a later wait() returns
its result, and a later close() still lets go of everything the manager holds."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import torch

import distckpt
from distckpt import events, faults
from tests import job_servers
from tests.ranks import run_ranks, values
from tests.test_async_handoff_interrupts import (
    _in_the_background_thread,
    called_in_background_module,
)
from tests.test_coord import TIMEOUT


def _waiting_for_the_save(frame: FrameType, event: str) -> bool:
    """BackgroundSaves.wait calls the Future's result(): the waiter blocks on the save there."""
    return event == "call" and called_in_background_module(frame, "result", "wait")


def _interrupting_the_wait(
    before_raising: Callable[[futures.Future[Any]], None],
) -> Callable[[FrameType, str, object], None]:
    """A trace hook that raises KeyboardInterrupt as the waiter calls the save's result(),
    after ``before_raising(the save's future)``. A real SIGINT cannot be landed at one exact
    point on purpose: the hook (this thread only) raises it there, as the handler would."""

    def trace(frame: FrameType, event: str, arg: object) -> None:
        if _waiting_for_the_save(frame, event):
            sys.settrace(None)
            before_raising(frame.f_locals["self"])
            raise KeyboardInterrupt

    return trace


def _interrupted_in_the_wait(
    call: Callable[[], object], before_raising: Callable[[futures.Future[Any]], None]
) -> None:
    """Run ``call``, which must raise the KeyboardInterrupt :func:`_interrupting_the_wait`
    raises as it waits for the save."""
    sys.settrace(_interrupting_the_wait(before_raising))
    try:
        with pytest.raises(KeyboardInterrupt):
            call()
    finally:
        sys.settrace(None)


@contextlib.contextmanager
def _held_after_writing(step: int) -> Iterator[threading.Event]:
    """Hold the background thread once it wrote ``step`` until the event yielded is set."""
    release = threading.Event()

    def hold(event: events.PhaseEvent) -> None:
        if event.phase == "save.write" and event.step == step and _in_the_background_thread():
            assert release.wait(TIMEOUT), "the test never released the save"

    stop_listening = events.add_listener(hold)
    try:
        yield release
    finally:
        release.set()
        stop_listening()


@pytest.mark.parametrize("save_ended", [False, True], ids=["still_running", "just_ended"])
def test_an_interrupted_wait_leaves_the_save_in_flight_and_counted(
    tmp_path: Path, save_ended: bool
) -> None:
    """A Ctrl-C in wait() while the async save of step 10 still runs, or once it ended before
    wait() had its result: the save stays in flight, a later wait() returns it committed, and
    the schedule (every 10 steps) counts from it, so step 11 is not saved."""
    manager = distckpt.CheckpointManager(
        tmp_path, timeout=TIMEOUT, async_save=True, every_n_steps=10, fsync=False
    )
    with _held_after_writing(10) as release:
        manager.save(10, {"w": torch.ones(4)})

        def before_raising(save: futures.Future[Any]) -> None:
            if save_ended:
                release.set()
                futures.wait([save], timeout=TIMEOUT)
                assert save.done()
            else:
                assert not save.done()

        _interrupted_in_the_wait(manager.wait, before_raising)
        assert manager.save_in_flight is not save_ended
    assert manager.save(11, {"w": torch.ones(4)}) is None, "the interrupted save was uncounted"
    committed = manager.wait()
    assert committed is not None and (committed.step, committed.done) == (10, True)
    assert manager.wait() is None
    assert manager.steps() == [10]
    assert manager.save(20, {"w": torch.ones(4)}) is not None
    manager.close()
    assert manager.steps() == [10, 20]


def _main_thread_inside(code_name: str, called_from: str) -> bool:
    """Whether the main thread now runs ``code_name`` called by ``called_from`` of
    distckpt/background.py."""
    frame: FrameType | None = sys._current_frames().get(threading.main_thread().ident or 0)
    while frame is not None:
        if called_in_background_module(frame, code_name, called_from):
            return True
        frame = frame.f_back
    return False


def _ctrl_c_in(places: list[tuple[str, str]]) -> threading.Thread:
    """A thread that sends the main thread a real SIGINT each time it is blocked inside the
    next of ``places`` (see :func:`_main_thread_inside`), one after the other."""

    def interrupt() -> None:
        for code_name, called_from in places:
            while not _main_thread_inside(code_name, called_from):
                time.sleep(0.01)
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    return thread


def test_a_close_interrupted_twice_keeps_the_lease_until_it_is_repeated(tmp_path: Path) -> None:
    """Ctrl-C twice in close() while an async save runs (in its wait, then as the background
    thread is stopped): the root's lease stays held while the save runs, the save commits, and
    a repeated close() finishes: the lease is released and a new manager opens the root."""
    manager = distckpt.CheckpointManager(tmp_path, timeout=TIMEOUT, async_save=True, fsync=False)
    with _held_after_writing(1):
        manager.save(1, {"w": torch.ones(4)})
        interrupter = _ctrl_c_in([("result", "wait"), ("shutdown", "close")])
        with pytest.raises(KeyboardInterrupt):
            manager.close()
        interrupter.join(TIMEOUT)
        assert manager.save_in_flight
        with pytest.raises(distckpt.RootInUse):
            distckpt.CheckpointManager(tmp_path, timeout=TIMEOUT)
    manager.close()
    assert manager.steps() == [1]
    with distckpt.CheckpointManager(tmp_path, timeout=TIMEOUT) as successor:
        assert successor.steps() == [1]


#: The managers' timeout in the two-rank close test: its held save must not time out the peer's
#: agreement on a loaded machine while rank 0 is interrupted twice.
TWO_RANK_TIMEOUT = 10.0


def _close_interrupted_twice_on_rank_0(rank: int, world_size: int, root: str) -> list[int]:
    """Rank 0 closes as the test above (interrupted twice, then again), rank 1 at once; then
    both save with a new manager, on the groups their closes gave back to the pool."""
    manager = distckpt.CheckpointManager(
        os.path.join(root, "first"), timeout=TWO_RANK_TIMEOUT, async_save=True, fsync=False
    )
    with _held_after_writing(1):
        manager.save(1, {"w": torch.ones(4)})
        if rank == 0:
            interrupter = _ctrl_c_in([("result", "wait"), ("shutdown", "close")])
            with pytest.raises(KeyboardInterrupt):
                manager.close()
            interrupter.join(TWO_RANK_TIMEOUT)
    manager.close()
    with distckpt.CheckpointManager(
        os.path.join(root, "next"), timeout=TWO_RANK_TIMEOUT, fsync=False
    ) as successor:
        successor.save(5, {"w": torch.ones(4)}, force=True)
        return successor.steps()


def test_a_close_interrupted_on_one_rank_gives_its_groups_back_in_the_order_of_the_others(
    tmp_path: Path,
) -> None:
    """README: a close() that did not complete is finished by calling close() again; once it
    did, the next manager works on every rank, also when only one rank's close was interrupted
    (as its background thread was stopped): each rank gives the thread's group back to the
    pool before the manager's, so the next manager's ranks take the same group."""
    results = values(run_ranks(_close_interrupted_twice_on_rank_0, 2, str(tmp_path), timeout=90))
    assert results == [[5], [5]]


@pytest.mark.parametrize("repeated", ["close", "wait"])
def test_a_save_failing_after_a_close_was_interrupted_is_raised_by_the_repeated_close(
    tmp_path: Path, repeated: str
) -> None:
    """A Ctrl-C in close()'s wait while the async save runs, which then fails as the close
    stops the thread: the interrupted close raises KeyboardInterrupt, and close() again (the
    manager's docstring) or wait() (README) raises the save's error, which is not lost; a
    close() after that completes."""
    manager = distckpt.CheckpointManager(tmp_path, timeout=TIMEOUT, async_save=True, fsync=False)
    faults.arm("before_agreement", "raise")
    with _held_after_writing(1) as release:
        manager.save(1, {"w": torch.ones(4)})

        def release_the_save(save: futures.Future[Any]) -> None:
            release.set()  # it fails before or while the interrupted close stops the thread

        _interrupted_in_the_wait(manager.close, release_the_save)
    with pytest.raises(faults.InjectedFault):
        getattr(manager, repeated)()
    manager.close()  # raises nothing: the save's error was received
    assert manager._released
    assert manager.steps() == []


#: A script (argv: the root) whose close() a Ctrl-C interrupts in its wait while the async save
#: runs; the save then fails, and the program exits as a Ctrl-C'd program does: without closing
#: again.
_INTERRUPTED_CLOSE_THEN_EXIT = textwrap.dedent(
    """
    import sys, torch, distckpt
    from distckpt import faults
    from tests.test_async_interrupts import _held_after_writing, _interrupted_in_the_wait

    manager = distckpt.CheckpointManager(sys.argv[1], timeout=60, async_save=True, fsync=False)
    faults.arm("before_agreement", "raise")
    with _held_after_writing(1) as release:
        manager.save(1, {"w": torch.ones(4)})
        _interrupted_in_the_wait(manager.close, lambda save: release.set())
    """
)


def test_a_save_failing_after_a_close_was_interrupted_is_logged_once_at_exit(
    tmp_path: Path,
) -> None:
    """README: a save in flight at exit is finished or reported as failed; also one whose
    close() a Ctrl-C interrupted, when the program then exits without closing again."""
    # In a job server (the script imports this module's helpers, from the repository on the
    # job server's sys.path).
    done = job_servers.run_script_preloaded(
        _INTERRUPTED_CLOSE_THEN_EXIT, [str(tmp_path / "root")], tmp_path, stderr_apart=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("fault injected at before_agreement") == 1, done.stderr


def test_a_ctrl_c_as_close_stops_the_thread_is_raised_and_a_repeated_close_completes(
    tmp_path: Path,
) -> None:
    """The manager's close(): every step runs even if one before was interrupted, then the
    first failure is raised. A Ctrl-C as the idle thread is stopped reaches the caller (not
    lost in the later steps, which still release the lease), and close() again stops the
    thread and gives its groups back."""
    threads_before = set(threading.enumerate())
    manager = distckpt.CheckpointManager(tmp_path, timeout=TIMEOUT, async_save=True, fsync=False)
    manager.save(1, {"w": torch.ones(4)})
    manager.wait()
    (background_thread,) = {
        thread
        for thread in set(threading.enumerate()) - threads_before
        if thread.name.startswith("distckpt-commit")
    }

    def trace(frame: FrameType, event: str, arg: object) -> None:
        # A real SIGINT cannot be landed at this call on purpose: raised here, as the handler would.
        if event == "call" and called_in_background_module(frame, "shutdown", "close"):
            sys.settrace(None)
            raise KeyboardInterrupt

    sys.settrace(trace)
    try:
        with pytest.raises(KeyboardInterrupt):
            manager.close()
    finally:
        sys.settrace(None)
    assert not manager._released and background_thread.is_alive()
    with distckpt.CheckpointManager(tmp_path, timeout=TIMEOUT) as successor:
        assert successor.steps() == [1]  # the lease went with the interrupted close
    manager.close()
    assert manager._released
    background_thread.join(TIMEOUT)  # the repeated close stopped it; it may still be exiting
    assert not background_thread.is_alive()
