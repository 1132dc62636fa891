"""The many-small-tensors job: a state of ``job["tensors"]`` tensors of 4 KiB per rank, where
per-tensor costs (pickling, zip records, the library's walks over the state) dominate the
bytes. Each round saves it with raw ``torch.save`` + fsync and with distckpt (sync,
``fsync=True``), in alternating order, then reads the raw ``torch.save`` file with
``torch.load`` and restores distckpt's checkpoint, in alternating order; the ratios are paired
per round."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from bench.contenders import raw_torch_save
from bench.summary import summarize_side_job
from bench.timing import Ranks
from distckpt import CheckpointManager

#: float32 elements of each tensor: 4 KiB
SMALL_ELEMENTS = 1024


def small_job(rank: int, world: int, job: dict[str, Any]) -> dict[str, Any] | None:
    """Rank 0 returns the per-round times of the four measurements."""
    logging.getLogger("distckpt").setLevel(logging.ERROR)
    ranks = Ranks(rank, world)
    work = Path(job["dir"])
    state = {
        "model": {f"rank{rank}.t{i}": torch.randn(SMALL_ELEMENTS) for i in range(job["tensors"])}
    }
    times: dict[str, list[float]] = {}
    mgr = CheckpointManager(work / "small", keep_last=1, fsync=True, timeout=job["pg_timeout"])
    mgr.save(0, state)  # untimed warm-up

    def one_round(r: int) -> None:
        step = r + 1
        raw_dir = ranks.fresh_dir(work / f"raw-{r}")
        raw_file = raw_dir / f"rank-{rank:05d}.pt"
        saves = [
            ("raw_torch_save", lambda: raw_torch_save(state, raw_file)),
            ("distckpt_sync_torch", lambda: mgr.save(step, state)),
        ]
        loads = [
            ("raw_torch_load", lambda: torch.load(raw_file, weights_only=True)),
            ("restore_full", lambda: mgr.restore(step)),
        ]
        for pair in (saves, loads):
            for name, fn in pair[r % 2 :] + pair[: r % 2]:
                times.setdefault(name, []).append(ranks.measure(lambda t0, fn=fn: fn())[""])
        ranks.remove(raw_dir)

    for r in range(job["rounds"]):
        one_round(r)
    mgr.close()
    if rank != 0:
        return None
    return {"ranks": world, "tensors": job["tensors"], "times": times}


def summarize_small(raw: dict[str, Any]) -> dict[str, Any]:
    """Medians and the two paired ratios the targets judge."""
    return summarize_side_job(
        raw,
        {
            "save_ratio": ("distckpt_sync_torch", "raw_torch_save"),
            "restore_ratio": ("restore_full", "raw_torch_load"),
        },
    )
