"""Snapshots for async saves: a copy of the state in CPU buffers that training cannot touch.

An async save returns as soon as the state is copied, and a background thread writes the copy.
The buffers are allocated at the first save and reused by later ones while the state's tensors
keep their places, shapes, dtypes and sharing, so a steady-state snapshot costs one memory copy
and no allocation; a save whose tensors changed gets new buffers and lets the old ones go.

A contiguous tensor that is the state's only tensor in its storage (the common case) gets a
contiguous buffer of its own, exactly its bytes. Tensors that share a storage (a weight tied to
two places of the state, views of one tensor) share one buffer: a copy of the bytes of that
storage they reach, from the lowest to the highest, in which each of them is a view with its
own dtype, offset, shape and strides. A tensor alone in its storage that is not contiguous (a
``channels_last`` or transposed one, an expanded view whose strides are 0, a slice with gaps)
gets such a buffer of its own, of the bytes it reaches. A lazily conjugated or negated view
keeps its bit: its buffer holds the bytes as they are, under the view with the bit set. So a
format sees what a sync save shows it: the "torch" rank file writes each storage once, and a
restore gives independent tensors where the state had them, tensors sharing a storage where the
state shared one, and each with its strides and bits. The one exception is a tensor whose bytes
reach too far: one that would copy more than :data:`MAX_SHARED_SPAN_RATIO` times its own bytes
(a narrow slice of a large tensor) gets a compact buffer of exactly its elements, in its memory
format where it has one (``channels_last``), else contiguous.

Without CUDA the buffers lie in one flat, page-aligned block of private anonymous memory
(``mmap``): one allocation per layout and no allocator header per tensor. Each buffer still has
a storage of its own covering exactly its bytes, so no format sees the block. With CUDA, every
buffer is a pinned tensor of its own, so device-to-host copies run at full speed.

A tensor torch cannot copy into such a buffer (quantized, sparse, nested, of any layout but
strided, or a subclass of ``torch.Tensor``, which a plain buffer would turn into a plain tensor)
is cloned instead, into fresh memory at each save: correct, and rare. A tensor of a sub-byte
dtype (:data:`SUB_BYTE_DTYPES`), for which torch has no copy at all, is copied as the bytes it
lies in.

DTensors are copied shard by shard and rebuilt with the same mesh and placements.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from distckpt.arrangement import (
    Arrangement,
    SharedView,
    arranged_snapshot,
    arrangement_of,
    byte_extent,
    byte_range,
    compact_stride,
    view_in,
)
from distckpt.containers import same_kind_of_mapping, same_kind_of_tuple
from distckpt.memory import DIRECT_ALIGNMENT, DIRECT_MIN_BYTES, anonymous_memory, round_up
from distckpt.per_rank import PerRank
from distckpt.state import dtensor_type
from distckpt.tensor_writes import SUB_BYTE_DTYPES, through_bytes

#: Each buffer of the flat block starts at a multiple of this many bytes: a cache line, which
#: every dtype's alignment divides, and small enough that many tiny tensors waste little. A
#: buffer of at least :data:`~distckpt.memory.DIRECT_MIN_BYTES` starts on a page, so the
#: "torch" rank file can write it with direct I/O straight from this memory (for a state whose
#: large tensors are whole pages, as they usually are, that costs no extra page).
BUFFER_ALIGNMENT = 64
#: A buffer of the bytes its tensors reach (tensors sharing a storage, or one tensor that is
#: not contiguous) copies them from the lowest rounded down to a multiple of this: every
#: dtype's size divides it, so each tensor's offset in the buffer stays a whole number of its
#: elements.
SHARED_START_ALIGNMENT = 16
#: Tensors sharing a storage share a buffer only while the bytes it would copy (from the lowest
#: they reach to the highest) are at most this many times their own bytes; else each keeps a
#: buffer of its own (see ``_Walk._worth_sharing``). A tensor that is not contiguous gets a
#: buffer of the bytes it reaches, keeping its strides, under the same bound.
MAX_SHARED_SPAN_RATIO = 2
#: ``torch.strided``, compared by identity for every tensor of every save
_STRIDED = torch.strided

#: Where a tensor sits in the state tree: the keys and indices leading to it.
TreeKey = tuple[Any, ...]
#: What a buffer is made for: the tensor's place, shape and dtype.
Slot = tuple[TreeKey, torch.Size, torch.dtype]


@dataclass(frozen=True)
class SharedStorage:
    """The key of a buffer of the bytes of a storage that its tensors reach: the ``number``-th
    such buffer of the layout, in the order of the state's walk, for tensors sharing a storage
    or for one tensor that is not contiguous. Not a tuple, so it never equals a
    :data:`TreeKey`."""

    number: int


#: Where a buffer belongs: a tensor's place (a buffer of its own elements), or the bytes of a
#: storage its tensors reach (:class:`SharedStorage`).
BufferKey = TreeKey | SharedStorage


@dataclass(frozen=True)
class Layout:
    """What a snapshot's buffers are made for; they are reused while it stays the same."""

    #: every tensor with a buffer, in the order of the state's walk
    slots: list[Slot] = field(default_factory=list)
    #: those of them in a buffer of the bytes they reach (sharing a storage, or not contiguous):
    #: by such buffer, each's in the order of the walk
    views: list[SharedView] = field(default_factory=list)
    #: the size of each such buffer
    shared_bytes: list[int] = field(default_factory=list)
    #: the tensors that are not plainly contiguous, by place
    arranged: dict[TreeKey, Arrangement] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    """A snapshot whose buffers exist but are not filled yet: ``state`` is the copy's tree
    (its tensors are the buffers), and :meth:`copy` fills them from the state they mirror."""

    state: Any
    #: (buffer, what it copies): a tensor, a ``uint8`` view of a sub-byte one's bytes, or the
    #: bytes of a storage that its tensors reach (tensors sharing it, or one tensor that is not
    #: contiguous)
    copies: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    #: whether the copies are asynchronous device-to-host copies into pinned buffers
    non_blocking: bool

    def copy(self) -> Any:
        """Fill every buffer; returns :attr:`state`. Pinned copies may still be in flight
        (:meth:`SnapshotBuffers.synchronize`)."""
        for buffer, source in self.copies:
            buffer.copy_(source, non_blocking=self.non_blocking)
        return self.state


