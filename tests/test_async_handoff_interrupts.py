"""A Ctrl-C landing in the hand-off of an async save to its background thread: before the
thread took the save, the save ends there (its staging removed, the schedule not counting it, no
save in flight); after, the save is the thread's, in flight and counted."""

from __future__ import annotations

import linecache
import os
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import torch

import distckpt
from distckpt import events
from tests.test_coord import TIMEOUT

#: The name prefix of the async saves' background thread (distckpt.background); the save's
#: proposal runs other pools' threads as well.
BACKGROUND_THREAD_PREFIX = "distckpt-commit"


def _in_the_background_thread() -> bool:
    return threading.current_thread().name.startswith(BACKGROUND_THREAD_PREFIX)


def called_in_background_module(frame: FrameType, code_name: str, called_from: str) -> bool:
    """Whether ``frame`` runs ``code_name`` called by ``called_from`` of distckpt/background.py."""
    caller = frame.f_back
    return (
        frame.f_code.co_name == code_name
        and caller is not None
        and caller.f_code.co_name == called_from
        and caller.f_code.co_filename.endswith(os.path.join("distckpt", "background.py"))
    )


def _save_interrupted(
    manager: distckpt.CheckpointManager,
    step: int,
    trace: Callable[[FrameType, str, object], Any],
) -> None:
    """Save ``step`` with ``trace`` as this thread's trace hook: the save must raise the
    KeyboardInterrupt the hook raises."""
    sys.settrace(trace)
    try:
        with pytest.raises(KeyboardInterrupt):
            manager.save(step, {"w": torch.ones(4)})
    finally:
        sys.settrace(None)


def _looking_for_a_thread_to_run_it(frame: FrameType, event: str) -> bool:
    """Inside ThreadPoolExecutor.submit, which queued the save and looks for a thread to run
    it."""
    return (
        event == "call"
        and frame.f_code.co_name == "_adjust_thread_count"
        and frame.f_locals["self"]._thread_name_prefix == BACKGROUND_THREAD_PREFIX
    )


def _submitted_not_yet_in_flight(frame: FrameType, event: str) -> bool:
    """After ThreadPoolExecutor.submit returned, before BackgroundSaves.submit made the save
    the one in flight (its last line)."""
    return (
        event == "line"
        and frame.f_code.co_name == "submit"
        and frame.f_code.co_filename.endswith(os.path.join("distckpt", "background.py"))
        and linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
        == "self.keep_in_flight(outcome)"
    )


@pytest.mark.parametrize(
    "lands_at", [_looking_for_a_thread_to_run_it, _submitted_not_yet_in_flight]
)
def test_an_interrupt_inside_the_submission_leaves_a_save_the_thread_took_to_it(
    tmp_path: Path, lands_at: Any
) -> None:
    """A Ctrl-C landing inside the submission of an async save after the background thread
    took the save (while the executor looks for a thread to run it; once it returned, before
    the save is in flight) neither removes the staging under the running commit nor uncounts
    the save: the save is in flight, wait() returns it committed, and the schedule counts from
    it."""
    manager = distckpt.CheckpointManager(
        tmp_path, timeout=TIMEOUT, async_save=True, every_n_steps=2, fsync=False
    )
    manager.save(2, {"w": torch.zeros(4)})
    manager.wait()  # the thread is idle now: it takes the next save as soon as it is queued
    taken = threading.Event()
    stop_listening = events.add_listener(
        lambda event: event.step == 4 and _in_the_background_thread() and taken.set()
    )

    def interrupt_once_taken(frame: FrameType, event: str, arg: object) -> Any:
        # A real SIGINT cannot be landed at this point on purpose: the trace hook (this thread
        # only) raises it there, once the background thread has begun the save.
        if lands_at(frame, event):
            sys.settrace(None)
            assert taken.wait(TIMEOUT), "the background thread did not take the save"
            raise KeyboardInterrupt
        return interrupt_once_taken  # traces the lines of each call too

    try:
        _save_interrupted(manager, 4, interrupt_once_taken)
    finally:
        stop_listening()
    committed = manager.wait()
    assert committed is not None and (committed.step, committed.done) == (4, True)
    assert manager.steps() == [2, 4]
    assert not manager.should_save(5), "the save of step 4 was not counted"
    assert os.listdir(tmp_path / ".staging") == []
    manager.close()


def _interrupted_on_creating_the_outcome(frame: FrameType) -> bool:
    """The hand-off's first statement: the Future that decides who owns the save is made."""
    caller = frame.f_back
    return (
        frame.f_code.co_name == "__init__"
        and caller is not None
        and caller.f_code.co_name == "_hand_off"
        and caller.f_code.co_filename.endswith(os.path.join("distckpt", "saving.py"))
    )


