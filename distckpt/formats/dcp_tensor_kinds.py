"""The kinds of tensor the "dcp" format saves: plain tensors and DTensors, not subclasses nor
nested tensors, which a save refuses before writing anything
(:class:`~distckpt.errors.UnsupportedTensors`). DCP writes a subclass's data as a plain
tensor's and reads it back with ``weights_only=True``, which refuses the subclass even when the
caller allows pickles, and it cannot write a nested tensor of the strided layout at all.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from distckpt.errors import UnsupportedTensors
from distckpt.formats.dcp_keys import dotted
from distckpt.per_rank import PerRank


def unsupported_tensors(
    value: Any, dtensor: type | None, path: tuple[Any, ...] = ()
) -> Iterator[tuple[str, str]]:
    """(dotted key, kind) of each tensor of ``value`` that is neither a plain tensor nor a
    DTensor, or is nested: DCP writes a subclass's data as a plain tensor's and reads it back
    with ``weights_only=True``, which refuses the subclass even when the caller allows pickles,
    and it cannot write a nested tensor of the strided layout at all."""
    if isinstance(value, torch.Tensor):
        is_dtensor = dtensor is not None and isinstance(value, dtensor)
        if type(value) is not torch.Tensor and not is_dtensor:
            yield dotted(path), f"{type(value).__module__}.{type(value).__qualname__}"
        elif value.is_nested:  # a nested tensor of the strided layout: DCP cannot size it
            yield dotted(path), "torch.Tensor (nested)"
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
            f"the 'dcp' format saves plain (not nested) tensors and DTensors only, not {listed}: "
            "save with format='torch', or convert them to plain tensors first",
            keys=tuple(key for key, _ in found),
            kinds=tuple(kind for _, kind in found),
        )
