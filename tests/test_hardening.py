"""Hardening: link modes, whatever a crash or another tool leaves in a root (at ``last``, in
staging, a link leaving the root) and a SIGKILL mid-save."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import filelock
import pytest
import torch

import distckpt
from distckpt import faults
from tests.core_ranks import JOB_TIMEOUT, TIMEOUT, _staging_entries, _weights
from tests.fault_checks import entries as _entries
from tests.filesystems import MountFactory
from tests.hardening_steps import _err, _save
from tests.ranks import run_ranks, values
from tests.waiting import after_rank_0_removals


def _restored(step: int, world_size: int = 2) -> list[tuple[int, list[float]]]:
    return [(step, _weights(step, rank).tolist()) for rank in range(world_size)]


def _clear_last(root: Path) -> None:
    link = root / "last"
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)


def _point_last_at(root: Path, target: str, *, pointer: bool = False) -> None:
    """Repoint ``root/last`` the way another tool (or an older crash) might have left it."""
    link = root / "last"
    _clear_last(root)
    if pointer:
        link.write_text(target + "\n")
    else:
        os.symlink(target, link)


# --------------------------------------------------------------------------- link modes


def _pointer_job(rank: int, world_size: int, root: str) -> tuple[int, list[float]]:
    with distckpt.CheckpointManager(root, link="pointer", timeout=TIMEOUT) as mgr:
        for step in (1, 2):
            mgr.save(step, {"w": _weights(step, rank)})
        template = {"w": torch.zeros(3)}
        return mgr.restore("last", state=template).step, template["w"].tolist()


def test_pointer_link_is_a_regular_file_naming_the_step_dir(root: Path) -> None:
    out = values(run_ranks(_pointer_job, 2, str(root), timeout=JOB_TIMEOUT))
    assert out == _restored(2)
    last = root / "last"
    assert last.is_file() and not last.is_symlink()
    assert last.read_text().strip() == "step-00000002"
    for rank in range(2):
        ckpt = distckpt.load_checkpoint(last, rank=rank)
        assert ckpt.step == 2
        assert torch.equal(ckpt.state["w"], _weights(2, rank))
    # An "auto" manager reads a pointer file another job wrote, and keeps "last" correct.
    assert _save(root, (3,))[0]["restored"] == _restored(3)[0]
    assert os.readlink(last) == "step-00000003"


def test_auto_link_falls_back_to_a_pointer_file_when_symlink_is_refused(
    mounts: MountFactory, caplog: pytest.LogCaptureFixture
) -> None:
    root = mounts.get("exfat").path / "hardening-auto-link"  # exFAT refuses symlinks
    caplog.set_level(logging.WARNING, logger="distckpt")
    with distckpt.CheckpointManager(root, link="auto", timeout=TIMEOUT) as mgr:
        for step in (1, 2):
            mgr.save(step, {"w": _weights(step, 0)})
        template = {"w": torch.zeros(3)}
        assert mgr.restore("last", state=template).step == 2
    assert torch.equal(template["w"], _weights(2, 0))
    last = root / "last"
    assert last.is_file() and not last.is_symlink()
    assert last.read_text().strip() == "step-00000002"
    assert "symlink" in caplog.text
    assert distckpt.load_checkpoint(last).step == 2
    assert distckpt.load_checkpoint(root).step == 2


def _save_refusing_symlinks(rank: int, world_size: int, root: str) -> tuple[int, list[float]]:
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": _weights(step, rank)})
        template = {"w": torch.zeros(3)}
        return mgr.restore(root + "/last", state=template).step, template["w"].tolist()


def test_auto_link_falls_back_on_every_rank_of_a_job(mounts: MountFactory) -> None:
    root = mounts.get("exfat").path / "hardening-every-rank"  # exFAT refuses symlinks
    out = values(run_ranks(_save_refusing_symlinks, 2, str(root), timeout=JOB_TIMEOUT))
    assert out == _restored(3)
    assert not (root / "last").is_symlink()
    assert (root / "last").read_text().strip() == "step-00000003"


# --------------------------------------------------------------------------- what sits at last


def _junk_file(root: Path, outside: Path) -> None:
    _clear_last(root)
    (root / "last").write_bytes(b"\x00\xffnot a pointer\nsecond line\n")


def _symlink_elsewhere(root: Path, outside: Path) -> None:
    _point_last_at(root, os.fspath(outside))


def _real_directory(root: Path, outside: Path) -> None:
    _clear_last(root)
    (root / "last").mkdir()
    (root / "last" / "notes.txt").write_text("left by another tool")
    (root / "last" / "sub").mkdir()
    (root / "last" / "sub" / "more.bin").write_bytes(b"123")


@pytest.mark.parametrize("sabotage", [_junk_file, _symlink_elsewhere, _real_directory])
def test_whatever_sits_at_last_is_replaced_safely(
    tmp_path: Path, root: Path, sabotage: Callable[[Path, Path], None]
) -> None:
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "data.txt").write_text("must survive")
    _save(root, (1,))
    sabotage(root, outside)

    out = _save(root, (2,))
    assert [o["restored"] for o in out] == _restored(2)
    assert os.readlink(root / "last") == "step-00000002"
    # Replacing a link must never delete what it pointed at.
    assert (outside / "data.txt").read_text() == "must survive"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000001", "step-00000002"]
    assert _entries(root / ".trash") == []
    assert not [p for p in root.iterdir() if p.name.startswith(".last")]


@pytest.mark.parametrize("sabotage", [_junk_file, _symlink_elsewhere, _real_directory])
def test_whatever_sits_at_last_of_a_new_root_is_replaced(
    tmp_path: Path, root: Path, sabotage: Callable[[Path, Path], None]
) -> None:
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "data.txt").write_text("must survive")
    root.mkdir()
    sabotage(root, outside)
    out = _save(root, (1,))
    assert [o["restored"] for o in out] == _restored(1)
    assert os.readlink(root / "last") == "step-00000001"
    assert (outside / "data.txt").read_text() == "must survive"


# --------------------------------------------------------------------------- crash leftovers


@pytest.mark.parametrize("tamper", ["older symlink", "older pointer", "deleted"])
def test_last_one_step_behind_is_ignored_and_repaired(
    root: Path, tamper: str, caplog: pytest.LogCaptureFixture
) -> None:
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": _weights(step, 0)})
        # A crash between the rename of step-3 and the link swap leaves "last" behind.
        if tamper == "deleted":
            (root / "last").unlink()
        else:
            _point_last_at(root, "step-00000001", pointer=tamper == "older pointer")
        with caplog.at_level(logging.WARNING, logger="distckpt"):
            template = {"w": torch.zeros(3)}
            assert mgr.restore("last", state=template).step == 3
            assert torch.equal(template["w"], _weights(3, 0))
            assert mgr.restore(root / "last").step == 3
        assert distckpt.load_checkpoint(root / "last").step == 3
        assert mgr.latest_step() == 3
    if tamper != "deleted":
        assert "step-00000001" in caplog.text  # says which link it did not follow

    distckpt.CheckpointManager(root, timeout=TIMEOUT).close()
    assert os.readlink(root / "last") == "step-00000003"


def _crash_after_rename(rank: int, world_size: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        for step in (1, 2):
            mgr.save(step, {"w": _weights(step, rank)})
        faults.arm("after_rename", "raise", rank=0)
        try:
            out["saved"] = mgr.save(3, {"w": _weights(3, rank)}).step
        except distckpt.CheckpointError as exc:
            out["error"] = _err(exc)
        if rank == 0:
            out["link"] = os.readlink(Path(root) / "last")
        template = {"w": torch.zeros(3)}
        out["restored"] = (mgr.restore("last", state=template).step, template["w"].tolist())
        out["latest"] = mgr.latest_step()
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        if rank == 0:
            out["repaired"] = os.readlink(Path(root) / "last")
        out["next"] = mgr.save(4, {"w": _weights(4, rank)}).step
    return out


def test_failure_between_rename_and_link_swap(root: Path) -> None:
    out = values(run_ranks(_crash_after_rename, 2, str(root), timeout=JOB_TIMEOUT))
    for rank, rank_out in enumerate(out):
        # Once renamed, the checkpoint is committed: an error updating the derived link is
        # logged, and the save succeeds on every rank; the link is repaired later.
        assert "error" not in rank_out and rank_out["saved"] == 3
        assert rank_out["restored"] == (3, _weights(3, rank).tolist())
        assert rank_out["latest"] == 3
        assert rank_out["next"] == 4
    assert out[0]["link"] == "step-00000002"
    assert out[0]["repaired"] == "step-00000003"
    assert _staging_entries(root) == []


def _killed_after_rename(rank: int, world_size: int, root: str) -> None:
    faults.arm("after_rename", "kill", nth=2)
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        for step in (1, 2):
            mgr.save(step, {"w": _weights(step, rank)})


def test_kill_between_rename_and_link_swap(root: Path) -> None:
    out = run_ranks(_killed_after_rename, 0, str(root), timeout=JOB_TIMEOUT, expect_killed=True)
    assert out == []  # the process died by SIGKILL
    assert os.readlink(root / "last") == "step-00000001"
    assert (root / "step-00000002" / "manifest.json").is_file()
    assert distckpt.load_checkpoint(root / "last").step == 2

    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        assert os.readlink(root / "last") == "step-00000002"
        assert mgr.latest_step() == 2
        after_rank_0_removals(mgr)
        assert _staging_entries(root) == []  # the dead writer's lock file too


def test_staging_of_dead_writers_is_removed_and_of_live_ones_kept(root: Path) -> None:
    _save(root, (1,))
    staging = root / ".staging"
    no_lock = staging / "step-00000005.deadbeef"
    stale_lock = staging / "step-00000006.deadbeef"
    live = staging / "step-00000007.feedface"
    for directory in (no_lock, stale_lock, live):
        directory.mkdir()
        (directory / "rank-00000.pt").write_bytes(b"partial")
    (staging / "step-00000006.deadbeef.lock").touch()  # its holder died: the kernel let go
    holder = filelock.FileLock(os.fspath(staging / "step-00000007.feedface.lock"))
    holder.acquire()
    try:
        out = _save(root, (2,))
        assert [o["restored"] for o in out] == _restored(2)
        assert not no_lock.exists()
        assert not stale_lock.exists()
        assert (live / "rank-00000.pt").read_bytes() == b"partial"
        assert _staging_entries(root) == ["step-00000007.feedface", "step-00000007.feedface.lock"]
    finally:
        holder.release()


# --------------------------------------------------------------------------- links leaving root


def _copy_outside(tmp_path: Path, root: Path) -> Path:
    """A valid checkpoint of a higher step outside ``root``: following a link to it would
    restore step 9 instead of the root's own newest."""
    other = tmp_path / "other"
    with distckpt.CheckpointManager(other, timeout=TIMEOUT) as mgr:
        mgr.save(9, {"w": _weights(9, 0)})
    shutil.copytree(other / "step-00000009", root.parent / "step-00000009")
    return other


