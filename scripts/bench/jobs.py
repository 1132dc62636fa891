"""The main job: every contender on one (world size, MiB per rank), round after round, on
every rank (:func:`main_job` is what ``tests/ranks.py`` starts)."""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

from bench import contenders as c
from bench.phases import PhaseRecorder, SavePhases, recording
from bench.timing import ContenderFailed, Ranks, first_line
from bench.training import Trainer, measure_training_round
from distckpt import CheckpointManager
from distckpt.layout import rank_file_name


def main_job(rank: int, world: int, job: dict[str, Any]) -> dict[str, Any] | None:
    """Run every requested contender; rank 0 returns the measurements, the others None."""
    # distckpt warns when a delete leaves `last` naming nothing: expected here, every round.
    logging.getLogger("distckpt").setLevel(logging.ERROR)
    # DCP's checkpoint process (AsyncCheckpointerType.PROCESS) meets its peers in a store on
    # MASTER_ADDR, or else on this host's fully qualified name, which may resolve slowly or
    # not at all: the ranks are on 127.0.0.1.
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    with recording() as recorder:
        return MainJob(Ranks(rank, world), job, recorder).run()


class MainJob:
    """One rank's part of the main job; the measurements so far, and what they share."""

    def __init__(self, ranks: Ranks, job: dict[str, Any], recorder: PhaseRecorder) -> None:
        self.ranks = ranks
        self.rank = ranks.rank
        self.recorder = recorder
        self.work = Path(job["dir"])
        self.rounds: int = job["rounds"]
        self.repeats: int = job["repeats"]
        self.timeout: float = job["pg_timeout"]
        self.active = [name for name in c.CONTENDERS if name in job["contenders"]]
        self.state = c.make_state(self.rank, job["mib"])
        self.tensors = list(c.iter_tensors(self.state))
        self.nbytes = sum(t.untyped_storage().nbytes() for t in self.tensors)
        self.tiny = {"tiny": {f"rank{self.rank}": torch.zeros(256)}}
        self.times: dict[str, list[float | None]] = {}
        self.cpu: dict[str, dict[str, list[float | None]]] = {}
        self.skipped: dict[str, str] = {}
        self.info: dict[str, Any] = {
            "state_bytes_per_rank": self.nbytes,
            "tensors_per_rank": len(self.tensors),
        }
        #: this rank's phase events of each timed distckpt_sync_torch save
        self.sync_phases: list[SavePhases] = []
        #: the same for distckpt_async_torch (its background write's phases included)
        self.async_phases: list[SavePhases] = []
        self.managers: list[Any] = []
        self.mgr_t: Any = None  # format="torch": distckpt_sync_torch and the restores
        self.mgr_d: Any = None  # format="dcp"
        self.mgr_a: Any = None  # async: step 2r+1 in round r; training rounds' steps after
        self.mgr_a_nice0: Any = None  # async with background_nice=0: under training only
        self.dcp_group: Any = None
        self.async_group: Any = None
        self.dcp_async_ok = False
        #: dcp_async_save's mode: the process mode, or the thread mode if that cannot start
        self.dcp_async_mode = AsyncCheckpointerType.PROCESS
        #: the thread mode measured beside the process mode (dcp_async_save_thread, training)
        self.dcp_thread_ok = False
        self.buffers: list[torch.Tensor] = []
        self.views: list[Any] = []
        self.chunk = b""
        self.trainer: Trainer | None = None
        self.train_steps: dict[str, list[int]] = {}
        self.train_saves: dict[str, list[int]] = {}
        #: the step of the next save under training: above every step of the save rounds
        self.next_train_step = 2 * self.rounds + 2

    # -- bookkeeping

    def put(self, r: int, name: str, marks: dict[str, float]) -> None:
        """Record a measurement of round ``r`` (and the CPU time ``ranks.measure`` saw)."""
        for key, value in marks.items():
            self.times.setdefault(f"{name}.{key}" if key else name, [None] * self.rounds)[r] = value
        for kind, value in zip(("user", "sys"), self.ranks.last_cpu):
            self.cpu.setdefault(kind, {}).setdefault(name, [None] * self.rounds)[r] = value

    def skip(self, name: str, why: str) -> None:
        if name in self.active:
            self.active.remove(name)
        self.skipped[name] = why

    def writer(self, path: Path) -> FileSystemWriter:
        return FileSystemWriter(
            path, single_file_per_rank=True, sync_files=True, thread_count=1, overwrite=True
        )

    def manager(self, name: str, **kwargs: Any) -> Any:
        mgr = CheckpointManager(self.work / name, fsync=True, timeout=self.timeout, **kwargs)
        self.managers.append(mgr)
        return mgr

    # -- set-up: managers, groups, probes, warm-ups

    def set_up(self) -> None:
        ranks, active = self.ranks, set(self.active)
        # distckpt torch format: the first save is untimed and measures peak RSS (this
        # process has done nothing bigger than allocating its state yet).
        if {"distckpt_sync_torch", "restore"} & active:
            self.mgr_t = self.manager("distckpt_torch", format="torch")
            first = self.peak_rss("rss", lambda: self.mgr_t.save(0, self.state))
            ranks.delete_checkpoint(self.mgr_t, 0)
            self.info["distckpt_sync_torch.first_save"] = max(ranks.gather(first))
        self.probe_dcp(active)
        if "distckpt_sync_dcp" in active:
            try:
                ranks.measure(lambda t0: self.manager("distckpt_dcp", format="dcp"))
                self.mgr_d = self.managers[-1]
                ranks.measure(lambda t0: self.mgr_d.save(0, self.tiny))
                ranks.delete_checkpoint(self.mgr_d, 0)
            except ContenderFailed as exc:
                self.skip("distckpt_sync_dcp", f"format='dcp' does not work (yet): {exc}")
            except Exception as exc:  # a format under construction may fail in any way
                why = f"format='dcp' does not work (yet): {first_line(exc)}"
                self.skip("distckpt_sync_dcp", why)
        if {"distckpt_async_torch", "train"} & active:
            self.mgr_a = self.manager("distckpt_async", format="torch", async_save=True)
            # After the sync save's peak: an async save's (with its buffers) is higher still.
            first = self.peak_rss(
                "rss_async", lambda: c.async_marks(0.0, self.mgr_a, 0, self.state)
            )
            ranks.delete_checkpoint(self.mgr_a, 0)
            self.info["distckpt_async_torch.first_save"] = max(ranks.gather(first))
        if "train" in active:
            # The same save with the background thread at the training thread's priority: what
            # background_nice changes (docs/benchmark.md, "Training during an async save").
            self.mgr_a_nice0 = self.manager(
                "distckpt_async_nice0", format="torch", async_save=True, background_nice=0
            )
            c.async_marks(0.0, self.mgr_a_nice0, 0, self.state)  # allocates its buffers
            ranks.delete_checkpoint(self.mgr_a_nice0, 0)
        if "copy" in active:
            self.buffers = [torch.empty_like(t) for t in self.tensors]
            # Fault the pages in: a steady-state copy reuses them.
            c.copy_into(self.buffers, self.tensors)
        self.views = [t.reshape(-1).view(torch.uint8).numpy() for t in self.tensors]
        self.chunk = os.urandom(c.CHUNK_BYTES) if "disk_write" in active else b""

    def peak_rss(self, key: str, save: Callable[[], Any]) -> float:
        """Run an untimed first ``save`` on every rank and record in ``info[key]`` how far it
        raised each rank's peak resident size above its resident size before; its seconds.

        Both sizes come from one clock (:func:`read_memory`): on Linux the kernel's VmHWM
        after the save minus its VmRSS before. A high-water mark only grows, so a save that
        peaked below an earlier peak cannot be seen: flagged ``peak_set_earlier``.
        ``ru_maxrss_after`` is kept for comparison with older runs, which used it."""
        self.ranks.barrier()
        before = read_memory()
        started = time.perf_counter()
        save()
        seconds = time.perf_counter() - started
        after = read_memory()
        self.info[key] = self.ranks.gather(
            {
                "rank": self.rank,
                "state_bytes": self.nbytes,
                "source": after.source,
                "rss_before": before.resident,
                "peak_before": before.peak,
                "rss_after": after.resident,
                "peak_after": after.peak,
                "ru_maxrss_after": ru_maxrss(),
                "extra": max(0, after.peak - before.resident),
                "peak_set_earlier": before.peak >= after.peak,
            }
        )
        return seconds

    def probe_dcp(self, active: set[str]) -> None:
        """DCP's own gloo groups, each probed with a tiny state so a failure is a clear skip."""
        ranks, tiny = self.ranks, self.tiny
        if "dcp_save" in active:
            self.dcp_group = dist.new_group(backend="gloo")
        dcp_async = bool({"dcp_async_save", "dcp_async_save_thread", "train"} & active)
        if dcp_async:
            self.async_group = dist.new_group(backend="gloo")
        self.dcp_async_ok = dcp_async
        if "dcp_save" in active:
            probe = ranks.fresh_dir(self.work / "dcp_probe")
            try:
                writer = self.writer(probe)
                ranks.measure(
                    lambda t0: dcp.save(tiny, storage_writer=writer, process_group=self.dcp_group)
                )
            except ContenderFailed as exc:
                self.skip("dcp_save", f"dcp.save failed: {exc}")
            ranks.remove(probe)
        if dcp_async:
            probe = ranks.fresh_dir(self.work / "dcp_async_probe")
            try:
                # DCP's fastest mode in torch 2.13: a checkpoint process of its own per rank
                # (the training process only stages); the thread mode if that cannot start.
                try:
                    ranks.measure(lambda t0: c.dcp_result(self.dcp_async_save(tiny, probe)))
                except ContenderFailed as exc:
                    self.info["dcp_async_mode_refused"] = f"{self.dcp_async_mode}: {exc}"
                    self.dcp_async_mode = AsyncCheckpointerType.THREAD
                    ranks.remove(probe)
                    probe = ranks.fresh_dir(self.work / "dcp_async_probe")
                    ranks.measure(lambda t0: c.dcp_result(self.dcp_async_save(tiny, probe)))
                self.info["dcp_async_mode"] = self.dcp_async_mode.value
            except ContenderFailed as exc:
                self.dcp_async_ok = False
                why = f"dcp.async_save failed: {exc}"
                if "dcp_async_save" in active:
                    self.skip("dcp_async_save", why)
                if "train" in active:
                    self.skipped["train_during_dcp_async"] = why
            ranks.remove(probe)
        thread_wanted = bool({"dcp_async_save_thread", "train"} & active)
        process_mode = self.dcp_async_mode == AsyncCheckpointerType.PROCESS
        if thread_wanted and self.dcp_async_ok and process_mode:
            probe = ranks.fresh_dir(self.work / "dcp_thread_probe")
            try:
                thread = AsyncCheckpointerType.THREAD
                ranks.measure(lambda t0: c.dcp_result(self.dcp_async_save(tiny, probe, thread)))
                self.dcp_thread_ok = True
            except ContenderFailed as exc:
                if "dcp_async_save_thread" in active:
                    self.skip("dcp_async_save_thread", f"dcp.async_save (thread) failed: {exc}")
            ranks.remove(probe)
        elif "dcp_async_save_thread" in active:
            self.skip(
                "dcp_async_save_thread",
                "dcp_async_save measured the thread mode already (see dcp_async_mode_refused)"
                if self.dcp_async_ok
                else "dcp.async_save failed",
            )

    def dcp_async_save(
        self, state: Any, path: Path, mode: AsyncCheckpointerType | None = None
    ) -> Any:
        """``dcp.async_save`` of ``state`` into ``path``, in ``mode`` (default: the fastest
        mode that started, :attr:`dcp_async_mode`)."""
        return dcp.async_save(
            state,
            storage_writer=self.writer(path),
            process_group=self.async_group,
            async_checkpointer_type=mode or self.dcp_async_mode,
        )

    # -- measurements

    def measure_reads(self, r: int, step: int) -> None:
        """Round ``r``'s restore measurements, on ``mgr_t``'s checkpoint of ``step``: hot
        (the pages the save left in the page cache) in rotating order, then cold (this
        checkpoint's files evicted with posix_fadvise first; no other cache is dropped)."""
        ranks, mgr = self.ranks, self.mgr_t
        rank_file = mgr.layout.step_dir(step) / rank_file_name(self.rank)
        # distckpt's rank files are not torch.save files: torch.load reads one of the same state.
        reference = self.torch_save_file()
        hot: list[tuple[str, Callable[[float], Any]]] = [
            ("restore_mmap", lambda t0: mgr.restore(step, mmap=True)),
            ("restore_full", lambda t0: mgr.restore(step)),
            ("raw_torch_load", lambda t0: torch.load(reference, weights_only=True)),
            ("raw_torch_load_mmap", lambda t0: torch.load(reference, weights_only=True, mmap=True)),
        ]
        cold: list[tuple[str, Callable[[float], Any]]] = [
            ("restore_mmap_cold", lambda t0: mgr.restore(step, mmap=True)),
            ("restore_full_cold", lambda t0: mgr.restore(step)),
        ]
        runs: dict[str, list[tuple[dict[str, float], tuple[float, float]]]] = {}
        try:
            for i in range(self.repeats):
                # Rotated: each full read allocates memory the previous one just freed.
                shift = (r * self.repeats + i) % len(hot)
                for name, read in hot[shift:] + hot[:shift]:
                    runs.setdefault(name, []).append((ranks.measure(read), ranks.last_cpu))
                for name, read in cold:  # last: the full cold read leaves the cache hot again
                    c.evict(rank_file)
                    runs.setdefault(name, []).append((ranks.measure(read), ranks.last_cpu))
        except ContenderFailed as exc:
            self.skip("restore", f"failed in round {r}: {exc}")
            return
        for name, measured in runs.items():
            self.put(r, name, ranks.median_run(measured))

    def torch_save_file(self) -> Path:
        """A ``torch.save`` file (+ fsync) of this rank's state, written at the first call,
        for ``torch.load`` to read beside the restores."""
        path = self.work / "torch_load" / f"rank-{self.rank:05d}.pt"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            c.raw_torch_save(self.state, path)
        return path

    def in_fresh_dir(self, name: str, r: int, fn: Callable[[float, Path], Any]) -> dict[str, float]:
        """Measure ``fn(t0, directory)`` writing into a fresh directory, deleted afterwards."""
        d = self.ranks.fresh_dir(self.work / name / f"round-{r}")
        try:
            return self.ranks.measure(lambda t0: fn(t0, d))
        finally:
            self.ranks.remove(d)

    def run_save(self, name: str, r: int) -> dict[str, float]:
        ranks, state, rank, step = self.ranks, self.state, self.rank, r + 1
        if name == "disk_write":
            return self.in_fresh_dir(
                name,
                r,
                lambda t0, d: c.write_chunks(d / f"rank-{rank:05d}.bin", self.chunk, self.nbytes),
            )
        if name == "raw_torch_save":
            return self.in_fresh_dir(
                name, r, lambda t0, d: c.raw_torch_save(state, d / f"rank-{rank:05d}.pt")
            )
        if name == "dcp_save":
            return self.in_fresh_dir(
                name,
                r,
                lambda t0, d: dcp.save(
                    state, storage_writer=self.writer(d), process_group=self.dcp_group
                ),
            )
        if name in ("dcp_async_save", "dcp_async_save_thread"):
            mode = AsyncCheckpointerType.THREAD if name == "dcp_async_save_thread" else None

            def dcp_async(t0: float, d: Path) -> c.Marks:
                future = self.dcp_async_save(state, d, mode)
                blocking = time.perf_counter() - t0
                c.dcp_result(future)
                return c.Marks(blocking=blocking, total=time.perf_counter() - t0)

            return self.in_fresh_dir(name, r, dcp_async)
        if name == "distckpt_sync_torch":
            try:
                self.recorder.take()  # what came before is not this save's
                marks = ranks.measure(lambda t0: self.mgr_t.save(step, state))
                self.sync_phases.append(self.recorder.take())
                if "restore" in self.active:
                    cpu_of_save = ranks.last_cpu
                    self.measure_reads(r, step)  # before the next save: see delete_checkpoint
                    ranks.last_cpu = cpu_of_save
                return marks
            finally:
                ranks.delete_checkpoint(self.mgr_t, step)
        if name == "distckpt_sync_dcp":
            try:
                return ranks.measure(lambda t0: self.mgr_d.save(step, state))
            finally:
                ranks.delete_checkpoint(self.mgr_d, step)
        if name == "distckpt_async_torch":
            try:
                self.recorder.take()
                marks = ranks.measure(lambda t0: c.async_marks(t0, self.mgr_a, 2 * r + 1, state))
                self.async_phases.append(self.recorder.take())
                return marks
            finally:
                ranks.delete_checkpoint(self.mgr_a, 2 * r + 1)
        raise AssertionError(name)

    def run_round(self, r: int, order: list[str]) -> None:
        ranks, step = self.ranks, r + 1
        # Decided from what this rank did, never from the disk: rank 0 may have changed it.
        read_done = False
        shift = r % len(order) if order else 0
        for name in order[shift:] + order[:shift]:
            if name not in self.active:
                continue
            try:
                self.put(r, name, self.run_save(name, r))
                read_done = read_done or name == "distckpt_sync_torch"
            except ContenderFailed as exc:
                self.skip(name, f"failed in round {r}: {exc}")
        if self.mgr_t is not None and "restore" in self.active and not read_done:
            try:
                ranks.measure(lambda t0: self.mgr_t.save(step, self.state))  # untimed
                self.measure_reads(r, step)
            except ContenderFailed as exc:
                self.skip("restore", f"failed in round {r}: {exc}")
            finally:
                ranks.delete_checkpoint(self.mgr_t, step)
        for name, fn in (
            ("crc32", lambda t0: c.crc32(self.views)),
            ("copy", lambda t0: c.copy_into(self.buffers, self.tensors)),
        ):
            if name in self.active:
                measured = [(ranks.measure(fn), ranks.last_cpu) for _ in range(self.repeats)]
                self.put(r, name, ranks.median_run(measured))

    def run(self) -> dict[str, Any] | None:
        self.set_up()
        order = [name for name in c.SAVE_CONTENDERS if name in self.active]
        for r in range(self.rounds):
            self.run_round(r, order)
        # Training last, in rounds of its own: its allocations (gloo's buffers for 12 MiB of
        # gradients) raise glibc's mmap threshold above the state's 8 MiB tensors, after which
        # a full restore reuses heap pages instead of faulting fresh ones (2-3x faster here):
        # run before the other contenders' rounds, it would change what they measure.
        if "train" in self.active:
            self.trainer = Trainer(self.rank, self.ranks.world)
            for r in range(self.rounds):
                try:
                    measure_training_round(self, r)
                except ContenderFailed as exc:
                    self.skip("train", f"failed in round {r}: {exc}")
                    break
        for mgr in self.managers:
            mgr.close()
        if self.train_steps:
            self.info["train_steps_during_save"] = self.train_steps
            self.info["train_saves"] = self.train_saves
        sync_phases = self.ranks.gather(self.sync_phases)
        async_phases = self.ranks.gather(self.async_phases)
        if self.rank != 0:
            return None
        if any(sync_phases):
            self.info["distckpt_sync_torch.phases_by_rank"] = sync_phases
        if any(async_phases):
            self.info["distckpt_async_torch.phases_by_rank"] = async_phases
        return {"times": self.times, "cpu": self.cpu, "skipped": self.skipped, "info": self.info}


