"""The sweep of what a killed test session left mounted (tests/leftover_mounts.py): on a temp
root of its own, laid out as pytest lays out ``pytest-of-<user>``."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.filesystems import _output, _run, unmount
from tests.leftover_mounts import ended_session_dirs, sweep_leftover_mounts


def _gone_pid() -> int:
    """A pid no process has (until reused, unlikely this soon)."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


def test_only_the_mounts_and_loop_devices_of_sessions_that_are_over_are_swept(
    tmp_path: Path,
) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    temp_root = tmp_path / "pytest-of-someone"
    killed, finished, running = (temp_root / f"pytest-{n}" for n in (6, 7, 8))
    # finished: its lock removed at exit (as also a live session without retention has none)
    owners = {killed: str(_gone_pid()), running: str(os.getpid())}
    points = [session / "test_x0" / "mnt" for session in (killed, finished, running)]
    for point in points:
        point.mkdir(parents=True)
        if point.parents[1] in owners:
            (point.parents[1] / ".lock").write_text(owners[point.parents[1]])
        _run("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", point)
    being_locked = temp_root / "pytest-9"  # pytest between creating its lock and writing it
    being_locked.mkdir()
    (being_locked / ".lock").write_text("")
    image = killed / "disk.img"
    _run("truncate", "-s", "1M", image)
    device = _output("losetup", "--find", "--show", image)
    try:
        assert ended_session_dirs(temp_root) == [killed]
        assert sweep_leftover_mounts(temp_root) == []
        assert [os.path.ismount(point) for point in points] == [False, True, True]
        assert _output("losetup", "--associated", image) == ""
    finally:
        for point in points:
            if os.path.ismount(point):
                unmount(point)
        with contextlib.suppress(RuntimeError):
            _run("losetup", "-d", device)
