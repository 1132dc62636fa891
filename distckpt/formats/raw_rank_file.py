"""The rank file of the "torch" format since manifest format version 2: tensor bytes written
raw, beside an index and the state's pickled skeleton.

``torch.save`` puts every storage in a zip record and hands its bytes to Python in pieces; on
a fast disk that costs about half as much again as writing the bytes. This layout writes each
storage's bytes with one large ``write`` straight from the tensor's memory (small ones gathered
by :class:`~distckpt.checksums.ChecksumWriter`, which checksums every byte on the way), and
:mod:`distckpt.formats.raw_rank_reader` reads them back with ``preadv`` straight into freshly
allocated storages, or maps the file.

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
* zero padding up to a multiple of :data:`~distckpt.memory.DIRECT_ALIGNMENT` (4096), then the
  storages' bytes (the data), each storage of at least :data:`~distckpt.memory.DIRECT_MIN_BYTES`
  (1 MiB) starting at a multiple of 4096, a smaller one at a multiple of :data:`ALIGNMENT` (so
  a mapped tensor of any dtype is aligned, and small tensors waste little), the data ending at
  a multiple of :data:`ALIGNMENT`. Offsets are explicit in the index all the same; a reader
  accepts any inside the file, and reads small storages with gaps of up to 4095 bytes between
  them in one ``preadv``.

That is layout 2: a page-aligned storage of an async save's snapshot (whose buffers are
page-aligned too, :func:`distckpt.snapshot.flat_buffers`) lands on a page of the file, so it can
be written with direct I/O straight from the snapshot's memory (:func:`write_rank_file`).
Layout 1 (up to distckpt 0.1.0) put the data and every storage at multiples of
:data:`ALIGNMENT`; its files still load.

Tensors that are views of one storage share it after loading, as with ``torch.load``. A
tensor this layout does not describe (a subclass such as a DTensor, one off the CPU, sparse,
nested, quantized, with ``requires_grad`` or a lazy conjugate/negative bit), and every tensor
inside an object other than a dict, OrderedDict, list or tuple, stays in the skeleton, where
``torch.save`` writes it as it always did; such a tensor does not share its storage with a raw
one after loading. The states distckpt saves hold detached tensors, so a parameter or a tensor
needing grad never meets a raw view of its storage; but detaching keeps the conjugate and
negative bits, so ``x.conj()`` (of a complex ``x``) or ``torch._neg_view(y)`` saved beside its
base comes back as a tensor of its own, its values exact, where ``torch.load`` would have it
share the base's storage. The index does not record those bits on purpose: a reader that
predates such a field would ignore it and load the view's raw bytes as plain values, silently
wrong.
"""

from __future__ import annotations

import ctypes
import io
import json
import struct
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from distckpt.checksums import ChecksumWriter
from distckpt.containers import same_kind_of_mapping, same_kind_of_tuple
from distckpt.memory import DIRECT_ALIGNMENT, DIRECT_MIN_BYTES, round_up

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
LAYOUT_RULES = {1: (ALIGNMENT, ALIGNMENT), 2: (DIRECT_ALIGNMENT, DIRECT_ALIGNMENT - 1)}
#: A rank file is written with direct I/O only when at least this share of its bytes can go
#: straight from page-aligned memory (:func:`writes_direct`): the rest is copied into the
#: writer's staging buffer first, and such a bounce copy made a direct write slower than a
#: buffered one (measured on a VM, 512 MiB per process from unaligned memory: 604-621 ms
#: against 392-473 ms).
_DIRECT_ALIGNED_SHARE = 0.9
_PADDING = bytes(DIRECT_ALIGNMENT)
#: With parallel writers, the data is cut into about this many chunks per thread (so a thread
#: that finishes early takes more), each at least :data:`_MIN_CHUNK_BYTES` (smaller ones would
#: cost more in system calls and thread hand-offs than they balance).
_CHUNKS_PER_THREAD = 4
_MIN_CHUNK_BYTES = 4 << 20


def aligned(offset: int, alignment: int = ALIGNMENT) -> int:
    """``offset`` rounded up to a multiple of ``alignment``."""
    return round_up(offset, alignment)


