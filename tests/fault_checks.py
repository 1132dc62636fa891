"""What a fault or a kill test saves and checks in a root: each rank's known state at every
step, its loss, and what a crash may leave behind (staging dirs, trash, links), shared by
``tests/test_faults.py`` and ``tests/test_random_kills.py``."""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any

import torch

import distckpt
from distckpt.fsutil import read_link
from distckpt.layout import RootLayout, step_dir_name

TIMEOUT = 10  # manager collectives and the commit lock: a dead peer must not block for long
PG_TIMEOUT = 10
JOB_TIMEOUT = 30  # run_ranks: past this a job counts as hung and the test fails
#: Step 2 is the best: ``best`` and ``last`` differ once step 3 is committed.
LOSS = {1: 0.9, 2: 0.5, 3: 0.7, 4: 0.6}


def state_of(step: int, rank: int) -> dict[str, Any]:
    """What rank ``rank`` saves at ``step``: a deterministic function of both. The tensor's key
    names the rank, so a sharded format (DCP) keeps each rank's own values."""
    return {"step": step, f"rank{rank}": torch.full((4,), float(step * 10 + rank))}


def template_of(rank: int) -> dict[str, Any]:
    return {"step": -1, f"rank{rank}": torch.zeros(4)}


def state_matches(loaded: Any, template: dict[str, Any], step: int, rank: int) -> bool:
    """Whether a restore of ``step`` gave back what ``rank`` saved, both in the returned state
    and in the template loaded in place."""
    want = state_of(step, rank)
    key = f"rank{rank}"
    return (
        loaded["step"] == step
        and torch.equal(loaded[key], want[key])
        and torch.equal(template[key], want[key])
    )


def loss_of(step: int) -> float:
    """A loss for any step: ``LOSS`` for the fault scenarios, a scrambled one beyond (so that
    ``best`` moves around), never the same for two steps."""
    return LOSS.get(step, ((step * 7919) % 101) / 100 + 0.01 + step * 1e-9)


def entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory)) if directory.is_dir() else []


def leftovers(root: Path) -> dict[str, list[str]]:
    """What a crash can leave: staging dirs (and their lock files) and trash entries."""
    return {"staging": entries(root / ".staging"), "trash": entries(root / ".trash")}


def link_target(root: Path, name: str) -> str | None:
    return read_link(root / name)


def committed_steps(root: Path) -> list[int]:
    return RootLayout.at(root).committed_steps()


def broken_checkpoints(root: Path) -> list[str]:
    """Every ``step-*`` dir that fails verify, with its problems (empty when all pass)."""
    report = distckpt.verify(root)
    return [f"{c.path.name}: {'; '.join(c.problems)}" for c in report.checkpoints if not c.ok]


def link_problems(root: Path) -> list[str]:
    """``last`` must name the newest committed step, ``best`` the best by ``loss_of``; each
    must name a dir that exists and passes verify."""
    steps = committed_steps(root)
    if not steps:
        return []
    want = {"last": steps[-1], "best": min(steps, key=loss_of)}
    problems = []
    for name, step in want.items():
        target = link_target(root, name)
        if target != step_dir_name(step):
            problems.append(f"{name} -> {target}, expected {step_dir_name(step)}")
        elif not distckpt.verify(root / name).ok:
            problems.append(f"{name} -> {target} fails verify")
    return problems


def describe(exc: BaseException) -> dict[str, Any]:
    return {
        "error_type": type(exc).__name__,
        "checkpoint_error": isinstance(exc, distckpt.CheckpointError),
        "error": str(exc)[:500],
        "traceback": traceback.format_exc()[-3000:],
    }


def manager(root: str, **options: Any) -> distckpt.CheckpointManager:
    options.setdefault("keep_last", 2)
    options.setdefault("monitor", "loss")
    options.setdefault("timeout", TIMEOUT)
    return distckpt.CheckpointManager(root, **options)