@dataclass(frozen=True)
class MemoryReading:
    """This process's resident size and its peak so far, in bytes, read at one moment."""

    resident: int
    peak: int
    #: where both come from: "VmHWM" (/proc/self/status) or "ru_maxrss" (the fallback)
    source: str


def read_memory() -> MemoryReading:
    """VmRSS and VmHWM from one read of ``/proc/self/status`` (Linux): VmRSS summed exactly
    at that moment, VmHWM the larger of it and the highest size the kernel recorded before
    (it records one when memory is unmapped, from its per-CPU counters, so a peak already
    gone may read a few hundred KiB low). ``ru_maxrss`` is not used there: it comes from
    those counters even for the present, and was seen to read below the VmRSS of the same
    moment. Without ``/proc`` (not Linux) the peak is ``ru_maxrss`` and so is the resident
    size, which a process has no other portable way to read: an increase measured there
    starts from the peak before, not from the resident size (a lower bound)."""
    try:
        with open("/proc/self/status") as file:
            fields = dict(line.split(":", 1) for line in file if ":" in line)
        # Both in kB (KiB), as "  123456 kB".
        resident, peak = (int(fields[name].split()[0]) * 1024 for name in ("VmRSS", "VmHWM"))
        return MemoryReading(resident, peak, "VmHWM")
    except (OSError, KeyError):
        peak = ru_maxrss()
        return MemoryReading(peak, peak, "ru_maxrss")


def ru_maxrss() -> int:
    """``getrusage``'s peak resident size of this process, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere
