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
from pathlib import Path
from typing import Any

import torch

from distckpt.errors import CheckpointNotFound, InvalidArgument
from distckpt.formats import ReadOptions
from distckpt.formats.torch_files import safe_torch_load
from distckpt.fsutil import atomic_write
from distckpt.layout import rank_file_name
from distckpt.reader import resolve_path

__all__ = ["export"]


def export(
    path: str | os.PathLike[str],
    out_file: str | os.PathLike[str],
    *,
    rank: int | None = None,
    all_ranks: bool = False,
    allow_pickle: bool = False,
    fsync: bool = True,
) -> Path:
    """Write the committed checkpoint at ``path`` to ``out_file`` as one ``torch.save`` file;
    returns the absolute path written.

    Args:
        path: a step dir, a checkpoint root (its newest checkpoint), or a ``last`` / ``best``
            link (symlink or pointer file).
        out_file: the file to write; replaced atomically if it exists. Its directory is created
            if missing.
        rank: for a "torch" checkpoint, the rank whose state to export (default 0). Not
            allowed for "dcp": that format is exported whole.
        all_ranks: for a "torch" checkpoint, export ``{rank: state}`` of every rank.
        allow_pickle: unpickle arbitrary objects in the checkpoint; only for trusted ones.
        fsync: make the output durable before returning.

    Needs memory for the whole exported state (for "dcp", every tensor at full size). Runs in
    this process alone: never collective, even where torch.distributed is initialised.
    """
    directory, manifest = resolve_path(Path(os.fspath(path)))
    out = Path(os.path.abspath(os.fspath(out_file)))
    if out.is_dir():
        raise InvalidArgument(f"out_file {out} is a directory; give the path of a file")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
        raise InvalidArgument(f"rank must be an int, not {rank!r}")
    if manifest.format == "dcp":
        if rank is not None or all_ranks:
            raise InvalidArgument(
                f"{directory} is a 'dcp' checkpoint: it is exported whole, as full tensors; "
                "rank= and all_ranks= only apply to the 'torch' format"
            )
        from distckpt.formats.dcp import load_consolidated  # imports DCP only when needed

        state: Any = load_consolidated(directory, manifest, allow_pickle=allow_pickle)
    elif manifest.format == "torch":
        if all_ranks and rank is not None:
            raise InvalidArgument("pass rank= or all_ranks=True, not both")
        options = ReadOptions(map_location="cpu", allow_pickle=allow_pickle)
        if all_ranks:
            state = {
                r: safe_torch_load(directory / rank_file_name(r), options)
                for r in range(manifest.world_size)
            }
        else:
            chosen = 0 if rank is None else rank
            if not 0 <= chosen < manifest.world_size:
                raise CheckpointNotFound(
                    f"{directory} was saved by ranks 0..{manifest.world_size - 1}; there is no "
                    f"rank {chosen}"
                )
            state = safe_torch_load(directory / rank_file_name(chosen), options)
    else:
        raise InvalidArgument(f"{directory}: cannot export format {manifest.format!r}")
    _atomic_torch_save(state, out, fsync=fsync)
    return out


def _atomic_torch_save(state: Any, out: Path, *, fsync: bool) -> None:
    """``torch.save`` streamed to a temporary file beside ``out``, then renamed over it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda file: torch.save(state, file), fsync=fsync)
