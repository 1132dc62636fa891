"""Reading a rank file of the "torch" format's raw layout (:mod:`distckpt.formats.raw_rank_file`
describes the layout and writes it): its header, index and skeleton checked before anything
is trusted, and the storages read with ``preadv`` straight into freshly allocated memory, or
mapped from the file.
"""

from __future__ import annotations

import io
import json
import mmap
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from distckpt.containers import same_kind_of_tuple
from distckpt.errors import CorruptCheckpoint
from distckpt.formats.base import ReadOptions, storage_placement
from distckpt.formats.raw_rank_file import (
    HEADER,
    LAYOUT_RULES,
    MAGIC,
    TensorEntry,
    aligned,
    memory_of,
)
from distckpt.memory import prefault

#: Storages up to this size are read together with one ``preadv`` (many small tensors would
#: otherwise cost a system call each).
_GATHERED_READ_BYTES = 1 << 20
#: At most this many buffers per ``preadv`` (Linux's IOV_MAX is 1024; a gap takes one too).
_MAX_READ_BUFFERS = 512
_DTYPES: dict[str, torch.dtype] = {
    str(value).removeprefix("torch."): value
    for value in vars(torch).values()
    if isinstance(value, torch.dtype)
}


def is_raw_rank_file(path: Path) -> bool:
    """Whether the file at ``path`` starts like a rank file in this layout."""
    with open(path, "rb") as file:
        return file.read(len(MAGIC)) == MAGIC


@dataclass(frozen=True)
class RankFileIndex:
    """A rank file's header, index and skeleton, as read and checked."""

    file_size: int
    data_start: int
    #: the largest gap between two storages its layout version allows
    max_gap: int
    #: (offset from ``data_start``, nbytes) per storage
    storages: list[tuple[int, int]]
    tensors: list[TensorEntry]
    skeleton: bytes


def read_index(file: io.FileIO, name: str) -> RankFileIndex:
    """The index of the open rank file ``file``; :class:`CorruptCheckpoint` naming ``name``
    when anything in it is out of place."""
    index = _index_of(file.fileno(), name)
    if index is None:
        raise _not_a_rank_file(file.fileno(), name)
    return index


def _not_a_rank_file(fd: int, name: str) -> CorruptCheckpoint:
    """The error for the file open as ``fd``, which does not start with :data:`MAGIC`."""
    head = os.pread(fd, HEADER.size, 0)
    if len(head) < HEADER.size:
        size = os.fstat(fd).st_size
        return CorruptCheckpoint(f"{name}: too short for a rank file ({size} bytes)")
    return CorruptCheckpoint(f"{name}: not a distckpt rank file (magic {head[: len(MAGIC)]!r})")


#: how a zip archive (a ``torch.save`` file since torch 1.6) starts: its first local header
ZIP_MAGIC = b"PK\x03\x04"
#: how a ``torch.save`` file starts: a zip archive, or the protocol opcode of the pickle
#: (protocol 2 and later) a legacy one starts with
_TORCH_SAVE_STARTS = (ZIP_MAGIC, b"\x80")


def _starts_like_torch_save(fd: int) -> bool:
    """Whether the file open as ``fd`` starts as a ``torch.save`` file does: one that starts
    like neither that nor a rank file (a damaged magic) is no file torch should be asked to
    unpickle, whose failure would read as an unsafe checkpoint rather than a damaged one."""
    head = os.pread(fd, max(map(len, _TORCH_SAVE_STARTS)), 0)
    return head.startswith(_TORCH_SAVE_STARTS)


