"""Hardening: link modes, whatever a crash or another tool leaves in a root, damaged
checkpoints, preflight errors raised alike on every rank, and a SIGKILL mid-save."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import filelock
import pytest
import torch
import torch.distributed as dist
from torch import nn

import distckpt
from distckpt import events, faults
from distckpt.checksums import file_checksum
from distckpt.fsutil import libc_function
from tests.filesystems import MountFactory, require_mounting
from tests.hostile_cases import edit_manifest
from tests.ranks import run_ranks, values
from tests.waiting import after_rank_0_removals

TIMEOUT = 20  # manager collectives: a hang becomes an error well before run_ranks gives up
JOB_TIMEOUT = 60


def _err(exc: BaseException) -> tuple[str, str]:
    return type(exc).__name__, str(exc)


def _weights(step: int, rank: int) -> torch.Tensor:
    return torch.full((3,), float(step * 10 + rank))


def _entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory)) if directory.is_dir() else []


def _staging_entries(root: Path) -> list[str]:
    return _entries(root / ".staging")


def _save_steps(rank: int, world_size: int, root: str, steps: tuple[int, ...]) -> dict[str, Any]:
    """Open a manager (which repairs the root), save ``steps``, then restore "last"."""
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        for step in steps:
            mgr.save(step, {"w": _weights(step, rank)})
        template = {"w": torch.zeros(3)}
        ckpt = mgr.restore("last", state=template, missing_ok=True)
        return {
            "steps": mgr.steps(),
            "restored": (ckpt.step, template["w"].tolist()) if ckpt else None,
        }


def _save(root: Path, steps: tuple[int, ...], world_size: int = 2) -> list[Any]:
    return values(run_ranks(_save_steps, world_size, str(root), steps, timeout=JOB_TIMEOUT))


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


# --------------------------------------------------------------------------- damaged checkpoints


def _truncate(path: Path) -> None:
    with open(path, "r+b") as file:
        file.truncate(path.stat().st_size // 2)


def _damage(step_dir: Path, damage: str) -> None:
    """Damage a one-rank checkpoint: its rank file ``"truncated"`` or ``"missing"``, or
    ``"no manifest"``."""
    if damage == "truncated":
        _truncate(step_dir / "rank-00000.pt")
    elif damage == "missing":
        (step_dir / "rank-00000.pt").unlink()
    else:
        (step_dir / "manifest.json").unlink()


@pytest.mark.parametrize("damage", ["truncated", "missing", "no manifest"])
def test_damaged_newest_is_skipped_by_last_and_refused_explicitly(
    root: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        for step in (1, 2):
            mgr.save(step, {"w": _weights(step, 0)})
    step2 = root / "step-00000002"
    _damage(step2, damage)

    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        # Named explicitly, it is refused (and left where it is).
        with pytest.raises(distckpt.CorruptCheckpoint, match="step-00000002"):
            mgr.restore(2)
        with pytest.raises(distckpt.CorruptCheckpoint):
            distckpt.load_checkpoint(step2)
        assert mgr.latest_step() == 1 and mgr.steps() == [1, 2]
        assert os.readlink(root / "last") == "step-00000001"  # repaired at start-up
        assert distckpt.load_checkpoint(root / "last").step == 1
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="distckpt"):
            template = {"w": torch.zeros(3)}
            assert mgr.restore("last", state=template).step == 1
        assert torch.equal(template["w"], _weights(1, 0))
        assert "step-00000002" in caplog.text
        # "last" skipped it, and set it aside (tests/test_set_aside.py): saving goes on from
        # the step loaded.
        assert mgr.steps() == [1] and not step2.exists()
        assert mgr.save(2, {"w": _weights(2, 0)}).step == 2
        assert mgr.save(3, {"w": _weights(3, 0)}).step == 3
        assert os.readlink(root / "last") == "step-00000003"


# --------------------------------------------------------------------------- preflight errors


def _construct(rank: int, world_size: int, root: str) -> tuple[str, str] | None:
    try:
        distckpt.CheckpointManager(root, timeout=TIMEOUT).close()
    except Exception as exc:
        return _err(exc)
    return None


@pytest.mark.parametrize("how", ["unwritable parent", "root is a file"])
def test_root_not_writable_on_every_rank(tmp_path: Path, how: str) -> None:
    parent = tmp_path / "parent"
    if how == "root is a file":
        root = tmp_path / "afile"
        root.write_text("not a directory")
    elif os.geteuid() == 0:
        # root ignores directory permissions: a parent that is a regular file stops mkdir.
        parent.write_text("a file, not a directory")
        root = parent / "ckpt"
    else:
        parent.mkdir()
        parent.chmod(0o500)
        root = parent / "ckpt"
    try:
        out = values(run_ranks(_construct, 2, str(root), timeout=JOB_TIMEOUT))
    finally:
        if parent.is_dir():
            parent.chmod(0o700)
    for result in out:
        assert result is not None
        assert result[0] == "RootNotWritable", result
        assert os.fspath(root) in result[1]
    assert issubclass(distckpt.RootNotWritable, PermissionError)


def _save_without_space(rank: int, world_size: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        mgr.save(1, {"w": _weights(1, rank)})
        try:
            mgr.save(2, {"w": torch.zeros(8 << 20)})  # 32 MiB a rank, on a 24 MiB volume
        except Exception as exc:
            out["error"] = _err(exc)
        if rank == 0:
            out["after"] = (mgr.steps(), os.readlink(Path(root) / "last"))
    return out


def test_insufficient_space_on_every_rank_and_nothing_written(mounts: MountFactory) -> None:
    root = mounts.get("small-ext4").path / "hardening-no-space"
    out = values(run_ranks(_save_without_space, 2, str(root), timeout=JOB_TIMEOUT))
    for rank_out in out:
        assert rank_out.get("error", ("no error",))[0] == "InsufficientSpace"
        assert "step 2" in rank_out["error"][1]
    assert out[0]["after"] == ([1], "step-00000001")
    assert _staging_entries(root) == []
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000001"]


def _restore_all(rank: int, world_size: int, root: str) -> tuple[str, str] | int:
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        try:
            return mgr.restore("last").step
        except Exception as exc:
            return _err(exc)


@pytest.mark.parametrize(("saved_by", "restored_by"), [(2, 1), (1, 2)])
def test_world_size_mismatch_names_both_sizes(root: Path, saved_by: int, restored_by: int) -> None:
    _save(root, (1,), world_size=saved_by)
    out = values(run_ranks(_restore_all, restored_by, str(root), timeout=JOB_TIMEOUT))
    assert len(out) == restored_by
    for result in out:
        assert isinstance(result, tuple), result
        name, message = result
        assert name == "WorldSizeMismatch", message
        assert f"{saved_by} rank" in message
        assert f"{restored_by} rank" in message


def _version_999(root: Path) -> None:
    edit_manifest(root / "step-00000002", lambda data: data.update(format_version=999))


def _not_json(root: Path) -> None:
    (root / "step-00000002" / "manifest.json").write_text('{"step": 2, "files": ')


def _truncate_rank_1(root: Path) -> None:
    _truncate(root / "step-00000002" / "rank-00001.pt")


def _remove_rank_1(root: Path) -> None:
    (root / "step-00000002" / "rank-00001.pt").unlink()


def _nothing(root: Path) -> None:
    pass


_TAMPERS: dict[str, Callable[[Path], None]] = {
    "version 999": _version_999,
    "not json": _not_json,
    "truncated rank 1": _truncate_rank_1,
    "missing rank 1": _remove_rank_1,
    "nothing": _nothing,
}


def _tamper_then_restore(
    rank: int, world_size: int, root: str, tamper: str, whiches: list[Any]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        for step in (1, 2):
            mgr.save(step, {"w": _weights(step, rank)})
        if rank == 0:
            _TAMPERS[tamper](Path(root))
        dist.barrier()
        for which in whiches:
            template = {"w": torch.zeros(3)}
            try:
                out[which] = (mgr.restore(which, state=template).step, template["w"].tolist())
            except Exception as exc:
                out[which] = _err(exc)
    return out


@pytest.mark.parametrize(
    ("tamper", "error"),
    [
        ("version 999", "UnsupportedVersion"),
        ("not json", "CorruptCheckpoint"),
        ("truncated rank 1", "CorruptCheckpoint"),
        ("missing rank 1", "CorruptCheckpoint"),
    ],
)
def test_restoring_a_damaged_step_fails_on_every_rank(root: Path, tamper: str, error: str) -> None:
    whiches: list[Any] = [2, 1]
    if tamper != "version 999":
        whiches.append("last")
    out = values(
        run_ranks(_tamper_then_restore, 2, str(root), tamper, whiches, timeout=JOB_TIMEOUT)
    )
    for rank, rank_out in enumerate(out):
        name, message = rank_out[2]
        assert name == error, message
        assert "step-00000002" in message
        if error == "UnsupportedVersion":
            assert "999" in message
        assert rank_out[1] == (1, _weights(1, rank).tolist())
        if "last" in rank_out:
            assert rank_out["last"] == (1, _weights(1, rank).tolist())


def test_restoring_a_missing_step_lists_the_committed_ones(root: Path) -> None:
    out = values(run_ranks(_tamper_then_restore, 2, str(root), "nothing", [5], timeout=JOB_TIMEOUT))
    for rank_out in out:
        name, message = rank_out[5]
        assert name == "CheckpointNotFound", message
        assert "1, 2" in message


# --------------------------------------------------------------------------- strict loading


def _restore_into_bigger_model(rank: int, world_size: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    torch.manual_seed(rank)
    small = nn.Sequential(nn.Linear(3, 3))
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        mgr.save(1, {"model": small, "rank": rank})
        bigger = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
        extra = [p.detach().clone() for p in bigger[1].parameters()]
        ckpt = mgr.restore(state={"model": bigger, "rank": -1}, strict=False)
        out["missing"] = sorted(ckpt.missing_keys)
        out["unexpected"] = sorted(ckpt.unexpected_keys)
        out["loaded"] = all(
            torch.equal(a, b) for a, b in zip(bigger[0].parameters(), small.parameters())
        )
        out["extra untouched"] = all(
            torch.equal(a, b) for a, b in zip(bigger[1].parameters(), extra)
        )
        out["rank"] = ckpt.state["rank"]
        try:
            mgr.restore(state={"model": nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))})
            out["strict"] = None
        except Exception as exc:
            out["strict"] = _err(exc)
    return out


def test_strict_false_loads_what_matches_and_reports_the_rest(root: Path) -> None:
    out = values(run_ranks(_restore_into_bigger_model, 2, str(root), timeout=JOB_TIMEOUT))
    for rank, rank_out in enumerate(out):
        assert rank_out["missing"] == ["model.1.bias", "model.1.weight"]
        assert rank_out["unexpected"] == []
        assert rank_out["loaded"]
        assert rank_out["extra untouched"]
        assert rank_out["rank"] == rank


def test_strict_true_raises_key_mismatch_naming_the_keys(root: Path) -> None:
    """A KeyMismatch, an InvalidArgument (tests/test_model_state.py checks its fields)."""
    out = values(run_ranks(_restore_into_bigger_model, 2, str(root), timeout=JOB_TIMEOUT))
    for rank_out in out:
        assert rank_out["strict"] is not None
        name, message = rank_out["strict"]
        assert name == "KeyMismatch", message
        assert issubclass(distckpt.KeyMismatch, distckpt.InvalidArgument)
        assert "1.weight" in message
        assert "strict=False" in message


# --------------------------------------------------------------------------- listing, extra files


def _save_described(
    rank: int, world_size: int, root: str, vocab: str
) -> list[distckpt.CheckpointInfo]:
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        mgr.save(1, {"w": _weights(1, rank)}, epoch=0, metrics={"loss": 2.0})
        mgr.save(
            2,
            {"w": _weights(2, rank)},
            epoch=1,
            metrics={"loss": 1.0},
            metadata={"note": "with files"},
            files={"config.json": b'{"hidden": 8}', "vocab.txt": vocab},
        )
        return mgr.checkpoints()


def test_checkpoints_and_extra_files(tmp_path: Path, root: Path) -> None:
    vocab = tmp_path / "vocab-source.txt"
    vocab.write_bytes(b"hello\nworld\n" * 1000)
    out = values(run_ranks(_save_described, 2, str(root), str(vocab), timeout=JOB_TIMEOUT))
    assert out[0] == out[1]
    infos = out[0]
    assert [i.step for i in infos] == [1, 2]
    assert [i.epoch for i in infos] == [0, 1]
    assert [dict(i.metrics) for i in infos] == [{"loss": 2.0}, {"loss": 1.0}]
    assert infos[1].metadata == {"note": "with files"}
    for info in infos:
        assert info.format == "torch"
        assert info.world_size == 2
        assert info.path == root / f"step-{info.step:08d}"
        files = [p for p in info.path.iterdir() if p.name != "manifest.json"]
        assert info.size_bytes == sum(p.stat().st_size for p in files)

    step2 = root / "step-00000002"
    assert (step2 / "config.json").read_bytes() == b'{"hidden": 8}'
    assert (step2 / "vocab.txt").read_bytes() == vocab.read_bytes()
    listed = json.loads((step2 / "manifest.json").read_text())["files"]
    assert set(listed) == {"rank-00000.pt", "rank-00001.pt", "config.json", "vocab.txt"}
    for name in ("config.json", "vocab.txt"):
        assert listed[name]["size"] == (step2 / name).stat().st_size
        assert listed[name]["checksum"] == file_checksum(step2 / name)
    assert not (root / "step-00000001" / "config.json").exists()


def _bad_extra_files(rank: int, world_size: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        for label, files in {
            "dotdot": {"../escape.txt": b"x"},
            "manifest": {"manifest.json": b"{}"},
            "rank file": {"rank-00000.pt": b"x"},
            "subdir": {"a/b.txt": b"x"},
            "missing source": {"vocab.txt": os.path.join(root, "nope.txt")},
        }.items():
            try:
                mgr.save(1, {"w": _weights(1, rank)}, files=files)
                out[label] = None
            except Exception as exc:
                out[label] = _err(exc)
        out["steps"] = mgr.steps()
    return out


def test_bad_extra_file_names_are_refused_on_every_rank(root: Path) -> None:
    out = values(run_ranks(_bad_extra_files, 2, str(root), timeout=JOB_TIMEOUT))
    for rank_out in out:
        for label in ("dotdot", "manifest", "rank file", "subdir", "missing source"):
            assert rank_out[label] is not None, label
            assert rank_out[label][0] == "InvalidArgument", (label, rank_out[label])
        assert rank_out["steps"] == []
    assert not (root.parent / "escape.txt").exists()
    assert _staging_entries(root) == []


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


# --------------------------------------------------------------------------- an unshared root

#: unshare(2)'s flag for a mount namespace of the caller's own (linux/sched.h)
CLONE_NEWNS = 0x00020000


def _mount_private_disk(disk: Path, over: Path) -> None:
    """Give this rank a view of ``over`` that no other rank shares, as a node-local disk does:
    ``disk`` bind-mounted over it in a mount namespace of this rank's own (the other rank, and
    the test, still see the real ``over``)."""
    unshare = libc_function("unshare", [ctypes.c_int])
    assert unshare is not None, "no unshare(2) in this C library (it is Linux's, as mounts are)"
    if unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) failed")
    # Private first: a bind mount in a namespace whose mounts are shared would reach the host's.
    subprocess.run(["mount", "--make-rprivate", "/"], check=True, capture_output=True)
    subprocess.run(["mount", "--bind", disk, over], check=True, capture_output=True)


def _open_on_own_disk(rank: int, world_size: int, parent: str, disk: str) -> tuple[str, str]:
    if rank == 1:  # rank 1's "node" has a disk of its own where the root's parent is
        _mount_private_disk(Path(disk), Path(parent))
    try:
        distckpt.CheckpointManager(Path(parent) / "ckpt", timeout=TIMEOUT).close()
    except Exception as exc:
        return _err(exc)
    raise AssertionError("a root rank 1 cannot see was accepted")


def test_a_root_missing_on_one_rank_is_refused_on_every_rank_naming_it(tmp_path: Path) -> None:
    require_mounting()
    parent, disk = tmp_path / "shared", tmp_path / "rank1-disk"
    parent.mkdir()
    disk.mkdir()
    out = values(run_ranks(_open_on_own_disk, 2, str(parent), str(disk), timeout=JOB_TIMEOUT))
    for error_type, message in out:
        assert error_type == "RootNotWritable"
        assert "does not exist on rank 1" in message
        assert "shared by every rank" in message


def _save_with_a_private_staging_dir(
    rank: int, world_size: int, root: str, disk: str
) -> tuple[str, str, int | None]:
    staging = Path(root) / ".staging"

    def write_to_own_disk(event: events.PhaseEvent) -> None:
        # Once the ranks agreed on the staging dir (rank 0 made it), rank 1's writes into it
        # land on a disk only rank 1 sees: the root is not shared by the ranks.
        if event.phase == "save.propose" and event.ok:
            (area,) = [entry for entry in staging.iterdir() if entry.is_dir()]
            _mount_private_disk(Path(disk), area)

    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        remove = events.add_listener(write_to_own_disk) if rank == 1 else lambda: None
        try:
            mgr.save(1, {"w": _weights(1, rank)})
        except distckpt.StagedFileMismatch as exc:
            assert isinstance(exc, OSError)
            assert exc.path is not None and exc.path.endswith("rank-00001.pt")
            assert exc.written_bytes is not None and exc.written_bytes > 0
            assert exc.found_bytes is None  # no such file where rank 0 looks
            return type(exc).__name__, str(exc), exc.rank
        finally:
            remove()
    raise AssertionError("a save whose rank 1 file rank 0 cannot see was committed")


def test_a_rank_file_rank_0_cannot_see_fails_the_save_on_every_rank_naming_the_rank(
    tmp_path: Path, root: Path
) -> None:
    require_mounting()
    disk = tmp_path / "rank1-disk"
    disk.mkdir()
    out = values(
        run_ranks(_save_with_a_private_staging_dir, 2, str(root), str(disk), timeout=JOB_TIMEOUT)
    )
    for error_type, message, rank in out:
        assert error_type == "StagedFileMismatch"
        assert "rank 1's file rank-00001.pt is not visible from rank 0" in message
        assert rank == 1
    assert list(root.glob("step-*")) == []
    assert _staging_entries(root) == []
    assert (disk / "rank-00001.pt").is_file()  # written, but where rank 0 cannot see it


def _save_with_rank_1_file_cut_short(
    rank: int, world_size: int, root: str
) -> tuple[str, int | None, int | None, int | None, dict[str, int]]:
    staging = Path(root) / ".staging"
    sizes: dict[str, int] = {}

    def cut_own_file_short(event: events.PhaseEvent) -> None:
        # rank 1 has written its file, before rank 0 checks the staged files: the file rank 0
        # finds then is not the one rank 1 reported (a stale or torn view of a shared root)
        if event.phase == "save.write" and event.ok:
            (area,) = [entry for entry in staging.iterdir() if entry.is_dir()]
            rank_file = area / "rank-00001.pt"
            sizes["written"] = rank_file.stat().st_size
            sizes["cut"] = sizes["written"] // 2
            os.truncate(rank_file, sizes["cut"])

    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        remove = events.add_listener(cut_own_file_short) if rank == 1 else lambda: None
        try:
            mgr.save(1, {"w": torch.arange(4096, dtype=torch.float32) + rank})
        except distckpt.StagedFileMismatch as exc:
            assert isinstance(exc, OSError)
            assert exc.path is not None and exc.path.endswith("rank-00001.pt")
            return type(exc).__name__, exc.rank, exc.written_bytes, exc.found_bytes, sizes
        finally:
            remove()
    raise AssertionError("a save whose rank 1 file rank 0 found cut short was committed")


def test_a_rank_file_of_another_size_than_written_fails_the_save_with_both_sizes(
    root: Path,
) -> None:
    """As the README says: ``found_bytes`` is the size rank 0 sees for a file of another size
    than its rank wrote (``written_bytes``), on every rank, and nothing is committed."""
    out = values(run_ranks(_save_with_rank_1_file_cut_short, 2, str(root), timeout=JOB_TIMEOUT))
    sizes = out[1][4]
    assert sizes["cut"] > 0
    for error_type, rank, written, found, _ in out:
        assert (error_type, rank) == ("StagedFileMismatch", 1)
        assert (written, found) == (sizes["written"], sizes["cut"])
    assert list(root.glob("step-*")) == []
    assert _staging_entries(root) == []


# --------------------------------------------------------------------------- damaged steps listed


@pytest.mark.parametrize("damage", ["truncated", "missing", "no manifest"])
def test_steps_lists_damaged_checkpoints_the_queries_skip(root: Path, damage: str) -> None:
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": _weights(step, 0)})
        _damage(root / "step-00000002", damage)
        assert mgr.steps() == [1, 2, 3]  # names only: the damaged step is listed
        assert [info.step for info in mgr.checkpoints()] == [1, 3]
        assert mgr.latest_step() == 3