@pytest.mark.parametrize(
    ("target", "pointer"),
    [
        ("other root", False),
        ("other step dir", False),
        ("../step-00000009", False),
        ("../step-00000009", True),
    ],
)
def test_last_pointing_outside_the_root_is_not_followed(
    tmp_path: Path, root: Path, target: str, pointer: bool, caplog: pytest.LogCaptureFixture
) -> None:
    other = _copy_outside(tmp_path, root)
    if target == "other root":
        target = os.fspath(other)
    elif target == "other step dir":
        target = os.fspath(other / "step-00000009")
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        for step in (1, 2):
            mgr.save(step, {"w": _weights(step, 0)})
        _point_last_at(root, target, pointer=pointer)
        with caplog.at_level(logging.WARNING, logger="distckpt"):
            template = {"w": torch.zeros(3)}
            assert mgr.restore("last", state=template).step == 2
            assert torch.equal(template["w"], _weights(2, 0))
            assert mgr.restore(root / "last").step == 2
            assert distckpt.load_checkpoint(root / "last").step == 2
            assert mgr.latest_step() == 2
        assert "outside" in caplog.text, "following no link must say why"

    distckpt.CheckpointManager(root, timeout=TIMEOUT).close()
    assert os.readlink(root / "last") == "step-00000002"
    assert (other / "step-00000009" / "manifest.json").is_file()
    assert (root.parent / "step-00000009" / "manifest.json").is_file()