def _index_of(fd: int, name: str) -> RankFileIndex | None:
    """:func:`read_index` of the file open as ``fd``, read with two ``pread`` calls (the
    header, then the index and the skeleton together); None when the file does not start
    with :data:`MAGIC` (not a rank file in this layout: :func:`is_raw_rank_file` says False)."""
    file_size = os.fstat(fd).st_size
    head = os.pread(fd, HEADER.size, 0)
    if head[: len(MAGIC)] != MAGIC:
        return None
    if len(head) < HEADER.size:
        raise CorruptCheckpoint(f"{name}: too short for a rank file ({file_size} bytes)")
    _magic, version, _reserved, index_bytes, skeleton_bytes = HEADER.unpack(head)
    if version not in LAYOUT_RULES:
        raise CorruptCheckpoint(
            f"{name}: rank-file layout {version}; this distckpt reads layouts "
            f"{', '.join(map(str, LAYOUT_RULES))}"
        )
    data_alignment, max_gap = LAYOUT_RULES[version]
    data_start = aligned(HEADER.size + index_bytes + skeleton_bytes, data_alignment)
    if data_start > file_size:
        raise CorruptCheckpoint(f"{name}: its index runs past the end of the file (truncated?)")
    parts = os.pread(fd, index_bytes + skeleton_bytes, HEADER.size)
    if len(parts) < index_bytes + skeleton_bytes:
        raise CorruptCheckpoint(f"{name}: ended early while reading its index (truncated?)")
    try:
        index = json.loads(parts[:index_bytes])
        storages = [(int(offset), int(nbytes)) for offset, nbytes in index["storages"]]
        tensors = [
            TensorEntry(int(s), _DTYPES[dtype], tuple(map(int, shape)), tuple(map(int, st)), int(o))
            for s, dtype, shape, st, o in index["tensors"]
        ]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CorruptCheckpoint(f"{name}: unreadable index: {exc!r}") from exc
    for offset, nbytes in storages:
        if offset < 0 or nbytes < 0 or data_start + offset + nbytes > file_size:
            raise CorruptCheckpoint(
                f"{name}: a storage at {offset} of {nbytes} bytes lies outside the file"
            )
    for entry in tensors:
        _check_fits(entry, storages, name)
    skeleton = parts[index_bytes:]
    return RankFileIndex(file_size, data_start, max_gap, storages, tensors, skeleton)


def _check_fits(entry: TensorEntry, storages: list[tuple[int, int]], name: str) -> None:
    """Refuse a tensor entry that reaches outside its storage: ``set_`` would otherwise grow a
    storage read from disk rather than fail."""
    shape, stride = entry.shape, entry.stride
    if not 0 <= entry.storage < len(storages) or len(shape) != len(stride):
        raise CorruptCheckpoint(f"{name}: a tensor entry names no storage of the file")
    # One plain loop for both checks: a restore checks every tensor, and min() or a generator
    # costs more per element.
    last, empty = entry.storage_offset, False
    for size, step in zip(shape, stride):
        if size < 0 or step < 0:
            raise CorruptCheckpoint(f"{name}: a tensor entry has a negative size or stride")
        empty = empty or size == 0
        last += (size - 1) * step
    if entry.storage_offset < 0:
        raise CorruptCheckpoint(f"{name}: a tensor entry has a negative storage offset")
    if not empty and (last + 1) * entry.dtype.itemsize > storages[entry.storage][1]:
        raise CorruptCheckpoint(f"{name}: a tensor entry reaches past the end of its storage")


def _read_exactly(fd: int, buffers: list[memoryview], offset: int, name: str) -> None:
    """Fill ``buffers`` from the file's bytes at ``offset`` on, in order (``preadv`` may stop
    short: it is called again for the rest)."""
    remaining = [b for b in buffers if b.nbytes]
    while remaining:
        got = os.preadv(fd, remaining, offset)
        if got == 0:
            raise CorruptCheckpoint(f"{name}: ended early while reading tensor data")
        offset += got
        while remaining and got >= remaining[0].nbytes:
            got -= remaining[0].nbytes
            remaining.pop(0)
        if got:
            remaining[0] = remaining[0][got:]


def _read_storages(fd: int, index: RankFileIndex, name: str) -> list[torch.UntypedStorage]:
    """Every storage read into new memory; runs of small ones with one ``preadv`` each, a
    large one alone, into memory faulted in at once first where it is fresh (:func:`prefault`)."""
    storages = [torch.UntypedStorage(nbytes) for _, nbytes in index.storages]
    gap = memoryview(bytearray(index.max_gap))
    batch: list[memoryview] = []
    batch_start = batch_end = 0

    def flush() -> None:
        if batch:
            _read_exactly(fd, batch, index.data_start + batch_start, name)
            batch.clear()

    by_offset = sorted(range(len(storages)), key=lambda number: index.storages[number][0])
    for number in by_offset:
        offset, nbytes = index.storages[number]
        if nbytes == 0:
            continue
        memory = memory_of(storages[number])
        if nbytes >= _GATHERED_READ_BYTES:
            prefault(storages[number].data_ptr(), nbytes)
            _read_exactly(fd, [memory], index.data_start + offset, name)
            continue
        skipped = offset - batch_end
        if (
            not batch
            or not 0 <= skipped <= index.max_gap
            or len(batch) + 2 > _MAX_READ_BUFFERS
            or offset + nbytes - batch_start > _GATHERED_READ_BYTES
        ):
            flush()
            batch_start = offset
        elif skipped:
            batch.append(gap[:skipped])
        batch.append(memory)
        batch_end = offset + nbytes
    flush()
    return storages


