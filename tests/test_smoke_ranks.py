from __future__ import annotations

from pathlib import Path

import pytest
import torch

import distckpt
from tests.ranks import run_ranks, values


def _save_and_restore(rank: int, world_size: int, root: str) -> tuple[int, list[int], bool]:
    torch.manual_seed(rank)
    model = torch.nn.Linear(3, 3)
    with distckpt.CheckpointManager(root, keep_last=2, timeout=20) as mgr:
        for step in (10, 20, 30):
            result = mgr.save(step, {"model": model, "rank": rank})
        fresh = torch.nn.Linear(3, 3)
        ckpt = mgr.restore(state={"model": fresh, "rank": -1})
        return (
            result.step,
            mgr.steps(),
            ckpt.state["rank"] == rank and torch.equal(fresh.weight, model.weight),
        )


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_save_restore_across_ranks(tmp_path: Path, world_size: int) -> None:
    out = values(run_ranks(_save_and_restore, world_size, str(tmp_path / "ckpt")))
    assert out == [(30, [20, 30], True)] * world_size
