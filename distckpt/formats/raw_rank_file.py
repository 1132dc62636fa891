"""The rank file of the "torch" format since manifest format version 2: tensor bytes written
raw, beside an index and the state's pickled skeleton.

``torch.save`` puts every storage in a zip record and hands its bytes to Python in pieces; on
a fast disk that costs about half as much again as writing the bytes. This layout writes each
storage's bytes with one large ``write`` straight from the tensor's memory (small ones gathered
by :class:`~distckpt.checksums.ChecksumWriter`, which checksums every byte on the way), and reads
them back with ``preadv`` straight into freshly allocated storages, or maps the file.

A file is, in order:

* a header (:data:`HEADER`): :data:`MAGIC`, the layout version, the sizes of the next two parts;
* the index, JSON: ``{"storages": [[offset, nbytes], ...], "tensors": [[storage, dtype, shape,
  stride, storage_offset], ...]}``, offsets relative to the start of the data;
* the skeleton: ``torch.save((skeleton, placeholders))``, where ``skeleton`` is the state with
  each plain CPU tensor replaced by a placeholder (a fresh one-item list; ``placeholders[i]``
  stands for ``tensors[i]``; pickling keeps their identity, so no value of the state can be
  mistaken for one). It is loaded with ``torch.load(weights_only=True)`` unless the caller opts
  in to unpickling, so nothing but plain values is ever unpickled, as with a ``torch.save`` file
  (a skeleton of plain values alone by a stricter unpickler that refuses every class:
  :func:`distckpt.formats.torch_files.load_skeleton`);
* zero padding up to a multiple of :data:`~distckpt.fsutil.DIRECT_ALIGNMENT` (4096), then the
  storages' bytes (the data), each storage of at least that many bytes starting at a multiple
  of it, a smaller one at a multiple of :data:`ALIGNMENT` (so a mapped tensor of any dtype is
  aligned, and many tiny tensors waste little), the data ending at a multiple of
  :data:`ALIGNMENT`. Offsets are explicit in the index all the same.

That is layout 2: a page-aligned storage of an async save's snapshot (whose buffers are
page-aligned too, :func:`distckpt.snapshot.flat_buffers`) lands on a page of the file, so it can
be written with direct I/O straight from the snapshot's memory (:func:`write_rank_file`).
Layout 1 (up to distckpt 0.1.0) put the data and every storage at multiples of
:data:`ALIGNMENT`; its files still load.

Tensors that are views of one storage share it after loading, as with ``torch.load``. A
tensor this layout does not describe (a subclass such as a DTensor, one off the CPU, sparse,
quantized, with ``requires_grad`` or a lazy conjugate/negative bit), and every tensor inside an
object other than a dict, OrderedDict, list or tuple, stays in the skeleton, where
``torch.save`` writes it as it always did (such a tensor does not share its storage with a raw
one after loading; the states distckpt saves hold detached plain tensors, so they do not meet).
"""

from __future__ import annotations

import ctypes
import io
import json
import mmap
import os
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from distckpt.checksums import ChecksumWriter
from distckpt.errors import CorruptCheckpoint
from distckpt.formats.base import ReadOptions, storage_placement
from distckpt.fsutil import DIRECT_ALIGNMENT
from distckpt.prefault import prefault
from distckpt.state import same_kind_of_tuple

#: The first bytes of every rank file in this layout.
MAGIC = b"DCKPTRAW"
#: Bumped when the layout changes in a way an older reader would misread.
LAYOUT_VERSION = 2
#: magic, layout version, reserved (0), index bytes, skeleton bytes; little-endian.
HEADER = struct.Struct("<8sIIQQ")
#: Every storage starts at a multiple of this (torch.save aligns its records the same way).
ALIGNMENT = 64
#: Per readable layout version: where the data starts (a multiple of the first), and the
#: largest gap between the end of one storage and the start of the next.
_LAYOUT_RULES = {1: (ALIGNMENT, ALIGNMENT), 2: (DIRECT_ALIGNMENT, DIRECT_ALIGNMENT - 1)}
#: A rank file is written with direct I/O only when at least this share of its tensor bytes
#: already sit at page-aligned addresses: the rest is copied into the writer's staging buffer
#: first, and such a bounce copy made a direct write slower than a buffered one (measured on
#: a VM, 512 MiB per process from unaligned memory: 604-621 ms against 392-473 ms).
_DIRECT_ALIGNED_SHARE = 0.9
#: Storages up to this size are read together with one ``preadv`` (many small tensors would
#: otherwise cost a system call each).
_GATHERED_READ_BYTES = 1 << 20
#: At most this many buffers per ``preadv`` (Linux's IOV_MAX is 1024; a gap takes one too).
_MAX_READ_BUFFERS = 512
_PADDING = bytes(DIRECT_ALIGNMENT)
#: With parallel writers, the data is cut into about this many chunks per thread (so a thread
#: that finishes early takes more), each at least :data:`_MIN_CHUNK_BYTES` (smaller ones would
#: cost more in system calls and thread hand-offs than they balance).
_CHUNKS_PER_THREAD = 4
_MIN_CHUNK_BYTES = 4 << 20
_DTYPES: dict[str, torch.dtype] = {
    str(value).removeprefix("torch."): value
    for value in vars(torch).values()
    if isinstance(value, torch.dtype)
}


