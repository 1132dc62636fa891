"""The preemption signals' handlers (``save_on_signal``): a manager that closes puts back what
it replaced only where its own handler is still the one installed, whatever order managers
close in and whatever else fails in close(); and a signal once served asks for no later save.
Real signals, sent to this process."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

import distckpt

SIGNAL = signal.SIGUSR1


@pytest.fixture
def programs_own_handler() -> Iterator[list[int]]:
    """A handler the program installed before any manager: what must be there in the end."""
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = signal.signal(SIGNAL, handler)
    try:
        yield received
    finally:
        signal.signal(SIGNAL, previous)


def _deliver() -> None:
    os.kill(os.getpid(), SIGNAL)
    time.sleep(0.05)  # Python runs the handler at its next check, in this (main) thread


def test_closing_managers_out_of_creation_order_keeps_the_open_ones_handler(
    tmp_path: Path, programs_own_handler: list[int]
) -> None:
    first = distckpt.CheckpointManager(tmp_path / "a", save_on_signal=(SIGNAL,))
    second = distckpt.CheckpointManager(tmp_path / "b", save_on_signal=(SIGNAL,))
    first.close()  # not in reverse order of creation
    _deliver()
    assert second._signals.is_set()  # the open manager still hears the signal
    assert programs_own_handler == []
    second.close()
    _deliver()
    assert programs_own_handler == [SIGNAL]  # the program's handler is back, not the first's


def test_close_restores_the_handler_even_when_releasing_the_root_fails(
    tmp_path: Path, programs_own_handler: list[int]
) -> None:
    mgr = distckpt.CheckpointManager(tmp_path, save_on_signal=(SIGNAL,))
    release = mgr._store.close

    def failing_release() -> None:
        release()
        # Replaced: no real root makes releasing its lease fail on demand here.
        raise OSError("the lease file's filesystem went away")

    mgr._store.close = failing_release  # type: ignore[method-assign]
    with pytest.raises(OSError, match="went away"):
        mgr.close()
    _deliver()
    assert programs_own_handler == [SIGNAL]


def test_a_closed_managers_handler_put_back_by_another_hands_the_signal_on(
    tmp_path: Path, programs_own_handler: list[int]
) -> None:
    """Another library wraps the manager's handler in its own (Lightning's signal connector
    does), so the manager's close() leaves that one installed, and the library then puts back
    what it had replaced: the closed manager's handler. A signal then reaches the program's
    handler, not a flag no one reads any more."""
    mgr = distckpt.CheckpointManager(tmp_path, save_on_signal=(SIGNAL,))
    managers_handler = signal.getsignal(SIGNAL)
    assert callable(managers_handler)

    def wrapping(signum: int, frame: FrameType | None) -> None:
        managers_handler(signum, frame)

    signal.signal(SIGNAL, wrapping)
    mgr.close()
    assert signal.getsignal(SIGNAL) is wrapping  # not the manager's to put back
    signal.signal(SIGNAL, managers_handler)  # the other library's own teardown
    _deliver()
    assert programs_own_handler == [SIGNAL]
    assert not mgr._signals.is_set()


def test_closing_puts_back_the_default_action_where_python_reported_no_handler(
    tmp_path: Path,
) -> None:
    """``signal.signal`` reports None for a handler set from C before the interpreter started
    (an embedding program's), which Python cannot install: close() raised TypeError."""
    previous = signal.signal(SIGNAL, signal.SIG_IGN)
    try:
        mgr = distckpt.CheckpointManager(tmp_path, save_on_signal=(SIGNAL,))
        # Set by hand: no handler this test process can install makes Python report None
        # (it does so only for one set before the interpreter started).
        mgr._signals._previous[SIGNAL] = None
        mgr.close()
        assert signal.getsignal(SIGNAL) == signal.SIG_DFL
    finally:
        signal.signal(SIGNAL, previous)


def test_a_served_signal_forces_no_later_save_and_is_not_pending_at_close(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """README: at the next save at a step boundary the signal forces a save and
    ``mgr.preempted`` becomes True; a job that goes on saves by its schedule again, and its
    close does not warn of a pending signal (that warning says no preemption save was made)."""
    options = {"every_n_steps": 100, "save_on_signal": (SIGNAL,), "fsync": False}
    with (
        caplog.at_level(logging.WARNING, logger="distckpt"),
        distckpt.CheckpointManager(tmp_path, **options) as mgr,
    ):
        os.kill(os.getpid(), SIGNAL)
        saved = mgr.save(1, {"s": 1})
        assert saved is not None and saved.step == 1 and mgr.preempted
        assert mgr.save(2, {"s": 2}) is None  # not due by the schedule: the signal is served
    assert "preemption signal pending" not in caplog.text
    assert distckpt.CheckpointManager(tmp_path, read_only=True).steps() == [1]
