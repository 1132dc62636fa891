"""A ``read_only=True`` manager never writes to its root (README, "Read-only roots": no lock
file, no cleanup or link repair), even in a writable directory holding what a writing start
would remove, and it never creates a root that is missing.

One process on a real directory: a start's upkeep is rank 0's alone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import distckpt
from distckpt.layout import TRASH_DIR_NAME
from tests.core_ranks import TIMEOUT, _weights
from tests.filesystems import tree_snapshot
from tests.waiting import after_rank_0_removals


def test_a_read_only_manager_leaves_the_trash_and_a_dead_writers_staging(root: Path) -> None:
    with distckpt.CheckpointManager(root, fsync=False, timeout=TIMEOUT) as mgr:
        for step in (1, 2):
            mgr.save(step, {"w": _weights(step, 0)})
    # what a job killed while emptying the trash, and one killed mid-save, leave behind
    (root / TRASH_DIR_NAME / "step-00000000").mkdir(parents=True)
    dead_staging = root / ".staging" / "step-00000003.deadbeef"
    dead_staging.mkdir()
    (dead_staging / "rank-00000.pt").write_bytes(b"partial")
    # one step behind, as a crash between a commit and its link swap leaves it: a writing
    # start would repair it
    (root / "last").unlink()
    os.symlink("step-00000001", root / "last")
    before = tree_snapshot(root)
    with distckpt.CheckpointManager(root, read_only=True, timeout=TIMEOUT) as mgr:
        after_rank_0_removals(mgr)
        template = {"w": torch.zeros(3)}
        assert mgr.restore("last", state=template).step == 2
        assert torch.equal(template["w"], _weights(2, 0))
    assert tree_snapshot(root) == before


def test_a_read_only_manager_of_a_missing_root_says_so_and_creates_nothing(tmp_path: Path) -> None:
    root = tmp_path / "missing" / "ckpt"
    with pytest.raises(distckpt.RootNotWritable, match="opened read-only: it is not created"):
        distckpt.CheckpointManager(root, read_only=True, timeout=TIMEOUT)
    assert not (tmp_path / "missing").exists()
