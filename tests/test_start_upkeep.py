"""What a manager's start does to the root it opens, and what it never does: it repairs the links
(logging, not raising, when they cannot be repaired) and removes dead writers' leftovers, but
never removes a committed checkpoint, whatever the retention rules it is given (README: "a start
never removes a checkpoint"; docs/faults.md: "A failed clean-up never stops a start").

One process on a real directory: a start's upkeep runs on rank 0 alone."""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from pathlib import Path

import pytest
import torch

import distckpt
from distckpt.layout import (
    LEASE_LOCK_NAME,
    LEASE_RECORD_NAME,
    LOCK_NAME,
    TRASH_DIR_NAME,
    RootLayout,
    rank_file_name,
)
from distckpt.lease import read_holder, this_host
from tests.core_ranks import TIMEOUT, _weights
from tests.filesystems import MountFactory
from tests.lease_holders import _record_as_another_machine
from tests.ranks import run_ranks, values
from tests.waiting import after_rank_0_removals


def _save(root: Path, steps: tuple[int, ...]) -> None:
    with distckpt.CheckpointManager(root, fsync=False, timeout=TIMEOUT) as mgr:
        for step in steps:
            mgr.save(step, {"w": _weights(step, 0)})


def test_a_start_with_a_stricter_retention_removes_no_checkpoint(root: Path) -> None:
    """A job opening the root with ``keep_last=1`` to restore an older step must find it there:
    retention runs at the next commit or ``prune``, never at a start."""
    _save(root, (1, 2, 3))
    with distckpt.CheckpointManager(root, fsync=False, timeout=TIMEOUT, keep_last=1) as mgr:
        after_rank_0_removals(mgr)
        assert mgr.steps() == [1, 2, 3]
        template = {"w": torch.zeros(3)}
        assert mgr.restore(1, state=template).step == 1
        assert torch.equal(template["w"], _weights(1, 0))
    assert sorted(entry.name for entry in root.glob("step-*")) == [
        "step-00000001",
        "step-00000002",
        "step-00000003",
    ]


