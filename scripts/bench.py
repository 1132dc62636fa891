#!/usr/bin/env python3
"""Benchmark distckpt against raw ``torch.save`` and DCP, on the same state, ranks and disk.

Every contender runs in one job per (world size, MiB per rank): the ranks are processes started
with ``torch.multiprocessing`` and joined by a gloo group on 127.0.0.1 (a free port), each with
one torch thread. Each round writes into a fresh directory that is deleted afterwards; the order
of the save contenders rotates from round to round; every time is the slowest rank's, and the
tables show medians over the rounds. Ratios between two contenders are medians of the per-round
ratios (paired measurements of the same run). Everything fsyncs: distckpt with ``fsync=True``,
raw ``torch.save`` followed by ``os.fsync``, DCP with ``sync_files=True``. Caches are not
dropped; each contender's output is deleted before the next one starts.

    python scripts/bench.py                                      # 1,2,4 ranks x 64,512 MiB
    python scripts/bench.py --world-sizes 2 --mib 512 --rounds 3 --json bench.json
    python scripts/bench.py --contenders raw_torch_save,distckpt_sync_torch --mib 64
    python scripts/bench.py --contenders train --world-sizes 2 --mib 512   # training slowdown

See docs/benchmark.md for what each contender measures and a run on a small machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import logging
import os
import platform
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time
import traceback
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # after OMP_NUM_THREADS, which torch reads when imported
import torch.distributed as dist
import torch.multiprocessing as tmp

MIB = 1 << 20
CHUNK_BYTES = 8 * MIB
TARGET_WORLD, TARGET_MIB = 2, 512
COORD_LIMIT_S = 0.050
#: "a small constant": what a sync save may add to the resident size of a rank holding its state
RSS_LIMIT_MIB = 64.0
#: The training step of the ``train`` contender: an MLP of TRAIN_DEPTH square layers of
#: TRAIN_WIDTH (12 MiB of parameters at 3 x 1024) on a batch of TRAIN_BATCH, ~30 ms of compute
#: on one core, plus an all_reduce of its 12 MiB of gradients; TRAIN_IDLE_STEPS timed steps
#: without a save per round, and at most TRAIN_MAX_STEPS while one runs.
TRAIN_WIDTH, TRAIN_DEPTH, TRAIN_BATCH = 1024, 3, 128
TRAIN_IDLE_STEPS, TRAIN_MAX_STEPS = 12, 2000

CONTENDERS: dict[str, str] = {
    "disk_write": "the disk itself: each rank writes as many bytes as its state in 8 MiB chunks "
    "(os.write) to its own file, then fsync",
    "raw_torch_save": "torch.save(state, path) + os.fsync by every rank into its own file, no "
    "coordination (what a timm/DeepSpeed-style per-rank saver costs)",
    "dcp_save": "torch.distributed.checkpoint.save with FileSystemWriter(sync_files=True, "
    "single_file_per_rank=True, thread_count=1) on a gloo group",
    "distckpt_sync_torch": "CheckpointManager(format='torch', fsync=True).save: staging, "
    "agreement, lock, manifest, rename, link swap",
    "distckpt_sync_dcp": "CheckpointManager(format='dcp', fsync=True).save (skipped with a note "
    "if the dcp format fails)",
    "distckpt_async_torch": "CheckpointManager(async_save=True).save: .blocking = until save() "
    "returns, .total = until wait() returns (buffers warmed by one untimed save)",
    "dcp_async_save": "torch.distributed.checkpoint.async_save on its own gloo group: .blocking "
    "= until it returns, .total = until its future is done",
    "copy": "copy_ of every tensor into preallocated buffers: the floor of an async snapshot",
    "crc32": "distckpt's CRC-32 (fsutil.crc32) over the state's bytes, as computed while writing",
    "train": "a DDP-like CPU training step on every rank (a 3-layer MLP: forward, backward, "
    "all_reduce of the flat gradients on the default gloo group, SGD): train_idle = its median "
    "time with no save running; train_during_distckpt_async = the median of the steps run "
    "after CheckpointManager(async_save=True).save returns until its background save is done "
    "on every rank; train_during_dcp_async = the same after dcp.async_save (gloo "
    "process_group) until its future is done; *.save = when that save finished, training "
    "alongside; *.lost = the training time the save cost (those steps' sum minus as many idle "
    "steps)",
    "restore": "restore_mmap = restore(step, mmap=True); restore_full = restore(step) (full "
    "read); raw_torch_load(_mmap) = torch.load of the same rank file; all with the page cache "
    "hot from the save; *_cold = the same after evicting the checkpoint's files "
    "(posix_fadvise DONTNEED)",
}
SAVE_CONTENDERS = (
    "disk_write",
    "raw_torch_save",
    "dcp_save",
    "distckpt_sync_torch",
    "distckpt_sync_dcp",
    "distckpt_async_torch",
    "dcp_async_save",
)
# Metrics whose time covers writing or reading the whole state (a throughput makes sense).
WHOLE_STATE = {
    "disk_write",
    "raw_torch_save",
    "dcp_save",
    "distckpt_sync_torch",
    "distckpt_sync_dcp",
    "distckpt_async_torch.total",
    "dcp_async_save.total",
    "copy",
    "crc32",
    "restore_full",
    "raw_torch_load",
    "restore_full_cold",
}
METRIC_ORDER = (
    "disk_write",
    "raw_torch_save",
    "dcp_save",
    "distckpt_sync_torch",
    "distckpt_sync_dcp",
    "distckpt_async_torch.blocking",
    "distckpt_async_torch.total",
    "dcp_async_save.blocking",
    "dcp_async_save.total",
    "copy",
    "crc32",
    "restore_mmap",
    "restore_full",
    "raw_torch_load",
    "raw_torch_load_mmap",
    "restore_mmap_cold",
    "restore_full_cold",
    "train_idle",
    "train_during_distckpt_async",
    "train_during_dcp_async",
    "train_during_distckpt_async.save",
    "train_during_dcp_async.save",
    "train_during_distckpt_async.lost",
    "train_during_dcp_async.lost",
)
RATIOS = (
    ("distckpt_sync_torch", "raw_torch_save"),
    ("distckpt_sync_torch", "dcp_save"),
    ("distckpt_sync_dcp", "dcp_save"),
    ("distckpt_sync_dcp", "raw_torch_save"),
    ("raw_torch_save", "disk_write"),
    ("dcp_save", "disk_write"),
    ("distckpt_sync_torch", "disk_write"),
    ("distckpt_async_torch.blocking", "copy"),
    ("distckpt_async_torch.blocking", "distckpt_sync_torch"),
    ("distckpt_async_torch.total", "distckpt_sync_torch"),
    ("dcp_async_save.blocking", "copy"),
    ("dcp_async_save.blocking", "dcp_save"),
    ("dcp_async_save.total", "dcp_save"),
    ("crc32", "distckpt_sync_torch"),
    ("restore_mmap", "restore_full"),
    ("restore_full", "raw_torch_load"),
    ("restore_mmap", "raw_torch_load_mmap"),
    ("restore_mmap_cold", "restore_full_cold"),
    ("train_during_distckpt_async", "train_idle"),
    ("train_during_dcp_async", "train_idle"),
    ("train_during_distckpt_async", "train_during_dcp_async"),
    ("train_during_distckpt_async.save", "distckpt_async_torch.total"),
    ("train_during_dcp_async.save", "dcp_async_save.total"),
    ("train_during_distckpt_async.lost", "train_during_dcp_async.lost"),
)


# ============================================================================== rank side


class Marks(dict):
    """Named times (seconds since the measurement's start) a measured function returns when
    one time is not enough, e.g. ``Marks(blocking=..., total=...)``."""


class ContenderFailed(Exception):
    """A contender raised on some rank; raised on every rank alike after the gather."""


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


class Ranks:
    """This rank's view of the job, with the timing collectives (on the default gloo group,
    which no library under test uses)."""

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
            error = _first_line(exc)
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


class Trainer:
    """A DDP-like CPU training step, the same on every rank: an MLP's forward and backward
    (gradients land in one flat buffer, like DDP's gradient_as_bucket_view), one all_reduce
    of that buffer on the default gloo group, an SGD step. Its model is separate from the
    state being saved, which no step touches."""

    def __init__(self, rank: int, world: int) -> None:
        torch.manual_seed(0)  # the same model on every rank, as DDP broadcasts it
        layers: list[torch.nn.Module] = []
        for i in range(TRAIN_DEPTH):
            layers.append(torch.nn.Linear(TRAIN_WIDTH, TRAIN_WIDTH))
            if i < TRAIN_DEPTH - 1:
                layers.append(torch.nn.ReLU())
        self.model = torch.nn.Sequential(*layers)
        params = list(self.model.parameters())
        self.flat = torch.zeros(sum(p.numel() for p in params))
        offset = 0
        for param in params:
            param.grad = self.flat[offset : offset + param.numel()].view_as(param)
            offset += param.numel()
        self.optimizer = torch.optim.SGD(params, lr=1e-4)
        generator = torch.Generator().manual_seed(rank + 1)  # each rank its own batch
        self.x = torch.randn(TRAIN_BATCH, TRAIN_WIDTH, generator=generator)
        self.y = torch.randn(TRAIN_BATCH, TRAIN_WIDTH, generator=generator)
        self.world = world
        self.flag = torch.zeros(1)
        self.run(lambda: True, 3)  # warm-up: allocator, autograd, the gloo buffers

    def step(self) -> float:
        """One training step; its seconds."""
        started = time.perf_counter()
        self.flat.zero_()
        loss = torch.nn.functional.mse_loss(self.model(self.x), self.y)
        loss.backward()
        dist.all_reduce(self.flat)
        self.flat.div_(self.world)
        self.optimizer.step()
        return time.perf_counter() - started

    def run(self, busy: Callable[[], bool], limit: int) -> list[float]:
        """Steps (at least one) while ``busy()`` is true on some rank, at most ``limit``: the
        ranks decide together after each step, untimed, with a 1-element all_reduce (as
        they must: each step's all_reduce needs every rank). Returns each step's seconds."""
        times: list[float] = []
        while len(times) < limit:
            times.append(self.step())
            self.flag.fill_(1.0 if busy() else 0.0)
            dist.all_reduce(self.flag, op=dist.ReduceOp.MAX)
            if self.flag.item() == 0.0:
                break
        return times


def make_state(rank: int, mib: int) -> dict[str, Any]:
    """About ``mib`` MiB of float32 tensors per rank: 8 MiB weights, each with an 8 KiB bias
    (like a model's layers), the last weight smaller to fit. Keys are unique per rank, so DCP
    (which deduplicates equal keys as replicated) writes every rank's tensors from that rank,
    exactly as the per-rank torch files do."""
    layers: dict[str, torch.Tensor] = {}
    remaining = mib * MIB
    index = 0
    while remaining > 0:
        rows = min(1024, max(1, remaining // (2048 * 4)))
        layers[f"rank{rank}.layer{index}.weight"] = torch.empty(rows, 2048).uniform_(-1, 1)
        layers[f"rank{rank}.layer{index}.bias"] = torch.empty(2048).uniform_(-1, 1)
        remaining -= rows * 2048 * 4
        index += 1
    return {"model": layers, "step": 1000}


def iter_tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from iter_tensors(item)


def _current_rss() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _write_chunks(path: Path, chunk: bytes, nbytes: int) -> None:
    view = memoryview(chunk)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        remaining = nbytes
        while remaining > 0:
            remaining -= os.write(fd, view[: min(remaining, len(view))])
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _main_job(ranks: Ranks, job: dict[str, Any]) -> dict[str, Any] | None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    from distckpt import CheckpointManager
    from distckpt.layout import rank_file_name

    rank = ranks.rank
    work = Path(job["dir"])
    rounds, repeats = job["rounds"], job["repeats"]
    timeout = job["pg_timeout"]
    active = [name for name in CONTENDERS if name in job["contenders"]]
    state = make_state(rank, job["mib"])
    tensors = list(iter_tensors(state))
    nbytes = sum(t.untyped_storage().nbytes() for t in tensors)
    tiny = {"tiny": {f"rank{rank}": torch.zeros(256)}}
    times: dict[str, list[float | None]] = {}
    cpu: dict[str, dict[str, list[float | None]]] = {}
    skipped: dict[str, str] = {}
    info: dict[str, Any] = {"state_bytes_per_rank": nbytes, "tensors_per_rank": len(tensors)}

    def put(r: int, name: str, marks: dict[str, float]) -> None:
        """Record a measurement of round ``r`` (and the CPU time ``ranks.measure`` saw)."""
        for key, value in marks.items():
            times.setdefault(f"{name}.{key}" if key else name, [None] * rounds)[r] = value
        for kind, value in zip(("user", "sys"), ranks.last_cpu):
            cpu.setdefault(kind, {}).setdefault(name, [None] * rounds)[r] = value

    def skip(name: str, why: str) -> None:
        if name in active:
            active.remove(name)
        skipped[name] = why

    def fsw(path: Path) -> FileSystemWriter:
        return FileSystemWriter(
            path, single_file_per_rank=True, sync_files=True, thread_count=1, overwrite=True
        )

    managers: list[Any] = []

    def manager(name: str, **kwargs: Any) -> Any:
        mgr = CheckpointManager(work / name, fsync=True, timeout=timeout, **kwargs)
        managers.append(mgr)
        return mgr

    # -- distckpt torch format: the first save is untimed and measures peak RSS (this process
    #    has done nothing bigger than allocating its state yet).
    mgr_t = None
    if {"distckpt_sync_torch", "restore"} & set(active):
        mgr_t = manager("distckpt_torch", format="torch")
        ranks.barrier()
        rss_before, max_before = _current_rss(), _max_rss()
        started = time.perf_counter()
        mgr_t.save(0, state)
        first = time.perf_counter() - started
        max_after = _max_rss()
        _delete(ranks, mgr_t, 0)
        info["rss"] = ranks.gather(
            {
                "rank": rank,
                "state_bytes": nbytes,
                "rss_before": rss_before,
                "max_rss_before": max_before,
                "max_rss_after": max_after,
                "extra": max(0, max_after - rss_before),
                "peak_set_earlier": max_after <= max_before,
            }
        )
        info["distckpt_sync_torch.first_save"] = max(ranks.gather(first))

    # -- DCP: its own gloo groups; probed with a tiny state so a failure is a clear skip.
    dcp_group = dist.new_group(backend="gloo") if "dcp_save" in active else None
    dcp_async = {"dcp_async_save", "train"} & set(active)
    async_group = dist.new_group(backend="gloo") if dcp_async else None
    dcp_async_ok = bool(dcp_async)
    if "dcp_save" in active:
        probe = ranks.fresh_dir(work / "dcp_probe")
        try:
            ranks.measure(
                lambda t0: dcp.save(tiny, storage_writer=fsw(probe), process_group=dcp_group)
            )
        except ContenderFailed as exc:
            skip("dcp_save", f"dcp.save failed: {exc}")
        ranks.remove(probe)
    if dcp_async:
        probe = ranks.fresh_dir(work / "dcp_async_probe")
        try:
            ranks.measure(
                lambda t0: _result(
                    dcp.async_save(tiny, storage_writer=fsw(probe), process_group=async_group)
                )
            )
        except ContenderFailed as exc:
            dcp_async_ok = False
            why = f"dcp.async_save failed: {exc}"
            if "dcp_async_save" in active:
                skip("dcp_async_save", why)
            if "train" in active:
                skipped["train_during_dcp_async"] = why
        ranks.remove(probe)

    mgr_d = None
    if "distckpt_sync_dcp" in active:
        try:
            made = ranks.measure(lambda t0: manager("distckpt_dcp", format="dcp"))
            del made
            mgr_d = managers[-1]
            ranks.measure(lambda t0: mgr_d.save(0, tiny))
            _delete(ranks, mgr_d, 0)
        except ContenderFailed as exc:
            skip("distckpt_sync_dcp", f"format='dcp' does not work (yet): {exc}")
        except Exception as exc:  # the format is being written concurrently: anything goes
            skip("distckpt_sync_dcp", f"format='dcp' does not work (yet): {_first_line(exc)}")

    mgr_a = None  # saves step 2r+1 in round r as distckpt_async_torch, 2r+2 under training
    if {"distckpt_async_torch", "train"} & set(active):
        mgr_a = manager("distckpt_async", format="torch", async_save=True)
        marks = ranks.measure(lambda t0: _async_marks(t0, mgr_a, 0, state))
        _delete(ranks, mgr_a, 0)
        info["distckpt_async_torch.first_save_blocking"] = marks["blocking"]

    buffers: list[torch.Tensor] = []
    if "copy" in active:
        buffers = [torch.empty_like(t) for t in tensors]
        for buffer, tensor in zip(buffers, tensors):
            buffer.copy_(tensor)  # fault the pages in: a steady-state copy reuses them
    views = [t.reshape(-1).view(torch.uint8).numpy() for t in tensors]
    chunk = os.urandom(CHUNK_BYTES) if "disk_write" in active else b""

    def measure_reads(r: int, step: int) -> None:
        """Round ``r``'s restore measurements, on ``mgr_t``'s checkpoint of ``step``: hot
        (the pages the save left in the page cache) in rotating order, then cold (this
        checkpoint's files evicted with posix_fadvise first; no other cache is dropped)."""
        assert mgr_t is not None
        rank_file = mgr_t.layout.step_dir(step) / rank_file_name(rank)
        hot: list[tuple[str, Callable[[float], Any]]] = [
            ("restore_mmap", lambda t0: mgr_t.restore(step, mmap=True)),
            ("restore_full", lambda t0: mgr_t.restore(step)),
            ("raw_torch_load", lambda t0: torch.load(rank_file, weights_only=True)),
            ("raw_torch_load_mmap", lambda t0: torch.load(rank_file, weights_only=True, mmap=True)),
        ]
        cold: list[tuple[str, Callable[[float], Any]]] = [
            ("restore_mmap_cold", lambda t0: mgr_t.restore(step, mmap=True)),
            ("restore_full_cold", lambda t0: mgr_t.restore(step)),
        ]
        runs: dict[str, list[tuple[dict[str, float], tuple[float, float]]]] = {}
        try:
            for i in range(repeats):
                # Rotated: each full read allocates memory the previous one just freed.
                shift = (r * repeats + i) % len(hot)
                for name, read in hot[shift:] + hot[:shift]:
                    runs.setdefault(name, []).append((ranks.measure(read), ranks.last_cpu))
                for name, read in cold:  # last: the full cold read leaves the cache hot again
                    _evict(rank_file)
                    runs.setdefault(name, []).append((ranks.measure(read), ranks.last_cpu))
        except ContenderFailed as exc:
            skip("restore", f"failed in round {r}: {exc}")
            return
        for name, measured in runs.items():
            put(r, name, _median_run(ranks, measured))

    def run_save(name: str, r: int) -> dict[str, float]:
        step = r + 1
        if name == "disk_write":
            d = ranks.fresh_dir(work / name / f"round-{r}")
            try:
                return ranks.measure(
                    lambda t0: _write_chunks(d / f"rank-{rank:05d}.bin", chunk, nbytes)
                )
            finally:
                ranks.remove(d)
        if name == "raw_torch_save":
            d = ranks.fresh_dir(work / name / f"round-{r}")

            def raw(t0: float) -> None:
                path = d / f"rank-{rank:05d}.pt"
                torch.save(state, path)
                _fsync_path(path)

            try:
                return ranks.measure(raw)
            finally:
                ranks.remove(d)
        if name == "dcp_save":
            d = ranks.fresh_dir(work / name / f"round-{r}")
            try:
                return ranks.measure(
                    lambda t0: dcp.save(state, storage_writer=fsw(d), process_group=dcp_group)
                )
            finally:
                ranks.remove(d)
        if name == "dcp_async_save":
            d = ranks.fresh_dir(work / name / f"round-{r}")

            def dcp_async(t0: float) -> Marks:
                future = dcp.async_save(state, storage_writer=fsw(d), process_group=async_group)
                blocking = time.perf_counter() - t0
                _result(future)
                return Marks(blocking=blocking, total=time.perf_counter() - t0)

            try:
                return ranks.measure(dcp_async)
            finally:
                ranks.remove(d)
        if name == "distckpt_sync_torch":
            assert mgr_t is not None
            try:
                marks = ranks.measure(lambda t0: mgr_t.save(step, state))
                if "restore" in active:
                    cpu_of_save = ranks.last_cpu
                    measure_reads(r, step)  # before the next save: see _delete
                    ranks.last_cpu = cpu_of_save
                return marks
            finally:
                _delete(ranks, mgr_t, step)
        if name == "distckpt_sync_dcp":
            assert mgr_d is not None
            try:
                return ranks.measure(lambda t0: mgr_d.save(step, state))
            finally:
                _delete(ranks, mgr_d, step)
        if name == "distckpt_async_torch":
            assert mgr_a is not None
            try:
                return ranks.measure(lambda t0: _async_marks(t0, mgr_a, 2 * r + 1, state))
            finally:
                _delete(ranks, mgr_a, 2 * r + 1)
        raise AssertionError(name)

    trainer = Trainer(rank, ranks.world) if "train" in active else None
    train_steps: dict[str, list[int]] = {}

    def train_during(
        t0: float, start: Callable[[], tuple[Callable[[], bool], Callable[[], Any]]], idle: float
    ) -> Marks:
        """Start a background save (``start`` returns "is it still running?" and "wait for
        it"), then train until it is done on every rank: the median of those steps; ``save`` =
        when the save was seen done, to the step (seconds since ``t0``, this rank's); ``lost`` =
        the training time the save cost, the steps' sum minus as many ``idle`` steps."""
        assert trainer is not None
        running, finish = start()
        done_at: list[float] = []

        def still_running() -> bool:
            if running():
                return True
            if not done_at:
                done_at.append(time.perf_counter())
            return False

        steps = trainer.run(still_running, TRAIN_MAX_STEPS)
        finish()
        done = done_at[0] if done_at else time.perf_counter()
        lost = sum(steps) - len(steps) * idle
        return Marks(
            {"": statistics.median(steps), "save": done - t0, "lost": lost, "n": len(steps)}
        )

    def measure_training(r: int) -> None:
        """Round ``r``'s training measurements: idle steps, then steps during each async save
        (which of the two goes first alternates from round to round); each save's output is
        deleted before the next measurement, as for the save contenders."""
        assert trainer is not None and mgr_a is not None
        idle = ranks.measure(
            lambda t0: Marks({"": statistics.median(trainer.run(lambda: True, TRAIN_IDLE_STEPS))})
        )
        put(r, "train_idle", idle)

        def distckpt_start() -> tuple[Callable[[], bool], Callable[[], Any]]:
            mgr_a.save(2 * r + 2, state)
            return (lambda: mgr_a.save_in_flight), mgr_a.wait

        def with_distckpt() -> None:
            try:
                marks = ranks.measure(lambda t0: train_during(t0, distckpt_start, idle[""]))
            finally:
                _delete(ranks, mgr_a, 2 * r + 2)
            record("train_during_distckpt_async", marks)

        def with_dcp() -> None:
            d = ranks.fresh_dir(work / "train_dcp" / f"round-{r}")

            def dcp_start() -> tuple[Callable[[], bool], Callable[[], Any]]:
                future = dcp.async_save(state, storage_writer=fsw(d), process_group=async_group)
                future = getattr(future, "upload_completion", future)
                return (lambda: not future.done()), future.result

            try:
                marks = ranks.measure(lambda t0: train_during(t0, dcp_start, idle[""]))
            finally:
                ranks.remove(d)
            record("train_during_dcp_async", marks)

        def record(name: str, marks: dict[str, float]) -> None:
            train_steps.setdefault(name, [0] * rounds)[r] = int(marks.pop("n"))
            put(r, name, marks)

        both = [with_distckpt, with_dcp] if dcp_async_ok else [with_distckpt]
        for run in both[r % len(both) :] + both[: r % len(both)]:
            run()

    order = [name for name in SAVE_CONTENDERS if name in active]
    for r in range(rounds):
        step = r + 1
        # Decided from what this rank did, never from the disk: rank 0 may have changed it.
        read_done = False
        shift = r % len(order) if order else 0
        for name in order[shift:] + order[:shift]:
            if name not in active:
                continue
            try:
                put(r, name, run_save(name, r))
                read_done = read_done or name == "distckpt_sync_torch"
            except ContenderFailed as exc:
                skip(name, f"failed in round {r}: {exc}")
        if mgr_t is not None and "restore" in active and not read_done:
            try:
                ranks.measure(lambda t0, s=step: mgr_t.save(s, state))  # untimed
                measure_reads(r, step)
            except ContenderFailed as exc:
                skip("restore", f"failed in round {r}: {exc}")
            finally:
                _delete(ranks, mgr_t, step)
        for name, fn in (
            ("crc32", lambda t0: _crc32(views)),
            ("copy", lambda t0: _copy(buffers, tensors)),
        ):
            if name in active:
                measured = [(ranks.measure(fn), ranks.last_cpu) for _ in range(repeats)]
                put(r, name, _median_run(ranks, measured))

    # Training last, in rounds of its own: its allocations (gloo's buffers for 12 MiB of
    # gradients) raise glibc's mmap threshold above the state's 8 MiB tensors, after which a
    # full restore reuses heap pages instead of faulting fresh ones (2-3x faster here): run
    # before the other contenders' rounds, it would change what they measure.
    for r in range(rounds if "train" in active else 0):
        try:
            measure_training(r)
        except ContenderFailed as exc:
            skip("train", f"failed in round {r}: {exc}")
            break
    for mgr in managers:
        mgr.close()
    if train_steps:
        info["train_steps_during_save"] = train_steps
    if rank != 0:
        return None
    return {"times": times, "cpu": cpu, "skipped": skipped, "info": info}


def _evict(path: Path) -> None:
    """Drop one file's (clean, fsynced) pages from the page cache: a cold read of it next."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _delete(ranks: Ranks, mgr: Any, step: int) -> None:
    """Delete a distckpt checkpoint right after its measurements (collective) and settle.

    So every save contender starts in the same state: right after the previous contender's
    output was deleted. It matters on VMs that hand free guest memory back to the host:
    writing into page-cache pages that were just freed is fast, while pages the host must
    fault in again made saves up to 2x slower (and their sys time 5x higher) here; a
    checkpoint kept across the next contender's save hands that contender the slow case."""
    with contextlib.suppress(Exception):  # a failed save has nothing to delete
        mgr.delete(step)
    ranks.remove()


def _median_run(
    ranks: Ranks, measured: list[tuple[dict[str, float], tuple[float, float]]]
) -> dict[str, float]:
    """The median of repeated measurements of one round (and of their CPU times)."""
    ranks.last_cpu = (
        statistics.median(cpu[0] for _, cpu in measured),
        statistics.median(cpu[1] for _, cpu in measured),
    )
    return {key: statistics.median(m[key] for m, _ in measured) for key in measured[0][0]}


def _result(future: Any) -> Any:
    """Wait for what ``dcp.async_save`` returned (a Future, or an AsyncSaveResponse)."""
    upload = getattr(future, "upload_completion", future)
    return upload.result()


def _async_marks(t0: float, mgr: Any, step: int, state: Any) -> Marks:
    mgr.save(step, state)
    blocking = time.perf_counter() - t0
    mgr.wait()
    return Marks(blocking=blocking, total=time.perf_counter() - t0)


def _crc32(views: Sequence[Any]) -> int:
    from distckpt import fsutil

    crc = 0
    for view in views:
        crc = fsutil.crc32(view, crc)
    return crc


def _copy(buffers: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor]) -> None:
    for buffer, tensor in zip(buffers, tensors):
        buffer.copy_(tensor)


def _instrument(mgr: Any, spans: dict[str, float]) -> None:
    """Add the time of each phase of a save to ``spans`` (this process only; no file of the
    library is changed). Nested phases are indented in their labels."""
    import distckpt.manager as manager_module

    def wrap(owner: Any, attr: str, label: str) -> None:
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spans[label] += time.perf_counter() - started

        setattr(owner, attr, timed)

    owners = {
        "manager": mgr,
        "format": mgr._format,
        "lock": mgr._lock._lock,
        "module": manager_module,
        "coord": mgr._coord,
    }
    for owner, attr, label in PHASES:
        wrap(owners[owner], attr, label)


#: The phases of a sync save timed by the coordination job, in display order (owner, attribute
#: wrapped, label); indented labels are parts of the one above them.
PHASES = (
    ("manager", "_propose", "propose: to_plain, estimate, staging dir + writer lock, all_gather"),
    ("format", "write", "write: torch.save into ChecksumWriter + fsync"),
    ("manager", "_commit", "commit (rank 0 only, under the root lock)"),
    ("lock", "acquire", "  root lock acquire"),
    ("module", "atomic_write_bytes", "  manifest write + fsync + dir fsync"),
    ("module", "rename_dir", "  rename staging -> step dir + 3 dir fsyncs"),
    ("manager", "_update_links", "  link swap (re-reads every manifest) + fsync"),
    ("manager", "_apply_retention", "  retention keep_last=2 (trash rename, fsync, rmtree)"),
    ("coord", "all_gather", "collectives: all_gather_object (x2: propose, agree)"),
    ("coord", "broadcast", "collectives: broadcast_object_list (x1: the commit's outcome)"),
)


def _coord_job(ranks: Ranks, job: dict[str, Any]) -> dict[str, Any] | None:
    from distckpt import CheckpointManager

    rank = ranks.rank
    work = Path(job["dir"])
    saves, warmup = job["saves"], 3
    state = {"model": {f"rank{rank}.w": torch.randn(256)}, "step": 0}  # 1 KiB of tensor
    mgr = CheckpointManager(work / "coord", keep_last=2, fsync=True, timeout=job["pg_timeout"])
    spans: dict[str, float] = defaultdict(float)
    _instrument(mgr, spans)
    for step in range(warmup):
        mgr.save(step, state)
    totals, phases = [], []
    for step in range(warmup, warmup + saves):
        spans.clear()
        totals.append(ranks.measure(lambda t0, s=step: mgr.save(s, state))[""])
        phases.append(dict(spans))
    mgr.close()
    raw_dir = ranks.fresh_dir(work / "coord_raw")
    raws = []
    for i in range(saves):

        def raw(t0: float, i: int = i) -> None:
            path = raw_dir / f"rank-{rank:05d}-{i}.pt"
            torch.save(state, path)
            _fsync_path(path)

        raws.append(ranks.measure(raw)[""])
    gathers = [ranks.measure(lambda t0: ranks.gather(rank))[""] for _ in range(saves)]
    ranks.remove(raw_dir)
    all_phases = ranks.gather(phases)
    if rank != 0:
        return None
    return {
        "ranks": ranks.world,
        "saves": totals,
        "raw_torch_save": raws,
        "all_gather_object": gathers,
        "phases_by_rank": all_phases,
        "state_bytes_per_rank": 256 * 4,
    }


def _rank_entry(
    rank: int, world: int, port: int, kind: str, job: dict[str, Any], queue: Any
) -> None:
    torch.set_num_threads(1)
    # distckpt warns when a delete leaves `last` naming nothing: expected here, every round.
    logging.getLogger("distckpt").setLevel(logging.ERROR)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=job["pg_timeout"]),
        )
        ranks = Ranks(rank, world)
        result = _main_job(ranks, job) if kind == "main" else _coord_job(ranks, job)
        queue.put((rank, "ok", result))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    queue.close()
    queue.join_thread()
    os._exit(0)  # no interpreter teardown: a rank whose peer died must not hang in atexit


# ============================================================================== parent side


class JobFailed(Exception):
    pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_job(
    kind: str, world: int, job: dict[str, Any], *, method: str, timeout: float
) -> dict[str, Any]:
    """Start ``world`` ranks, run the job, return rank 0's result; kill them on failure."""
    ctx = tmp.get_context(method)
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_rank_entry, args=(rank, world, port, kind, job, queue), daemon=True)
        for rank in range(world)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world:
            if time.monotonic() > deadline:
                raise JobFailed(f"the ranks did not finish within {timeout:.0f} s (a hang?)")
            try:
                rank, status, value = queue.get(timeout=1.0)
            except Exception:  # queue.Empty: check for ranks that died without a word
                dead = {i: p.exitcode for i, p in enumerate(procs) if p.exitcode not in (None, 0)}
                if dead:
                    raise JobFailed(f"ranks died without reporting: {dead}") from None
                continue
            results[rank] = (status, value)
            if status == "error":
                raise JobFailed(f"rank {rank} failed:\n{value}")
    finally:
        for proc in procs:
            if proc.is_alive() and results.get(procs.index(proc), ("", None))[0] != "ok":
                proc.kill()
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    return results[0][1]


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _paired_ratio(a: Sequence[float | None], b: Sequence[float | None]) -> list[float]:
    return [x / y for x, y in zip(a, b) if x is not None and y is not None and y > 0]


def summarize(world: int, mib: int, raw: dict[str, Any]) -> dict[str, Any]:
    times = raw["times"]
    medians = {name: _median(values) for name, values in times.items()}
    user = raw["cpu"].get("user", {})

    def user_cpu(metric: str) -> list[float | None] | None:
        base, _, key = metric.partition(".")
        # A train_* measurement's CPU time covers all its steps (and a save): not per step.
        whole = key in ("", "total") and not base.startswith("train_")
        return user.get(base) if whole else None

    ratios = {}
    for a, b in RATIOS:
        if a in times and b in times:
            per_round = _paired_ratio(times[a], times[b])
            if per_round:
                cpu_a, cpu_b = user_cpu(a), user_cpu(b)
                # Only where the denominator does real work in user space (not disk_write).
                meaningful = cpu_a and cpu_b and (_median(cpu_b) or 0) > 0.005
                cpu_ratio = _paired_ratio(cpu_a, cpu_b) if meaningful else []
                ratios[f"{a} / {b}"] = {
                    "median": statistics.median(per_round),
                    "min": min(per_round),
                    "max": max(per_round),
                    "per_round": per_round,
                    "user_cpu_median": statistics.median(cpu_ratio) if cpu_ratio else None,
                }
    cpu_medians = {
        kind: {name: _median(values) for name, values in by_name.items()}
        for kind, by_name in raw["cpu"].items()
    }
    return {
        "world_size": world,
        "mib_per_rank": mib,
        "times": times,
        "medians": medians,
        "cpu": raw["cpu"],
        "cpu_medians": cpu_medians,
        "ratios": ratios,
        "skipped": raw["skipped"],
        "info": raw["info"],
    }


def summarize_coord(raw: dict[str, Any]) -> dict[str, Any]:
    rank0 = raw["phases_by_rank"][0]
    phases = {
        label: statistics.median(save.get(label, 0.0) for save in rank0)
        for _, _, label in PHASES
        if any(label in save for save in rank0)
    }
    return {
        "ranks": raw["ranks"],
        "state_bytes_per_rank": raw["state_bytes_per_rank"],
        "saves": raw["saves"],
        "median_s": statistics.median(raw["saves"]),
        "p90_s": sorted(raw["saves"])[int(0.9 * (len(raw["saves"]) - 1))],
        "raw_torch_save_median_s": statistics.median(raw["raw_torch_save"]),
        "all_gather_object_median_s": statistics.median(raw["all_gather_object"]),
        "rank0_phase_medians_s": phases,
    }


# ------------------------------------------------------------------------------ rendering


def _fmt_s(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.3f} s"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> list[str]:
    if markdown:
        # Leading spaces mark parts of the row above; markdown would drop them.
        rows = [[_nbsp(row[0]), *row[1:]] for row in rows]
        lines = ["| " + " | ".join(headers) + " |"]
        lines.append("|" + "|".join("---:" if i else "---" for i in range(len(headers))) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return lines
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*headers), *(fmt.format(*row) for row in rows)]