@dataclass
class _Walk:
    """What one walk of the state finds: its tensors with a buffer, the copies into the
    buffers it found, and which tensors share a storage."""

    slots: list[Slot] = field(default_factory=list)
    #: the tensor of each slot
    sources: list[torch.Tensor] = field(default_factory=list)
    copies: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    #: a storage's start address -> the first slot met in it
    first_in_storage: dict[int, int] = field(default_factory=dict)
    #: a storage's start address -> its slots, once a second one is met in it
    sharing: dict[int, list[int]] = field(default_factory=dict)
    #: the slots of the tensors that are not plainly contiguous, and how each lies
    arranged: dict[int, Arrangement] = field(default_factory=dict)

    def layout(self) -> tuple[Layout, list[tuple[torch.Tensor, int, int]]]:
        """The layout found, and for each buffer of the bytes its tensors reach (tensors sharing
        a storage, a tensor that is not contiguous) the range of bytes [low, high) in a tensor
        whose storage holds them all."""
        if not self.sharing and not self.arranged:
            return Layout(self.slots), []
        groups: list[list[int]] = []
        for members in self.sharing.values():
            on_device: dict[torch.device, list[int]] = {}
            for index in members:
                tensor = self.sources[index]
                if tensor.numel():  # a tensor of no elements shares nothing
                    on_device.setdefault(tensor.device, []).append(index)
            groups += [
                same for same in on_device.values() if len(same) > 1 and self._worth_sharing(same)
            ]
        grouped = {index for members in groups for index in members}
        # A tensor that is not contiguous and shares no buffer gets one of the bytes it reaches,
        # keeping its strides, unless that is too many more than its own (then a compact one).
        groups += [
            [index]
            for index in self.arranged
            if index not in grouped and self.sources[index].numel() and self._worth_sharing([index])
        ]
        groups.sort()  # by the first slot of each: the order of the walk, as the layout's
        views: list[SharedView] = []
        shared_bytes: list[int] = []
        ranges: list[tuple[torch.Tensor, int, int]] = []
        for number, members in enumerate(groups):
            tensors = [self.sources[index] for index in members]
            extents = [byte_extent(tensor) for tensor in tensors]
            low = min(start for start, _ in extents)
            low -= low % SHARED_START_ALIGNMENT
            high = max(end for _, end in extents)
            shared_bytes.append(high - low)
            # Tensors of different storages over the same memory (rare: two `frombuffer`s of
            # it) are copied through the largest, which holds the bytes of every other.
            largest = max(tensors, key=lambda tensor: tensor.untyped_storage().nbytes())
            ranges.append((largest, low, high))
            views += [
                SharedView(
                    self.slots[index][0],
                    number,
                    start - low,
                    tensor.shape,
                    tensor.stride(),
                    tensor.dtype,
                    tensor.is_conj(),
                    tensor.is_neg(),
                )
                for index, tensor, (start, _) in zip(members, tensors, extents)
            ]
        arranged = {self.slots[index][0]: how for index, how in self.arranged.items()}
        return Layout(self.slots, views, shared_bytes, arranged), ranges

    def _worth_sharing(self, members: list[int]) -> bool:
        """Whether the tensors of ``members`` (slots in one storage) take one buffer of the bytes
        they reach: only while the bytes between the lowest and the highest they reach are at
        most :data:`MAX_SHARED_SPAN_RATIO` times their own. Two small slices far apart in a large
        storage keep a buffer each (their gap is not copied, nor held between saves), and are
        restored as separate tensors, as before sharing was kept. An expanded view (strides of
        0) reaches fewer bytes than it has elements."""
        tensors = [self.sources[index] for index in members]
        extents = [byte_extent(tensor) for tensor in tensors]
        span = max(end for _, end in extents) - min(start for start, _ in extents)
        own = sum(tensor.numel() * tensor.dtype.itemsize for tensor in tensors)
        return span <= MAX_SHARED_SPAN_RATIO * own


