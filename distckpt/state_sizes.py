"""How many bytes a nested state's tensors and byte strings take, as a format writes them:
what a save estimates before it writes (free space, an async snapshot's buffers).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from distckpt.per_rank import PerRank
from distckpt.state import dtensor_type


def element_bytes(state: Any) -> int:
    """Bytes of the elements of the tensors in a nested state, as a format that writes each
    tensor's elements (DCP) writes them: numel times item size of each (a DTensor: its local shard;
    a sparse one: the tensors it is made of). An expanded or overlapping view counts every
    element it shows, however few bytes its storage holds; a tensor met twice counts twice."""
    return sum(tensor_element_bytes(tensor) for tensor in local_tensors(state))


def tensor_element_bytes(tensor: torch.Tensor) -> int:
    """The bytes of every element of ``tensor`` (a strided one) or of the tensors it is made of
    (:func:`tensor_parts`): what :func:`element_bytes` counts for each tensor."""
    return sum(part.numel() * part.element_size() for part in tensor_parts(tensor))


def storage_sizes(state: Any) -> list[int]:
    """The size in bytes of each storage the tensors of a nested state hold, each storage once
    (a DTensor: its local shard's), in the order the state's walk meets them: what
    ``torch.save`` writes, each tensor's whole storage. A sparse tensor or a wrapper subclass (a
    tensor holding inner tensors) has no storage of its own: torch.save writes the storages of
    the tensors it is made of (:func:`tensor_parts`), a slice's whole storage too."""
    seen: set[tuple[int, int]] = set()
    sizes: list[int] = []
    for tensor in local_tensors(state):
        for part in tensor_parts(tensor):
            if part.layout != torch.strided:  # a layout of no storage to ask about
                sizes.append(part.nbytes)
                continue
            storage = part.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in seen:
                seen.add(key)
                sizes.append(storage.nbytes())
    return sizes


def byte_string_bytes(state: Any) -> int:
    """The length of every ``bytes`` / ``bytearray`` value of a nested state (through mappings,
    lists, tuples and :class:`~distckpt.PerRank`): what a format writes for them besides the
    tensors (the Lightning callback's states and loop state are saved as bytes)."""
    if isinstance(state, (bytes, bytearray)):
        return len(state)
    if isinstance(state, PerRank):
        return byte_string_bytes(state.value)
    if isinstance(state, Mapping):
        return sum(byte_string_bytes(item) for item in state.values())
    if isinstance(state, (list, tuple)):
        return sum(byte_string_bytes(item) for item in state)
    return 0


def local_tensors(state: Any) -> Iterator[torch.Tensor]:
    """The tensors of a nested state (through mappings, lists, tuples and
    :class:`~distckpt.PerRank`), in order; a DTensor as its local shard."""
    dtensor = dtensor_type()
    if dtensor is not None and isinstance(state, dtensor):
        yield state.to_local()
    elif isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, PerRank):
        yield from local_tensors(state.value)
    elif isinstance(state, Mapping):
        for item in state.values():
            yield from local_tensors(item)
    elif isinstance(state, (list, tuple)):
        for item in state:
            yield from local_tensors(item)


def tensor_parts(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The strided tensors a non-strided one is made of, as ``torch.save`` writes it: a wrapper
    subclass's inner tensors (``__tensor_flatten__``, each taken apart in turn), a COO tensor's
    indices and values, a compressed one's (CSR, CSC, BSR, BSC) two index tensors and values;
    any other layout, the tensor itself as if it were dense."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        inner = [getattr(tensor, name) for name in names]
        return [part for item in inner if item is not None for part in tensor_parts(item)]
    layout = tensor.layout
    if layout == torch.sparse_coo:
        return [tensor._indices(), tensor._values()]
    if layout in (torch.sparse_csr, torch.sparse_bsr):
        return [tensor.crow_indices(), tensor.col_indices(), tensor.values()]
    if layout in (torch.sparse_csc, torch.sparse_bsc):
        return [tensor.ccol_indices(), tensor.row_indices(), tensor.values()]
    return [tensor]
