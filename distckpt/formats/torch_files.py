"""The "torch" format: one ``torch.save`` file per rank, ``rank-00000.pt`` ... (the layout of
DeepSpeed-style per-rank checkpoints).

Fastest to write and read, and each file loads with plain ``torch.load``; a checkpoint can only
be restored by the same world size that saved it (use "dcp" to reshard). Files are streamed to
disk storage by storage (never serialised whole in memory) through a writer that checksums the
bytes as they pass. Reading uses ``torch.load(weights_only=True)`` unless the caller opts in to
unpickling arbitrary objects.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from distckpt.errors import CorruptCheckpoint, UnsafeCheckpoint
from distckpt.formats.base import ReadOptions, ShardContext
from distckpt.fsutil import ChecksumWriter
from distckpt.layout import parse_rank_file_name, rank_file_name
from distckpt.manifest import FileRecord, Manifest
from distckpt.state import tensor_bytes

# Pickle framing, object headers and the zip container around tensor data.
_OVERHEAD_BYTES = 64 << 10


def safe_torch_load(source: Path, options: ReadOptions) -> Any:
    """``torch.load`` that unpickles only tensors and plain values unless the caller opted in,
    and turns torch's refusal into an error that says how to opt in."""
    try:
        return torch.load(
            os.fspath(source),
            map_location=options.map_location,
            weights_only=not options.allow_pickle,
            mmap=options.mmap or None,
        )
    except pickle.UnpicklingError as exc:
        if options.allow_pickle:
            raise CorruptCheckpoint(f"{source}: cannot be unpickled: {exc}") from exc
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UnsafeCheckpoint(
            f"{source} holds objects outside torch's weights-only allow-list, so it was not "
            f"loaded ({first_line}). If you trust this checkpoint, pass allow_pickle=True, or "
            "allow the specific types with torch.serialization.add_safe_globals([...])"
        ) from exc
    except (RuntimeError, EOFError, ValueError) as exc:
        raise CorruptCheckpoint(f"{source}: not a readable torch file: {exc}") from exc


class TorchFilesFormat:
    """One ``torch.save`` file per rank."""

    name = "torch"
    fixed_world_size = True

    def required_files(self, manifest: Manifest) -> list[str]:
        return [rank_file_name(rank) for rank in range(manifest.world_size)]

    def owns_file(self, name: str) -> bool:
        return parse_rank_file_name(name) is not None

    def check_template(self, directory: Path, template: Any) -> None:
        pass  # a rank file is read whole; any template (or none) will do

    def estimate_bytes(self, state: Any) -> int:
        return tensor_bytes(state) + _OVERHEAD_BYTES

    def write(self, state: Any, directory: Path, ctx: ShardContext) -> Mapping[str, FileRecord]:
        name = rank_file_name(ctx.rank)
        with ChecksumWriter(directory / name, fsync=ctx.fsync) as writer:
            try:
                torch.save(state, writer)
            except RuntimeError:
                if writer.error is not None:  # the disk's error, not the zip writer's echo
                    raise writer.error from None
                raise
        return {name: FileRecord(size=writer.size, checksum=writer.checksum, rank=ctx.rank)}

    def read(
        self,
        directory: Path,
        manifest: Manifest,
        ctx: ShardContext,
        template: Any,
        options: ReadOptions,
    ) -> Any:
        return safe_torch_load(directory / rank_file_name(ctx.rank), options)
