"""Helpers shared by the core protocol tests: their timeouts, weights per step and rank, what a
rank reports of a distckpt error and what is left in a root's staging dir."""

from __future__ import annotations

from pathlib import Path

import torch

import distckpt
from tests.fault_checks import entries

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


def _staging_entries(root: Path) -> list[str]:
    return entries(root / ".staging")