# --------------------------------------------------------------------------- SIGKILL mid-save


def _train_until_killed(rank: int, world_size: int, root: str) -> Any:
    faults.arm("after_manifest", "kill", rank=0, nth=3)
    try:
        with distckpt.CheckpointManager(root, timeout=10) as mgr:
            for step in range(1, 6):
                mgr.save(step, {"w": _weights(step, rank)})
    except distckpt.CheckpointError as exc:
        return _err(exc)
    return "finished"


def _resume(rank: int, world_size: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        if rank == 0:
            out["link at start"] = os.readlink(Path(root) / "last")
            after_rank_0_removals(mgr)
            out["staging at start"] = _staging_entries(Path(root))
        template = {"w": torch.zeros(3)}
        ckpt = mgr.restore("last", state=template)
        out["resumed"] = (ckpt.step, template["w"].tolist())
        out["saved"] = mgr.save(ckpt.step + 1, {"w": _weights(ckpt.step + 1, rank)}).step
        out["steps"] = mgr.steps()
    return out


def test_sigkill_mid_save_then_resume_from_newest_complete(root: Path) -> None:
    killed = run_ranks(
        _train_until_killed, 2, str(root), timeout=JOB_TIMEOUT, pg_timeout=10, expect_killed=True
    )
    # Rank 0 died by SIGKILL; rank 1, if it reported, saw the collective fail.
    assert [r.rank for r in killed] in ([], [1])
    for result in killed:
        assert result.error_type is None, result.traceback
        assert result.value != "finished"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000001", "step-00000002"]
    assert os.readlink(root / "last") == "step-00000002"

    out = values(run_ranks(_resume, 2, str(root), timeout=JOB_TIMEOUT))
    assert out[0]["link at start"] == "step-00000002"
    assert out[0]["staging at start"] == []  # the dead writer's staging is cleaned up
    for rank, rank_out in enumerate(out):
        assert rank_out["resumed"] == (2, _weights(2, rank).tolist())
        assert rank_out["saved"] == 3
        assert rank_out["steps"] == [1, 2, 3]
    assert os.readlink(root / "last") == "step-00000003"
