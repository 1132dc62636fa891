"""Running a job's ranks: one job per configuration, and the jobs beside the main ones
(coordination, many small tensors), each in a directory of its own."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.ranks import run_ranks


class JobFailed(Exception):
    """A job's rank raised, died or hung; the job's configuration is reported as failed."""


def run_job(
    fn: Callable[..., dict[str, Any] | None],
    world: int,
    job: dict[str, Any],
    *,
    method: str,
    timeout: float,
) -> dict[str, Any]:
    """Start ``world`` ranks running ``fn(rank, world, job)``; rank 0's result. The first rank
    to fail stops the job (its peers are killed). The ranks are not daemonic, so DCP's
    process-based ``async_save`` can start its checkpoint process in each; whatever a rank
    started is killed with it when the job ends, however it ends."""
    try:
        results = run_ranks(
            fn,
            world,
            job,
            timeout=timeout,
            pg_timeout=job["pg_timeout"],
            start_method=method,
            fail_fast=True,
            daemon=False,
        )
    except (TimeoutError, AssertionError) as exc:  # a hang, or ranks that died silently
        raise JobFailed(str(exc)) from None
    for result in results:
        if result.error_type is not None:
            raise JobFailed(f"rank {result.rank} failed:\n{result.traceback}")
    if not results or results[0].rank != 0:
        raise JobFailed("rank 0 did not report")
    return results[0].value


def log(started: float, text: str) -> None:
    print(f"[{time.monotonic() - started:7.1f} s] {text}", file=sys.stderr, flush=True)


def side_job(
    fn: Callable[..., dict[str, Any] | None],
    world: int,
    job: dict[str, Any],
    run_dir: Path,
    what: str,
    started: float,
    args: argparse.Namespace,
) -> dict[str, Any] | None:
    """Run a job besides the main ones in a directory of its own; rank 0's result, or None
    (logged) if it failed."""
    job_dir = run_dir / f"{what}-{world}"
    job_dir.mkdir()
    log(started, f"{what} at {world} ranks: starting")
    try:
        return run_job(
            fn, world, {**job, "dir": os.fspath(job_dir)}, method=args.start_method, timeout=900
        )
    except JobFailed as exc:
        log(started, f"{what} job at {world} ranks FAILED: {exc}")
        return None
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)
