"""An ``overwrite=True`` whose new checkpoint the filesystem loses in the rename (``CommitLost``)
fails the save and keeps the old checkpoint under its name, by either way of replacing it: the
atomic exchange and the two-rename fallback."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import distckpt
from distckpt import events, fsutil
from distckpt.layout import step_dir_name
from distckpt.storage import posix_overwrite
from tests.filesystems import MountFactory
from tests.test_edge_cases import _two_dirs


def _shorten_the_staged_file_before_the_rename(root: Path) -> Callable[[], None]:
    """No filesystem here loses a file it renames (fusefat, which empties whole dirs, commits
    nothing to overwrite: tests/test_filesystems.py), so the new checkpoint's shard is cut to
    half just before the commit renames it, after the staged files were checked: when the
    commit's manifest phase ends, through the library's own phase listeners. Returns the
    function that removes the listener."""

    def shorten(event: events.PhaseEvent) -> None:
        staged = list(root.glob(".staging/step-00000002.*/*.pt"))
        if event.phase == "commit.manifest" and staged:
            os.truncate(staged[0], staged[0].stat().st_size // 2)

    return events.add_listener(shorten)


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_lost_overwrite_keeps_the_old_checkpoint(
    tmp_path: Path, mounts: MountFactory, exchange: bool
) -> None:
    if not exchange:  # bindfs (FUSE) cannot swap two names, as NFS: the two-rename fallback
        tmp_path = mounts.get("bindfs").path / "overwrite-lost"
        tmp_path.mkdir()
    _overwrite_a_lost_commit_keeps_the_old_one(tmp_path / "root", exchange)


def _overwrite_a_lost_commit_keeps_the_old_one(root: Path, exchange: bool) -> None:
    old_state = {"w": torch.arange(4.0)}
    assert fsutil.exchange_dirs(*_two_dirs(root.parent / "probe"), fsync=False) == exchange
    with distckpt.CheckpointManager(root) as mgr:
        mgr.save(1, {"w": torch.zeros(4)})
        mgr.save(2, old_state)
        stop_shortening = _shorten_the_staged_file_before_the_rename(root)
        try:
            with pytest.raises(distckpt.CommitLost) as raised:
                mgr.save(2, {"w": torch.ones(4)}, overwrite=True)
        finally:
            stop_shortening()
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


def test_a_failed_exchange_back_still_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The exchange that swaps the old checkpoint back fails: the undo falls back to the trash
    and a rename, and the save still raises ``CommitLost``. No filesystem here fails a second
    exchange in a row while the first succeeded (an ext4 error makes both the undo's renames
    fail as well, and the root read-only), so that one call fails, as an I/O error would."""

    def the_exchange_back_fails(a: Path, b: Path, *, fsync: bool) -> bool:
        raise OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(a))

    monkeypatch.setattr(posix_overwrite, "exchange_dirs", the_exchange_back_fails)
    with caplog.at_level(logging.ERROR, logger="distckpt"):
        _overwrite_a_lost_commit_keeps_the_old_one(tmp_path / "root", True)
    assert "could not exchange" in caplog.text
