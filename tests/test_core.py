"""The core save / restore protocol on real gloo ranks: round trips, step rules, links,
retention, deletion, the manifest and the pickle opt-in."""

from __future__ import annotations

import collections
import copy
import json
import logging
import os
import random
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

# Optimizers import torch._dynamo when constructed (about 2 s): imported here, before the ranks
# fork, so that no rank pays for it again.
import torch._dynamo
from torch import nn

import distckpt
from distckpt import faults, fsutil
from distckpt.checksums import file_checksum
from distckpt.manifest import FORMAT_VERSION
from distckpt.state_sizes import storage_sizes
from distckpt.storage import open_store
from distckpt.storage import posix as posix_store
from tests.ranks import Collected, run_ranks, values
from tests.waiting import after_rank_0_removals

TIMEOUT = 20  # manager collectives: a hang becomes an error well before run_ranks gives up
JOB_TIMEOUT = 60


def _err(exc: BaseException) -> tuple[str, str, bool, bool]:
    """What a rank reports about a distckpt error (exceptions do not cross the fork)."""
    return (
        type(exc).__name__,
        str(exc),
        isinstance(exc, distckpt.CheckpointError),
        isinstance(exc, FileNotFoundError),
    )


def _weights(step: int, rank: int) -> torch.Tensor:
    # Distinct per step and per rank, so a restore of the wrong step or rank file shows.
    return torch.full((3,), float(step * 10 + rank))