class SnapshotBuffers:
    """Reusable CPU buffers, keyed by where each tensor sits in the state tree, or, for a
    buffer of the bytes of a storage that its tensors reach (tensors sharing a storage, a
    tensor that is not contiguous), by which such buffer it is (:class:`SharedStorage`)."""

    def __init__(self) -> None:
        #: the buffers of tensors with one of their own elements, and those of the bytes of a
        #: storage that its tensors reach
        self._buffers: dict[BufferKey, torch.Tensor] = {}
        #: each tensor in a buffer of the bytes it reaches, its view of that buffer, by its place
        self._views: dict[TreeKey, torch.Tensor] = {}
        #: what the buffers were made for; None while there are none (at first, and after an
        #: allocation that failed: the next save allocates again)
        self._layout: Layout | None = None
        self._pin = torch.cuda.is_available()
        self._dtensor: Any = None

    def snapshot(self, state: Any) -> Any:
        """A copy of ``state`` (plain data and tensors) sharing no memory with it."""
        return self.prepare(state).copy()

    def prepare(self, state: Any) -> Snapshot:
        """The snapshot of ``state`` with its buffers ready (allocated only if the tensors'
        places, shapes, dtypes or sharing changed since the last one) but no buffer filled
        yet: what it will hold is known (e.g. its size) before the copy runs. The rare tensor
        that gets no buffer (see the module doc) is cloned here already."""
        self._dtensor = dtensor_type()
        walk = _Walk()
        copied = self._walk(state, (), lambda key, value: self._leaf(key, value, walk))
        layout, ranges = walk.layout()
        if layout != self._layout:
            # A tensor came, went, changed or shares its storage otherwise: new buffers (the
            # old ones are dropped, so a changed state does not pin old memory), and a second
            # walk that finds them all.
            self._allocate(layout)
            walk = _Walk()
            copied = self._walk(state, (), lambda key, value: self._leaf(key, value, walk))
            layout, ranges = walk.layout()
        for number, (source, low, high) in enumerate(ranges):
            walk.copies.append(
                (self._buffers[SharedStorage(number)], byte_range(source, low, high))
            )
        return Snapshot(copied, tuple(walk.copies), self._pin)

    def synchronize(self) -> None:
        """Wait for non-blocking device-to-host copies (pinned buffers) to land."""
        if self._pin:
            torch.cuda.synchronize()

    def _allocate(self, layout: Layout) -> None:
        in_reached_bytes = {view.key for view in layout.views}
        slots: list[tuple[BufferKey, torch.Size, torch.dtype]] = [
            slot for slot in layout.slots if slot[0] not in in_reached_bytes
        ]
        slots += [
            (SharedStorage(number), torch.Size([nbytes]), torch.uint8)
            for number, nbytes in enumerate(layout.shared_bytes)
        ]
        # Forgotten first: should the allocation fail (no memory), the old buffers may be gone
        # already, and the next save must not take them for ready.
        self._layout = None
        self._views = {}
        if self._pin:
            # No GPU was available to test this branch: it follows the flat block's design, a
            # pinned uint8 buffer for the bytes of a storage that its tensors reach (tensors
            # sharing it, or one that is not contiguous), filled by one non-blocking copy.
            self._buffers = {key: self._pinned(key, shape, dtype) for key, shape, dtype in slots}
        else:
            self._buffers = {}  # before mapping the new block: the old one may go back first
            self._buffers = flat_buffers(slots)
        for key, arrangement in layout.arranged.items():
            if key not in in_reached_bytes:  # a compact buffer of exactly its elements
                buffer = self._buffers[key]
                compact = compact_stride(buffer.shape, arrangement.stride)
                self._buffers[key] = buffer.as_strided(buffer.shape, compact)
        self._views = {
            view.key: view_in(self._buffers[SharedStorage(view.storage)], view)
            for view in layout.views
        }
        self._layout = layout

    def _pinned(self, key: BufferKey, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """The pinned buffer of ``key``: its old one if it still fits, else a new one."""
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
            buffer = torch.empty(shape, dtype=dtype, device="cpu", pin_memory=True)
        return buffer

    def _leaf(self, key: TreeKey, value: Any, walk: _Walk) -> Any:
        """The snapshot of one leaf of the state: a tensor's buffer (None while it has none: that
        walk's tree is thrown away), its clone if it gets no buffer, or a copy of a plain value."""
        is_dtensor = self._dtensor is not None and isinstance(value, self._dtensor)
        if not (is_dtensor or isinstance(value, torch.Tensor)):
            # Plain values (numbers, strings) are immutable or small: a deep copy stops later
            # mutation of, say, a list of ints in a sampler's state from reaching the snapshot.
            return copy.deepcopy(value)
        local = value.to_local() if is_dtensor else value
        if local.requires_grad:  # a state reduced to plain data has none: no detach to pay
            local = local.detach()
        if (
            local.layout is not _STRIDED
            or local.is_quantized
            or local.is_nested
            or type(local) is not torch.Tensor
        ):
            # A buffer of raw bytes cannot hold it (a quantized buffer made that way has no
            # quantizer, and copying into it crashed the process; a nested tensor of the strided
            # layout has no single shape to make one of), nor a subclass: a plain buffer would
            # drop its type, and a wrapper subclass (one holding inner tensors) dispatches
            # ``copy_`` once per inner tensor, so only the last one would land. Its own clone
            # keeps it whole: fresh memory each save.
            return self._rebuilt(value, local.clone(), is_dtensor)
        shape, dtype = local.shape, local.dtype
        # Written out here, not in a method of the walk: this runs for every tensor of every
        # save, and a state of 20,000 small tensors felt each call.
        index = len(walk.slots)
        walk.slots.append((key, shape, dtype))
        walk.sources.append(local)
        # The storage's start, without the cost of asking each tensor for its storage. A
        # tensor of no elements may seem to share one: the walk's layout drops it.
        start = local.data_ptr() - local.storage_offset() * dtype.itemsize
        first = walk.first_in_storage.setdefault(start, index)
        if first != index:
            walk.sharing.setdefault(start, [first]).append(index)
        # Only a complex tensor can be lazily conjugated: real ones skip asking (every save, for
        # every tensor, the calls add up).
        if not local.is_contiguous() or local.is_neg() or (dtype.is_complex and local.is_conj()):
            arrangement = arrangement_of(local)
            walk.arranged[index] = arrangement
            arranged = arranged_snapshot(
                key,
                local,
                arrangement,
                views=self._views,
                buffers=self._buffers,
                arranged=self._layout.arranged if self._layout is not None else {},
            )
            if arranged is None:
                return None
            tensor, fill = arranged
            if fill is not None:
                walk.copies.append(through_bytes(*fill))
            return self._rebuilt(value, tensor, is_dtensor)
        buffer = self._buffers.get(key)
        if buffer is not None:
            if buffer.shape != shape or buffer.dtype != dtype:
                return None
            # No call in the common case: this runs for every tensor of every save.
            walk.copies.append(
                (buffer, local) if dtype not in SUB_BYTE_DTYPES else through_bytes(buffer, local)
            )
        else:
            # In a buffer of the bytes its storage's tensors reach (filled by one copy of them),
            # or in none yet.
            buffer = self._views.get(key)
            if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
                return None
        return self._rebuilt(value, buffer, is_dtensor)

    def _rebuilt(self, value: Any, local: torch.Tensor, is_dtensor: bool) -> Any:
        """``local`` as the snapshot of ``value``: itself, or a DTensor like ``value``."""
        if not is_dtensor:
            return local
        return self._dtensor.from_local(
            local,
            value.device_mesh,
            value.placements,
            run_check=False,
            shape=value.shape,
            stride=value.stride(),
        )

    def _walk(self, value: Any, key: TreeKey, leaf: Callable[[TreeKey, Any], Any]) -> Any:
        """``value``'s tree rebuilt with ``leaf(key, value)`` for each tensor and plain value."""
        if isinstance(value, torch.Tensor):  # a DTensor is one, too
            return leaf(key, value)
        if isinstance(value, PerRank):
            return PerRank(self._walk(value.value, key, leaf))
        if isinstance(value, Mapping):
            return same_kind_of_mapping(
                value,
                {k: self._walk(v, (*key, k), leaf) for k, v in value.items()},
                copy_metadata=True,
            )
        if isinstance(value, (list, tuple)):
            items = [self._walk(v, (*key, i), leaf) for i, v in enumerate(value)]
            if isinstance(value, list):
                return items
            return same_kind_of_tuple(value, items)
        return leaf(key, value)


def flat_buffers(
    slots: Sequence[tuple[BufferKey, torch.Size, torch.dtype]],
) -> dict[BufferKey, torch.Tensor]:
    """A buffer for each slot, all in one block of page-aligned anonymous memory
    (:func:`~distckpt.memory.anonymous_memory`), each a tensor with a storage of its own over
    exactly its bytes, starting at a multiple of :data:`BUFFER_ALIGNMENT`, or of
    :data:`~distckpt.memory.DIRECT_ALIGNMENT` when it has at least
    :data:`~distckpt.memory.DIRECT_MIN_BYTES` (what a direct writer writes straight from it)."""
    offsets: list[int] = []
    end = 0
    for _, shape, dtype in slots:
        nbytes = shape.numel() * dtype.itemsize
        alignment = DIRECT_ALIGNMENT if nbytes >= DIRECT_MIN_BYTES else BUFFER_ALIGNMENT
        offsets.append(round_up(end, alignment))
        end = offsets[-1] + nbytes
    memory = anonymous_memory(end) if end else None
    buffers: dict[BufferKey, torch.Tensor] = {}
    for (key, shape, dtype), offset in zip(slots, offsets):
        nbytes = shape.numel() * dtype.itemsize
        if memory is None or nbytes == 0:  # frombuffer refuses no bytes; there are none to hold
            buffers[key] = torch.empty(shape, dtype=dtype)
            continue
        # Its own storage object, holding the block alive: the block is unmapped once the last
        # buffer (and the snapshots that hold it) are gone.
        buffers[key] = torch.frombuffer(memory[offset : offset + nbytes], dtype=dtype).view(shape)
    return buffers
