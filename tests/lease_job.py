"""A small checkpointing job for the tests of one writer job per root, run as real processes.

    python tests/lease_job.py ROOT OUT NAME --world-size 2 [options]   # run_ranks ranks
    python -m torch.distributed.run ... tests/lease_job.py ROOT OUT NAME [options]

``--world-size 1`` runs the job in this very process, with no process group, so that its exit
(its ``atexit`` hooks) is a real interpreter exit. Every rank appends what happens to it, one
JSON object a line, to ``OUT/NAME-rank<r>.jsonl``: its pid first (a test kills by pid the ranks
torchrun started: they live in sessions of their own), "opening" just
before the manager is made, then "opened" (with the seconds it took) or "refused" (the error,
and the holder's pid), one "saved" or "failed" per save attempt, and "closed". Every save's
metadata names the run and its ``TORCHELASTIC_RUN_ID``.

distckpt's log, from INFO up, goes to stderr (``distckpt INFO: ...``): a test waits there for a
start to say that it found the root held and waits for it.

A test steers the job through files in OUT: ``NAME.go-<i>`` lets save attempt i start
(``--gate``), ``NAME.resume`` lets rank 0 go on after it wrote ``NAME.held`` at the end of the
write phase of attempt ``--hold-in-save``, ``NAME.release`` lets the job close its manager
(``--hold-open``), and ``NAME.stop`` ends the save attempts early.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import distckpt
from distckpt import events

GATE_TIMEOUT = 120.0


def log_event(out: Path, run: str, rank: int, event: str, **fields: Any) -> None:
    line = json.dumps({"event": event, **fields})
    with open(out / f"{run}-rank{rank}.jsonl", "a") as log:
        log.write(line + "\n")


def wait_for_file(path: Path) -> None:
    deadline = time.monotonic() + GATE_TIMEOUT
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.02)


def _hold_in_save(out: Path, run: str, attempt: int) -> None:
    """Rank 0 stops at the end of the write phase of one save until the test lets it go on:
    a save that stays in progress for as long as the test needs (a phase listener is
    synchronous, in the thread that saves)."""
    seen = {"writes": 0}

    def listener(event: events.PhaseEvent) -> None:
        if event.phase == "save.write" and event.rank == 0:
            seen["writes"] += 1
            if seen["writes"] == attempt:
                (out / f"{run}.held").touch()
                wait_for_file(out / f"{run}.resume")

    events.add_listener(listener)


def job(rank: int, world_size: int, args: argparse.Namespace) -> None:
    out, run = Path(args.out), args.run
    log_event(out, run, rank, "pid", pid=os.getpid())
    if args.hold_in_save:
        _hold_in_save(out, run, args.hold_in_save)
    log_event(out, run, rank, "opening")
    began = time.monotonic()
    try:
        mgr = distckpt.CheckpointManager(
            args.root, timeout=args.timeout, wait_for_root=args.wait, async_save=args.async_save
        )
    except distckpt.RootInUse as exc:
        holder = exc.holder.pid if exc.holder is not None else None
        log_event(out, run, rank, "refused", type=type(exc).__name__, error=str(exc), holder=holder)
        return
    log_event(out, run, rank, "opened", seconds=time.monotonic() - began)
    resumed = mgr.restore("last", missing_ok=True)
    step = resumed.step if resumed is not None else 0
    metadata = {"run": run, "run_id": os.environ.get("TORCHELASTIC_RUN_ID")}
    for attempt in range(1, args.saves + 1):
        if (out / f"{run}.stop").exists():
            break
        if args.gate:
            wait_for_file(out / f"{run}.go-{attempt}")
        state = {"step": step + 1, "w": torch.full((256,), float(10 * (step + 1) + rank))}
        try:
            result = mgr.save(step + 1, state, metadata=metadata)
        except distckpt.CheckpointError as exc:
            log_event(
                out, run, rank, "failed", step=step + 1, type=type(exc).__name__, error=str(exc)
            )
        else:
            step += 1
            log_event(out, run, rank, "saved", step=step, done=result is not None and result.done)
        if attempt == args.crash_after:
            raise ZeroDivisionError("the training loop failed")
        time.sleep(args.pause)
    close_when_released(mgr, out, run, rank, hold_open=args.hold_open)


def close_when_released(
    mgr: distckpt.CheckpointManager, out: Path, run: str, rank: int, *, hold_open: bool
) -> None:
    """Close the manager and log "closed"; with ``hold_open``, only once ``OUT/RUN.release``
    exists (until then the job keeps the root)."""
    if hold_open:
        wait_for_file(out / f"{run}.release")
    mgr.close()
    log_event(out, run, rank, "closed")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root")
    parser.add_argument("out")
    # Not an option: torchrun's own parser would take "--run" for its "--run-path".
    parser.add_argument("run", help="names this job's files in OUT")
    parser.add_argument("--world-size", type=int, default=2, help="without torchrun")
    parser.add_argument("--wait", type=float, default=0.0, help="wait_for_root")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--saves", type=int, default=2, help="save attempts")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between attempts")
    parser.add_argument("--gate", action="store_true")
    parser.add_argument("--hold-in-save", type=int, default=0)
    parser.add_argument("--hold-open", action="store_true")
    parser.add_argument("--crash-after", type=int, default=0)
    parser.add_argument("--async-save", action="store_true")
    return parser.parse_args(argv)


def run_launched(
    job: Callable[[int, int, argparse.Namespace], None], args: argparse.Namespace
) -> None:
    """Run ``job(rank, world_size, args)`` as this process was started: as one rank of a
    torchrun job, alone (``args.world_size`` 1: no process group), or as the launcher of
    ``args.world_size`` ranks that tests/ranks.py forks (with ``args.timeout`` as the process
    group's timeout)."""
    torch.set_num_threads(1)
    log_distckpt_to_stderr()
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: one rank of its job
        import torch.distributed as dist

        dist.init_process_group("gloo")
        job(dist.get_rank(), dist.get_world_size(), args)
        dist.destroy_process_group()
    elif args.world_size == 1:
        job(0, 1, args)
    else:
        from tests.ranks import run_ranks

        if getattr(args, "format", None) == "dcp":
            # imported once here, not in every forked rank: it takes seconds (DTensor, sympy)
            import distckpt.formats.dcp  # noqa: F401
        results = run_ranks(job, args.world_size, args, timeout=600, pg_timeout=args.timeout)
        for result in results:
            result.unwrap()


def log_distckpt_to_stderr() -> None:
    """distckpt's log records from INFO up, on stderr (forked ranks inherit the handler)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
    library = logging.getLogger("distckpt")
    library.addHandler(handler)
    library.setLevel(logging.INFO)


def main(argv: list[str]) -> None:
    run_launched(job, parse(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
