"""Exporting a committed checkpoint as one ``torch.save`` file, in a plain process.

The result loads anywhere with ``torch.load(path, weights_only=True)`` (as long as the state
holds only tensors and plain values), with no distckpt, no process group and no knowledge of
how many ranks wrote the checkpoint:

* a "dcp" checkpoint becomes its consolidated state: every DTensor as one full tensor, nested
  as it was saved (``{"app": {"model": {...}, "optim": {...}}, ...}``);
* a "torch" checkpoint becomes the state of one rank (rank 0 unless ``rank=`` says otherwise),
  or with ``all_ranks=True`` a dict ``{rank: state}`` of every rank.

The checkpoint's manifest is checked before anything is read, the checksum of every file the
export reads is checked before the output is written (``verify=True``, the default: a
checkpoint leaving the library's files keeps no checksum that could catch a damaged byte
later), checkpoint files are read through the same safe loaders as a restore (nothing is
unpickled beyond tensors and plain values unless ``allow_pickle=True``), and the output file
appears atomically: a reader sees the old file or the complete new one, never a partial one.
An ``s3://`` output is streamed into its object (a multipart upload, published whole when
complete or never), so the same holds for it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distckpt.errors import InvalidArgument
from distckpt.export_state import savable_state, torch_save
from distckpt.formats import format_named
from distckpt.formats.base import check_rank_argument
from distckpt.fsutil import atomic_write, fsync_ancestors, make_dirs
from distckpt.inspection import check_local_copy
from distckpt.layout import on_disk_spelling
from distckpt.objstore import ObjectStore
from distckpt.objurl import S3Url, is_s3_url
from distckpt.resolve import Found, resolve_path
from distckpt.results import CheckpointLocation
from distckpt.storage.nesting import bucket_root_around, local_root_around
from distckpt.storage.s3_root import prefix_holds_a_root
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
    verify: bool = True,
) -> Path | str:
    """Write the committed checkpoint at ``path`` to ``out_file`` as one ``torch.save`` file;
    returns the absolute path written (an ``s3://`` ``out_file``: its URL).

    Args:
        path: a step dir, a checkpoint root (its newest checkpoint), or a ``last`` / ``best``
            link (symlink or pointer file); or the same as an ``s3://`` URL (its files are
            downloaded into a temporary dir first).
        out_file: the file to write; replaced atomically if it exists. Its directory is created
            if missing. Or an ``s3://BUCKET/KEY`` URL: the object to write (uploaded as it is
            written, it appears whole or not at all), in a store ``storage_options``
            configure as well. Local or not, never a checkpoint root itself (a directory; a
            root's prefix) nor one of its own names
            (``ROOT/last``, ``ROOT/step-00000010/...``, ``ROOT/.staging/...``; links resolved:
            :class:`~distckpt.InvalidArgument`), a local root being what
            :func:`distckpt.layout.holds_a_root` tells one: ``exports/last/model.pt`` is
            written again and again. A local ``out_file`` is neither inside the checkpoint
            being exported (``best-model/rank-00000.pt`` of a checkpoint copied out as
            ``best-model/``; links resolved) nor a name ending in a path separator (a
            directory's): :class:`~distckpt.InvalidArgument`, before anything is read or
            written (the checkpoint's manifest excepted).
        rank: for a "torch" checkpoint, the rank whose state to export (default 0). Not
            allowed for "dcp": that format is exported whole.
        all_ranks: for a "torch" checkpoint, export ``{rank: state}`` of every rank.
        allow_pickle: unpickle arbitrary objects in the checkpoint; only for trusted ones.
        fsync: make the output durable before returning (an object is durable once written).
        storage_options: the client options of an ``s3://`` ``path`` and ``out_file`` (see
            :class:`~distckpt.CheckpointManager`).
        verify: compare the checksum of every file the export reads with the manifest's,
            as :func:`distckpt.verify` does, before anything is written: a mismatch raises
            :class:`~distckpt.CorruptCheckpoint` naming the file, and ``out_file`` is left as
            it was (no temporary file made). Those are the files of the exported
            state: for "dcp" ``.metadata`` and every rank's data file (not the extra files
            a save stored beside them), for "torch" the rank's file (every rank's with
            ``all_ranks``), not the other ranks' (their bytes are not in the output, and
            ``distckpt.verify`` checks a whole checkpoint). An ``s3://`` checkpoint's files
            are checked as downloaded, the bytes exported. A root's (or ``last``'s) newest
            checkpoint, or ``best``'s, that fails, a checksum or (with or without ``verify``)
            a file missing or of another size, is refused so, naming the file, not passed
            over for another as a restore is: the export writes what was named. The check
            costs one more read of those files; ``False`` skips it.

    Needs memory for the whole exported state (for "dcp", every tensor at full size). Runs in
    this process alone: never collective, even where torch.distributed is initialised.

    An error of the operating system (a failed read of the checkpoint's files; a failed write
    of ``out_file``: a full disk, naming the file, or a directory that cannot be created) is
    raised as that ``OSError`` (:mod:`distckpt.errors`); a failed write leaves no temporary
    file behind.
    """
    if is_s3_url(out_file):
        # Opened first: a bad URL or option is refused before the checkpoint is read.
        with _output_object(str(out_file), storage_options) as (store, name):
            found = resolve_path(path, storage_options=storage_options, skip_failing=False)
            _refuse_the_checkpoint_read(str(out_file), found[0].location)
            state = _exported_state(found, rank, all_ranks, allow_pickle, verify)
            with store.open_write(name) as writer:
                torch_save(state, writer, str(out_file))
        return str(out_file)
    given = os.fspath(out_file)
    if given.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep)):
        raise InvalidArgument(
            f"out_file {given} names a directory (it ends in a path separator); give the path "
            "of a file",
            path=given,
        )
    out = on_disk_spelling(given)
    _refuse_a_local_roots_own_name(out)
    if out.is_dir():
        raise InvalidArgument(f"out_file {out} is a directory; give the path of a file")
    # Its manifest: no tensor read. A root's failing newest checkpoint is refused, not passed
    # over: an older step written in its place would pass for the one named.
    found = resolve_path(path, storage_options=storage_options, skip_failing=False)
    _refuse_the_checkpoint_read(out, found[0].location)
    state = _exported_state(found, rank, all_ranks, allow_pickle, verify)
    _atomic_torch_save(state, out, fsync=fsync)
    return out


def _exported_state(
    found: Found, rank: int | None, all_ranks: bool, allow_pickle: bool, verify: bool
) -> Any:
    """What :func:`export` writes of the committed checkpoint ``found``, its files checked
    against their checksums first with ``verify``, as ``torch.save`` can write it
    (:func:`~distckpt.export_state.savable_state`)."""
    source, manifest = found
    check_rank_argument(rank)
    fmt = format_named(manifest.format)
    names = fmt.exported_files(manifest, rank=rank, all_ranks=all_ranks)
    with (
        source.local_copy(names) as directory,
        errors_name_the_location(source, directory),
    ):
        if verify:
            check_local_copy(source, directory, manifest, names)
        exported = fmt.export(
            directory, manifest, rank=rank, all_ranks=all_ranks, allow_pickle=allow_pickle
        )
    return savable_state(exported)


@contextmanager
def _output_object(
    url: str, storage_options: Mapping[str, Any] | None
) -> Iterator[tuple[ObjectStore, str]]:
    """The store of the bucket of ``url`` and the key of its object; refused
    (:class:`InvalidArgument`) when ``url`` names no object (a bucket, a "directory/")."""
    parsed = S3Url.parse(url)
    if not parsed.prefix or url.endswith("/"):
        raise InvalidArgument(
            f"out_file {url} names no object: give the key of one (s3://BUCKET/KEY)", path=url
        )
    with ObjectStore(str(S3Url(parsed.bucket, "")), storage_options) as store:
        _refuse_a_roots_own_name(store, url, parsed.prefix)
        yield store, parsed.prefix


def _inside_a_root(out_file: str | Path, root: str, name: str) -> InvalidArgument:
    """The refusal of an ``out_file`` that is inside the checkpoint root ``root`` under the
    root's own ``name``."""
    return InvalidArgument(
        f"out_file {out_file} is inside the checkpoint root {root} under its own name "
        f"{name!r}: export it elsewhere",
        path=str(out_file),
    )


