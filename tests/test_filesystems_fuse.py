"""What FUSE mounts (bindfs, fuse2fs; see tests/filesystems.py) keep or do not share: files
removed while open left as ``.fuse_hidden*``, ``flock`` locks that do not reach another job
through the mount, and renames that cannot exchange two names, which an overwrite then works
around."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

import distckpt
from distckpt import faults
from distckpt.fsutil import exchange_dirs, probe_writable, read_link
from distckpt.lock import WriterLock
from tests.filesystem_saves import (
    TIMEOUT,
    _cli_job,
    _hidden_files_settle,
    _save_one,
)
from tests.filesystems import MountFactory
from tests.ranks import run_ranks, values
from tests.waiting import after_rank_0_removals


def _cli(*args: str) -> tuple[int, str]:
    """The ``distckpt`` command line's exit code and output, in a process of its own."""
    return values(run_ranks(_cli_job, 0, list(args), timeout=120))[0]


# ---------------------------------------------------------------- files held open


@pytest.mark.parametrize("name", ["bindfs", "fuse2fs"])
def test_writer_locks_and_probes_leave_nothing_hidden(mounts: MountFactory, name: str) -> None:
    """A writer lock file and a write probe are removed while still open: a file removed
    just after its close races the FUSE daemon's asynchronous handling of that close, and
    2 to 6 in 100 were left as ``.fuse_hidden*`` for good (34 of these 600 before the fix)."""
    staging = mounts.get(name).path / "locks" / ".staging"
    staging.mkdir(parents=True)
    for number in range(300):
        claim = WriterLock(staging / f"step-{number:08d}.token")
        claim.acquire()
        claim.release()
        probe_writable(staging.parent)
    assert _hidden_files_settle(staging.parent) == []
    assert sorted(os.listdir(staging)) == [] and sorted(os.listdir(staging.parent)) == [".staging"]


@pytest.mark.parametrize("name", ["bindfs", "fuse2fs"])
def test_file_held_open_in_trash_is_in_use_then_collected(mounts: MountFactory, name: str) -> None:
    """A FUSE filesystem keeps an unlinked file that a reader holds open as .fuse_hidden*: it is
    reported in use (never as a dead writer's leftover) and removed once nobody holds it."""
    root = mounts.get(name).path / "held"
    values(run_ranks(_save_one, 2, os.fspath(root), timeout=90))
    doomed = root / ".trash" / "step-00000001.0123"
    doomed.mkdir(parents=True)
    (doomed / "rank-00000.pt").write_bytes(b"x" * 100)
    with open(doomed / "rank-00000.pt", "rb"):  # a reader that has not finished
        gc_code, gc_out = _cli("gc", os.fspath(root))
        hidden = [p for p in (doomed).iterdir() if p.name.startswith(".fuse_hidden")]
        assert hidden, f"{name} did not keep the open file as .fuse_hidden*: {gc_out}"
        listed = _cli("ls", os.fspath(root))[1]
        assert "in use" in listed and "dead writer" not in listed, listed
        assert "nothing to collect" not in gc_out and gc_code != 0, gc_out
    time.sleep(0.2)  # the FUSE daemon releases the hidden file when the last handle closes
    assert _cli("gc", os.fspath(root))[0] == 0
    assert not doomed.exists()


# ---------------------------------------------------------------- two writers, unshared locks


# The other job opens its manager first (its start-up cleanup would take this job's staging
# dir for a dead writer's: the writer lock does not reach it either), then saves on request.
_OTHER_WRITER = """
import sys, torch, distckpt
with distckpt.CheckpointManager(sys.argv[1], timeout=20) as mgr:
    print("open", flush=True)
    sys.stdin.readline()
    try:
        mgr.save(1, {"w": torch.ones(4)})
    except distckpt.LeaseLost as exc:
        print("fenced:", exc, flush=True)
        sys.exit(3)
"""


