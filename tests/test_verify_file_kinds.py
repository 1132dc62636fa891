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


def _cli_output(rank: int, world_size: int, *args: str) -> tuple[int, str]:
    """``distckpt ARGS`` in a process of its own (see :func:`_verify_lines`)."""
    out = run_cli(*args)
    return out.returncode, out.stdout + out.stderr


def test_a_manifest_that_is_a_fifo_is_named_not_read(tmp_path: Path) -> None:
    """A FIFO in place of ``manifest.json`` blocked verify, ls and info for good: each names
    it and goes on (ls lists its step as damaged)."""
    root = tmp_path / "root"
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        mgr.save(1, {"w": torch.zeros(2)})
        mgr.save(2, {"w": torch.ones(2)})
    manifest = root / "step-00000002" / "manifest.json"
    manifest.unlink()
    os.mkfifo(manifest)
    named = f"{manifest}: is a FIFO; checkpoint files must be regular files"
    for args, expected_code, expected_text in (
        (("verify", os.fspath(root)), 1, named),
        (("ls", os.fspath(root)), 0, "DAMAGED (run verify)"),
        (("info", os.fspath(manifest.parent)), 2, named),
    ):
        code, text = values(run_ranks(_cli_output, 0, *args, timeout=60))[0]
        assert code == expected_code, (args, text)
        assert expected_text in text, (args, text)


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


def test_a_manifest_that_is_a_directory_is_named_and_its_fd_closed(tmp_path: Path) -> None:
    """A directory in place of ``manifest.json`` opens (read-only), so what was opened must be
    closed when it is refused: each refusal names the file, none leaves an fd open."""
    step_dir = tmp_path / "step-00000001"
    (step_dir / "manifest.json").mkdir(parents=True)
    open_fds = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(distckpt.CorruptCheckpoint) as err:
            distckpt.manifest.read_manifest(step_dir)
        assert str(err.value) == (
            f"{step_dir / 'manifest.json'}: is a directory; checkpoint files must be regular files"
        )
    assert len(os.listdir("/proc/self/fd")) == open_fds
