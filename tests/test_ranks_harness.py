"""The test harness's own promises (``tests.ranks``, ``tests.ports``): a hung job fails with
each stuck rank's stacks, no rendezvous store thread runs in the parent while it forks the
ranks, the ranks meet in a file store (the store opens no socket, so it makes no DNS lookup),
non-daemonic ranks may start processes, none of which outlives the job, and a reserved port is
no other process's, on any local address, until it is given back."""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.filesystems import skip_or_fail, tool_missing_reason
from tests.ports import ReservedPort
from tests.processes import proc_stat, wait_until_group_is_gone
from tests.ranks import (
    RankResult,
    RankResultLost,
    describe_stuck,
    run_ranks,
    values,
)

REPO = Path(__file__).resolve().parents[1]

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
    # The timeout is waited out whole: a short one first. Only rank 1 must be stuck: if rank 0
    # was named too, it may only have been slow to report on a loaded machine, and the last
    # try's timeout is long enough for it to report there (what the message says is decided
    # by that try).
    for timeout in (3, 15):
        with pytest.raises(TimeoutError) as raised:
            run_ranks(_rank_one_sleeps_in_a_named_place, 2, timeout=timeout, native_stacks=False)
        message = str(raised.value)
        if "rank 0 (pid" not in message:
            break
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


def test_a_stuck_process_is_described_down_to_its_native_frames(sleeper: int) -> None:
    missing = tool_missing_reason("gdb", "gdb")  # native stacks come from gdb
    if missing is not None:
        skip_or_fail(missing)
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


def _rendezvous_store_type(rank: int, world_size: int) -> str:
    store = dist.distributed_c10d._get_default_store()
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return type(store).__name__


def test_ranks_meet_in_a_file_store() -> None:
    # A TCPStore reverse-resolves ::ffff:127.0.0.1 over DNS at each connect, on both ends; a
    # dropped reply then stalls the job for glibc's 5 s retry.
    assert values(run_ranks(_rendezvous_store_type, 2)) == ["FileStore"] * 2


def _start_a_sleeping_child() -> int:
    """A multiprocessing child of this rank (a daemonic rank may not have one), left running."""
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(600,))
    child.start()
    assert child.pid is not None
    assert os.getpgid(child.pid) == os.getpid()  # in the group this rank leads
    return child.pid


def _leave_a_child_behind(rank: int, world_size: int) -> tuple[int, int]:
    return os.getpid(), _start_a_sleeping_child()


def test_non_daemonic_ranks_may_start_children_and_none_outlives_the_job() -> None:
    pids = values(run_ranks(_leave_a_child_behind, 2, daemon=False))
    for rank_pid, child_pid in pids:
        assert rank_pid != child_pid
        wait_until_group_is_gone(rank_pid)  # the rank and its child, killed by run_ranks


def _fail_while_a_peer_and_its_child_hang(rank: int, world_size: int, pid_file: str) -> None:
    if rank == 1:
        Path(pid_file).write_text(f"{os.getpid()} {_start_a_sleeping_child()}")
        time.sleep(600)
    deadline = time.monotonic() + 30
    while not Path(pid_file).exists() or not Path(pid_file).read_text():
        assert time.monotonic() < deadline, "rank 1 never started its child"
        time.sleep(0.05)
    raise RuntimeError("rank 0 fails")


def test_a_failed_job_kills_a_hung_peer_and_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "rank1.pids"
    results = run_ranks(
        _fail_while_a_peer_and_its_child_hang, 2, str(pid_file), daemon=False, fail_fast=True
    )
    assert [(r.rank, r.error_type) for r in results] == [(0, "RuntimeError")]
    rank_pid, child_pid = (int(pid) for pid in pid_file.read_text().split())
    wait_until_group_is_gone(rank_pid)
    assert (stat := proc_stat(child_pid)) is None or not stat.live  # its child too


def _hang_with_a_child(rank: int, world_size: int, pid_file: str) -> None:
    Path(pid_file).write_text(f"{os.getpid()} {_start_a_sleeping_child()}")
    time.sleep(600)


def test_a_hung_job_is_killed_with_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "rank0.pids"
    with pytest.raises(TimeoutError):
        run_ranks(
            _hang_with_a_child, 1, str(pid_file), daemon=False, timeout=5, native_stacks=False
        )
    rank_pid, child_pid = (int(pid) for pid in pid_file.read_text().split())
    wait_until_group_is_gone(rank_pid)
    assert (stat := proc_stat(child_pid)) is None or not stat.live  # its child too


#: Local addresses other than 127.0.0.1 that a process may bind: what the hostname resolves to
#: on Debian-style hosts (where a gloo rank listens), and any other of the loopback's /8.
OTHER_LOOPBACK_ADDRESSES = ("127.0.1.1", "127.0.0.2")


def _bind_refused(port: int, address: str = "127.0.0.1") -> bool:
    """Whether a socket of another owner is refused the port on ``address`` (as a gloo rank's
    listener or an S3 server without SO_REUSEADDR would be)."""
    with socket.socket() as other:
        try:
            other.bind((address, port))
        except OSError:
            return True
        return False


