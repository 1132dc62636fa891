"""The kill harness itself (``tests/killing.py``): a killed job counts as gone only once every
process of its group has died, not merely its first process; each run is a fresh interpreter's,
and a run and the next do not share a hash seed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests import killing

#: A job whose first process starts a child of its own (as a job script starts its ranks), both
#: sleeping until killed.
_PARENT_AND_CHILD = (
    "import subprocess, sys, time; "
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
    "time.sleep(120)"
)


def test_a_killed_group_is_waited_for_until_its_last_process_has_died() -> None:
    job = subprocess.Popen([sys.executable, "-c", _PARENT_AND_CHILD], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(killing.live_group_members(job.pid)) < 2:
            assert time.monotonic() < deadline, "the job's child never started"
            time.sleep(0.02)
        stat = killing.proc_stat(job.pid)
        assert stat is not None and stat.group == job.pid and stat.live
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    killing.wait_until_group_is_gone(job.pid, timeout=30)
    assert killing.live_group_members(job.pid) == []


def test_each_run_is_a_fresh_interpreter_and_the_next_has_another_hash_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the test's process holds (its environment, an armed fault, a default dtype a test
    # left behind) reaches a run only as it would a fresh interpreter: through the environment.
    monkeypatch.setenv("PROBE_SETTING", "from the test")
    monkeypatch.setenv("DISTCKPT_FAULT", "after_rename:kill:0")
    torch.set_default_dtype(torch.float64)
    try:
        for _ in range(2):
            assert not killing.run(["tests/fresh_run_probe.py", str(tmp_path)], tmp_path)
    finally:
        torch.set_default_dtype(torch.float32)
    first, second = (json.loads(line) for line in (tmp_path / "probe.txt").read_text().splitlines())
    for found in (first, second):
        assert found["already_imported"] == []
        assert found["setting"] == "from the test"
        assert found["armed"] == ["after_rename"]
        assert found["default_dtype"] == "torch.float32"
    assert first["string_hash"] != second["string_hash"]
    assert (tmp_path / "exited.txt").read_text() == "exit handlers ran\n"