def _same(a: Any, b: Any) -> bool:
    """Bit-exact equality of nested state dicts."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and torch.equal(a, b)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _staging_entries(root: Path) -> list[str]:
    staging = root / ".staging"
    return sorted(os.listdir(staging)) if staging.is_dir() else []


# --------------------------------------------------------------------------- round trip


def _make_training(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    # The batch comes from the global RNG: a continuation only matches if the RNG was restored.
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()
    scheduler.step()


def _draws() -> tuple[list[float], float, float]:
    return torch.rand(4).tolist(), random.random(), float(np.random.rand())


def _round_trip(rank: int, world_size: int, root: str) -> dict[str, Any]:
    random.seed(rank)
    np.random.seed(rank)
    model, optimizer, scheduler = _make_training(seed=rank)  # each rank its own data
    for _ in range(3):
        _train_step(model, optimizer, scheduler)
    rng = distckpt.capture_rng()
    state = {"model": model, "optim": optimizer, "sched": scheduler, "rng": rng, "rank": rank}
    saved_model = copy.deepcopy(model.state_dict())
    saved_optim = copy.deepcopy(optimizer.state_dict())
    saved_sched = copy.deepcopy(scheduler.state_dict())
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        result = mgr.save(3, state)

        # The reference continuation: what training would have done without a restart.
        distckpt.restore_rng(rng)
        expected_draws = _draws()
        _train_step(model, optimizer, scheduler)
        expected_params = [p.detach().clone() for p in model.parameters()]

        fresh_model, fresh_optim, fresh_sched = _make_training(seed=1000 + rank)
        torch.manual_seed(99)
        random.seed(99)
        np.random.seed(99)
        template = {
            "model": fresh_model,
            "optim": fresh_optim,
            "sched": fresh_sched,
            "rng": distckpt.capture_rng(),
            "rank": -1,
        }
        ckpt = mgr.restore(state=template)
        checks = {
            "model": _same(fresh_model.state_dict(), saved_model),
            "optim": _same(fresh_optim.state_dict(), saved_optim),
            "optim_has_state": bool(fresh_optim.state_dict()["state"]),
            "sched": _same(fresh_sched.state_dict(), saved_sched),
            "rank": ckpt.state["rank"] == rank,
            "step": ckpt.step,
        }
        distckpt.restore_rng(ckpt.state["rng"])
        checks["rng"] = _draws() == expected_draws
        _train_step(fresh_model, fresh_optim, fresh_sched)
        checks["continued"] = _same([p.detach() for p in fresh_model.parameters()], expected_params)
    return {"result": result, "checks": checks}


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_round_trip_is_bit_exact(root: Path, world_size: int) -> None:
    out = values(run_ranks(_round_trip, world_size, str(root), timeout=JOB_TIMEOUT))
    for rank_out in out:
        assert rank_out["checks"] == {
            "model": True,
            "optim": True,
            "optim_has_state": True,
            "sched": True,
            "rank": True,
            "step": 3,
            "rng": True,
            "continued": True,
        }
    results = [rank_out["result"] for rank_out in out]
    assert results == [results[0]] * world_size
    assert results[0].step == 3
    assert results[0].path == root / "step-00000003"


# --------------------------------------------------------------------------- paths and links


def _save_from_workdir(rank: int, world_size: int, workdir: str) -> list[int]:
    os.chdir(workdir)
    with distckpt.CheckpointManager("ckpt", timeout=TIMEOUT) as mgr:
        for step in (1, 2):
            mgr.save(step, {"w": _weights(step, rank)})
        return mgr.steps()


def _restore_every_way(rank: int, world_size: int, cwd: str, root_rel: str) -> dict[str, Any]:
    os.chdir(cwd)
    got: dict[str, Any] = {}
    with distckpt.CheckpointManager(root_rel, timeout=TIMEOUT) as mgr:
        ways = {
            "last": "last",
            "int": 1,
            "link path": os.path.join(root_rel, "last"),
            "link pathlike": Path(root_rel) / "last",
            "step dir": os.path.join(root_rel, "step-00000001"),
        }
        for label, which in ways.items():
            template = {"w": torch.zeros(3)}
            ckpt = mgr.restore(which, state=template)
            got[label] = (ckpt.step, template["w"].tolist())
        got["latest"] = mgr.latest_step()
    return got


def test_relative_root_survives_chdir_and_moving_the_root(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    out = values(run_ranks(_save_from_workdir, 2, str(workdir), timeout=JOB_TIMEOUT))
    assert out == [[1, 2], [1, 2]]
    original = workdir / "ckpt"
    assert not os.path.isabs(os.readlink(original / "last"))
    assert os.readlink(original / "last") == "step-00000002"

    (tmp_path / "moved").mkdir()
    moved = tmp_path / "moved" / "renamed"
    os.rename(original, moved)
    assert (moved / "last").resolve() == (moved / "step-00000002").resolve()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = values(
        run_ranks(_restore_every_way, 2, str(elsewhere), "../moved/renamed", timeout=JOB_TIMEOUT)
    )
    for rank, got in enumerate(out):
        newest, first = [20.0 + rank] * 3, [10.0 + rank] * 3
        assert got == {
            "last": (2, newest),
            "int": (1, first),
            "link path": (2, newest),
            "link pathlike": (2, newest),
            "step dir": (1, first),
            "latest": 2,
        }

    # A plain process with no process group reads each rank's file.
    for rank in range(2):
        for path, step in (
            (moved / "last", 2),
            (moved, 2),
            (moved / "step-00000001", 1),
        ):
            template = {"w": torch.zeros(3)}
            ckpt = distckpt.load_checkpoint(path, rank=rank, state=template)
            assert ckpt.step == step
            assert torch.equal(template["w"], _weights(step, rank))
            assert torch.equal(ckpt.state["w"], _weights(step, rank))
    with pytest.raises(distckpt.CheckpointNotFound):
        distckpt.load_checkpoint(moved, rank=2)


def test_load_checkpoint_defaults_to_rank_zero_without_a_group(root: Path) -> None:
    values(run_ranks(_save_from_workdir, 2, str(root.parent), timeout=JOB_TIMEOUT))
    ckpt = distckpt.load_checkpoint(root / "last")
    assert torch.equal(ckpt.state["w"], _weights(2, 0))


# --------------------------------------------------------------------------- a failing rank


def _second_save_fails_on_rank_1(rank: int, world_size: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        mgr.save(1, {"w": _weights(1, rank)})
        faults.arm("after_shard_write", "raise", rank=1)
        try:
            mgr.save(2, {"w": _weights(2, rank)})
        except Exception as exc:
            out["error"] = _err(exc)
        if rank == 0:
            # Rank 0 cleans up before it raises, so what it sees now is what a crash leaves.
            out["steps"] = mgr.steps()
            out["last"] = os.readlink(Path(root) / "last")
            out["staging"] = _staging_entries(Path(root))
        out["retry"] = mgr.save(2, {"w": _weights(2, rank)}).step
    return out


def test_rank_raising_mid_write_fails_every_rank_and_leaves_nothing(root: Path) -> None:
    out = values(run_ranks(_second_save_fails_on_rank_1, 2, str(root), timeout=JOB_TIMEOUT))
    for rank_out in out:
        name, message, is_checkpoint_error, _ = rank_out["error"]
        assert is_checkpoint_error, name
        assert "rank 1" in message
        assert rank_out["retry"] == 2
    assert out[0]["steps"] == [1]
    assert out[0]["last"] == "step-00000001"
    assert out[0]["staging"] == []
    assert _staging_entries(root) == []


class _RefusesItsState:
    """An object whose ``state_dict()`` raises: rank 0's snapshot fails while its root work,
    in the thread beside it, opens the staging area."""

    def state_dict(self) -> dict[str, Any]:
        raise ValueError("this state refuses to be saved")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise AssertionError("never saved, so never loaded")


def _snapshot_fails_on_rank_0(rank: int, world_size: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, timeout=TIMEOUT, async_save=True) as mgr:
        state: dict[str, Any] = {"w": _weights(1, rank)}
        try:
            mgr.save(1, {**state, "obj": _RefusesItsState()} if rank == 0 else state)
        except Exception as exc:
            out["error"] = _err(exc)
        if rank == 0:
            out["staging"] = _staging_entries(Path(root))
        out["retry"] = mgr.save(1, state).step
        mgr.wait()
        out["steps"] = mgr.steps()
    return out


def test_a_snapshot_failing_beside_the_root_work_fails_every_rank_and_leaves_nothing(
    root: Path,
) -> None:
    out = values(run_ranks(_snapshot_fails_on_rank_0, 2, str(root), timeout=JOB_TIMEOUT))
    for rank_out in out:
        assert "refuses to be saved" in rank_out["error"][1]
        assert rank_out["retry"] == 1
        assert rank_out["steps"] == [1]
    assert out[0]["staging"] == []  # the staging area opened beside the snapshot is gone


def _copy_fails_on_rank_1(rank: int, world_size: int, root: str) -> dict[str, Any]:
    from distckpt import events

    out: dict[str, Any] = {"gathered_in": set(), "copy_ok": []}

    def note(event: events.PhaseEvent) -> None:
        if event.phase == "collective.all_gather" and event.step is None:
            out["gathered_in"].add(threading.current_thread().name)
        if event.phase == "propose.copy":
            out["copy_ok"].append(event.ok)

    with distckpt.CheckpointManager(root, timeout=TIMEOUT, async_save=True) as mgr:
        state: dict[str, Any] = {"w": _weights(1, rank)}
        # A tensor with no data (a parameter never materialised): its copy fails, after the
        # proposal was made and while the all-gather of the proposals runs beside it.
        broken = {**state, "z": torch.empty(4, device="meta")} if rank == 1 else state
        remove = events.add_listener(note)
        try:
            mgr.save(1, broken)
        except Exception as exc:
            out["error"] = _err(exc)
        finally:
            remove()
        out["in_flight"] = mgr.save_in_flight
        if rank == 0:
            out["staging"] = _staging_entries(Path(root))
            out["steps_after_failure"] = mgr.steps()
        out["retry"] = mgr.save(1, state).step
        mgr.wait()
        out["steps"] = mgr.steps()
    return out


def test_a_copy_failing_on_one_rank_beside_the_all_gather_fails_save_on_every_rank(
    root: Path,
) -> None:
    out = values(run_ranks(_copy_fails_on_rank_1, 2, str(root), timeout=JOB_TIMEOUT))
    for rank_out in out:
        _, message, is_checkpoint_error, _ = rank_out["error"]  # raised by save() itself
        assert is_checkpoint_error and "rank 1" in message and "meta" in message, message
        assert not rank_out["in_flight"]
        assert rank_out["retry"] == 1 and rank_out["steps"] == [1]
        assert "distckpt-propose-gather" in rank_out["gathered_in"]  # it ran beside the copy
    assert out[1]["copy_ok"] == [False] and out[0]["copy_ok"] == [True]
    assert out[0]["staging"] == [] and out[0]["steps_after_failure"] == []


def _async_save_of_an_old_step(rank: int, world_size: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, timeout=TIMEOUT, async_save=True) as mgr:
        mgr.save(2, {"w": _weights(2, rank)})
        mgr.wait()
        try:
            mgr.save(1, {"w": _weights(1, rank)})  # refused by rank 0's root work
        except distckpt.CheckpointError as exc:
            out["error"] = _err(exc)
        out["in_flight"] = mgr.save_in_flight
        out["steps"] = mgr.steps()
        if rank == 0:
            out["staging"] = _staging_entries(Path(root))
    return out


def test_an_async_save_of_a_refused_step_raises_in_save_on_every_rank(root: Path) -> None:
    out = values(run_ranks(_async_save_of_an_old_step, 2, str(root), timeout=JOB_TIMEOUT))
    for rank_out in out:
        assert "error" in rank_out  # raised by save() itself, not later by wait()
        assert rank_out["error"][2]  # a CheckpointError on every rank
        assert not rank_out["in_flight"]
        assert rank_out["steps"] == [2]
    assert out[0]["staging"] == []


# --------------------------------------------------------------------------- retention, delete


def test_the_staging_dir_is_made_durable_in_the_write_phase_not_when_opened(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening the staging area (rank 0's part of the proposal, which the caller waits for)
    fsyncs nothing for the new dir: only the commit's rename needs its creation durable, so
    rank 0 makes it so at the start of its write phase, before the agreement and the commit."""
    # A spy, not a mock: every fsync still happens; it only records which dirs were fsynced.
    fsynced: list[Path] = []

    def recording_fsync_dir(path: str | os.PathLike[str]) -> None:
        fsynced.append(Path(path))
        real_fsync_dir(path)

    real_fsync_dir = fsutil.fsync_dir
    monkeypatch.setattr(fsutil, "fsync_dir", recording_fsync_dir)  # the commit's rename_dir
    monkeypatch.setattr(posix_store, "fsync_dir", recording_fsync_dir)
    store = open_store(root)
    staging_root = root / ".staging"
    staging_root.mkdir(parents=True)  # once per root, durably (not what this test is about)
    area = store.begin_staging(1, "token")
    try:
        assert Path(area.location).parent == staging_root
        assert fsynced == []
        store.make_staging_durable(area)
        assert fsynced == [staging_root]
    finally:
        store.discard_staging(area)

    # And in a save: the staging root is fsynced before the commit (whose first fsync is the
    # manifest's, of the staging dir itself).
    fsynced.clear()
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        mgr.save(2, {"w": _weights(2, 0)})
    committing = next(i for i, path in enumerate(fsynced) if path.parent == staging_root)
    assert staging_root in fsynced[:committing]


