"""Jobs that rank checkpoints by a monitor, run against a POSIX or an S3 root alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt


def restart_with_another_monitor(root: str | Path, **options: Any) -> dict[str, Any]:
    """A root whose job ranked by ``loss`` (best: step 1) restarted by a manager without a
    monitor, then by a job ranking by ``val_acc``, which no checkpoint has. ``options``: the
    managers' storage options."""
    state = {"w": torch.zeros(2)}
    with distckpt.CheckpointManager(root, keep_last=2, monitor="loss", **options) as mgr:
        for step, loss in zip(range(1, 5), [1.0, 5.0, 6.0, 7.0]):
            mgr.save(step, state, metrics={"loss": loss})
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, **options) as mgr:  # knows no metric: best stays
        out["no monitor"] = mgr.restore("best").step
    with distckpt.CheckpointManager(
        root, keep_last=2, monitor="val_acc", mode="max", **options
    ) as mgr:
        out["best_step"] = mgr.best_step()
        with pytest.raises(distckpt.CheckpointNotFound):
            mgr.restore("best")
        for step in range(5, 9):
            mgr.save(step, state, metrics={"loss": 1.0})
        out["steps"] = mgr.steps()
    return out
