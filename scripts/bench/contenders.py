"""What the benchmark measures: the contenders, the metrics and ratios the tables show, the
state every contender saves, and the small operations the contenders time."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

MIB = 1 << 20
CHUNK_BYTES = 8 * MIB

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
    "dcp_async_save": "torch.distributed.checkpoint.async_save on its own gloo group, in its "
    "fastest mode (AsyncCheckpointerType.PROCESS: a checkpoint process per rank; THREAD if that "
    "cannot start, see info.dcp_async_mode): .blocking = until it returns, .total = until its "
    "future is done",
    "dcp_async_save_thread": "the same in AsyncCheckpointerType.THREAD (a background thread in "
    "the rank's own process), measured beside the process mode",
    "copy": "copy_ of every tensor into preallocated buffers: the floor of an async snapshot",
    "crc32": "distckpt's CRC-32 (checksums.crc32) over the state's bytes, as computed while "
    "writing",
    "train": "a DDP-like CPU training step on every rank (a 3-layer MLP: forward, backward, "
    "all_reduce of the flat gradients on the default gloo group, SGD): train_idle = its median "
    "time with no save running; train_during_distckpt_async = the median of the steps run "
    "after CheckpointManager(async_save=True).save returns until its background save is done "
    "on every rank, saves back to back until at least 8 steps overlapped one; "
    "train_during_distckpt_async_nice0 = the same with background_nice=0; "
    "train_during_dcp_async = the same with dcp.async_save (gloo process_group, the mode "
    "of dcp_async_save) and its future; train_during_dcp_async_thread = the same in the thread "
    "mode, when dcp_async_save ran in the process mode; *.save = a save's mean time until it "
    "finished, training alongside; *.lost = the training time a save cost (those steps' sum "
    "minus as many idle steps, per save)",
    "restore": "restore_mmap = restore(step, mmap=True); restore_full = restore(step) (full "
    "read); raw_torch_load(_mmap) = torch.load of a torch.save file of the same state (written "
    "once per job, beside the checkpoints); all with the page cache "
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
    "dcp_async_save_thread",
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
    "dcp_async_save_thread.total",
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
    "dcp_async_save_thread.blocking",
    "dcp_async_save_thread.total",
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
    "train_during_distckpt_async_nice0",
    "train_during_dcp_async",
    "train_during_dcp_async_thread",
    "train_during_distckpt_async.save",
    "train_during_distckpt_async_nice0.save",
    "train_during_dcp_async.save",
    "train_during_dcp_async_thread.save",
    "train_during_distckpt_async.lost",
    "train_during_distckpt_async_nice0.lost",
    "train_during_dcp_async.lost",
    "train_during_dcp_async_thread.lost",
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
    ("dcp_async_save.blocking", "dcp_async_save_thread.blocking"),
    ("dcp_async_save.total", "dcp_async_save_thread.total"),
    ("distckpt_async_torch.blocking", "dcp_async_save.blocking"),
    ("distckpt_async_torch.total", "dcp_async_save.total"),
    ("crc32", "distckpt_sync_torch"),
    ("restore_mmap", "restore_full"),
    ("restore_full", "raw_torch_load"),
    ("restore_mmap", "raw_torch_load_mmap"),
    ("restore_mmap_cold", "restore_full_cold"),
    ("train_during_distckpt_async", "train_idle"),
    ("train_during_dcp_async", "train_idle"),
    ("train_during_dcp_async_thread", "train_idle"),
    ("train_during_distckpt_async_nice0", "train_idle"),
    ("train_during_distckpt_async", "train_during_dcp_async"),
    ("train_during_distckpt_async", "train_during_dcp_async_thread"),
    ("train_during_distckpt_async", "train_during_distckpt_async_nice0"),
    ("train_during_distckpt_async.save", "distckpt_async_torch.total"),
    ("train_during_dcp_async.save", "dcp_async_save.total"),
    ("train_during_distckpt_async.lost", "train_during_dcp_async.lost"),
    ("train_during_distckpt_async.lost", "train_during_dcp_async_thread.lost"),
    ("train_during_distckpt_async.save", "train_during_distckpt_async_nice0.save"),
)


class Marks(dict):
    """Named times (seconds since the measurement's start) a measured function returns when
    one time is not enough, e.g. ``Marks(blocking=..., total=...)``."""


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
    """The tensors of a nested dict, depth first."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from iter_tensors(item)


def write_chunks(path: Path, chunk: bytes, nbytes: int) -> None:
    """``disk_write``: ``nbytes`` of ``chunk`` repeated into a new file, then fsync."""
    view = memoryview(chunk)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        remaining = nbytes
        while remaining > 0:
            remaining -= os.write(fd, view[: min(remaining, len(view))])
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_torch_save(state: Any, path: Path) -> None:
    """``raw_torch_save``: what a per-rank saver with no coordination does."""
    torch.save(state, path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def evict(path: Path) -> None:
    """Drop one file's (clean, fsynced) pages from the page cache: a cold read of it next."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def dcp_result(future: Any) -> Any:
    """Wait for what ``dcp.async_save`` returned (a Future, or an AsyncSaveResponse)."""
    upload = getattr(future, "upload_completion", future)
    return upload.result()


def async_marks(t0: float, mgr: Any, step: int, state: Any) -> Marks:
    """An async distckpt save: until ``save`` returns, and until ``wait`` does."""
    mgr.save(step, state)
    blocking = time.perf_counter() - t0
    mgr.wait()
    return Marks(blocking=blocking, total=time.perf_counter() - t0)


def crc32(views: Sequence[Any]) -> int:
    """``crc32``: distckpt's checksum over the state's bytes."""
    from distckpt import checksums

    crc = 0
    for view in views:
        crc = checksums.crc32(view, crc)
    return crc


def copy_into(buffers: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor]) -> None:
    """``copy``: every tensor into its preallocated buffer."""
    for buffer, tensor in zip(buffers, tensors):
        buffer.copy_(tensor)
