"""``verify`` of a checkpoint whose listed files are not what they were: one that is no
regular file is named and never opened, and one that vanishes between the check of its size
and the read of its bytes (its checkpoint deleted by a live job's retention) is missing, which
a root's verify leaves out as it leaves out any checkpoint deleted while it is checked."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

import distckpt
import distckpt.manifest
from tests.cli_runner import run_cli
from tests.ranks import run_ranks, values


def _verify_lines(rank: int, world_size: int, root: str) -> tuple[int, list[str]]:
    """``distckpt verify ROOT`` in a process of its own: a regression that opens a FIFO
    blocks there, and fails the test by the timeout of ``run_ranks`` instead of hanging it."""
    out = run_cli("verify", root)
    return out.returncode, out.stdout.splitlines()


@pytest.mark.parametrize("kind", ["FIFO", "directory", "socket"])
def test_a_listed_file_that_is_no_regular_file_is_named_not_opened(
    tmp_path: Path, kind: str
) -> None:
    root = tmp_path / "root"
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        mgr.save(1, {"w": torch.zeros(2)}, files={"notes.txt": b""})
    notes = root / "step-00000001" / "notes.txt"
    notes.unlink()
    if kind == "FIFO":
        os.mkfifo(notes)
    elif kind == "directory":
        notes.mkdir()
    else:
        listening = socket.socket(socket.AF_UNIX)
        listening.bind(os.fspath(notes))
        listening.close()
    code, lines = values(run_ranks(_verify_lines, 0, os.fspath(root), timeout=60))[0]
    assert code == 1, lines
    expected = f"{notes}: is a {kind}; checkpoint files must be regular files"
    assert any(expected in line for line in lines), lines


def test_a_checkpoint_deleted_between_size_and_checksum_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention deletes step 1 right after verify checked its files' sizes and before it
    opens the first one to checksum it: verify reports step 2 alone, and no damage."""
    root = tmp_path / "root"
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        for step in (1, 2):
            mgr.save(step, {"w": torch.full((4,), float(step))})
    step_dir = root / "step-00000001"
    real_checksum = distckpt.manifest.file_checksum
    deleted: list[Path] = []

    def deleted_first(path: Path, *args: object) -> str:
        # The window between the lstat and the open is a few instructions wide: no real
        # process can be made to land in it on cue, so the deletion a live job's retention
        # makes (renaming the dir away) is done here, on the real filesystem, and the real
        # checksum then opens a file that is really gone.
        if not deleted and Path(path).parent == step_dir:
            shutil.move(step_dir, tmp_path / "deleted")
            deleted.append(step_dir)
        return real_checksum(path, *args)

    monkeypatch.setattr(distckpt.manifest, "file_checksum", deleted_first)
    report = distckpt.verify(root)
    assert deleted == [step_dir]
    assert report.ok, str(report)
    assert [checkpoint.step for checkpoint in report.checkpoints] == [2]
