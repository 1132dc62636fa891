"""The root's writer lease between real processes: exclusion, waiting, a SIGKILLed holder,
holders on other machines where locks are local to each machine, and a manager that lost the
root to another one (through a bindfs mount its locks do not cross) committing, deleting and
pruning nothing. Breaking a lease is tested in ``tests/test_lease_break.py``; forked children
of a holder and a worker noticing that its launcher died in ``tests/test_lease_forks.py``.

Every holder is a separate process driven through its stdin; every process a test
starts is killed by its pid when the test ends. The last tests hold the holders to what
``tests/lease_holders.py`` promises of them.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import fields as dataclass_fields
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import distckpt
import distckpt.lease
import distckpt.lease_break
from distckpt.layout import LEASE_RECORD_NAME, RootLayout, rank_file_name
from distckpt.lease import (
    LeaseHolder,
    RootLease,
    _boot_id,
    read_holder,
    this_host,
)
from distckpt.lease_break import break_lease
from distckpt.lock import lock_is_held, locks_local_to_machine, mount_of
from tests.cli_runner import run_cli
from tests.filesystems import MountFactory
from tests.lease_holders import (
    _ANOTHER_BOOT_ID,
    STARTUP,
    Holder,
    _exit_status,
    _on_another_machine_named_like_this_one,
    _record_as_another_machine,
    in_a_pid_namespace_of_its_own,
    start_holder,
)


def test_second_job_is_refused_naming_the_holder(root: Path, holders: list[Holder]) -> None:
    root.mkdir()
    first = start_holder(holders, root)
    assert first.line() == "held 1"
    # a python of its own: its exit status is looked at, and a forked holder's is not real
    second = start_holder(holders, root, fresh_interpreter=True)
    answer = second.line()
    assert answer.startswith("refused RootInUse")
    assert f"root {root} is in use by" in answer
    assert f"pid {first.pid}" in answer and "on host" in answer and "since" in answer
    assert second.proc.wait(timeout=STARTUP) == 3
    assert first.ask("check") == "current"  # the refused job changed nothing
    shown = run_cli("lease", os.fspath(root))
    assert f"pid {first.pid}" in shown.stdout and "(alive)" in shown.stdout


def test_two_jobs_starting_at_once_one_wins(root: Path, holders: list[Holder]) -> None:
    root.mkdir()
    racers = [start_holder(holders, root), start_holder(holders, root)]
    answers = [racer.line() for racer in racers]
    assert sorted(answer.split()[0] for answer in answers) == ["held", "refused"]
    winner = racers[answers.index("held 1")]
    loser_answer = next(answer for answer in answers if answer.startswith("refused"))
    assert "RootInUse" in loser_answer and f"pid {winner.pid}" in loser_answer


def test_a_waiting_job_proceeds_when_the_holder_ends(root: Path, holders: list[Holder]) -> None:
    root.mkdir()
    first = start_holder(holders, root)
    assert first.line() == "held 1"
    second = start_holder(holders, root, wait=STARTUP)
    assert second.line(timeout=1.5) == ""  # still waiting
    assert first.ask("release") == "released"
    assert second.line() == "held 2"
    assert "lost" in first.ask("check")  # released: it may not commit any more


def test_a_sigkilled_holder_blocks_nobody(root: Path, holders: list[Holder]) -> None:
    root.mkdir()
    first = start_holder(holders, root)
    assert first.line() == "held 1"
    first.kill()
    holder = read_holder(root)
    assert holder is not None and holder.pid == first.pid and holder.alive is False
    assert "dead: the next writer takes over" in run_cli("ls", os.fspath(root)).stdout
    began = time.monotonic()
    lease = RootLease.acquire(root)  # no wait, no manual step
    try:
        assert time.monotonic() - began < 5
        assert lease.generation == 2 and lease.holder.pid == os.getpid()
        listed = json.loads(run_cli("ls", "--json", os.fspath(root)).stdout)
        assert listed["lease"]["generation"] == 2 and listed["lease"]["alive"] is True
    finally:
        lease.release()
    assert read_holder(root) is None
    assert "lease: none" in run_cli("ls", os.fspath(root)).stdout


def test_an_exception_in_the_loop_releases_the_lease(root: Path) -> None:
    root.mkdir()
    with pytest.raises(ZeroDivisionError), RootLease.acquire(root):
        raise ZeroDivisionError  # the training loop failing
    record = json.loads((root / LEASE_RECORD_NAME).read_text())
    assert record["released_utc"] is not None
    with RootLease.acquire(root) as lease:
        assert lease.generation == 2


def test_machine_local_lock_mounts_are_recognised(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
        "2 1 0:50 / /nfs rw,relatime - nfs4 srv:/x rw,vers=4.2,local_lock=all,addr=10.0.0.1\n"
        "3 1 0:51 / /nfs/locked rw - nfs4 srv:/y rw,vers=4.2,local_lock=none\n"
        "4 1 0:52 / /lustre rw shared:3 - lustre mgs@tcp:/fs rw,localflock\n"
    )
    assert locks_local_to_machine(Path("/nfs/run"), mountinfo)
    assert not locks_local_to_machine(Path("/nfs/locked/run"), mountinfo)
    assert locks_local_to_machine(Path("/lustre/a/b"), mountinfo)
    assert not locks_local_to_machine(Path("/home/run"), mountinfo)
    assert not locks_local_to_machine(tmp_path)  # this machine's own mounts


def test_a_mount_point_with_a_space_tab_newline_and_backslash_is_found(tmp_path: Path) -> None:
    """A tmpfs mounted, in a mount namespace of its own, where ``/proc/self/mountinfo``
    writes the blanks and backslash of its mount point as octal escapes."""
    mount_point = tmp_path / "a b\tc\nd\\e"
    mount_point.mkdir()

    def its_device_as_found_and_as_stat_says() -> str:
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", mount_point], check=True)
        found = mount_of(mount_point / "file")
        device = os.stat(mount_point).st_dev
        return f"{found and found.device} / {(os.major(device), os.minor(device))}"

    said = in_a_pid_namespace_of_its_own(its_device_as_found_and_as_stat_says)
    found, _, stat_says = said.partition(" / ")
    assert found == stat_says, said


def test_errors_are_checkpoint_errors() -> None:
    assert issubclass(distckpt.RootInUse, BlockingIOError)
    assert issubclass(distckpt.LeaseLost, RuntimeError)
    assert issubclass(distckpt.LauncherGone, RuntimeError)
    for error in (distckpt.RootInUse, distckpt.LeaseLost, distckpt.LauncherGone):
        assert issubclass(error, distckpt.CheckpointError)


@pytest.mark.parametrize("wait", [0.0, 0.6])
def test_a_holder_on_another_machine_is_refused_where_locks_are_local_to_each_machine(
    root: Path, monkeypatch: pytest.MonkeyPatch, wait: float
) -> None:
    root.mkdir()
    holder = _record_as_another_machine(root, host=this_host() + "-node-b")
    # No NFS or Lustre driver on the test machines, so no mount with machine-local locks
    # (``local_lock=all``, ``localflock``) can be made; the mountinfo parsing that detects one is
    # tested on its own (test_machine_local_lock_mounts_are_recognised).
    monkeypatch.setattr(distckpt.lease, "locks_local_to_machine", lambda path: True)
    started = time.monotonic()
    with pytest.raises(distckpt.RootInUse) as refused:
        distckpt.CheckpointManager(root, wait_for_root=wait, timeout=STARTUP)
    assert time.monotonic() - started >= wait
    assert isinstance(refused.value, BlockingIOError)
    assert refused.value.holder == holder
    message = str(refused.value)
    assert f"root {root} is in use by {holder.describe()}" in message
    assert "locks on this filesystem are local to each machine" in message
    assert f"distckpt lease {root} --break" in message
    assert not (root / "step-00000001").exists()
    assert read_holder(root) == replace(holder, alive=None)  # the record is left as it was

    # An operator who knows that machine's job is dead breaks its lease: the root opens.
    broken = break_lease(root)
    assert broken is not None and broken.token == holder.token and broken.broken_utc
    # the break held the lock file (that machine's lock does not reach it here): kept, so
    # that a job waiting on it and a job opening it later lock the same file
    assert RootLayout(root).lease_lock_path.exists()
    with distckpt.CheckpointManager(root, timeout=STARTUP) as mgr:
        assert mgr.save(1, {"w": torch.zeros(2)}) is not None
        now = read_holder(root)
        assert now is not None and now.host == this_host() and now.generation == 4


@pytest.mark.parametrize(
    ("host", "boot_id", "taken_over"),
    [
        (this_host, lambda: None, True),  # an older version's record: hostname, no boot id
        (this_host, _boot_id, True),
        (this_host, lambda: _ANOTHER_BOOT_ID, False),  # same name, another machine or boot
        (lambda: this_host() + "-node-b", _boot_id, False),
    ],
    ids=["older-writer", "this-machine", "other-boot", "other-hostname"],
)
def test_where_locks_are_local_a_dead_holder_is_taken_over_only_on_this_machine(
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    host: Callable[[], str],
    boot_id: Callable[[], str | None],
    taken_over: bool,
) -> None:
    """The lock of a holder whose record names this hostname and this boot (or no boot id, an
    older version's record) tells whether it lives: free, so it is dead and taken over. Any
    other machine's holder, even under this hostname, is refused: its lock is on its machine."""
    root.mkdir()
    holder = _record_as_another_machine(root, host=host(), boot_id=boot_id())
    # as in the test above: no mount with machine-local locks can be made here
    monkeypatch.setattr(distckpt.lease, "locks_local_to_machine", lambda path: True)
    if not taken_over:
        with pytest.raises(distckpt.RootInUse, match="local to each machine"):
            RootLease.acquire(root)
        return
    with RootLease.acquire(root) as lease:
        assert lease.generation == holder.generation + 1


def test_a_job_that_lost_the_root_changes_nothing_of_the_new_holders(
    mounts: MountFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Every commit, delete, prune, gc and set-aside checks the lease under the commit lock first:
    a job that lost the root (another job took it over through a path its locks do not reach,
    as an operator's break lets one) fails them with ``LeaseLost``, and neither adds, removes
    nor moves a checkpoint of the new holder's (a restore of the fenced job that skips a
    damaged newer one leaves it committed, with ``last`` on it)."""
    bindfs = mounts.get("bindfs")
    assert bindfs.writable_source is not None
    here, there = bindfs.path / "fenced-removals", bindfs.writable_source / "fenced-removals"
    with distckpt.CheckpointManager(here, keep_last=2, timeout=STARTUP, fsync=False) as fenced:
        fenced.save(1, {"w": torch.zeros(1)})
        fenced.save(2, {"w": torch.zeros(1)})
        with distckpt.CheckpointManager(there, timeout=STARTUP, fsync=False) as taker:
            taker.save(3, {"w": torch.ones(1)})  # keeps everything: step 1 is prunable
            with pytest.raises(distckpt.LeaseLost):
                fenced.delete(3)
            with pytest.raises(distckpt.LeaseLost):
                fenced.prune()
            with pytest.raises(distckpt.LeaseLost):
                fenced.gc()
            with pytest.raises(distckpt.LeaseLost):
                fenced.save(4, {"w": torch.zeros(1)})
            os.truncate(there / "step-00000003" / rank_file_name(0), 10)
            with caplog.at_level(logging.ERROR, logger="distckpt"):
                assert fenced.restore().step == 2  # skipping the damaged step 3, left there
            refused = [r.getMessage() for r in caplog.records if r.exc_info is not None]
            assert any(
                "could not set aside the damaged checkpoint" in message and "LeaseLost" in message
                for message in refused
            ), refused  # the set-aside was tried, and the lease refused it
            assert taker.steps() == [1, 2, 3]
            assert os.readlink(there / "last") == "step-00000003"


def test_a_lease_record_made_unreadable_or_removed_fences_its_holder(tmp_path: Path) -> None:
    """An unreadable record "names nobody, so it fences whoever held it": the holder's check
    refuses, as it does once the record is gone."""
    record = tmp_path / LEASE_RECORD_NAME
    with RootLease.acquire(tmp_path) as lease:
        record.write_bytes(b"{not json")
        with pytest.raises(distckpt.LeaseLost, match="no readable lease record is there any more"):
            lease.check_current()
        record.unlink()
        with pytest.raises(distckpt.LeaseLost, match="no readable lease record is there any more"):
            lease.check_current()


def test_a_claim_whose_record_another_machine_replaced_at_once_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where locks are local to each machine, jobs on two machines can both take the lease
    lock: each writes its record and reads it back, and the one whose record the other's
    replaced meanwhile is refused, naming the other, with the lock let go (not left to fail
    at its first commit)."""
    real_write = distckpt.lease.atomic_write_bytes

    def another_machine_writes_right_after(path: Path, data: bytes, **options: bool) -> None:
        real_write(path, data, **options)
        _record_as_another_machine(tmp_path, host=this_host() + "-node7")

    # A wrapper at the lease's own seam: nothing real lands another machine's write between
    # this claim's write and its read back. The write and the read are real.
    monkeypatch.setattr(distckpt.lease, "atomic_write_bytes", another_machine_writes_right_after)
    with pytest.raises(distckpt.RootInUse, match="claimed the root at the same moment") as refused:
        RootLease.acquire(tmp_path)
    assert f"host {this_host()}-node7" in str(refused.value)
    assert lock_is_held(RootLayout(tmp_path).lease_lock_path) is False


@pytest.mark.parametrize(
    "record", [b"null", b"[]", b'"x"', b"3"], ids=["null", "list", "str", "int"]
)
def test_a_lease_record_that_is_json_but_no_object_is_unreadable_and_ignored(
    tmp_path: Path, record: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """ "An unreadable record is logged and ignored": valid JSON that is not an object names
    nobody either, so it blocks neither a job opening the root nor the CLI reading it."""
    from distckpt.cli import main

    root = tmp_path / "root"
    root.mkdir()
    (root / LEASE_RECORD_NAME).write_bytes(record)
    assert read_holder(root) is None
    assert any("unreadable lease record" in r.getMessage() for r in caplog.records)
    for command in ("ls", "lease"):
        assert main([command, str(root)], out=io.StringIO()) == 0, command
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        assert mgr.save(1, {"w": torch.ones(1)}).step == 1
        holder = read_holder(root)
        assert holder is not None and holder.pid == os.getpid()  # its own record replaced it


def test_a_live_holder_on_another_machine_with_the_same_hostname_is_not_taken_over(
    mounts: MountFactory, tmp_path: Path, holders: list[Holder]
) -> None:
    """Where locks stay on each machine, a holder whose record names another machine is
    refused, never taken over, even when that machine has this one's hostname: the record
    carries the boot id beside the hostname. Two machines here: this
    process's, on a directory, and another one's on a bindfs view of it, whose ``flock`` does
    not reach the directory (as two NFS clients' locks do not reach each other)."""
    bindfs = mounts.get("bindfs")
    assert bindfs.writable_source is not None
    here, there = bindfs.writable_source / "same-name", bindfs.path / "same-name"
    here.mkdir()
    first = start_holder(holders, here)
    assert first.line() == "held 1"
    record = json.loads((here / LEASE_RECORD_NAME).read_text())
    assert record["host"] == this_host() and record["boot_id"] == _boot_id()
    assert set(record) == {f.name for f in dataclass_fields(LeaseHolder)} - {"alive"}

    elsewhere = _on_another_machine_named_like_this_one(bindfs.path, tmp_path)
    second = start_holder(holders, there, prefix=elsewhere)
    refused = second.line()
    assert refused.startswith("refused RootInUse"), refused
    assert "locks on this filesystem are local to each machine" in refused
    assert f"pid {first.pid}" in refused
    assert first.ask("check") == "current"


def test_a_forked_holder_ends_when_its_stdin_closes_while_a_later_holder_runs(
    tmp_path: Path, holders: list[Holder]
) -> None:
    """The harness's promise: a forked holder keeps no copy of an earlier holder's pipes, so
    closing a holder's stdin ends it however many holders were forked after it."""
    earlier, later = tmp_path / "earlier", tmp_path / "later"
    earlier.mkdir()
    later.mkdir()
    first = start_holder(holders, earlier)
    assert first.line() == "held 1"
    second = start_holder(holders, later)
    assert second.line() == "held 1"
    assert first.proc.stdin is not None
    first.proc.stdin.close()
    first.proc.stdin = None
    assert first.proc.wait(timeout=STARTUP) == 0
    assert second.ask("check") == "current"


@pytest.mark.parametrize(
    ("code", "status"), [(None, 0), (0, 0), (3, 3), (256 + 3, 3), ("a message", 1)]
)
def test_a_forked_holder_exits_with_the_status_python_gives_sys_exit(
    code: object, status: int
) -> None:
    assert _exit_status(SystemExit(code)) == status