#: Run in a network namespace of its own (where the kernel's range of ports for a bind to port 0
#: can be narrowed to the reserved port alone without touching the machine's): binds port 0 on
#: each address of argv, with and without SO_REUSEADDR (gloo sets it), and prints, as JSON, the
#: port each got or None where the kernel had no port to give.
EPHEMERAL_BINDS = """
import json, socket, subprocess, sys
from pathlib import Path
from tests.ports import ReservedPort
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
port_range = Path("/proc/sys/net/ipv4/ip_local_port_range")
got = {}
with ReservedPort() as reserved:
    port_range.write_text(f"{reserved.port} {reserved.port}")
    for address in sys.argv[1:]:
        for reuse in (0, 1):
            with socket.socket() as ephemeral:
                ephemeral.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, reuse)
                try:
                    ephemeral.bind((address, 0))
                    got[f"{address} reuse={reuse}"] = ephemeral.getsockname()[1]
                except OSError:
                    got[f"{address} reuse={reuse}"] = None
print(json.dumps(got))
"""


def test_a_reserved_port_is_given_to_no_bind_to_port_0_on_any_local_address() -> None:
    if os.geteuid() != 0:
        skip_or_fail("a network namespace of the test's own needs root")
    for tool, package in (("unshare", "util-linux"), ("ip", "iproute2")):
        missing = tool_missing_reason(tool, package)
        if missing is not None:
            skip_or_fail(missing)
    addresses = [*OTHER_LOOPBACK_ADDRESSES, "127.0.0.1", "0.0.0.0"]
    done = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", EPHEMERAL_BINDS, *addresses],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.fspath(REPO)},
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.splitlines()[-1])
    # the only port the kernel may give is the reserved one, which it gives to none of them
    assert got == {f"{address} reuse={reuse}": None for address in addresses for reuse in (0, 1)}


def test_a_reserved_port_refuses_connections_and_other_binds_but_takes_a_server() -> None:
    with ReservedPort() as reserved:
        for address in ("127.0.0.1", *OTHER_LOOPBACK_ADDRESSES):
            assert _bind_refused(reserved.port, address), address
        with socket.socket() as client, pytest.raises(ConnectionRefusedError):
            client.connect(("127.0.0.1", reserved.port))
        # a server that sets SO_REUSEADDR binds it, on 127.0.0.1 as moto's does or on every
        # address as torch's TCPStore does; so does the next one once the first is gone, and the
        # port is nobody else's in between
        with socket.socket() as moto_like:
            moto_like.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            moto_like.bind(("127.0.0.1", reserved.port))
            moto_like.listen()
        for _ in range(2):
            timeout = datetime.timedelta(seconds=10)
            server = dist.TCPStore("127.0.0.1", reserved.port, 1, True, timeout=timeout)
            server.set("key", "value")
            assert server.get("key") == b"value"
            del server
            for address in ("127.0.0.1", *OTHER_LOOPBACK_ADDRESSES):
                assert _bind_refused(reserved.port, address), address


def _returns_a_tensor(rank: int, world_size: int) -> torch.Tensor:
    return torch.ones(2) * rank


def test_a_tensor_a_rank_returns_arrives_after_the_rank_has_exited() -> None:
    # Sent through the queue's own pickler, a tensor was a shared-memory handle that only its
    # exited rank could serve: the result was dropped, and run_ranks returned no results.
    received = values(run_ranks(_returns_a_tensor, 2))
    assert [tensor.tolist() for tensor in received] == [[0.0, 0.0], [1.0, 1.0]]


def _rank_one_exits_without_a_result(rank: int, world_size: int) -> int:
    if rank == 1:
        os._exit(0)
    return rank


def test_a_rank_that_exits_cleanly_without_a_result_fails_the_job() -> None:
    with pytest.raises(RankResultLost, match=r"\{1: 0\}"):
        run_ranks(_rank_one_exits_without_a_result, 2)


def _returns_a_lock(rank: int, world_size: int) -> object:
    return threading.Lock()


def test_a_return_value_that_cannot_be_pickled_is_the_ranks_error() -> None:
    results = run_ranks(_returns_a_lock, 2)
    assert [result.rank for result in results] == [0, 1]
    with pytest.raises(AssertionError, match="rank 0 raised TypeError"):
        values(results)


def test_values_refuses_no_results_and_a_rank_given_twice() -> None:
    with pytest.raises(RankResultLost):
        values([])
    with pytest.raises(RankResultLost):
        values([RankResult(0, value=0), RankResult(0, value=0)])
    with pytest.raises(RankResultLost):
        values([RankResult(1, value=1), RankResult(0, value=0)])
    assert values([RankResult(0, value="a"), RankResult(1, value="b")]) == ["a", "b"]
    # What run_ranks returns with expect_killed when rank 1 of 3 was killed.
    assert values([RankResult(0, value="a"), RankResult(2, value="c")]) == ["a", "c"]
