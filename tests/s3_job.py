"""A small training job that checkpoints to an ``s3://`` root, for the end-to-end tests of the
object-store backend (``tests/test_s3_jobs.py``), run as real processes.

    python -m torch.distributed.run ... tests/s3_job.py URL OUT NAME --endpoint E [options]
    python tests/s3_job.py URL OUT NAME --endpoint E --world-size 2 [options]  # forked ranks

Every rank trains a deterministic "model": tensors ``w`` that each step advances from their
previous values (:func:`advance`), so a resume from a wrong or damaged checkpoint shows in every
later step. Step ``s`` holds exactly :func:`expected_state` ``(s, rank)``, and reports the loss
:func:`loss_at` ``(s)`` as its metric, so a test knows, without running the job, what every
step must restore to and which step is the best. A job resumes from ``last`` and trains until
step ``--steps``; run again after a kill, the same command carries on from the newest committed
step.

Every rank appends what happens to it, one JSON object a line, to ``OUT/NAME-rank<r>.jsonl``:
its pid first (a test kills by pid the ranks torchrun started: they run in sessions of their
own), "opening" just before the manager is made, then "opened" or "refused" (the error),
"resumed" (the step restored, or None), "saving" as each save starts, then "saved" or
"failed", and "closed". A job with ``--hold-open`` keeps its manager (and the root's lease)
until ``OUT/NAME.release`` exists.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

import distckpt
from tests import killing
from tests.lease_job import close_when_released, log_event, run_launched

#: float32 elements of each rank's ``w``
ELEMENTS = 4096
WORLD_SIZE = 2


def advance(w: torch.Tensor, step: int) -> torch.Tensor:
    """One training step: deterministic on a CPU, and every element depends on the last."""
    return w * 0.999 + torch.sin(w + step) * 0.01


def initial_weights() -> list[torch.Tensor]:
    """Every rank's ``w`` before step 1, one per rank of the job."""
    seeds = [torch.Generator().manual_seed(1000 + rank) for rank in range(WORLD_SIZE)]
    return [torch.randn(ELEMENTS, generator=seed) for seed in seeds]


def expected_state(step: int, rank: int, fmt: str, ballast_mib: int = 0) -> dict[str, Any]:
    """What rank ``rank`` saves at ``step`` (recomputed from the start)."""
    weights = initial_weights()
    for done in range(1, step + 1):
        weights = [advance(w, done) for w in weights]
    return rank_state(step, rank, weights, fmt, ballast_mib)


def rank_state(
    step: int, rank: int, weights: list[torch.Tensor], fmt: str, ballast_mib: int = 0
) -> dict[str, Any]:
    """The state a rank saves. The "model" is replicated, as under DDP: every rank holds every
    ``w`` (the "dcp" format keeps one copy of what every rank holds, so values that differ
    between ranks would be lost there). In the "torch" format, where each rank writes a file of
    its own, ``own`` differs between ranks: a rank restoring another's file shows."""
    state: dict[str, Any] = {
        "model": {f"w{index}": w for index, w in enumerate(weights)},
        "step": torch.tensor(step),
    }
    if fmt == "torch":
        state["own"] = torch.full((16,), float(1000 * rank + step))
    if ballast_mib:
        # Only makes each save take long enough for a kill to land inside it.
        state["ballast"] = torch.full((ballast_mib * 2**18,), float(step))
    return state


def template(rank: int, fmt: str, ballast_mib: int = 0) -> dict[str, Any]:
    """A state of the saved structure to restore into."""
    zeros = [torch.zeros(ELEMENTS) for _ in range(WORLD_SIZE)]
    return rank_state(0, rank, zeros, fmt, ballast_mib)


def matches(expected: dict[str, Any], restored: dict[str, Any]) -> bool:
    """Whether ``restored`` equals ``expected`` bit for bit."""
    try:
        killing.assert_equal(expected, restored)
    except AssertionError:
        return False
    return True


def loss_at(step: int) -> float:
    """The metric a step reports: distinct for steps below 101, lowest at step 3 up to 10."""
    return float((step * 37) % 101)


def storage_options(args: argparse.Namespace) -> dict[str, str]:
    return {"endpoint_url": args.endpoint, "key": args.key, "secret": args.secret}


def job(rank: int, world_size: int, args: argparse.Namespace) -> None:
    out, run = Path(args.out), args.run
    log_event(out, run, rank, "pid", pid=os.getpid())
    log_event(out, run, rank, "opening")
    try:
        mgr = distckpt.CheckpointManager(
            args.url,
            storage_options=storage_options(args),
            format=args.format,
            async_save=args.async_save,
            keep_last=args.keep_last,
            keep_best=args.keep_best,
            monitor="loss" if args.keep_best else None,
            timeout=args.timeout,
            wait_for_root=args.wait,
        )
    except distckpt.RootInUse as exc:
        log_event(out, run, rank, "refused", type=type(exc).__name__, error=str(exc))
        return
    log_event(out, run, rank, "opened")
    restored = template(rank, args.format, args.ballast_mib)
    resumed = mgr.restore("last", state=restored, missing_ok=True)
    step = resumed.step if resumed is not None else 0
    expected = expected_state(step, rank, args.format, args.ballast_mib)
    exact = resumed is None or matches(expected, restored)
    log_event(out, run, rank, "resumed", step=None if resumed is None else step, exact=exact)
    weights = list(restored["model"].values()) if resumed is not None else initial_weights()
    metadata = {"run": run}
    while step < args.steps:
        if (out / f"{run}.stop").exists():
            break
        weights = [advance(w, step + 1) for w in weights]
        state = rank_state(step + 1, rank, weights, args.format, args.ballast_mib)
        log_event(out, run, rank, "saving", step=step + 1)
        try:
            result = mgr.save(
                step + 1, state, metrics={"loss": loss_at(step + 1)}, metadata=metadata
            )
        except distckpt.CheckpointError as exc:
            log_event(
                out, run, rank, "failed", step=step + 1, type=type(exc).__name__, error=str(exc)
            )
            break
        step += 1
        log_event(out, run, rank, "saved", step=step, done=result is not None and result.done)
        time.sleep(args.pause)
    try:
        mgr.wait()  # an async save still in flight
    except distckpt.CheckpointError as exc:
        log_event(out, run, rank, "failed", step=step, type=type(exc).__name__, error=str(exc))
    close_when_released(mgr, out, run, rank, hold_open=args.hold_open)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url", help="the s3:// root")
    parser.add_argument("out")
    # Not an option: torchrun's own parser would take "--run" for its "--run-path".
    parser.add_argument("run", help="names this job's files in OUT")
    parser.add_argument("--endpoint", required=True, help="the S3 server's URL")
    parser.add_argument("--key", default="test-key")
    parser.add_argument("--secret", default="test-secret")
    parser.add_argument(
        "--world-size", type=int, default=WORLD_SIZE, help="forked ranks, without torchrun"
    )
    parser.add_argument("--format", choices=("torch", "dcp"), default="torch")
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--steps", type=int, default=4, help="train until this step")
    parser.add_argument("--keep-last", type=int)
    parser.add_argument("--keep-best", type=int, help="with the metric 'loss' (lower is better)")
    parser.add_argument("--ballast-mib", type=int, default=0)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between saves")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--wait", type=float, default=0.0, help="wait_for_root")
    parser.add_argument("--hold-open", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    run_launched(job, parse(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