def test_two_writers_the_lock_does_not_reach_never_both_commit(mounts: MountFactory) -> None:
    """Two jobs on one directory whose ``flock`` locks are not shared: here bindfs and the
    directory under it (flock on a bindfs mount does not reach the underlying directory), as
    on two NFS clients with local locks. The lease *record* still reaches both: the job that
    opened the root last holds it, and the other one's save is fenced with ``LeaseLost``,
    nothing of it visible."""
    bindfs = mounts.get("bindfs")
    assert bindfs.writable_source is not None
    here, there = bindfs.path / "two-writers", bindfs.writable_source / "two-writers"
    other = subprocess.Popen(
        [sys.executable, "-c", _OTHER_WRITER, os.fspath(there)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout is not None and other.stdout.readline() == "open\n"
        with distckpt.CheckpointManager(here, timeout=TIMEOUT) as mgr:
            # This job's start-up removal of dead writers' leftovers runs in the background;
            # the writer lock does not reach the other job either, so that removal, still
            # running, would take the other job's save in progress for a dead writer's.
            after_rank_0_removals(mgr)
            out, err = other.communicate("save\n", timeout=120)
            assert other.returncode == 3 and "fenced:" in out, err
            assert mgr.save(1, {"w": torch.zeros(4)}) is not None
    finally:
        if other.returncode is None:
            other.kill()
            other.wait()
    loaded = distckpt.load_checkpoint(here)
    assert loaded.step == 1 and torch.equal(loaded.state["w"], torch.zeros(4))
    assert [p for p in (here / ".staging").iterdir() if p.is_dir()] == []


def test_a_step_committed_between_the_lease_check_and_the_rename(
    mounts: MountFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one window the lease record leaves on such mounts: another writer's ``step-N``
    lands between this commit's check under the lock and its rename. The rename must then
    fail saying so (``ConcurrentCommit``), not "Directory not empty". The other writer's
    rename is made here by a hook at our own fault point (a real directory on the real mount),
    because no second job can be scheduled into that window any other way."""
    bindfs = mounts.get("bindfs")
    assert bindfs.writable_source is not None
    here = bindfs.path / "collision"
    real_hit = faults.hit

    def another_writer_renames_first(point: str, rank: int) -> None:
        if point == "before_rename":
            landed = here / "step-00000001"
            landed.mkdir()
            (landed / "rank-00000.pt").write_bytes(b"the other writer's data")
        real_hit(point, rank)

    monkeypatch.setattr(faults, "hit", another_writer_renames_first)
    with (
        distckpt.CheckpointManager(here, timeout=TIMEOUT) as mgr,
        pytest.raises(distckpt.ConcurrentCommit) as info,
    ):
        mgr.save(1, {"w": torch.zeros(4)})
    message = str(info.value)
    assert "step 1 was committed by another writer meanwhile" in message
    assert "does not reach that writer" in message and "NFS" in message
    assert isinstance(info.value, FileExistsError) and info.value.step == 1
    assert (here / "step-00000001" / "rank-00000.pt").read_bytes() == b"the other writer's data"
    assert [p for p in (here / ".staging").iterdir() if p.is_dir()] == []


def test_an_error_between_the_two_renames_of_an_overwrite_puts_the_old_step_back(
    mounts: MountFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where two names cannot be exchanged (bindfs refuses RENAME_EXCHANGE), ``overwrite=True``
    moves the old step into the trash, then renames the new one into place. Between the two,
    ``last`` already names a step that is there (the links moved off the old one first, so a
    crash there leaves no link naming nothing). An error raised between the two (an injected
    one here: a real one is an I/O error) fails the save and, as a failed save leaves the root
    as it was, the old step is renamed back, not left in the trash to be deleted."""
    root = mounts.get("bindfs").path / "overwrite-error"
    linked_between: list[bool] = []
    real_hit = faults.hit

    def look_at_last_between_the_renames(point: str, rank: int) -> None:
        if point == "during_delete":
            linked_between.append((root / str(read_link(root / "last"))).is_dir())
        real_hit(point, rank)

    # A spy (the fault still fires): it looks at the disk at our own fault point, the same
    # instant a job killed there would leave, and cheaper than starting and killing one.
    monkeypatch.setattr(faults, "hit", look_at_last_between_the_renames)
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    assert not exchange_dirs(root / "a", root / "b", fsync=False)  # the fallback runs here
    (root / "a").rmdir()
    (root / "b").rmdir()
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        mgr.save(1, {"w": torch.ones(1)})
        mgr.save(2, {"w": torch.full((1,), 2.0)})
        faults.arm("during_delete", "raise", rank=0)
        try:
            with pytest.raises(Exception, match="during_delete"):
                mgr.save(2, {"w": torch.full((1,), 20.0)}, overwrite=True)
        finally:
            faults.disarm()
        assert linked_between == [True]
        assert mgr.steps() == [1, 2]
        assert os.readlink(root / "last") == "step-00000002"
        assert not (root / ".trash").exists() or os.listdir(root / ".trash") == []
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        assert mgr.steps() == [1, 2]
        assert torch.equal(mgr.restore(2, verify=True).state["w"], torch.full((1,), 2.0))