def _mapped_storages(path: Path, index: RankFileIndex) -> list[torch.UntypedStorage]:
    """Every storage as a view of the file mapped into memory (private unless torch's default
    mmap options say shared, as with ``torch.load(mmap=True)``)."""
    shared = torch.serialization.get_default_mmap_options() == mmap.MAP_SHARED
    whole = torch.UntypedStorage.from_file(os.fspath(path), shared, index.file_size)
    # The C slice, as torch.load(mmap=True) slices its mapping, without UntypedStorage's
    # Python __getitem__ in front of it (a check for meta storages, which a mapping is not).
    view = torch._C.StorageBase.__getitem__
    start = index.data_start
    return [
        view(whole, slice(start + offset, start + offset + nbytes))
        if nbytes
        else torch.UntypedStorage(0)
        for offset, nbytes in index.storages
    ]


def _filled(value: Any, tensors: dict[int, torch.Tensor], done: dict[int, Any]) -> Any:
    """The loaded skeleton ``value`` with each placeholder replaced by its tensor (dicts and
    lists in place; they are fresh from unpickling)."""
    tensor = tensors.get(id(value))
    if tensor is not None:
        return tensor
    is_tuple = type(value) is tuple or (isinstance(value, tuple) and hasattr(value, "_fields"))
    if not (is_tuple or type(value) in (dict, OrderedDict, list)):
        return value
    if id(value) in done:
        return done[id(value)]
    done[id(value)] = value  # before descending: a dict met again inside itself stays one
    if isinstance(value, dict):
        for key, item in value.items():
            value[key] = _filled(item, tensors, done)
    elif isinstance(value, list):
        value[:] = [_filled(item, tensors, done) for item in value]
    else:
        items = [_filled(item, tensors, done) for item in value]
        if any(new is not old for new, old in zip(items, value)):
            done[id(value)] = same_kind_of_tuple(value, items)
    return done[id(value)]


def load_rank_file(
    path: Path,
    options: ReadOptions,
    load_skeleton: Callable[[io.BytesIO, ReadOptions, str], Any],
    *,
    otherwise: Callable[[], Any] | None = None,
) -> Any:
    """The state in the rank file at ``path``. ``load_skeleton(source, options, name)`` loads
    the pickled skeleton (the caller's safe ``torch.load``), before any tensor data is read, so
    a refused checkpoint costs no read of its data. A file that does not start like a rank
    file in this layout but like a ``torch.save`` file is read by ``otherwise()`` (a
    ``torch.save`` file in its place); any other is refused as :class:`CorruptCheckpoint`.
    Telling them apart reads through the one fd the index and skeleton are read through;
    ``otherwise`` opens the file again, as a mapping with ``mmap`` does."""
    name = os.fspath(path)
    fd = os.open(name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        index = _index_of(fd, name)
        if index is None:
            if otherwise is not None and _starts_like_torch_save(fd):
                return otherwise()
            raise _not_a_rank_file(fd, name)
        loaded = load_skeleton(io.BytesIO(index.skeleton), options, name)
        skeleton, placeholders = _checked_skeleton(loaded, len(index.tensors), name)
        if options.mmap:
            storages = _mapped_storages(path, index)
        else:
            storages = _read_storages(fd, index, name)
    finally:
        os.close(fd)
    place = storage_placement(options.map_location)
    if place is not None:
        storages = [place(storage) for storage in storages]
    devices = [storage.device for storage in storages]
    tensors = {
        id(placeholder): torch.empty(0, dtype=entry.dtype, device=devices[entry.storage]).set_(
            storages[entry.storage], entry.storage_offset, entry.shape, entry.stride
        )
        for placeholder, entry in zip(placeholders, index.tensors)
    }
    return _filled(skeleton, tensors, {})


def _checked_skeleton(loaded: Any, tensor_count: int, name: str) -> tuple[Any, Sequence[Any]]:
    if not (isinstance(loaded, tuple) and len(loaded) == 2 and isinstance(loaded[1], list)):
        raise CorruptCheckpoint(f"{name}: its skeleton is not (state, placeholders)")
    skeleton, placeholders = loaded
    if len(placeholders) != tensor_count:
        raise CorruptCheckpoint(
            f"{name}: {len(placeholders)} placeholders for {tensor_count} indexed tensors"
        )
    return skeleton, placeholders
