"""The core save / restore protocol on real gloo ranks: round trips, relative roots and links,
kinds of state, the manifest, the pickle opt-in and the line logged per commit."""

from __future__ import annotations

import collections
import copy
import json
import logging
import os
import random
import re
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
from distckpt.checksums import file_checksum
from distckpt.manifest import FORMAT_VERSION
from distckpt.state_sizes import storage_sizes
from tests.core_ranks import JOB_TIMEOUT, TIMEOUT, _err, _weights
from tests.ranks import Collected, run_ranks, values


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