def _refuse_a_local_roots_own_name(out: Path) -> None:
    """Refuse (:class:`InvalidArgument`) an ``out`` inside a checkpoint root under a name of
    its layout (``root/step-00000010/rank-00000.pt``, ``root/last/model.pt``): the file would
    replace a committed one or join a step dir, which verify then reports and retention
    deletes. Checked as given and with its links resolved (``root/last`` is a link to a step
    dir; so may any dir on the way be). Names are compared ignoring case, on every filesystem:
    where case is ignored (exFAT), ``root/LAST`` is the root's ``last``."""
    found = local_root_around(out)
    if found is not None:
        raise _inside_a_root(out, str(found[0]), found[1])


def _refuse_the_checkpoint_read(out: Path | str, location: CheckpointLocation) -> None:
    """Refuse (:class:`InvalidArgument`) an ``out`` inside the checkpoint being exported (at
    ``location``): the export would replace one of its files or join them, and any directory
    holding a manifest is a checkpoint, a root's step dir or not (a copy named
    ``best-model/``). A local ``out`` is inside when a directory on its way, as given or with
    links resolved, is the checkpoint's directory itself (the same device and inode, whatever
    path reaches it: a link, a bind mount)."""
    if isinstance(out, str) or isinstance(location, str):
        inside = str(out).startswith(f"{str(location).rstrip('/')}/")
    else:
        inside = _in_directory(out, Path(location))
    if inside:
        raise InvalidArgument(
            f"out_file {out} is inside the checkpoint being exported, {location}: export it "
            "elsewhere",
            path=str(out),
        )


