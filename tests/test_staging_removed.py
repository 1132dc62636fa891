"""A save whose staging dir someone else removed while it wrote: two jobs on one directory whose
``flock`` locks are not shared (bindfs over a directory, as two NFS clients locking locally),
where the job that took the lease over removes, at its start, what it takes for a dead writer's
staging dir. The save fails with :class:`~distckpt.LeaseLost` when its lease is gone, and with
:class:`~distckpt.StagingRemoved` while it still holds it, never with a bare
``FileNotFoundError``."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt import faults
from distckpt.lease import RootLease
from tests.filesystems import MountFactory
from tests.ranks import run_ranks, values

TIMEOUT = 20.0


def _at_the_shard_write(
    monkeypatch: pytest.MonkeyPatch, act: Callable[[], None], point: str = "before_shard_write"
) -> None:
    """Run ``act`` once, when the save reaches ``point``: by default ``before_shard_write``,
    its staging dir made, its shard not yet written (``after_shard_write``: written). A
    wrapper around the library's own fault point, because no other job's start can be
    scheduled into that window between two instructions any other way (the real race is the
    two-writers test in tests/test_filesystems_fuse.py)."""
    real_hit = faults.hit
    done: list[bool] = []

    def hit(reached: str, rank: int) -> None:
        if reached == point and not done:
            done.append(True)
            act()
        real_hit(reached, rank)

    monkeypatch.setattr(faults, "hit", hit)


def _remove_staging_dirs(root: Path) -> None:
    for staging in (root / ".staging").iterdir():
        if staging.is_dir():
            shutil.rmtree(staging)


def _another_job_starts(there: Path, leases: list[RootLease]) -> None:
    """What another job's start does where this job's locks do not reach: it takes the lease
    (the lease's own code, not a manager, which would need this rank's process group), then
    removes the staging dir it takes for a dead writer's."""
    leases.append(RootLease.acquire(there))
    _remove_staging_dirs(there)


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_a_save_whose_staging_dir_the_job_that_took_its_lease_removed_raises_lease_lost(
    mounts: MountFactory, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    bindfs = mounts.get("bindfs")
    assert bindfs.writable_source is not None
    name = f"staging-taken-{fmt}"
    here, there = bindfs.path / name, bindfs.writable_source / name
    leases: list[RootLease] = []
    with distckpt.CheckpointManager(here, timeout=TIMEOUT, fsync=False, format=fmt) as fenced:
        fenced.save(1, {"w": torch.zeros(4)})
        _at_the_shard_write(monkeypatch, lambda: _another_job_starts(there, leases))
        try:
            with pytest.raises(distckpt.LeaseLost) as lost:
                fenced.save(2, {"w": torch.ones(4)})
        finally:
            for lease in leases:
                lease.release()
    error = lost.value
    assert "was removed meanwhile" in str(error) and "lost its lease" in str(error)
    assert error.step == 2 and error.rank == 0
    assert error.path is not None and "/.staging/" in error.path
    with distckpt.CheckpointManager(there, read_only=True) as reader:
        assert reader.steps() == [1]


def _fenced_ranks(rank: int, world_size: int, here: str, there: str, point: str) -> dict[str, Any]:
    """Save step 1, then step 2 while another job takes the root over (rank 0, at ``point``)
    and removes the staging dir, which rank 1 waits for before it writes: rank 1's write
    fails, and rank 0's too when ``point`` comes before it."""
    leases: list[RootLease] = []

    def taken_over() -> None:
        _another_job_starts(Path(there), leases)

    def removed() -> None:
        deadline = time.monotonic() + TIMEOUT  # a bound on a hang, not a timed assertion
        while any(p.is_dir() for p in Path(there, ".staging").iterdir()):
            assert time.monotonic() < deadline, "the staging dir was never removed"
            time.sleep(0.01)

    with distckpt.CheckpointManager(here, timeout=TIMEOUT, fsync=False) as fenced:
        fenced.save(1, {"w": torch.full((4,), float(rank))})
        with pytest.MonkeyPatch.context() as monkeypatch:
            if rank == 0:
                _at_the_shard_write(monkeypatch, taken_over, point)
            else:
                _at_the_shard_write(monkeypatch, removed)
            try:
                fenced.save(2, {"w": torch.ones(4)})
            except distckpt.CheckpointError as exc:
                return {"type": type(exc).__name__, "error": str(exc), "step": exc.step}
            finally:
                for lease in leases:
                    lease.release()
    return {"type": None}


# after_shard_write: rank 0 wrote its shard whole, only rank 1 finds the dir gone, and only
# rank 0 can tell that the lease went with it
@pytest.mark.parametrize("point", ["before_shard_write", "after_shard_write"])
def test_every_rank_of_a_save_whose_staging_dir_the_lease_taker_removed_raises_lease_lost(
    mounts: MountFactory, point: str
) -> None:
    bindfs = mounts.get("bindfs")
    assert bindfs.writable_source is not None
    name = f"staging-taken-{point}"
    here, there = bindfs.path / name, bindfs.writable_source / name
    results = values(
        run_ranks(_fenced_ranks, 2, os.fspath(here), os.fspath(there), point, timeout=60)
    )
    for result in results:
        assert result["type"] == "LeaseLost" and result["step"] == 2, result
        assert "was removed meanwhile" in result["error"], result
        assert "lost its lease" in result["error"], result


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_a_save_whose_staging_dir_vanished_under_its_lease_raises_staging_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    root = tmp_path / "root"
    with distckpt.CheckpointManager(root, timeout=TIMEOUT, fsync=False, format=fmt) as manager:
        _at_the_shard_write(monkeypatch, lambda: _remove_staging_dirs(root))
        with pytest.raises(distckpt.StagingRemoved) as removed:
            manager.save(1, {"w": torch.ones(4)})
        error = removed.value
        assert isinstance(error, FileNotFoundError) and isinstance(error, distckpt.CheckpointError)
        assert "was removed meanwhile, by someone else" in str(error)
        assert error.step == 1 and error.rank == 0
        assert error.path is not None and Path(error.path).parent == root / ".staging"
        assert manager.steps() == []
        assert manager.save(1, {"w": torch.ones(4)}) is not None  # the lease is still held
