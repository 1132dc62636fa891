"""An FSDP2 training job in the "dcp" format that the exact-resume tests run, kill and run again.

``python tests/fsdp_job.py ROOT OUT [--rng per-rank|unmarked]`` starts 2 gloo ranks (forked, so
they share the job's process group and a SIGKILL of the group reaches every rank), each with
its own dropout stream, and trains a ``fully_shard``-ed dropout model with Adam for
:data:`TOTAL_STEPS` optimizer steps from ``restore("last")``, saving every 2 steps with
``format="dcp"``. The RNGs are in the state as :class:`distckpt.RNGState` (per rank), or with
``--rng unmarked`` as a Stateful value distckpt does not know to be per rank, which "dcp" saves
once for all ranks.

Each rank appends every step's loss to ``OUT/losses-rank{r}.txt`` as ``0 step loss`` (the loss
in ``float.hex``, exact) and, at the end, saves its full (unsharded) parameters and optimizer
state and its RNG state to ``OUT/final-rank{r}.pt``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch._dynamo  # imported once before the fork: FSDP2 would import it in every rank

import distckpt
from distckpt.formats.dcp import ModelOptimizerState
from tests.ranks import JOB_TIMEOUT_SECONDS, run_job_ranks
from tests.test_dcp import fsdp, full_state

WORLD_SIZE = 2
TOTAL_STEPS = 24


class UnmarkedRNG:
    """The RNGs as a Stateful value distckpt does not know to be per rank: what a user's own
    RNG wrapper looks like without distckpt.PerRank around it."""

    def state_dict(self) -> dict[str, Any]:
        return distckpt.capture_rng()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        distckpt.restore_rng(state)


def dropout_model() -> torch.nn.Sequential:
    torch.manual_seed(0)  # the same initial weights on every rank and in every run
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(16, 5)
    )


def rank_batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(1000 * rank + step))


def train(rank: int, args: argparse.Namespace) -> None:
    """Train to TOTAL_STEPS on one rank, from a fresh start or from ``last``."""
    model = fsdp(dropout_model(), WORLD_SIZE)
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    tracker = distckpt.StepTracker(optim)
    torch.manual_seed(100 + rank)  # every rank draws its own dropout masks
    state = {
        "app": ModelOptimizerState(model, optim),
        "steps": tracker,
        "rng": distckpt.RNGState() if args.rng == "per-rank" else UnmarkedRNG(),
    }
    losses = open(args.out / f"losses-rank{rank}.txt", "a", buffering=1)  # noqa: SIM115
    with distckpt.CheckpointManager(
        args.root,
        format="dcp",
        every_n_steps=2,
        keep_last=2,
        fsync=False,
        timeout=JOB_TIMEOUT_SECONDS,  # a hang fails within the test's wait, naming where
    ) as mgr:
        mgr.restore("last", state=state, missing_ok=True)
        while tracker.step < TOTAL_STEPS:
            step = tracker.step
            optim.zero_grad()
            loss = model(rank_batch(rank, step)).square().mean()
            loss.backward()
            optim.step()
            losses.write(f"0 {step} {loss.item().hex()}\n")
            mgr.save(tracker.step, state)
    final = {"state": full_state(model, optim), "rng": torch.get_rng_state()}
    tracker.close()
    torch.save(final, args.out / f"final-rank{rank}.pt")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("out", type=Path)
    parser.add_argument("--rng", choices=("per-rank", "unmarked"), default="per-rank")
    args = parser.parse_args()
    return run_job_ranks(train, WORLD_SIZE, args, args.out)


if __name__ == "__main__":
    sys.exit(main())