def _in_directory(path: Path, directory: Path) -> bool:
    """Whether an existing directory on ``path``'s way (as given, or with links resolved) is
    ``directory`` itself. Both are spelled as the disk lists them first: exfat-fuse gives each
    spelling of a directory an inode of its own."""
    try:
        target = os.stat(on_disk_spelling(directory))
    except OSError:
        return False
    for way in (on_disk_spelling(path), on_disk_spelling(os.path.realpath(path))):
        for parent in way.parents:
            try:
                if os.path.samestat(os.stat(parent), target):
                    return True
            except OSError:  # not there yet (the export creates it), or no directory
                continue
    return False


def _refuse_a_roots_own_name(store: ObjectStore, url: str, key: str) -> None:
    """Refuse (:class:`InvalidArgument`) a ``key`` that is a checkpoint root's own prefix (as
    a local root is a directory, not a file), or whose part after a root's prefix is a name of
    that root's layout (``root/last``, ``root/step-00000010/...``): the object would replace
    one of the root's (a pointer, the lease) or join a step's. A prefix holds a root as
    :func:`~distckpt.storage.s3_root.prefix_holds_a_root` tells."""
    if prefix_holds_a_root(store, f"{key}/"):
        raise InvalidArgument(
            f"out_file {url} is a checkpoint root; give the key of an object outside it",
            path=url,
        )
    found = bucket_root_around(store, key)
    if found is not None:
        raise _inside_a_root(url, *found)


def _atomic_torch_save(state: Any, out: Path, *, fsync: bool) -> None:
    """``torch.save`` streamed to a temporary file beside ``out``, then renamed over it; with
    ``fsync``, the names of the directories above ``out`` are made durable too, those it
    creates and those it finds (as for a root: :func:`fsync_ancestors`), or a power loss
    could take the file away with them."""
    make_dirs(out.parent, fsync=fsync)
    if fsync:
        fsync_ancestors(out.parent)
    atomic_write(out, lambda file: torch_save(state, file, out), fsync=fsync)
