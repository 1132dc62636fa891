"""What the "dcp" format writes for a state, counted in one walk of it: the bytes of its values
(every element of each tensor, each byte string and text), the items DCP frames one by one,
and the characters of their keys. The walk follows DCP's flattening (``a.b.0``): a list it
pickles whole (:func:`~distckpt.formats.dcp_text_keys.flattened_whole`) and a tuple are one
item, their byte strings and texts still counted; a per-rank value is keyed under
``__per_rank__.<rank>``. A key's separators and a rank's digits are counted generously: an
estimate over by a few bytes an item is what a free-space check wants."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from distckpt.formats.dcp_per_rank import PER_RANK_KEY
from distckpt.formats.dcp_text_keys import flattened_whole
from distckpt.per_rank import PerRank
from distckpt.state import dtensor_type
from distckpt.state_sizes import tensor_element_bytes

#: ``__per_rank__.`` and a rank of up to seven digits and its dot
_PER_RANK_KEY_CHARS = len(PER_RANK_KEY) + 9


@dataclass
class DcpSizes:
    """What :func:`dcp_sizes` counted."""

    value_bytes: int = 0
    items: int = 0
    key_chars: int = 0


def dcp_sizes(state: Any) -> DcpSizes:
    """The value bytes, items and key characters "dcp" writes for ``state`` (one rank's)."""
    sizes = DcpSizes()
    dtensor = dtensor_type()

    def walk(node: Any, key_chars: int, framed: bool) -> None:
        """``framed``: ``node`` is an item of its own (not inside one DCP pickles whole)."""
        if isinstance(node, PerRank):
            walk(node.value, key_chars + _PER_RANK_KEY_CHARS, True)
            return
        if isinstance(node, Mapping) and framed:
            for key, value in node.items():
                walk(value, key_chars + len(str(key)) + 1, True)
            return
        if isinstance(node, list) and framed and not flattened_whole(node):
            for index, value in enumerate(node):
                walk(value, key_chars + len(str(index)) + 1, True)
            return
        if framed:
            sizes.items += 1
            sizes.key_chars += key_chars
        if dtensor is not None and isinstance(node, dtensor):
            sizes.value_bytes += tensor_element_bytes(node.to_local())
        elif isinstance(node, torch.Tensor):
            sizes.value_bytes += tensor_element_bytes(node)
        elif isinstance(node, (bytes, bytearray)):
            sizes.value_bytes += len(node)
        elif isinstance(node, str):
            sizes.value_bytes += len(node.encode("utf-8", "surrogatepass"))
        elif isinstance(node, Mapping):
            for value in node.values():
                walk(value, key_chars, False)
        elif isinstance(node, (list, tuple)) and _may_hold_sized(node):
            for value in node:
                walk(value, key_chars, False)

    walk(state, 0, True)
    return sizes


def _may_hold_sized(items: list[Any] | tuple[Any, ...]) -> bool:
    """Whether ``items`` may hold something of a size to count, told by the set of its items'
    types: a list of a million token ids is skipped without a look at each."""
    return any(issubclass(kind, _SIZED) for kind in set(map(type, items)))


_SIZED = (torch.Tensor, bytes, bytearray, str, Mapping, list, tuple, PerRank)
