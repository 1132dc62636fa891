"""Exporting a committed checkpoint as one ``torch.save`` file, in a plain process.

The result loads anywhere with ``torch.load(path, weights_only=True)`` (as long as the state
holds only tensors and plain values), with no distckpt, no process group and no knowledge of
how many ranks wrote the checkpoint:

* a "dcp" checkpoint becomes its consolidated state: every DTensor as one full tensor, nested
  as it was saved (``{"app": {"model": {...}, "optim": {...}}, ...}``);
* a "torch" checkpoint becomes the state of one rank (rank 0 unless ``rank=`` says otherwise),
  or with ``all_ranks=True`` a dict ``{rank: state}`` of every rank.

The checkpoint's manifest is checked before anything is read, checkpoint files are read through
the same safe loaders as a restore (nothing is unpickled beyond tensors and plain values unless
``allow_pickle=True``), and the output file appears atomically: a reader sees the old file or
the complete new one, never a partial one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from distckpt.errors import InvalidArgument
from distckpt.formats import format_named
from distckpt.formats.base import check_rank_argument
from distckpt.fsutil import atomic_write
from distckpt.resolve import resolve_path
from distckpt.storage.views import errors_name_the_location

__all__ = ["export"]


def export(
    path: str | os.PathLike[str],
    out_file: str | os.PathLike[str],
    *,
    rank: int | None = None,
    all_ranks: bool = False,
    allow_pickle: bool = False,
    fsync: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> Path:
    """Write the committed checkpoint at ``path`` to ``out_file`` as one ``torch.save`` file;
    returns the absolute path written.

    Args:
        path: a step dir, a checkpoint root (its newest checkpoint), or a ``last`` / ``best``
            link (symlink or pointer file); or the same as an ``s3://`` URL (its files are
            downloaded into a temporary dir first).
        out_file: the file to write; replaced atomically if it exists. Its directory is created
            if missing.
        rank: for a "torch" checkpoint, the rank whose state to export (default 0). Not
            allowed for "dcp": that format is exported whole.
        all_ranks: for a "torch" checkpoint, export ``{rank: state}`` of every rank.
        allow_pickle: unpickle arbitrary objects in the checkpoint; only for trusted ones.
        fsync: make the output durable before returning.
        storage_options: the client options of an ``s3://`` ``path`` (see
            :class:`~distckpt.CheckpointManager`).

    Needs memory for the whole exported state (for "dcp", every tensor at full size). Runs in
    this process alone: never collective, even where torch.distributed is initialised.

    An error of the operating system (a failed read of the checkpoint's files; a failed write
    of ``out_file``: a full disk, naming the file, or a directory that cannot be created) is
    raised as that ``OSError`` (:mod:`distckpt.errors`); a failed write leaves no temporary
    file behind.
    """
    source, manifest = resolve_path(path, storage_options=storage_options)
    out = Path(os.path.abspath(os.fspath(out_file)))
    if out.is_dir():
        raise InvalidArgument(f"out_file {out} is a directory; give the path of a file")
    check_rank_argument(rank)
    with (
        source.local_copy(manifest.files) as directory,
        errors_name_the_location(source, directory),
    ):
        state = format_named(manifest.format).export(
            directory, manifest, rank=rank, all_ranks=all_ranks, allow_pickle=allow_pickle
        )
    _atomic_torch_save(state, out, fsync=fsync)
    return out


def _atomic_torch_save(state: Any, out: Path, *, fsync: bool) -> None:
    """``torch.save`` streamed to a temporary file beside ``out``, then renamed over it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda file: torch.save(state, file), fsync=fsync)
