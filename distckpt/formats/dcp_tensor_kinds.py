"""The kinds of tensor the "dcp" format saves: plain tensors and DTensors, not subclasses, nested
tensors, sparse tensors, nor tensors of a ``bits*`` or sub-byte dtype, which a save refuses
before writing anything (:class:`~distckpt.errors.UnsupportedTensors`). DCP writes a
subclass's data as a plain tensor's and reads it back with ``weights_only=True``, which refuses
the subclass even when the caller allows pickles; it cannot write a nested tensor of the
strided layout, nor reach a sparse tensor's storage, and it sizes every dtype by
``torch.iinfo`` or ``torch.finfo``, which know neither ``bits*`` nor sub-byte dtypes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from distckpt.errors import UnsupportedTensors
from distckpt.formats.dcp_keys import dotted
from distckpt.per_rank import PerRank
from distckpt.tensor_writes import SUB_BYTE_DTYPES

#: The dtypes of raw bits (no numbers): neither ``torch.iinfo`` nor ``torch.finfo`` takes them
BITS_DTYPES: frozenset[torch.dtype] = frozenset(
    getattr(torch, name)
    for name in ("bits1x8", "bits2x4", "bits4x2", "bits8", "bits16")
    if hasattr(torch, name)
)


def unsupported_tensors(
    value: Any, dtensor: type | None, path: tuple[Any, ...] = ()
) -> Iterator[tuple[str, str]]:
    """(dotted key, kind) of each tensor of ``value`` the format cannot save and load back
    (see the module doc): one neither a plain tensor nor a DTensor (its class's qualified
    name), a nested one (``torch.Tensor (nested)``), one of another layout than strided
    (``torch.Tensor (torch.sparse_coo)``), or one of a ``bits*`` or sub-byte dtype
    (``torch.Tensor (torch.uint4)``)."""
    if isinstance(value, torch.Tensor):
        is_dtensor = dtensor is not None and isinstance(value, dtensor)
        if type(value) is not torch.Tensor and not is_dtensor:
            yield dotted(path), f"{type(value).__module__}.{type(value).__qualname__}"
        elif value.is_nested:  # a nested tensor of the strided layout: DCP cannot size it
            yield dotted(path), "torch.Tensor (nested)"
        elif value.layout != torch.strided:
            yield dotted(path), f"torch.Tensor ({value.layout})"
        elif value.dtype in BITS_DTYPES or value.dtype in SUB_BYTE_DTYPES:
            yield dotted(path), f"torch.Tensor ({value.dtype})"
    elif isinstance(value, PerRank):
        yield from unsupported_tensors(value.value, dtensor, path)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from unsupported_tensors(item, dtensor, (*path, key))
    elif isinstance(value, (list, tuple)) and any(
        # told by the set of the items' types, so a long list of plain values (a million token
        # ids) costs no look at each
        issubclass(kind, (torch.Tensor, Mapping, list, tuple, PerRank))
        for kind in set(map(type, value))
    ):
        for index, item in enumerate(value):
            yield from unsupported_tensors(item, dtensor, (*path, index))


def check_tensor_types(state: Any, dtensor: type | None) -> None:
    """Raise :class:`~distckpt.errors.UnsupportedTensors` naming every tensor of ``state`` the
    format cannot save and load back (:func:`unsupported_tensors`)."""
    found = list(unsupported_tensors(state, dtensor))
    if found:
        listed = ", ".join(f"{key} ({kind})" for key, kind in found)
        raise UnsupportedTensors(
            "the 'dcp' format saves plain (strided, not nested) tensors and DTensors of "
            f"byte-sized number dtypes only, not {listed}: save with format='torch', or "
            "convert them first (to_dense(), view(torch.uint8))",
            keys=tuple(key for key, _ in found),
            kinds=tuple(kind for _, kind in found),
        )