def test_a_start_whose_links_cannot_be_repaired_opens_and_says_so(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``last`` left a directory by another tool, and the trash a file, so the directory cannot
    be moved aside: the repair fails with an OSError, which the start logs; the job restores
    its newest checkpoint and saves on."""
    _save(root, (1, 2))
    (root / "last").unlink()
    (root / "last").mkdir()
    (root / TRASH_DIR_NAME).write_text("not a directory\n")
    with (
        caplog.at_level(logging.ERROR, logger="distckpt"),
        distckpt.CheckpointManager(root, fsync=False, timeout=TIMEOUT) as mgr,
    ):
        assert f"could not repair the links of {root}" in caplog.text
        template = {"w": torch.zeros(3)}
        assert mgr.restore("last", state=template).step == 2
        assert torch.equal(template["w"], _weights(2, 0))
        assert mgr.save(3, {"w": _weights(3, 0)}).step == 3
        assert mgr.steps() == [1, 2, 3]


def test_a_start_removes_links_naming_a_damaged_checkpoint_when_none_is_whole(root: Path) -> None:
    """``last`` and ``best`` never name a damaged checkpoint once a start repaired them: with
    no whole checkpoint to point at, they go (README: "`last`/`best` never dangle")."""
    with distckpt.CheckpointManager(root, fsync=False, timeout=TIMEOUT, monitor="loss") as mgr:
        mgr.save(1, {"w": _weights(1, 0)}, metrics={"loss": 0.5})
    assert (root / "last").is_symlink() and (root / "best").is_symlink()
    os.truncate(root / "step-00000001" / rank_file_name(0), 10)
    with distckpt.CheckpointManager(root, fsync=False, timeout=TIMEOUT, monitor="loss") as mgr:
        assert not (root / "last").is_symlink() and not (root / "last").exists()
        assert not (root / "best").is_symlink() and not (root / "best").exists()
        assert (root / "step-00000001").is_dir()  # passed over, not removed


def test_a_start_and_restore_on_a_root_whose_only_checkpoint_is_damaged_say_so_once_each(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A requeued job whose only checkpoint is damaged is told so by each look at it (the
    start's link repair, its search for the newest, the restore's), not once per re-listing of
    a root where nothing changed."""
    _save(root, (1,))
    os.truncate(root / "step-00000001" / rank_file_name(0), 10)
    with (
        caplog.at_level(logging.WARNING, logger="distckpt"),
        distckpt.CheckpointManager(root, fsync=False, timeout=TIMEOUT) as mgr,
    ):
        assert mgr.restore("last", state={"w": torch.zeros(3)}, missing_ok=True) is None
    damaged = [r for r in caplog.records if r.getMessage().startswith("skipping damaged")]
    assert 1 <= len(damaged) <= 3, [r.getMessage() for r in damaged]


def _start_that_rank_1_cannot_see(rank: int, world_size: int, parent: str) -> tuple[str, bool]:
    """Both ranks name the root ``ckpt`` relative to their working directory, which is not the
    same directory on rank 1: rank 0 opens the root (taking its lease), rank 1 finds none. The
    error, and whether the root's lease is free on rank 0 right after its failed start (rank 1
    may raise before rank 0 let go: only rank 0 looks)."""
    os.chdir(parent if rank == 0 else tempfile.mkdtemp(dir=parent))
    try:
        distckpt.CheckpointManager("ckpt", fsync=False, timeout=TIMEOUT)
    except distckpt.CheckpointError as exc:
        return type(exc).__name__, rank != 0 or read_holder(Path(parent, "ckpt")) is None
    raise AssertionError("the start did not fail")


def test_a_start_failing_on_another_rank_releases_the_lease_rank_0_took(tmp_path: Path) -> None:
    out = values(run_ranks(_start_that_rank_1_cannot_see, 2, str(tmp_path), timeout=60))
    assert out == [("RootNotWritable", True)] * 2


def test_link_symlink_where_symlinks_are_refused_fails_the_start_not_a_later_link_swap(
    mounts: MountFactory,
) -> None:
    """The start finds out whether the root takes symlinks, so that ``link="symlink"`` on one
    that refuses them is refused before anything is saved, rather than leaving every commit
    without its ``last``."""
    root = mounts.get("exfat").path / "start-symlink-refused"  # exFAT refuses symlinks
    with pytest.raises(distckpt.RootNotWritable, match="refuses symlinks"):
        distckpt.CheckpointManager(root, link="symlink", fsync=False, timeout=TIMEOUT)
    assert read_holder(root) is None
    # its lock files alone: no probe of the filesystem left, no staging dir
    assert sorted(entry.name for entry in root.iterdir()) == [
        LEASE_LOCK_NAME,
        LEASE_RECORD_NAME,
        LOCK_NAME,
    ]


class _ProbeLettingGoOnceTheStartFindsItHeld(logging.Handler):
    """A stand-in probe's hold of the lease lock (``distckpt ls`` or ``lease`` holds it for an
    instant): an flock of its own open file, as another process's would be (the library locks
    with flock: one open file excludes another, in one process too). It lets go when filelock
    says a try of the lock found it held (its line before each pause between tries), in the
    start's own thread: the start has met the probe by then, and takes the lock at a later try
    only if it keeps trying past that instant. No timer decides whether it comes in time."""

    def __init__(self, lock_path: str) -> None:
        super().__init__(logging.DEBUG)
        self.lock_path = lock_path
        self.held: int | None = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(self.held, fcntl.LOCK_EX)
        self.tries_that_met_it = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.held is not None and "not acquired on" in message and self.lock_path in message:
            self.tries_that_met_it += 1
            self.let_go()

    def let_go(self) -> None:
        if self.held is not None:
            os.close(self.held)
            self.held = None


def test_a_start_that_does_not_wait_outlasts_a_probe_of_the_lease_lock(root: Path) -> None:
    """``distckpt ls`` or ``lease`` holds the lease's lock for an instant: a start with
    ``wait_for_root=0`` that comes right then, on a root whose record names a holder on another
    machine that died (its lock there gone with it, as on NFS with a lock manager), takes the
    root over once the probe lets go, and is not refused as if that holder lived."""
    _save(root, (1,))
    _record_as_another_machine(root, host=this_host() + "-node-b")
    probe = _ProbeLettingGoOnceTheStartFindsItHeld(os.fspath(RootLayout(root).lease_lock_path))
    filelock_log = logging.getLogger("filelock")
    level = filelock_log.level
    filelock_log.addHandler(probe)
    filelock_log.setLevel(logging.DEBUG)
    try:
        with distckpt.CheckpointManager(root, fsync=False, timeout=TIMEOUT) as mgr:
            assert mgr.steps() == [1]
            holder = read_holder(root)
            assert holder is not None and holder.pid == os.getpid() and holder.generation == 4
    finally:
        filelock_log.removeHandler(probe)
        filelock_log.setLevel(level)
        probe.let_go()
    assert probe.tries_that_met_it == 1
