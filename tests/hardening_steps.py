"""Helpers shared by the hardening tests: saving steps on real ranks and reading back what a
root holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import distckpt
from tests.core_ranks import JOB_TIMEOUT, TIMEOUT, _weights
from tests.ranks import run_ranks, values


def _err(exc: BaseException) -> tuple[str, str]:
    return type(exc).__name__, str(exc)


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


def _truncate(path: Path) -> None:
    with open(path, "r+b") as file:
        file.truncate(path.stat().st_size // 2)
