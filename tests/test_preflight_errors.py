"""Preflight errors raised alike on every rank: an unwritable root, no space, a world size or
step that does not match, a damaged step restored, a root or rank file one rank cannot see, and
strict loading naming the keys that do not match."""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import distckpt
from distckpt import events
from distckpt.fsutil import libc_function
from tests.core_ranks import JOB_TIMEOUT, TIMEOUT, _staging_entries, _weights
from tests.filesystems import MountFactory, require_mounting
from tests.hardening_steps import _err, _save, _truncate
from tests.hostile_cases import edit_manifest
from tests.lease_holders import CLONE_NEWNS
from tests.other_user import succeeds_as_nobody
from tests.ranks import run_ranks, values

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


def test_another_users_lease_file_is_root_not_writable(shared_dir: Path) -> None:
    """A root shared with another user whose job ran under umask 022: the root dir lets this
    user write, its ``.lease`` and ``.lock`` (that job's, mode 0644) do not. Opening it is
    ``RootNotWritable`` naming the lease file, as every other write failure at the start."""
    root = shared_dir / "run"
    root.mkdir(mode=0o777)
    root.chmod(0o777)  # a shared dir every user may write in
    umask = os.umask(0o022)
    try:
        distckpt.CheckpointManager(root).close()  # the other user's job, ended
    finally:
        os.umask(umask)

    def refused() -> None:
        with pytest.raises(distckpt.RootNotWritable) as caught:
            distckpt.CheckpointManager(root)
        assert caught.value.path == os.fspath(root / ".lease"), caught.value
        assert "Permission denied" in str(caught.value)

    assert succeeds_as_nobody(refused), "the lease file's refusal was not RootNotWritable"


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


# --------------------------------------------------------------------------- an unshared root


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


def test_a_rank_file_grown_after_it_was_written_fails_the_save_with_both_sizes(root: Path) -> None:
    """Another size is any other size: a staged file rank 0 finds longer than its rank wrote
    (bytes appended by someone else) fails the save with ``StagedFileMismatch`` too, before
    anything is renamed, not with a ``CommitLost`` blaming the rename."""

    def append_to_the_staged_file(event: events.PhaseEvent) -> None:
        if event.phase == "save.write" and event.ok:
            (rank_file,) = root.glob(".staging/step-00000001.*/rank-00000.pt")
            with open(rank_file, "ab") as file:
                file.write(b"appended")

    with distckpt.CheckpointManager(root, fsync=False, timeout=TIMEOUT) as mgr:
        remove = events.add_listener(append_to_the_staged_file)
        try:
            with pytest.raises(distckpt.StagedFileMismatch) as mismatch:
                mgr.save(1, {"w": torch.zeros(4)})
        finally:
            remove()
        assert mismatch.value.found_bytes == mismatch.value.written_bytes + len(b"appended")
        assert mgr.steps() == []
    assert _staging_entries(root) == []
