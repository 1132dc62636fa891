"""Places where the state given to a "dcp" restore holds another kind of value than the
checkpoint: a dict or a list where a tensor was saved, a dict where a list was or the reverse,
a tensor where a plain value was. DCP would refuse some of them in its collective read as if
the checkpoint were damaged, and load others into the wrong kind of value; the restore's key
check finds them before the read (:func:`~distckpt.formats.dcp_keys.key_mismatch_as_read`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from distckpt.formats.dcp_storage import Path_, flat_paths, saved_paths
from distckpt.per_rank import PerRank

__all__ = [
    "given_for_saved_tensors",
    "dict_list_swaps",
    "tensors_for_saved_values",
    "container_for_saved_tensor",
    "dicts_for_saved_values",
    "as_saved",
]


def given_for_saved_tensors(state: Any, metadata: Metadata) -> tuple[list[Path_], list[Path_]]:
    """The places of ``state`` (as the read asks for it) where the checkpoint holds a tensor
    and ``state`` another kind of value, as (those holding a dict or a list, those holding a
    plain value such as None): DCP would refuse the read as if the checkpoint were damaged.
    "torch" reports a container there on both sides only and leaves it as given, and
    replaces a plain value with the saved tensor."""
    saved = _saved_places(metadata, tensors=True)
    containers: list[Path_] = []
    plain: list[Path_] = []

    def other_kind(node: Any, path: Path_, saved_path: Path_) -> bool:
        if saved_path not in saved or isinstance(node, torch.Tensor):
            return False
        kind = isinstance(node, (Mapping, list, tuple, PerRank))
        (containers if kind else plain).append(path)
        return True

    _walk(state, other_kind)
    return containers, plain


def dict_list_swaps(state: Any, metadata: Metadata) -> list[Path_]:
    """The places of ``state`` (as the read asks for it) that hold a dict where the checkpoint
    holds a list, or a list where it holds a dict, each the outermost place where they differ:
    DCP names a dict's key ``"0"`` as it names a list's first item, and would load one into
    the other, and a list's items beside a dict's other keys are keys on each side only. A
    place differs where the checkpoint holds something under it and all of it under keys of
    the other kind (list indices are ints in DCP's places, dict keys text)."""
    saved_kinds: dict[Path_, set[bool]] = {}
    for place in map(as_saved, saved_paths(metadata)):
        for depth, part in enumerate(place):
            saved_kinds.setdefault(place[:depth], set()).add(isinstance(part, int))
    places: list[Path_] = []
    for path in flat_paths(state).values():
        for depth, part in enumerate(path):
            kinds = saved_kinds.get(as_saved(path[:depth]))
            if kinds and isinstance(part, int) not in kinds:
                if path[:depth] not in places:
                    places.append(path[:depth])
                break
    return places


def tensors_for_saved_values(flat: Mapping[str, Any], metadata: Metadata) -> list[str]:
    """The flat keys of the tensors of ``flat`` (the state as the read asks for it, flattened)
    where the checkpoint holds a plain value: the tensor cannot take it, so it is missing, as
    "torch" reports it, found before the read."""
    saved = metadata.state_dict_metadata
    return [
        key
        for key, value in flat.items()
        if isinstance(value, torch.Tensor)
        and key in saved
        and not isinstance(saved[key], TensorStorageMetadata)
    ]


def container_for_saved_tensor(value: Any, entry: Any) -> bool:
    """Whether ``value`` (a per-rank value given) is a dict or a list where the checkpoint's
    ``entry`` (at the place of its saved copy) is a tensor: on both sides only, as
    :func:`given_for_saved_tensors` finds it for the rest of a state."""
    return isinstance(entry, TensorStorageMetadata) and isinstance(value, (Mapping, list, tuple))


def dicts_for_saved_values(state: Any, metadata: Metadata) -> list[Path_]:
    """The places of ``state`` (as the read asks for it) holding a dict, an empty one too,
    where the checkpoint holds a plain value (a string, None, a tuple): on both sides only, as
    "torch" reports it. DCP gives an empty dict no key, so without this a strict check would
    find the saved value unexpected alone, where the read then finds it missing too."""
    saved = _saved_places(metadata, tensors=False)
    places: list[Path_] = []

    def other_kind(node: Any, path: Path_, saved_path: Path_) -> bool:
        if isinstance(node, Mapping) and saved_path in saved:
            places.append(path)
            return True
        return False

    _walk(state, other_kind)
    return places


def _saved_places(metadata: Metadata, *, tensors: bool) -> set[Path_]:
    """The places (:func:`as_saved`) of the checkpoint's tensors, or of its other values."""
    return {
        as_saved(path)
        for path, entry in zip(saved_paths(metadata), metadata.state_dict_metadata.values())
        if isinstance(entry, TensorStorageMetadata) == tensors
    }


def as_saved(place: Path_) -> Path_:
    """``place`` as DCP records it: dict keys as their text, list indices as ints."""
    return tuple(part if isinstance(part, int) else str(part) for part in place)


def _walk(state: Any, stop: Callable[[Any, Path_, Path_], bool]) -> None:
    """Visit every value below the top of ``state`` through its dicts and lists, each with its
    place and its place as DCP records it (dict keys as text), not below one ``stop`` is true
    of."""

    def walk(node: Any, path: Path_, saved_path: Path_) -> None:
        if path and stop(node, path, saved_path):
            return
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, (*path, key), (*saved_path, str(key)))
        elif isinstance(node, list):
            for index, item in enumerate(node):
                walk(item, (*path, index), (*saved_path, index))

    walk(state, (), ())
