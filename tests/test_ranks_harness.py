"""The test harness's own promises (``tests.ranks``): a hung job fails with each stuck rank's
stacks, and no rendezvous store thread runs in the parent while it forks the ranks."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.killing import proc_stat
from tests.ranks import describe_stuck, run_ranks, values

#: Thread counts of this process taken just before each fork, while a test records them.
_threads_at_fork: list[int] = []
_recording: list[bool] = [False]


def _count_threads_before_fork() -> None:
    if _recording[0]:
        _threads_at_fork.append(len(os.listdir("/proc/self/task")))


# A fork hook cannot be removed again: outside the test below it does nothing.
os.register_at_fork(before=_count_threads_before_fork)


def _rank_one_sleeps_in_a_named_place(rank: int, world_size: int) -> int:
    if rank == 1:
        time.sleep(600)
    return rank


def test_a_timeout_names_each_stuck_rank_and_its_python_stack() -> None:
    # Long enough for rank 0 to report even on a loaded machine (a reverse DNS lookup in its
    # store connect may take 5 s), so that only rank 1 is stuck.
    with pytest.raises(TimeoutError) as raised:
        run_ranks(_rank_one_sleeps_in_a_named_place, 2, timeout=15, native_stacks=False)
    message = str(raised.value)
    assert "rank 1 (pid" in message
    assert "rank 0 (pid" not in message  # rank 0 reported: it is not stuck
    assert "waits in " in message  # its threads' kernel wait channels
    assert "_rank_one_sleeps_in_a_named_place" in message  # its Python stack
    assert "native stacks" not in message


@pytest.fixture
def sleeper() -> Iterator[int]:
    process = subprocess.Popen(["sleep", "600"])
    try:
        # Only once it sleeps: just started, it is still running (loading, executing).
        deadline = time.monotonic() + 30
        while (stat := proc_stat(process.pid)) is not None and stat.state != "S":
            assert time.monotonic() < deadline, f"sleep is still in state {stat.state}"
            time.sleep(0.01)
        yield process.pid
    finally:
        process.kill()
        process.wait()


@pytest.mark.skipif(shutil.which("gdb") is None, reason="native stacks come from gdb")
def test_a_stuck_process_is_described_down_to_its_native_frames(sleeper: int) -> None:
    description = describe_stuck(sleeper, None)
    assert f"thread {sleeper}: state S" in description
    assert "no Python stacks" in description
    assert "nanosleep" in description.split("native stacks:")[1]


def _world_size(rank: int, world_size: int) -> int:
    return world_size


def test_no_store_thread_runs_in_the_parent_while_ranks_are_forked() -> None:
    # A thread of the parent that holds a lock at the fork leaves it held for ever in the
    # child: the store's server thread (glibc's resolver lock) hung ranks that way.
    before = len(os.listdir("/proc/self/task"))
    _threads_at_fork.clear()
    _recording[0] = True
    try:
        assert values(run_ranks(_world_size, 4)) == [4] * 4
    finally:
        _recording[0] = False
    assert len(_threads_at_fork) == 4
    assert max(_threads_at_fork) <= before, (before, _threads_at_fork)
