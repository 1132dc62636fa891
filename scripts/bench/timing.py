"""A rank's view of a benchmark job: the timing collectives, on the default gloo group (which
no library under test uses), and the clean-up between measurements."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from bench.contenders import Marks


class ContenderFailed(Exception):
    """A contender raised on some rank; raised on every rank alike after the gather."""


def first_line(exc: BaseException) -> str:
    """The exception's type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


class Ranks:
    """This rank's view of the job, with the timing collectives."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank = rank
        self.world = world
        #: (user, system) CPU seconds of the last measurement, the slowest rank's each (the
        #: whole process: background threads of async saves count)
        self.last_cpu = (0.0, 0.0)

    def barrier(self) -> None:
        dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def measure(self, fn: Callable[[float], Any]) -> dict[str, float]:
        """Start every rank together, run ``fn(t0)`` and return the slowest rank's seconds.
        ``fn`` may return :class:`Marks` (seconds since ``t0``) instead of one time; anything
        else it returns is dropped.
        A failure on any rank raises :class:`ContenderFailed` on every rank."""
        self.barrier()
        before = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        marks: dict[str, float] = {}
        error = None
        try:
            result = fn(t0)
            elapsed = time.perf_counter() - t0
            marks = dict(result) if isinstance(result, Marks) else {"": elapsed}
            del result  # a restored state must not outlive its measurement
        except Exception as exc:
            error = first_line(exc)
            if os.environ.get("DISTCKPT_BENCH_DEBUG"):
                traceback.print_exc()
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime)
        gathered = self.gather((marks, error, cpu))
        errors = {rank: err for rank, (_, err, _) in enumerate(gathered) if err}
        if errors:
            if len(errors) == self.world and len(set(errors.values())) == 1:
                raise ContenderFailed(f"on every rank: {errors[0]}")
            raise ContenderFailed("; ".join(f"rank {r}: {e}" for r, e in errors.items()))
        self.last_cpu = (max(c[0] for _, _, c in gathered), max(c[1] for _, _, c in gathered))
        return {key: max(m[key] for m, _, _ in gathered) for key in marks}

    def median_run(
        self, measured: list[tuple[dict[str, float], tuple[float, float]]]
    ) -> dict[str, float]:
        """The median of repeated measurements of one round (and of their CPU times, which
        become ``last_cpu``)."""
        self.last_cpu = (
            statistics.median(cpu[0] for _, cpu in measured),
            statistics.median(cpu[1] for _, cpu in measured),
        )
        return {key: statistics.median(m[key] for m, _ in measured) for key in measured[0][0]}

    def fresh_dir(self, path: Path) -> Path:
        if self.rank == 0:
            if path.exists():
                shutil.rmtree(path)
            path.mkdir(parents=True)
        self.barrier()
        return path

    def remove(self, path: Path | None = None) -> None:
        """Delete a contender's output (rank 0; None: it was deleted already) and flush the
        deletion's metadata writes and discards, outside any measurement, before the next."""
        self.barrier()
        if self.rank == 0:
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)
            os.sync()
        self.barrier()

    def delete_checkpoint(self, mgr: Any, step: int) -> None:
        """Delete a distckpt checkpoint right after its measurements (collective) and settle.

        So every save contender starts in the same state: right after the previous
        contender's output was deleted. It matters on VMs that hand free guest memory back to
        the host: writing into page-cache pages that were just freed is fast, while pages the
        host must fault in again made saves up to 2x slower (and their sys time 5x higher)
        here; a checkpoint kept across the next contender's save hands that contender the
        slow case."""
        with contextlib.suppress(Exception):  # a failed save has nothing to delete
            mgr.delete(step)
        self.remove()