def _keep_last_two(rank: int, world_size: int, root: str) -> list[tuple[list[int], str, bool]]:
    seen = []
    with distckpt.CheckpointManager(root, keep_last=2, timeout=TIMEOUT) as mgr:
        for step in range(1, 6):
            mgr.save(step, {"w": _weights(step, rank)})
            link = os.readlink(Path(root) / "last")
            seen.append((mgr.steps(), link, (Path(root) / link).is_dir()))
    return seen


def test_keep_last_removes_older_dirs_never_the_target_of_last(root: Path) -> None:
    out = values(run_ranks(_keep_last_two, 2, str(root), timeout=JOB_TIMEOUT))
    expected = [
        ([1], "step-00000001", True),
        ([1, 2], "step-00000002", True),
        ([2, 3], "step-00000003", True),
        ([3, 4], "step-00000004", True),
        ([4, 5], "step-00000005", True),
    ]
    # Every rank returns only after rank 0's commit (and its retention) is done.
    assert out == [expected, expected]
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000004", "step-00000005"]
    assert not any((root / ".trash").iterdir())


def _delete_steps(rank: int, world_size: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": _weights(step, rank)})
        # Only rank 0 looks at the disk: delete returns on the others once rank 0 decided,
        # and rank 0 may already be running the next delete while they look.
        mgr.delete(2)
        if rank == 0:
            out["after middle"] = (mgr.steps(), os.readlink(Path(root) / "last"))
        mgr.delete(3)
        if rank == 0:
            link = os.readlink(Path(root) / "last")
            out["after newest"] = (mgr.steps(), link, mgr.latest_step())
        try:
            mgr.delete(7)
        except Exception as exc:
            out["missing"] = _err(exc)
        template = {"w": torch.zeros(3)}
        out["restored"] = (mgr.restore(state=template).step, template["w"].tolist())
    return out


def test_delete_moves_last_and_missing_step_is_not_found(root: Path) -> None:
    out = values(run_ranks(_delete_steps, 2, str(root), timeout=JOB_TIMEOUT))
    assert out[0]["after middle"] == ([1, 3], "step-00000003")
    assert out[0]["after newest"] == ([1], "step-00000001", 1)
    for rank, rank_out in enumerate(out):
        name, message, _, is_file_not_found = rank_out["missing"]
        assert name == "CheckpointNotFound"
        assert is_file_not_found
        assert message == f"no checkpoint for step 7 in {root}; committed steps: 1"
        assert rank_out["restored"] == (1, [10.0 + rank] * 3)
    assert issubclass(distckpt.CheckpointNotFound, FileNotFoundError)


# --------------------------------------------------------------------------- step rules


def _overwrite(rank: int, world_size: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        mgr.save(1, {"w": _weights(1, rank)})
        out["overwrite"] = mgr.save(1, {"w": _weights(7, rank)}, overwrite=True).step
        try:
            mgr.save(1, {"w": _weights(8, rank)})
        except Exception as exc:
            out["again"] = _err(exc)
        template = {"w": torch.zeros(3)}
        mgr.restore(1, state=template)
        out["restored"] = template["w"].tolist()
        out["steps"] = mgr.steps()
    return out


def test_overwrite_replaces_and_without_it_the_step_exists(root: Path) -> None:
    out = values(run_ranks(_overwrite, 2, str(root), timeout=JOB_TIMEOUT))
    for rank, rank_out in enumerate(out):
        assert rank_out["overwrite"] == 1
        assert rank_out["again"][0] == "CheckpointExists"
        assert "overwrite=True" in rank_out["again"][1]
        assert rank_out["restored"] == [70.0 + rank] * 3
        assert rank_out["steps"] == [1]
    assert not (root / ".trash").exists() or not any((root / ".trash").iterdir())


def _bad_steps(rank: int, world_size: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        mgr.save(5, {"w": _weights(5, rank)})
        for label, step in {
            "lower": 3,
            "negative": -1,
            "float": 6.0,
            "str": "6",
            "bool": True,
            "none": None,
            "different per rank": 10 + rank,
        }.items():
            try:
                mgr.save(step, {"w": _weights(0, rank)})  # type: ignore[arg-type]
                out[label] = None
            except Exception as exc:
                out[label] = _err(exc)
        out["steps"] = mgr.steps()
        out["next"] = mgr.save(6, {"w": _weights(6, rank)}).step
    return out


def test_invalid_steps_raise_invalid_step_on_every_rank(root: Path) -> None:
    out = values(run_ranks(_bad_steps, 2, str(root), timeout=JOB_TIMEOUT))
    for rank_out in out:
        for label in ("lower", "negative", "float", "str", "bool", "none", "different per rank"):
            assert rank_out[label] is not None, f"save of a {label} step did not raise"
            assert rank_out[label][0] == "InvalidStep", (label, rank_out[label])
        assert "delete" in rank_out["lower"][1]
        assert rank_out["steps"] == [5]
        assert rank_out["next"] == 6
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000005", "step-00000006"]
    assert _staging_entries(root) == []


def _restore_empty(rank: int, world_size: int, root: str) -> tuple[Any, Any, Any]:
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        quiet = mgr.restore(missing_ok=True)
        quiet_best = mgr.restore("best", missing_ok=True)
        try:
            mgr.restore()
            loud = None
        except Exception as exc:
            loud = _err(exc)
    return quiet, quiet_best, loud


def test_missing_ok_on_an_empty_root(root: Path) -> None:
    out = values(run_ranks(_restore_empty, 2, str(root), timeout=JOB_TIMEOUT))
    for quiet, quiet_best, loud in out:
        assert quiet is None
        assert quiet_best is None
        assert loud is not None
        assert loud[0] == "CheckpointNotFound"
        assert loud[3]  # a FileNotFoundError too


# --------------------------------------------------------------------------- manifest


def _save_with_metrics(rank: int, world_size: int, root: str) -> None:
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        mgr.save(
            4,
            {"w": _weights(4, rank)},
            epoch=2,
            # Rank 0's metrics are the ones stored: rank 1 passes different ones on purpose.
            metrics={"loss": 0.25 + rank, "ppl": float("nan"), "acc": torch.tensor(0.5)},
            metadata={"run": "exp1", "lrs": [0.1, 0.01], "nested": {"a": None}},
        )


def _reject_constant(name: str) -> float:
    raise ValueError(f"manifest.json is not strict JSON: it contains {name}")


def test_manifest_is_strict_json_listing_every_rank_file(root: Path) -> None:
    values(run_ranks(_save_with_metrics, 2, str(root), timeout=JOB_TIMEOUT))
    step_dir = root / "step-00000004"
    data = json.loads((step_dir / "manifest.json").read_text(), parse_constant=_reject_constant)
    assert data["format_version"] == FORMAT_VERSION
    assert data["step"] == 4
    assert data["epoch"] == 2
    assert data["world_size"] == 2
    assert data["format"] == "torch"
    assert data["metrics"]["loss"] == 0.25
    assert data["metrics"]["acc"] == 0.5
    assert data["metrics"]["ppl"] == "nan"
    assert data["metadata"] == {"run": "exp1", "lrs": [0.1, 0.01], "nested": {"a": None}}
    assert set(data["files"]) == {"rank-00000.pt", "rank-00001.pt"}
    for rank in range(2):
        name = f"rank-{rank:05d}.pt"
        record = data["files"][name]
        assert record["size"] == (step_dir / name).stat().st_size
        assert record["checksum"] == file_checksum(step_dir / name)
        assert record["rank"] == rank
    assert sorted(os.listdir(step_dir)) == ["manifest.json", "rank-00000.pt", "rank-00001.pt"]

    info = distckpt.load_checkpoint(step_dir, rank=1)
    assert info.metrics["loss"] == 0.25
    assert info.metrics["ppl"] != info.metrics["ppl"]  # NaN read back as NaN
    assert info.metadata["run"] == "exp1"


# --------------------------------------------------------------------------- pickle opt-in


class Opaque:
    """A user class torch's weights-only loader does not know."""

    def __init__(self, value: int) -> None:
        self.value = value


def _save_and_restore_opaque(rank: int, world_size: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        out["saved"] = mgr.save(1, {"w": _weights(1, rank), "obj": Opaque(rank)}).step
        try:
            mgr.restore(1)
            out["refused"] = None
        except Exception as exc:
            out["refused"] = _err(exc)
        ckpt = mgr.restore(1, allow_pickle=True)
        out["allowed"] = ckpt.state["obj"].value
    return out


@pytest.mark.parametrize("world_size", [1, 2])
def test_allow_pickle_is_an_explicit_opt_in(root: Path, world_size: int) -> None:
    out = values(run_ranks(_save_and_restore_opaque, world_size, str(root), timeout=JOB_TIMEOUT))
    for rank, rank_out in enumerate(out):
        assert rank_out["saved"] == 1
        assert rank_out["refused"] is not None
        name, message, _, _ = rank_out["refused"]
        assert name == "UnsafeCheckpoint", message
        assert "allow_pickle" in message
        assert rank_out["allowed"] == rank

    with pytest.raises(distckpt.UnsafeCheckpoint, match="allow_pickle"):
        distckpt.load_checkpoint(root, rank=0)
    assert distckpt.load_checkpoint(root, rank=0, allow_pickle=True).state["obj"].value == 0


#: the INFO line of one commit: its step dir, size, seconds and throughput
COMMIT_LINE = re.compile(
    r"committed (?P<path>\S+): (?P<size>\d+\.\d) MiB in \d+\.\d\d s \(\d+\.\d MiB/s\)"
)


def _commit_lines(records: list[logging.LogRecord]) -> list[re.Match[str]]:
    return [
        match
        for record in records
        if record.name == "distckpt" and record.levelno == logging.INFO
        for match in [COMMIT_LINE.fullmatch(record.getMessage())]
        if match is not None
    ]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_one_info_line_per_commit(
    root: Path, caplog: pytest.LogCaptureFixture, async_save: bool
) -> None:
    caplog.set_level(logging.INFO, logger="distckpt")
    with distckpt.CheckpointManager(root, async_save=async_save, fsync=False) as mgr:
        for step in (1, 2):
            mgr.save(step, {"w": torch.zeros(1 << 19)})  # 2 MiB
            mgr.wait()
        mgr.save(2, {"w": torch.zeros(1)}, force=True)  # committed already: no commit, no line
    lines = _commit_lines(caplog.records)
    assert [match["path"] for match in lines] == [
        os.fspath(root / "step-00000001"),
        os.fspath(root / "step-00000002"),
    ]
    assert [match["size"] for match in lines] == ["2.0", "2.0"]


def _commit_lines_seen(rank: int, world_size: int, root: str) -> int:
    collected = Collected()
    logger = logging.getLogger("distckpt")
    logger.addHandler(collected)
    logger.setLevel(logging.INFO)
    with distckpt.CheckpointManager(root, fsync=False, timeout=TIMEOUT) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": _weights(step, rank)})
    return len(_commit_lines(collected.records))


def test_the_commit_line_comes_from_rank_0_alone(root: Path) -> None:
    assert values(run_ranks(_commit_lines_seen, 2, str(root), timeout=JOB_TIMEOUT)) == [3, 0]


# --------------------------------------------------------------------------- a failed proposal

#: How long rank 0's root work is held before it opens the staging area (a slow root: NFS, an
#: object store). A proposal that failed without waiting for its root work has raised long
#: before, so a staging area, its writer lock and the thread would outlive the failed save.
SLOW_ROOT_SECONDS = 0.3


def _slow_root_work(seconds: float) -> None:
    """Hold rank 0's root work at the ``before_staging`` fault point for ``seconds``: no slow
    root (NFS, an object store far away) exists here, so the delay is added at the point where
    such a root would spend it."""
    real_hit = faults.hit

    def hit(point: str, rank: int) -> None:
        if point == "before_staging":
            time.sleep(seconds)
        real_hit(point, rank)

    faults.hit = hit  # the proposal calls faults.hit through the module: this reaches it


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _propose_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("distckpt-propose")]


def _failed_proposals(
    rank: int, world_size: int, root: str, async_save: bool, failing_rank: int
) -> dict[str, Any]:
    """Save step 2 twice, failing each time on ``failing_rank`` alone: a metric that is no
    number (checked before the root work starts), then a state that refuses to be saved
    (after it started); rank 0's root work is slow both times."""
    out: dict[str, Any] = {"errors": [], "threads": []}
    _slow_root_work(SLOW_ROOT_SECONDS)
    with distckpt.CheckpointManager(root, timeout=TIMEOUT, async_save=async_save) as mgr:
        state: dict[str, Any] = {"w": _weights(2, rank)}
        mgr.save(1, {"w": _weights(1, rank)})  # the manager's own fds and threads are open now
        mgr.wait()
        after_rank_0_removals(mgr)  # whose thread holds fds for a while (gc waits for it, too)
        fds = _open_fds()
        failing = rank == failing_rank
        attempts = [
            ({**state}, {"loss": "not a number" if failing else 0.5}),
            ({**state, "obj": _RefusesItsState()} if failing else state, {"loss": 0.5}),
        ]
        for bad_state, metrics in attempts:
            try:
                mgr.save(2, bad_state, metrics=metrics)
            except Exception as exc:
                out["errors"].append(_err(exc))
            out["threads"].append(_propose_threads())  # right after save() raised
        mgr.gc()
        if rank == 0:
            out["staging"] = _staging_entries(Path(root))
        out["fds_leaked"] = _open_fds() - fds
        out["retry"] = mgr.save(2, state, metrics={"loss": 0.5}).step
        mgr.wait()
        out["steps"] = mgr.steps()
    return out


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_a_failed_proposal_leaves_no_staging_fd_or_thread_behind(
    root: Path, world_size: int, async_save: bool
) -> None:
    failing_rank = world_size - 1  # with 2 ranks, rank 1: rank 0's own arguments are fine
    out = values(
        run_ranks(
            _failed_proposals, world_size, str(root), async_save, failing_rank, timeout=JOB_TIMEOUT
        )
    )
    for rank_out in out:
        (metric_error, state_error) = rank_out["errors"]
        assert metric_error[0] == "InvalidArgument", metric_error
        assert "must be a number" in metric_error[1], metric_error
        assert state_error[2] and "refuses to be saved" in state_error[1], state_error
        assert rank_out["threads"] == [[], []]
        assert rank_out["fds_leaked"] == 0
        assert rank_out["retry"] == 2 and rank_out["steps"] == [1, 2]
    assert out[0]["staging"] == []


# --------------------------------------------------------------------------- kinds of state

#: A named tuple at module level, so the pickle opt-in can find its class on restore.
Pair = collections.namedtuple("Pair", "weights count")


@pytest.mark.parametrize("async_save", [False, True])
def test_a_named_tuple_round_trips(root: Path, async_save: bool) -> None:
    state = {"pair": Pair(torch.arange(4.0), 3), "nested": [Pair(torch.ones(2), 5)]}
    with distckpt.CheckpointManager(root, async_save=async_save, fsync=False) as mgr:
        mgr.save(1, state)
        mgr.wait()
        # A named tuple is a user class to torch's weights-only loader: it needs the opt-in.
        restored = mgr.restore(1, allow_pickle=True).state
    assert type(restored["pair"]) is Pair and type(restored["nested"][0]) is Pair
    assert torch.equal(restored["pair"].weights, torch.arange(4.0))
    assert restored["pair"].count == 3 and restored["nested"][0].count == 5


@pytest.mark.parametrize("async_save", [False, True])
def test_a_sparse_tensor_round_trips(root: Path, async_save: bool) -> None:
    sparse = torch.sparse_coo_tensor([[0, 2, 5]], [1.0, 2.0, 3.0], (8,))
    # It has no storage of its own: torch.save writes its indices' and its values' storages.
    assert storage_sizes({"sparse": sparse}) == [3 * 8, 3 * 4]
    with distckpt.CheckpointManager(root, async_save=async_save, fsync=False) as mgr:
        mgr.save(1, {"sparse": sparse, "dense": torch.ones(3)})
        sparse.add_(sparse)  # training goes on: an async save keeps what it copied
        mgr.wait()
        restored = mgr.restore(1).state["sparse"]
    assert restored.layout == torch.sparse_coo
    assert torch.equal(restored.to_dense(), torch.tensor([1.0, 0, 2.0, 0, 0, 3.0, 0, 0]))


# --------------------------------------------------------------------------- step dir widths


def test_overwrite_replaces_a_step_dir_of_another_width_where_it_is(root: Path) -> None:
    """Any width parses (README, On disk): ``step-5`` is step 5, so ``overwrite=True`` replaces
    it in place rather than adding ``step-00000005`` beside it, and a delete then leaves no
    old copy behind to come back."""
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        mgr.save(5, {"w": torch.full((3,), 5.0)})
    (root / "step-00000005").rename(root / "step-5")
    (root / "last").unlink()
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        assert mgr.steps() == [5]
        saved = mgr.save(5, {"w": torch.full((3,), 50.0)}, overwrite=True)
        assert saved.path == root / "step-5"
        assert sorted(p.name for p in root.glob("step-*")) == ["step-5"]
        assert mgr.steps() == [5]
        assert torch.equal(mgr.restore(5).state["w"], torch.full((3,), 50.0))
        mgr.delete(5)
        assert mgr.steps() == []
        assert mgr.restore(missing_ok=True) is None


def test_two_dirs_of_one_step_list_it_once_and_the_canonical_name_wins(root: Path) -> None:
    """A root holding ``step-00000005`` and ``step-5`` (copied in by hand) lists step 5 once,
    and reads and replaces the dir named as distckpt names it; the other one is step 5 again
    once that is deleted."""
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        mgr.save(5, {"w": torch.full((3,), 5.0)})
    import shutil

    shutil.copytree(root / "step-00000005", root / "step-5")
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        assert mgr.steps() == [5]
        mgr.save(5, {"w": torch.full((3,), 50.0)}, overwrite=True)
        assert torch.equal(mgr.restore(5).state["w"], torch.full((3,), 50.0))
        assert sorted(p.name for p in root.glob("step-*")) == ["step-00000005", "step-5"]
        mgr.delete(5)
        assert mgr.steps() == [5]
        assert torch.equal(mgr.restore(5).state["w"], torch.full((3,), 5.0))