def _nbsp(text: str) -> str:
    stripped = text.lstrip(" ")
    return "&nbsp;" * (len(text) - len(stripped)) + stripped


def render_config(summary: dict[str, Any], markdown: bool = False) -> list[str]:
    world, mib = summary["world_size"], summary["mib_per_rank"]
    info = summary["info"]
    state_mib = info["state_bytes_per_rank"] / MIB
    rounds = max((len(v) for v in summary["times"].values()), default=0)
    title = (
        f"{world} rank(s) x {mib} MiB per rank ({state_mib:.1f} MiB of tensors per rank, "
        f"{info['tensors_per_rank']} tensors), {rounds} rounds; time = slowest rank"
    )
    lines = [f"### {title}" if markdown else f"== {title}", ""]
    rows = []
    raw_median = summary["medians"].get("raw_torch_save")
    cpu = summary.get("cpu_medians", {})
    for name in METRIC_ORDER:
        values = [v for v in summary["times"].get(name, []) if v is not None]
        if not values:
            continue
        median = statistics.median(values)
        rate = f"{world * state_mib / median:.0f}" if name in WHOLE_STATE else ""
        base, _, key = name.partition(".")
        training = base.startswith("train_")  # a step, or a save slowed by training
        vs_raw = f"{median / raw_median:.2f}x" if raw_median and not training else ""
        shown = key in ("", "total") and not base.startswith("train_")
        user = cpu.get("user", {}).get(base) if shown else None
        system = cpu.get("sys", {}).get(base) if shown else None
        rows.append(
            [
                name,
                _fmt_s(median),
                _fmt_s(min(values)),
                _fmt_s(max(values)),
                rate,
                _fmt_s(user) if user is not None else "",
                _fmt_s(system) if system is not None else "",
                vs_raw,
            ]
        )
    headers = ["contender", "median", "min", "max", "MiB/s (all ranks)"]
    headers += ["user CPU", "sys CPU", "/ raw_torch_save"]
    lines += _table(headers, rows, markdown)
    lines.append("")
    ratio_rows = [
        [
            name,
            f"{r['median']:.3f}",
            f"{r['min']:.3f} .. {r['max']:.3f}",
            f"{r['user_cpu_median']:.2f}" if r.get("user_cpu_median") is not None else "",
        ]
        for name, r in summary["ratios"].items()
    ]
    if ratio_rows:
        headers = ["ratio (paired per round)", "median", "range", "user CPU ratio"]
        lines += _table(headers, ratio_rows, markdown)
        lines.append("")
    extra = []
    if "rss" in info:
        for entry in info["rss"]:
            note = " (peak was set before the save)" if entry["peak_set_earlier"] else ""
            extra.append(
                f"peak RSS rank {entry['rank']}: {entry['max_rss_after'] / MIB:.0f} MiB, "
                f"{entry['rss_before'] / MIB:.0f} MiB resident before the first sync save "
                f"(state {entry['state_bytes'] / MIB:.0f} MiB): "
                f"+{entry['extra'] / MIB:.1f} MiB beyond it{note}"
            )
    for key in ("distckpt_sync_torch.first_save", "distckpt_async_torch.first_save_blocking"):
        if key in info:
            extra.append(f"{key} (untimed warm-up): {_fmt_s(info[key])}")
    for name, counts in info.get("train_steps_during_save", {}).items():
        extra.append(
            f"{name}: {', '.join(str(c) for c in counts)} training steps per round overlapped "
            "the save"
        )
    for name, why in summary["skipped"].items():
        extra.append(f"SKIPPED {name}: {why}")
    lines += [f"* {e}" if markdown else f"  {e}" for e in extra]
    return [*lines, ""]


