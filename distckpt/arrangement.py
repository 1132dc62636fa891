"""How a tensor lies over its bytes, as an async snapshot keeps it (:mod:`distckpt.snapshot`).

A sync save writes a tensor with its storage and its view of it: its offset, strides (a
``channels_last`` or transposed tensor, an expanded view whose strides are 0, a slice with gaps)
and lazily conjugated or negated bit. A snapshot keeps the same: such a tensor becomes a view,
with the same strides and bits, of a buffer holding the bytes it reaches (:class:`SharedView`,
:func:`view_in`), or, when those reach too far, a compact buffer of its elements in its memory
format (:func:`compact_stride`). Buffers hold the bytes as they are, without the bits applied
(:func:`without_bits`), and the snapshot sets the bits again over them (:func:`with_bits`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch


class Arrangement(NamedTuple):
    """How a tensor that is not plainly contiguous lies over its bytes, which its snapshot keeps
    as a sync save does: its strides, and whether it is a lazily conjugated or negated view
    (whose bytes hold the values before the bit applies)."""

    stride: tuple[int, ...]
    conj: bool
    neg: bool


class SharedView(NamedTuple):
    """A tensor of the state in a buffer of the bytes of its storage that it (and the others
    sharing that storage, if any) reaches: its place, which such buffer holds it (the
    ``number`` of its :class:`~distckpt.snapshot.SharedStorage`), its view of that buffer's
    bytes, and its bits."""

    key: tuple[Any, ...]
    storage: int
    byte_offset: int
    shape: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype
    conj: bool = False
    neg: bool = False


def arrangement_of(tensor: torch.Tensor) -> Arrangement:
    """How ``tensor`` lies over its bytes."""
    return Arrangement(tensor.stride(), tensor.is_conj(), tensor.is_neg())


def byte_extent(tensor: torch.Tensor) -> tuple[int, int]:
    """The bytes [start, end) of its storage that a tensor (of at least one element) reaches."""
    last = tensor.storage_offset() + sum(
        (size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride())
    )
    itemsize = tensor.dtype.itemsize
    return tensor.storage_offset() * itemsize, (last + 1) * itemsize


def byte_range(tensor: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """The bytes [low, high) of ``tensor``'s storage, as a ``uint8`` tensor (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(
        tensor.untyped_storage(), low, (high - low,)
    )


def view_in(buffer: torch.Tensor, view: SharedView) -> torch.Tensor:
    """``view``'s tensor in the ``buffer`` of the bytes it reaches (whose storage it then
    shares), with its conjugate and negative bits."""
    tensor = torch.empty(0, dtype=view.dtype, device=buffer.device).set_(
        buffer.untyped_storage(), view.byte_offset // view.dtype.itemsize, view.shape, view.stride
    )
    return with_bits(tensor, Arrangement(view.stride, view.conj, view.neg))


def with_bits(tensor: torch.Tensor, arrangement: Arrangement) -> torch.Tensor:
    """``tensor`` (its bytes as they are) as the lazily conjugated or negated view
    ``arrangement`` says, as a sync save restores one."""
    if arrangement.conj:
        tensor = tensor.conj()
    if arrangement.neg:
        # No public call sets the bit alone; this is the view ``.imag`` of a conjugate gives.
        tensor = torch._neg_view(tensor)
    return tensor


def without_bits(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s bytes as they are: a view of it without its conjugate or negative bit."""
    if tensor.is_conj():
        tensor = tensor.conj()
    if tensor.is_neg():
        tensor = torch._neg_view(tensor)
    return tensor


def compact_stride(shape: torch.Size, stride: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a compact copy of a tensor of ``shape`` and ``stride``: the same when
    they cover exactly its elements, else those of its memory format (``channels_last`` when
    its strides suggest it, else contiguous), as ``torch.empty_like`` chooses them."""
    # On the meta device: only the strides are computed, nothing is allocated.
    laid_out = torch.empty_strided(shape, stride, device="meta")
    return torch.empty_like(laid_out).stride()


def arranged_snapshot(
    key: tuple[Any, ...],
    local: torch.Tensor,
    arrangement: Arrangement,
    *,
    views: Mapping[Any, torch.Tensor],
    buffers: Mapping[Any, torch.Tensor],
    arranged: Mapping[Any, Arrangement],
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None] | None:
    """The snapshot of ``local``, a tensor at ``key`` that is not plainly contiguous, from the
    buffers made for the last layout (``views`` of buffers of the bytes their tensors reach,
    each tensor's own ``buffers``, and the ``arranged`` tensors of that layout): its view with
    its bits, and the copy that fills its buffer (None for a view of a buffer of the bytes its
    tensors reach, which one copy of those bytes fills). None when no buffer fits it."""
    shape, dtype = local.shape, local.dtype
    view = views.get(key)
    if view is not None:
        if view.shape != shape or view.dtype != dtype or arrangement_of(view) != arrangement:
            return None
        return view, None
    buffer = buffers.get(key)
    if (
        buffer is None
        or arranged.get(key) != arrangement
        or buffer.shape != shape
        or buffer.dtype != dtype
    ):
        return None
    # The bytes as they are, into a buffer without the bits: a copy would apply them.
    return with_bits(buffer, arrangement), (buffer, without_bits(local))
