"""The coordination-overhead job: a ~1 KiB state saved with ``keep_last=2``, so every save
stages, agrees, locks, writes the manifest, renames, swaps ``last`` and deletes the oldest
checkpoint; the phases come from the events distckpt emits (:mod:`bench.phases`)."""

from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Any

import torch

from bench.contenders import raw_torch_save
from bench.phases import SavePhases, recording, summarize_phases
from bench.timing import Ranks
from distckpt import CheckpointManager

WARMUP_SAVES = 3


def coord_job(rank: int, world: int, job: dict[str, Any]) -> dict[str, Any] | None:
    """Time ``job["saves"]`` tiny saves (after :data:`WARMUP_SAVES`), raw ``torch.save`` +
    fsync of the same state and one ``all_gather_object``; rank 0 returns the times."""
    logging.getLogger("distckpt").setLevel(logging.ERROR)
    ranks = Ranks(rank, world)
    work = Path(job["dir"])
    saves = job["saves"]
    state = {"model": {f"rank{rank}.w": torch.randn(256)}, "step": 0}  # 1 KiB of tensor
    totals: list[float] = []
    phases: list[SavePhases] = []
    with recording() as recorder:
        mgr = CheckpointManager(work / "coord", keep_last=2, fsync=True, timeout=job["pg_timeout"])
        for step in range(WARMUP_SAVES):
            mgr.save(step, state)
        for step in range(WARMUP_SAVES, WARMUP_SAVES + saves):
            recorder.take()  # the previous save's stragglers and the timing barrier's
            totals.append(ranks.measure(lambda t0, s=step: mgr.save(s, state))[""])
            phases.append(recorder.take())
        mgr.close()
    raw_dir = ranks.fresh_dir(work / "coord_raw")
    raws = [
        ranks.measure(lambda t0, i=i: raw_torch_save(state, raw_dir / f"rank-{rank:05d}-{i}.pt"))[
            ""
        ]
        for i in range(saves)
    ]
    gathers = [ranks.measure(lambda t0: ranks.gather(rank))[""] for _ in range(saves)]
    ranks.remove(raw_dir)
    all_phases = ranks.gather(phases)
    if rank != 0:
        return None
    return {
        "ranks": world,
        "saves": totals,
        "raw_torch_save": raws,
        "all_gather_object": gathers,
        "phases_by_rank": all_phases,
        "state_bytes_per_rank": 256 * 4,
    }


def summarize_coord(raw: dict[str, Any]) -> dict[str, Any]:
    """Medians of the coordination job, and its phases (:func:`summarize_phases`)."""
    return {
        "ranks": raw["ranks"],
        "state_bytes_per_rank": raw["state_bytes_per_rank"],
        "saves": raw["saves"],
        "median_s": statistics.median(raw["saves"]),
        "p90_s": sorted(raw["saves"])[int(0.9 * (len(raw["saves"]) - 1))],
        "raw_torch_save_median_s": statistics.median(raw["raw_torch_save"]),
        "all_gather_object_median_s": statistics.median(raw["all_gather_object"]),
        "phases": summarize_phases(raw["phases_by_rank"]),
    }
