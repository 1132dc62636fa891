"""An ``overwrite=True`` whose new checkpoint the filesystem loses in the rename (``CommitLost``)
fails the save and keeps the old checkpoint under its name, by either way of replacing it: the
atomic exchange and the two-rename fallback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import distckpt
from distckpt import faults, fsutil
from distckpt.layout import step_dir_name


def _shorten_the_staged_file_before_the_rename(root: Path) -> None:
    """No filesystem here loses a file it renames (fusefat, which empties whole dirs, commits
    nothing to overwrite: tests/test_filesystems.py), so the new checkpoint's shard is cut to
    half just before the commit renames it, after the staged files were checked."""
    real_hit = faults.hit

    def shorten(point: str, rank: int) -> None:
        staged = list(root.glob(".staging/step-00000002.*/*.pt"))
        if point == "before_rename" and staged:
            os.truncate(staged[0], staged[0].stat().st_size // 2)
        real_hit(point, rank)

    faults.hit = shorten  # the store calls it through the module


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_lost_overwrite_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    root = tmp_path / "root"
    old_state = {"w": torch.arange(4.0)}
    if not exchange:
        # Every local filesystem of this machine exchanges two names; the one switch that
        # selects the fallback (as on NFS) is turned.
        monkeypatch.setattr(fsutil, "_RENAMEAT2", None)
    monkeypatch.setattr(faults, "hit", faults.hit)  # restored after the test
    with distckpt.CheckpointManager(root) as mgr:
        mgr.save(1, {"w": torch.zeros(4)})
        mgr.save(2, old_state)
        _shorten_the_staged_file_before_the_rename(root)
        with pytest.raises(distckpt.CommitLost) as raised:
            mgr.save(2, {"w": torch.ones(4)}, overwrite=True)
        assert "the checkpoint it was to replace is kept" in str(raised.value)
        assert mgr.steps() == [1, 2]
        restored = mgr.restore("last", state={"w": torch.empty(4)})
        assert restored.step == 2 and torch.equal(restored.state["w"], old_state["w"])
    assert distckpt.verify(root).ok
    assert fsutil.read_link(root / "last") == step_dir_name(2)
    with distckpt.CheckpointManager(root) as mgr:  # its start empties the trash
        assert mgr.steps() == [1, 2]
        assert torch.equal(
            mgr.restore("last", state={"w": torch.empty(4)}).state["w"], old_state["w"]
        )
    assert not list(root.glob(".trash/*"))