def _storage_offsets(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Each storage's offset in the data part of a layout-2 file, and the data's length: a
    storage of at least :data:`DIRECT_MIN_BYTES` starts at a multiple of
    :data:`DIRECT_ALIGNMENT`, a smaller one at a multiple of :data:`ALIGNMENT`; the data ends at
    a multiple of :data:`ALIGNMENT`."""
    offsets: list[int] = []
    end = 0
    for nbytes in sizes:
        offsets.append(aligned(end, DIRECT_ALIGNMENT if nbytes >= DIRECT_MIN_BYTES else ALIGNMENT))
        end = offsets[-1] + nbytes
    return offsets, aligned(end)


#: A rank file's head (header, index, skeleton) beyond its per-storage entries, at most, for
#: :func:`estimate_file_bytes` (a skeleton of plain values: a few KiB)
_HEAD_BYTES = 64 << 10
#: Each storage's share of the head: its index entry (JSON) and its placeholder in the
#: skeleton, at most (about 100 bytes measured; views of one storage add an entry each)
_HEAD_BYTES_PER_STORAGE = 256


def estimate_file_bytes(storage_sizes: Sequence[int]) -> int:
    """About how large a rank file of storages of ``storage_sizes`` bytes will be: the bytes,
    the layout's padding, and a head of 64 KiB plus 256 bytes per storage (what a save asks
    the disk to have free, before its margin). A head can outgrow that budget (many views of
    one storage, tensors kept in the skeleton such as DTensors, large plain values): the
    save's space margin is for that."""
    head = _HEAD_BYTES + _HEAD_BYTES_PER_STORAGE * len(storage_sizes)
    return aligned(head, DIRECT_ALIGNMENT) + _storage_offsets(storage_sizes)[1]


def writes_direct(
    storages: Sequence[torch.UntypedStorage],
    *,
    head_bytes: int,
    direct: bool,
    writer_threads: int,
) -> bool:
    """Whether :func:`write_rank_file` asks for direct I/O: when the caller allows it
    (``direct``), one thread writes (parallel writers stay buffered: their writes at offsets
    are not staged into whole pages), and at least 90% of the file (``head_bytes``, the header,
    index and skeleton, count as not aligned: they are copied through the staging buffer) are
    storages of at least :data:`DIRECT_MIN_BYTES` at page-aligned addresses, which go to the
    disk straight from their memory. An async save's snapshot buffers are
    (:func:`distckpt.snapshot.flat_buffers`); a sync save's ordinary tensors normally are not
    (a state restored with ``mmap=True`` may be), and a copy of each into the staging buffer
    first would cost more than the page cache saves, so such a file stays buffered, as does a
    file of small tensors only."""
    if not direct or writer_threads != 1:
        return False
    total, aligned = head_bytes, 0
    for storage in storages:
        nbytes = storage.nbytes()
        total += nbytes
        if nbytes >= DIRECT_MIN_BYTES and storage.data_ptr() % DIRECT_ALIGNMENT == 0:
            aligned += nbytes
    return aligned > 0 and aligned >= _DIRECT_ALIGNED_SHARE * total


def _is_raw_tensor(value: Any) -> bool:
    """Whether ``value`` is a tensor this layout writes as raw bytes (see the module doc)."""
    return (
        type(value) is torch.Tensor
        and value.device.type == "cpu"
        and value.layout == torch.strided
        and not value.is_nested  # strided layout, but no sizes or strides of its own
        and not value.is_quantized
        and not value.requires_grad
        and not value.is_conj()
        and not value.is_neg()
    )


def memory_of(storage: torch.UntypedStorage) -> memoryview:
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
            result = same_kind_of_mapping(
                value, {key: self.split(item) for key, item in value.items()}
            )
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
        memory = memory_of(storage) if nbytes else memoryview(b"")
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
    head_padding = _PADDING[: aligned(head_size, DIRECT_ALIGNMENT) - head_size]
    direct = writes_direct(
        splitter.storages,
        head_bytes=head_size,
        direct=direct,
        writer_threads=writer_threads,
    )
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
