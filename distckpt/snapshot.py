"""Snapshots for async saves: a copy of the state in CPU buffers that training cannot touch.

An async save returns as soon as the state is copied, and a background thread writes the copy.
The buffers are allocated at the first save and reused by later ones while the state's tensors
keep their places, shapes and dtypes, so a steady-state snapshot costs one memory copy and no
allocation; a save whose tensors changed gets new buffers and lets the old ones go.

Without CUDA the buffers are views of one flat, page-aligned block of private anonymous memory
(``mmap``): one allocation per layout and no allocator header per tensor.
Each buffer still has a storage of its own covering exactly its bytes, so a format sees the
snapshot as it sees separate tensors: the "torch" rank file writes only each tensor's bytes,
and a restore gives independent tensors, not views of one block. With CUDA, every buffer is a
pinned tensor of its own, so device-to-host copies run at full speed.

DTensors are copied shard by shard and rebuilt with the same mesh and placements.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from distckpt.memory import DIRECT_ALIGNMENT, DIRECT_MIN_BYTES, anonymous_memory, round_up
from distckpt.per_rank import PerRank
from distckpt.state import dtensor_type, same_kind_of_tuple

#: Each buffer of the flat block starts at a multiple of this many bytes: a cache line, which
#: every dtype's alignment divides, and small enough that many tiny tensors waste little. A
#: buffer of at least :data:`~distckpt.memory.DIRECT_MIN_BYTES` starts on a page, so the
#: "torch" rank file can write it with direct I/O straight from this memory (for a state whose
#: large tensors are whole pages, as they usually are, that costs no extra page).
BUFFER_ALIGNMENT = 64

#: Where a tensor sits in the state tree: the keys and indices leading to it.
TreeKey = tuple[Any, ...]
#: What a buffer is made for: the tensor's place, shape and dtype.
Slot = tuple[TreeKey, torch.Size, torch.dtype]


@dataclass(frozen=True)
class Snapshot:
    """A snapshot whose buffers exist but are not filled yet: ``state`` is the copy's tree
    (its tensors are the buffers), and :meth:`copy` fills them from the state they mirror."""

    state: Any
    #: (buffer, the tensor it copies), in the order of the state's walk
    copies: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    #: whether the copies are asynchronous device-to-host copies into pinned buffers
    non_blocking: bool

    def copy(self) -> Any:
        """Fill every buffer; returns :attr:`state`. Pinned copies may still be in flight
        (:meth:`SnapshotBuffers.synchronize`)."""
        for buffer, source in self.copies:
            buffer.copy_(source, non_blocking=self.non_blocking)
        return self.state


class SnapshotBuffers:
    """Reusable CPU buffers, keyed by where each tensor sits in the state tree."""

    def __init__(self) -> None:
        self._buffers: dict[TreeKey, torch.Tensor] = {}
        #: the slots the buffers were made for, in the order of the state's walk
        self._layout: list[Slot] = []
        self._pin = torch.cuda.is_available()
        self._dtensor: Any = None

    def snapshot(self, state: Any) -> Any:
        """A copy of ``state`` (plain data and tensors) sharing no memory with it."""
        return self.prepare(state).copy()

    def prepare(self, state: Any) -> Snapshot:
        """The snapshot of ``state`` with its buffers ready (allocated only if the tensors'
        places, shapes or dtypes changed since the last one) but no tensor copied yet: what it
        will hold is known (e.g. its size) before the copy runs."""
        self._dtensor = dtensor_type()
        slots: list[Slot] = []
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        copied = self._walk(state, (), lambda key, value: self._leaf(key, value, slots, copies))
        if slots != self._layout:
            # A tensor came, went or changed: new buffers (the old ones of tensors that are
            # gone are dropped, so a changed state does not pin old memory), and a second walk
            # that finds them all.
            self._allocate(slots)
            slots.clear()
            copies.clear()
            copied = self._walk(state, (), lambda key, value: self._leaf(key, value, slots, copies))
        return Snapshot(copied, tuple(copies), self._pin)

    def synchronize(self) -> None:
        """Wait for non-blocking device-to-host copies (pinned buffers) to land."""
        if self._pin:
            torch.cuda.synchronize()

    def _allocate(self, slots: list[Slot]) -> None:
        if self._pin:
            self._buffers = {key: self._pinned(key, shape, dtype) for key, shape, dtype in slots}
        else:
            self._buffers = {}  # before mapping the new block: the old one may go back first
            self._buffers = flat_buffers(slots)
        self._layout = list(slots)

    def _pinned(self, key: TreeKey, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """The pinned buffer of ``key``: its old one if it still fits, else a new one."""
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
            buffer = torch.empty(shape, dtype=dtype, device="cpu", pin_memory=True)
        return buffer

    def _leaf(
        self,
        key: TreeKey,
        value: Any,
        slots: list[Slot],
        copies: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> Any:
        """The snapshot of one leaf of the state: a tensor's buffer (None while it has none: that
        walk's tree is thrown away), or a copy of a plain value."""
        is_dtensor = self._dtensor is not None and isinstance(value, self._dtensor)
        if not (is_dtensor or isinstance(value, torch.Tensor)):
            # Plain values (numbers, strings) are immutable or small: a deep copy stops later
            # mutation of, say, a list of ints in a sampler's state from reaching the snapshot.
            return copy.deepcopy(value)
        local = value.to_local() if is_dtensor else value
        slots.append((key, local.shape, local.dtype))
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != local.shape or buffer.dtype != local.dtype:
            return None
        copies.append((buffer, local.detach()))
        if not is_dtensor:
            return buffer
        return self._dtensor.from_local(
            buffer,
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
            return {k: self._walk(v, (*key, k), leaf) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            items = [self._walk(v, (*key, i), leaf) for i, v in enumerate(value)]
            if isinstance(value, list):
                return items
            return same_kind_of_tuple(value, items)
        return leaf(key, value)


def flat_buffers(slots: list[Slot]) -> dict[TreeKey, torch.Tensor]:
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
    buffers: dict[TreeKey, torch.Tensor] = {}
    for (key, shape, dtype), offset in zip(slots, offsets):
        nbytes = shape.numel() * dtype.itemsize
        if memory is None or nbytes == 0:  # frombuffer refuses no bytes; there are none to hold
            buffers[key] = torch.empty(shape, dtype=dtype)
            continue
        # Its own storage object, holding the block alive: the block is unmapped once the last
        # buffer (and the snapshots that hold it) are gone.
        buffers[key] = torch.frombuffer(memory[offset : offset + nbytes], dtype=dtype).view(shape)
    return buffers