def render_coord(coord: dict[str, Any], markdown: bool = False) -> list[str]:
    title = (
        f"coordination overhead: {coord['ranks']} ranks, ~1 KiB state per rank, keep_last=2, "
        f"{len(coord['saves'])} saves after 3 warm-up saves"
    )
    lines = [f"### {title}" if markdown else f"== {title}", ""]
    rows = [
        ["distckpt sync save (total per save)", _fmt_s(coord["median_s"])],
        ["  p90", _fmt_s(coord["p90_s"])],
        ["raw torch.save + fsync of the same state", _fmt_s(coord["raw_torch_save_median_s"])],
        [
            "difference: the coordination itself",
            _fmt_s(coord["median_s"] - coord["raw_torch_save_median_s"]),
        ],
        ["one all_gather_object (timing group)", _fmt_s(coord["all_gather_object_median_s"])],
    ]
    rows.append(["rank 0, by phase (nested rows are parts of the row above):", ""])
    rows += [["  " + k, _fmt_s(v)] for k, v in coord["rank0_phase_medians_s"].items()]
    lines += _table(["what (medians)", "time"], rows, markdown)
    return [*lines, ""]


def evaluate_targets(
    configs: list[dict[str, Any]], coord: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """PASS/FAIL per target, from the target configuration (2 ranks x 512 MiB) when it ran,
    otherwise from the largest configuration that ran (said so in the line)."""
    targets: list[dict[str, Any]] = []
    ran = [c for c in configs if "medians" in c]
    chosen = next(
        (c for c in ran if (c["world_size"], c["mib_per_rank"]) == (TARGET_WORLD, TARGET_MIB)),
        None,
    )
    where = f"{TARGET_WORLD}x{TARGET_MIB} MiB"
    if chosen is None and ran:
        chosen = max(ran, key=lambda c: (c["mib_per_rank"] * c["world_size"], c["world_size"]))
        where = (
            f"{chosen['world_size']}x{chosen['mib_per_rank']} MiB, NOT the target "
            f"{TARGET_WORLD}x{TARGET_MIB} MiB"
        )

    def ratio(name: str) -> float | None:
        found = chosen["ratios"].get(name) if chosen else None
        return found["median"] if found else None

    def add(label: str, value: float | None, limit: float, shown: str, strict: bool) -> None:
        passed = None if value is None else (value < limit if strict else value <= limit)
        targets.append(
            {"target": label, "value": value, "limit": limit, "where": where, "passed": passed}
        )
        targets[-1]["shown"] = shown if value is not None else "not measured"

    r = ratio("distckpt_sync_torch / raw_torch_save")
    add("distckpt sync save <= 1.10x raw torch.save + fsync", r, 1.10, f"{r or 0:.3f}x", False)
    r = ratio("distckpt_sync_torch / dcp_save")
    add("distckpt sync save <= 1.0x DCP save", r, 1.0, f"{r or 0:.3f}x", False)
    r = ratio("crc32 / distckpt_sync_torch")
    add("checksum cost < 10% of the sync save", r, 0.10, f"{(r or 0) * 100:.1f}%", True)
    r = ratio("restore_mmap / restore_full")
    cold = ratio("restore_mmap_cold / restore_full_cold")
    shown = f"{(r or 0) * 100:.1f}% with the page cache hot"
    if cold is not None:
        shown += f" ({cold * 100:.1f}% cold, not judged)"
    add("restore(mmap=True) < 10% of a full read", r, 0.10, shown, True)
    r = ratio("distckpt_async_torch.blocking / copy")
    add("async blocking <= 1.5x copy_ into preallocated buffers", r, 1.5, f"{r or 0:.2f}x", False)
    r = ratio("distckpt_async_torch.blocking / distckpt_sync_torch")
    add("async blocking < 10% of the sync save", r, 0.10, f"{(r or 0) * 100:.1f}%", True)
    r = ratio("train_during_distckpt_async / train_idle")
    theirs = ratio("train_during_dcp_async / train_idle")
    add(
        "distckpt async training slowdown <= DCP async_save's",
        r if theirs is not None else None,
        theirs or 0.0,
        f"{r or 0:.2f}x vs {theirs or 0:.2f}x",
        False,
    )
    rss = chosen["info"].get("rss") if chosen else None
    extra = max(e["extra"] for e in rss) / MIB if rss else None
    add(
        f"peak RSS of a sync save <= state + {RSS_LIMIT_MIB:.0f} MiB (max over ranks)",
        extra,
        RSS_LIMIT_MIB,
        f"+{extra or 0:.1f} MiB",
        False,
    )
    value = coord["median_s"] if coord else None
    targets.append(
        {
            "target": f"coordination overhead < 50 ms median at {coord['ranks'] if coord else 4} "
            "ranks",
            "value": value,
            "limit": COORD_LIMIT_S,
            "where": "tiny state",
            "passed": None if value is None else value < COORD_LIMIT_S,
            "shown": _fmt_s(value) if value is not None else "not measured",
        }
    )
    return targets


def render_targets(targets: list[dict[str, Any]], markdown: bool = False) -> list[str]:
    lines = ["### Targets" if markdown else "== Targets", ""]
    for t in targets:
        verdict = {True: "PASS", False: "FAIL", None: "N/A "}[t["passed"]]
        line = f"{verdict}  {t['target']}: {t['shown']} ({t['where']})"
        lines.append(f"* **{verdict}** {line[6:]}" if markdown else line)
    return [*lines, ""]


# ------------------------------------------------------------------------------ main


def _meminfo(key: str) -> int | None:
    with contextlib.suppress(OSError), open("/proc/meminfo") as file:
        for line in file:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


def _fs_type(path: Path) -> str:
    best, kind = "", "unknown"
    with contextlib.suppress(OSError), open("/proc/mounts") as file:
        for line in file:
            parts = line.split()
            if len(parts) > 2 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    return kind


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _contender_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown contender(s) {unknown}; choose from {', '.join(CONTENDERS)}"
        )
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="contenders:\n"
        + "\n".join(f"  {name}: {text}" for name, text in CONTENDERS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--world-sizes",
        type=_int_list,
        default=[1, 2, 4],
        metavar="1,2,4",
        help="numbers of ranks, one job each (with every --mib)",
    )
    parser.add_argument(
        "--mib",
        type=_int_list,
        default=[64, 512],
        metavar="64,512",
        help="state size per rank, in MiB",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds per job; tables show medians over them"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="copy, crc32 and the restores run this many times per round; the round counts "
        "their median (they are short, so one run is at the mercy of a page fault storm)",
    )
    parser.add_argument(
        "--contenders",
        type=_contender_list,
        default=list(CONTENDERS),
        metavar="NAME,...",
        help="default: all (see below)",
    )
    parser.add_argument("--json", type=Path, help="write every measurement to this file")
    parser.add_argument("--markdown", type=Path, help="write the tables as markdown here")
    parser.add_argument("--dir", type=Path, help="where to write (default: the temp dir)")
    parser.add_argument(
        "--coord-ranks",
        type=int,
        default=4,
        help="ranks of the coordination-overhead job (0: skip it)",
    )
    parser.add_argument(
        "--coord-saves", type=int, default=20, help="timed saves of the coordination job"
    )
    parser.add_argument(
        "--start-method",
        choices=("spawn", "fork"),
        default="spawn",
        help="how torch.multiprocessing starts the ranks",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=0.0,
        help="seconds per job before it counts as hung (0: from the sizes)",
    )
    args = parser.parse_args(argv)
    if min(args.rounds, args.repeats, args.coord_saves) < 1 or args.coord_ranks < 0:
        parser.error("--rounds, --repeats and --coord-saves must be >= 1, --coord-ranks >= 0")
    return args