def _aligned(offset: int, alignment: int = ALIGNMENT) -> int:
    return -(-offset // alignment) * alignment


def _storage_offsets(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Each storage's offset in the data part of a layout-2 file, and the data's length: a
    storage of at least :data:`DIRECT_ALIGNMENT` bytes starts at a multiple of it, a smaller
    one at a multiple of :data:`ALIGNMENT`; the data ends at a multiple of :data:`ALIGNMENT`."""
    offsets: list[int] = []
    end = 0
    for nbytes in sizes:
        offsets.append(_aligned(end, DIRECT_ALIGNMENT if nbytes >= DIRECT_ALIGNMENT else ALIGNMENT))
        end = offsets[-1] + nbytes
    return offsets, _aligned(end)


def writes_direct(
    storages: Sequence[torch.UntypedStorage], *, direct: bool, writer_threads: int
) -> bool:
    """Whether :func:`write_rank_file` asks for direct I/O: when the caller allows it
    (``direct``), one thread writes (parallel writers stay buffered: their writes at offsets
    are not staged into whole pages), and at least 90% of the tensor bytes already sit at
    page-aligned addresses, so they go to the disk straight from their memory. An async save's
    snapshot buffers are page-aligned (:func:`distckpt.snapshot.flat_buffers`); a sync save's
    ordinary tensors normally are not, and a copy of each into the staging buffer first would
    cost more than the page cache saves, so that file stays buffered."""
    if not direct or writer_threads != 1:
        return False
    total = aligned = 0
    for storage in storages:
        nbytes = storage.nbytes()
        total += nbytes
        if nbytes and storage.data_ptr() % DIRECT_ALIGNMENT == 0:
            aligned += nbytes
    return aligned >= _DIRECT_ALIGNED_SHARE * total


def _is_raw_tensor(value: Any) -> bool:
    """Whether ``value`` is a tensor this layout writes as raw bytes (see the module doc)."""
    return (
        type(value) is torch.Tensor
        and value.device.type == "cpu"
        and value.layout == torch.strided
        and not value.is_quantized
        and not value.requires_grad
        and not value.is_conj()
        and not value.is_neg()
    )


def _memory_of(storage: torch.UntypedStorage) -> memoryview:
    """The bytes of a CPU storage, without a copy; valid while ``storage`` lives."""
    buffer = (ctypes.c_ubyte * storage.nbytes()).from_address(storage.data_ptr())
    return memoryview(buffer).cast("B")


class TensorEntry(NamedTuple):
    """Where one tensor lies: which storage, and its view of it. A named tuple: a restore
    makes one per tensor, and a frozen dataclass costs several times as much to make."""

    storage: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int

    def to_json(self) -> list[Any]:
        name = str(self.dtype).removeprefix("torch.")
        return [self.storage, name, list(self.shape), list(self.stride), self.storage_offset]


class _Splitter:
    """Takes the raw tensors out of a state, leaving placeholders: what the skeleton is."""

    def __init__(self) -> None:
        self.storages: list[torch.UntypedStorage] = []
        self.tensors: list[TensorEntry] = []
        self.placeholders: list[list[int]] = []
        # keyed by the address of torch's storage object, as torch.save keys them
        self._storage_numbers: dict[int, int] = {}
        # id(value) -> its skeleton, so a value met twice stays one object after loading (every
        # value met belongs to the state, alive throughout, so no id is reused meanwhile)
        self._done: dict[int, Any] = {}

    def split(self, value: Any) -> Any:
        done = self._done.get(id(value))
        if done is not None:
            return done
        if _is_raw_tensor(value):
            result: Any = self._placeholder(value)
        elif type(value) in (dict, OrderedDict):
            result = type(value)((key, self.split(item)) for key, item in value.items())
        elif type(value) is list:
            result = [self.split(item) for item in value]
        elif type(value) is tuple or (isinstance(value, tuple) and hasattr(value, "_fields")):
            result = same_kind_of_tuple(value, [self.split(item) for item in value])
        else:
            return value  # written by torch.save inside the skeleton, as it is
        self._done[id(value)] = result
        return result

    def _placeholder(self, tensor: torch.Tensor) -> list[int]:
        storage = tensor.untyped_storage()
        number = self._storage_numbers.setdefault(storage._cdata, len(self.storages))
        if number == len(self.storages):
            self.storages.append(storage)
        self.tensors.append(
            TensorEntry(
                number,
                tensor.dtype,
                tuple(tensor.shape),
                tuple(tensor.stride()),
                tensor.storage_offset(),
            )
        )
        placeholder = [len(self.placeholders)]
        self.placeholders.append(placeholder)
        return placeholder


def _padded_storages(
    storages: Sequence[torch.UntypedStorage], offsets: Sequence[int], end: int
) -> list[tuple[memoryview, memoryview]]:
    """Each storage's bytes and the zero padding after it (up to the next storage's offset, or
    to ``end``, the data's length), in file order."""
    padded = []
    for number, (storage, offset) in enumerate(zip(storages, offsets)):
        nbytes = storage.nbytes()
        memory = _memory_of(storage) if nbytes else memoryview(b"")
        following = offsets[number + 1] if number + 1 < len(offsets) else end
        padded.append((memory, memoryview(_PADDING)[: following - offset - nbytes]))
    return padded


def _data_chunks(
    storages: Sequence[torch.UntypedStorage], offsets: Sequence[int], end: int, chunk_bytes: int
) -> list[list[memoryview]]:
    """The data part of the file (every storage's bytes and the padding after it, in file
    order) cut into runs of about ``chunk_bytes``: a large storage into several, small ones
    (with their padding) gathered into one, so parallel writers get balanced work and a state
    of many small tensors costs few system calls."""
    chunks: list[list[memoryview]] = [[]]
    filled = 0
    for memory, padding in _padded_storages(storages, offsets, end):
        nbytes = memory.nbytes
        for start in range(0, nbytes, chunk_bytes):
            piece = memory[start : start + chunk_bytes]
            if filled and filled + piece.nbytes > chunk_bytes:
                chunks.append([])
                filled = 0
            chunks[-1].append(piece)
            filled += piece.nbytes
        if padding.nbytes:
            chunks[-1].append(padding)
            filled += padding.nbytes
    return [chunk for chunk in chunks if chunk]


def write_rank_file(
    state: Any, path: Path, *, fsync: bool, writer_threads: int = 1, direct: bool = False
) -> ChecksumWriter:
    """Write ``state`` to a new file at ``path`` in this layout; returns the closed writer
    (its ``size`` and ``checksum`` cover every byte of the file). With ``writer_threads`` > 1
    the storages' bytes are written by that many threads at their offsets
    (:meth:`~distckpt.checksums.ChecksumWriter.write_in_parallel`); the file is byte for byte the
    one a single writer makes, which appends them in turn with ``write``. With ``direct``, the
    file is written with direct I/O where :func:`writes_direct` says so and the file system
    takes it (the writer's ``direct`` tells); the bytes are the same either way."""
    splitter = _Splitter()
    skeleton = splitter.split(state)
    pickled = io.BytesIO()
    torch.save((skeleton, splitter.placeholders), pickled)
    offsets, end = _storage_offsets([storage.nbytes() for storage in splitter.storages])
    index = json.dumps(
        {
            "storages": [[o, s.nbytes()] for o, s in zip(offsets, splitter.storages)],
            "tensors": [entry.to_json() for entry in splitter.tensors],
        },
        separators=(",", ":"),
    ).encode()
    skeleton_bytes = pickled.getbuffer()
    header = HEADER.pack(MAGIC, LAYOUT_VERSION, 0, len(index), skeleton_bytes.nbytes)
    head_size = HEADER.size + len(index) + skeleton_bytes.nbytes
    head_padding = _PADDING[: _aligned(head_size, DIRECT_ALIGNMENT) - head_size]
    direct = writes_direct(splitter.storages, direct=direct, writer_threads=writer_threads)
    with ChecksumWriter(path, fsync=fsync, direct=direct) as writer:
        for part in (header, index, skeleton_bytes, head_padding):
            writer.write(part)
        if writer_threads > 1:
            chunk_bytes = max(_MIN_CHUNK_BYTES, -(-end // (writer_threads * _CHUNKS_PER_THREAD)))
            chunks = _data_chunks(splitter.storages, offsets, end, chunk_bytes)
            writer.write_in_parallel(chunks, writer_threads)
            return writer
        for memory, padding in _padded_storages(splitter.storages, offsets, end):
            if memory.nbytes:
                writer.write(memory)
            if padding.nbytes:
                writer.write(padding)
    return writer


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
    if version not in _LAYOUT_RULES:
        raise CorruptCheckpoint(
            f"{name}: rank-file layout {version}; this distckpt reads layouts "
            f"{', '.join(map(str, _LAYOUT_RULES))}"
        )
    data_alignment, max_gap = _LAYOUT_RULES[version]
    data_start = _aligned(HEADER.size + index_bytes + skeleton_bytes, data_alignment)
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
        memory = _memory_of(storages[number])
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
    file in this layout is read by ``otherwise()`` (a ``torch.save`` file in its place), or
    refused as :class:`CorruptCheckpoint` without it: the file is opened once either way."""
    name = os.fspath(path)
    fd = os.open(name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        index = _index_of(fd, name)
        if index is None:
            if otherwise is not None:
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
