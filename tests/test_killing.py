"""The kill harness itself (``tests/killing.py``): a killed job counts as gone only once every
process of its group has died, not merely its first process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

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