def check_resources(args: argparse.Namespace, where: Path) -> list[str]:
    """Why the requested sizes cannot run here (empty: they fit). At most two checkpoints of
    a configuration exist at once (the round's distckpt checkpoint kept for the restore
    measurements, and the contender being measured); each rank holds its state, a copy
    buffer, distckpt's async snapshot and transiently DCP's staging copy or a loaded state."""
    problems = []
    free = shutil.disk_usage(where).free
    available = _meminfo("MemAvailable")
    for world in args.world_sizes:
        for mib in args.mib:
            disk = int(2 * world * mib * MIB * 1.1) + 512 * MIB
            if disk > free:
                problems.append(
                    f"{world} ranks x {mib} MiB needs ~{disk / 2**30:.1f} GiB of disk, "
                    f"{free / 2**30:.1f} GiB free at {where}"
                )
            memory = world * (5 * mib * MIB + 512 * MIB)
            if available is not None and memory > available:
                problems.append(
                    f"{world} ranks x {mib} MiB needs ~{memory / 2**30:.1f} GiB of memory, "
                    f"{available / 2**30:.1f} GiB available"
                )
    return problems


def _log(started: float, text: str) -> None:
    print(f"[{time.monotonic() - started:7.1f} s] {text}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    base = args.dir if args.dir else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    run_dir = base / f"distckpt-bench-{uuid.uuid4().hex[:8]}"
    problems = check_resources(args, base)
    if problems:
        print("refusing to run:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    usage = shutil.disk_usage(base)
    machine = {
        "cpus": os.cpu_count(),
        "memory_gib": round((_meminfo("MemTotal") or 0) / 2**30, 1),
        "disk_free_gib": round(usage.free / 2**30, 1),
        "disk_total_gib": round(usage.total / 2**30, 1),
        "filesystem": _fs_type(base.resolve()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    header = (
        f"machine: {machine['cpus']} CPUs, {machine['memory_gib']} GiB RAM, "
        f"{machine['filesystem']} disk with {machine['disk_free_gib']} of "
        f"{machine['disk_total_gib']} GiB free; torch {machine['torch']}, "
        f"python {machine['python']}; start method {args.start_method}"
    )
    print(header, flush=True)
    print(
        "note: caches are not dropped: every save fsyncs, and restores read what the save just "
        "left in the page cache, except the *_cold ones (the checkpoint's own files evicted "
        "with posix_fadvise first)\n",
        flush=True,
    )
    started = time.monotonic()
    configs: list[dict[str, Any]] = []
    coord: dict[str, Any] | None = None
    run_dir.mkdir()
    try:
        for world in args.world_sizes:
            for mib in args.mib:
                fits = check_resources(
                    argparse.Namespace(world_sizes=[world], mib=[mib]), base
                )  # the disk may have filled since
                if fits:
                    configs.append({"world_size": world, "mib_per_rank": mib, "error": fits})
                    _log(started, f"skipping {world}x{mib} MiB: {'; '.join(fits)}")
                    continue
                job_dir = run_dir / f"w{world}-m{mib}"
                job_dir.mkdir()
                written = world * mib * ((len(SAVE_CONTENDERS) + 2) * args.rounds + 4)
                timeout = args.timeout or 300 + written / 20
                job = {
                    "dir": os.fspath(job_dir),
                    "mib": mib,
                    "rounds": args.rounds,
                    "repeats": args.repeats,
                    "contenders": args.contenders,
                    "pg_timeout": timeout,
                }
                _log(started, f"{world} rank(s) x {mib} MiB: starting")
                try:
                    raw = run_job("main", world, job, method=args.start_method, timeout=timeout)
                    summary = summarize(world, mib, raw)
                except JobFailed as exc:
                    summary = {"world_size": world, "mib_per_rank": mib, "error": str(exc)}
                    _log(started, f"{world} rank(s) x {mib} MiB FAILED: {exc}")
                finally:
                    shutil.rmtree(job_dir, ignore_errors=True)
                configs.append(summary)
                if "medians" in summary:
                    _log(started, f"{world} rank(s) x {mib} MiB: done")
                    print("\n".join(render_config(summary)), flush=True)
        if args.coord_ranks:
            job_dir = run_dir / "coord"
            job_dir.mkdir()
            job = {"dir": os.fspath(job_dir), "saves": args.coord_saves, "pg_timeout": 300}
            _log(started, f"coordination overhead at {args.coord_ranks} ranks: starting")
            try:
                raw_coord = run_job(
                    "coord", args.coord_ranks, job, method=args.start_method, timeout=600
                )
                coord = summarize_coord(raw_coord)
                print("\n".join(render_coord(coord)), flush=True)
            except JobFailed as exc:
                _log(started, f"coordination job FAILED: {exc}")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    targets = evaluate_targets(configs, coord)
    print("\n".join(render_targets(targets)), flush=True)
    elapsed = time.monotonic() - started
    _log(started, f"finished in {elapsed:.0f} s")
    if args.json:
        payload = {
            "machine": machine,
            "args": {
                k: (os.fspath(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            },
            "elapsed_s": elapsed,
            "contenders": CONTENDERS,
            "configs": configs,
            "coordination": coord,
            "targets": targets,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    if args.markdown:
        lines = [header, ""]
        for summary in configs:
            if "medians" in summary:
                lines += render_config(summary, markdown=True)
        if coord:
            lines += render_coord(coord, markdown=True)
        lines += render_targets(targets, markdown=True)
        args.markdown.write_text("\n".join(lines) + "\n")
    failed_jobs = [c for c in configs if "error" in c]
    return 1 if failed_jobs else 0


if __name__ == "__main__":
    sys.exit(main())