def _interrupted_on_entering_the_submission(frame: FrameType) -> bool:
    """After the renewal and the schedule's count, before any statement of the submission."""
    return frame.f_code.co_name == "submit" and frame.f_code.co_filename.endswith(
        os.path.join("distckpt", "background.py")
    )


@pytest.mark.parametrize(
    "lands_at", [_interrupted_on_creating_the_outcome, _interrupted_on_entering_the_submission]
)
def test_an_interrupt_before_the_thread_took_the_save_ends_it_at_once(
    tmp_path: Path, lands_at: Any
) -> None:
    """A Ctrl-C landing in the hand-off of an async save before the background thread could
    take it (as the hand-off begins; once the save is counted, as the submission is entered)
    ends the save there: its staging is removed, the schedule does not count it (the next step
    retries it), and wait() has no save in flight."""
    manager = distckpt.CheckpointManager(
        tmp_path, timeout=TIMEOUT, async_save=True, every_n_steps=2, fsync=False
    )
    manager.save(2, {"w": torch.zeros(4)})
    manager.wait()

    def interrupt_there(frame: FrameType, event: str, arg: object) -> None:
        # A real SIGINT cannot be landed at one exact line on purpose: the trace hook (this
        # thread only) raises it there, as the signal handler would.
        if event == "call" and lands_at(frame):
            sys.settrace(None)
            raise KeyboardInterrupt

    _save_interrupted(manager, 4, interrupt_there)
    assert manager.wait() is None
    assert os.listdir(tmp_path / ".staging") == []
    assert manager.should_save(5), "the interrupted save of step 4 was counted"
    assert manager.steps() == [2]
    manager.close()


def test_an_interrupt_once_the_save_is_in_flight_before_the_thread_started_it_ends_it(
    tmp_path: Path,
) -> None:
    """A Ctrl-C landing just after the submission made the save the one in flight, while the
    background thread (started by this first async save) has not begun it yet: the save ends
    there as above, and is in flight no more: wait() returns None, not its cancellation, and
    the next saves are made."""
    manager = distckpt.CheckpointManager(
        tmp_path, timeout=TIMEOUT, async_save=True, every_n_steps=2, fsync=False
    )
    interrupted = threading.Event()

    def hold_the_worker(frame: FrameType, event: str, arg: object) -> None:
        # Nothing real holds a thread the executor starts before its first statement: this
        # hook (set for threads started from now on: the background thread) holds it there
        # until the saving thread was interrupted.
        if event == "call" and frame.f_code.co_name == "_run_unless_cancelled":
            assert interrupted.wait(TIMEOUT), "the saving thread was never interrupted"

    def interrupt_once_in_flight(frame: FrameType, event: str, arg: object) -> Any:
        # As in the tests above, the hook raises the KeyboardInterrupt at that exact point.
        if event == "return" and called_in_background_module(frame, "keep_in_flight", "submit"):
            sys.settrace(None)
            raise KeyboardInterrupt
        return interrupt_once_in_flight

    threading.settrace(hold_the_worker)
    try:
        _save_interrupted(manager, 2, interrupt_once_in_flight)
    finally:
        threading.settrace(None)  # type: ignore[arg-type]
        interrupted.set()
    assert manager.wait() is None
    assert os.listdir(tmp_path / ".staging") == []
    # A second call at step 2 is held (as a micro-batch inside an accumulation window would
    # be); step 3 crosses the multiple of 2 only if the interrupted save was not counted.
    assert not manager.should_save(2)
    assert manager.should_save(3), "the interrupted save of step 2 was counted"
    assert manager.save(3, {"w": torch.ones(4)}) is not None
    committed = manager.wait()
    assert committed is not None and committed.step == 3
    manager.close()
    assert manager.steps() == [3]


def test_a_save_raising_cancelled_error_itself_fails_once_and_is_then_over(
    tmp_path: Path,
) -> None:
    """A save whose own code raises CancelledError (an inner future of it was cancelled), not
    a cancellation of the save: wait() raises it once as the save's failure (its on_failure
    runs), then no save is in flight, and close() completes."""
    manager = distckpt.CheckpointManager(tmp_path, timeout=TIMEOUT, async_save=True, fsync=False)
    saves = manager._background
    assert saves is not None

    def save_with_a_cancelled_inner_future(coord: object) -> Any:
        # No real save can be made to lose one of its inner futures to a cancel on purpose:
        # this stand-in raises the CancelledError such a save would.
        raise futures.CancelledError("an inner future of the save was cancelled")

    saves.submit(save_with_a_cancelled_inner_future, futures.Future())
    failures: list[str] = []
    with pytest.raises(futures.CancelledError, match="inner future"):
        saves.wait(on_failure=lambda: failures.append("failed"))
    assert failures == ["failed"]
    assert not saves.holds_outcome
    assert saves.wait() is None
    manager.close()
    assert manager._released
