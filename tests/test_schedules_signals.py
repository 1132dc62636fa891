"""The save decisions after a preemption signal was served: the signal asks for one save,
not for every save after it."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest

import distckpt

#: the signal of the test's preemption notice: pytest's own SIGTERM handling stays out of it
NOTICE = signal.SIGUSR1


def test_a_served_signal_forces_no_later_save_and_is_not_pending_at_close(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """README: at the next save at a step boundary the signal forces a save and
    ``mgr.preempted`` becomes True; a job that goes on saves by its schedule again, and its
    close does not warn of a pending signal (that warning says no preemption save was made)."""
    options = {"every_n_steps": 100, "save_on_signal": (NOTICE,), "fsync": False}
    with (
        caplog.at_level(logging.WARNING, logger="distckpt"),
        distckpt.CheckpointManager(tmp_path, **options) as mgr,
    ):
        os.kill(os.getpid(), NOTICE)
        saved = mgr.save(1, {"s": 1})
        assert saved is not None and saved.step == 1 and mgr.preempted
        assert mgr.save(2, {"s": 2}) is None  # not due by the schedule: the signal is served
    assert "preemption signal pending" not in caplog.text
    assert distckpt.CheckpointManager(tmp_path, read_only=True).steps() == [1]
