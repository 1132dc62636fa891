"""How the "dcp" format arranges a state's keys around DCP: per-rank values moved under a
namespace of their rank, and wrapper prefixes (``_orig_mod.``, ``module.``) mapped between the
state given to restore and the keys a checkpoint holds.

Per-rank values. DCP saves every non-DTensor value once, as if every rank held the same one.
A value marked per rank (:mod:`distckpt.per_rank`) is therefore moved, before ``dcp.save``,
from its place to ``__per_rank__.<rank>.<its place>``: a key only that rank has, which that rank
writes into its own ``.distcp`` file. DCP's ``.metadata`` then lists every rank's copy, so
``verify`` checks them with the rest, ``export`` includes them (under ``__per_rank__``, by rank),
and a restore knows they are there. On restore each rank asks for its own namespace and the
values are put back at their places. They cannot be resharded: a restore by another number of
ranks that asks for them is refused, naming them; one that does not ask logs that they were
not restored.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import STORAGE_TYPES, Metadata, TensorStorageMetadata

from distckpt.containers import same_kind_of_tuple
from distckpt.formats.dcp_storage import flat_paths, flat_state, key_mismatch, shape_mismatches
from distckpt.formats.dcp_text_keys import (
    flattened_whole,
    get_saved,
    holds_containers,
    keys_like,
)
from distckpt.key_prefixes import log_prefix_mapping, matching_prefixes
from distckpt.load_report import LoadReport, dotted_prefixes, list_length_key
from distckpt.model_state_keys import SCHEDULER_GROUP_KEYS
from distckpt.per_rank import PerRank
from distckpt.state import set_path

__all__ = [
    "PER_RANK_KEY",
    "split_per_rank",
    "with_per_rank",
    "per_rank_placeholders",
    "restore_per_rank",
    "split_per_rank_keys",
    "per_rank_not_read",
    "key_mismatch_as_read",
    "saved_paths",
    "dotted",
    "rename_to_saved",
    "rename_back",
]

logger = logging.getLogger("distckpt")

#: the top-level key under which every rank's per-rank values are saved, by rank
PER_RANK_KEY = "__per_rank__"

Path_ = tuple[Any, ...]
_REMOVED = object()

#: the flat key of a setting an LR scheduler adds to an optimizer parameter group
#: (``...param_groups.0.initial_lr``; :data:`~distckpt.model_state_keys.SCHEDULER_GROUP_KEYS`)
_SCHEDULER_SETTING = re.compile(
    rf"(?:^|\.)param_groups\.\d+\.(?:{'|'.join(sorted(SCHEDULER_GROUP_KEYS))})$"
)
#: the flat key of the names of an optimizer parameter group's parameters
_GROUP_PARAMS = re.compile(r"(?:^|\.)param_groups\.\d+\.params$")


def dotted(path: Iterable[Any]) -> str:
    return ".".join(str(part) for part in path)


def split_per_rank(state: Any) -> tuple[Any, list[tuple[Path_, Any]]]:
    """``state`` without its per-rank values (fresh containers, the same tensors; an item of a
    list becomes None, so the rest keep their places), and those values by place."""
    marked: list[tuple[Path_, Any]] = []

    def walk(node: Any, path: Path_) -> Any:
        if isinstance(node, PerRank):
            marked.append((path, node.value))
            return _REMOVED
        if isinstance(node, Mapping):
            items = ((key, walk(value, (*path, key))) for key, value in node.items())
            return {key: value for key, value in items if value is not _REMOVED}
        if isinstance(node, (list, tuple)) and not holds_containers(node):
            return list(node) if isinstance(node, list) else node  # no per-rank mark inside
        if isinstance(node, (list, tuple)):
            items = [walk(value, (*path, index)) for index, value in enumerate(node)]
            kept = [None if value is _REMOVED else value for value in items]
            return kept if isinstance(node, list) else same_kind_of_tuple(node, kept)
        return node

    return walk(state, ()), marked


def with_per_rank(shared: dict[str, Any], marked: list[tuple[Path_, Any]], rank: int) -> Any:
    """``shared`` plus this rank's per-rank values under ``__per_rank__.<rank>``."""
    if not marked:
        return shared
    own: dict[str, Any] = {}
    for path, value in marked:
        set_path(own, path, value)
    return {**shared, PER_RANK_KEY: {str(rank): own}}


def per_rank_placeholders(metadata: Metadata, rank: int) -> dict[str, Any]:
    """Something for DCP to load each of this rank's saved per-rank values into, by its flat
    key: an empty tensor of the saved size, or None for a plain value. Built from the
    checkpoint rather than from the state given to restore, whose per-rank values may have
    another shape now (a fresh data loader's state has no iterator position yet)."""
    prefix = f"{PER_RANK_KEY}.{rank}."
    return {
        key: _placeholder(entry)
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(prefix)
    }


def _placeholder(entry: STORAGE_TYPES) -> torch.Tensor | None:
    """Something DCP can load a saved value into: an empty tensor of its saved size and dtype,
    or None for a plain value (which DCP replaces with the unpickled one)."""
    if isinstance(entry, TensorStorageMetadata):
        return torch.empty(entry.size, dtype=entry.properties.dtype)
    return None


def restore_per_rank(
    state: dict[str, Any], marked: list[tuple[Path_, Any]], rank: int, metadata: Metadata
) -> None:
    """Move this rank's loaded per-rank values (:func:`per_rank_placeholders`, filled) back to
    their places; a value the checkpoint lacks stays absent (so it is reported missing)."""
    paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    nested: dict[str, Any] = {}
    for key in per_rank_placeholders(metadata, rank):
        if key in state:
            set_path(nested, paths.get(key, (key,)), state.pop(key))
    found_own, own = get_saved(nested, (PER_RANK_KEY, str(rank)))
    for path, template in marked:
        found, value = get_saved(own, path) if found_own else (False, None)
        if found:
            # Built from saved places: its dicts' keys as text, mapped back onto the template's.
            set_path(state, path, keys_like(template, value))


def split_per_rank_keys(keys: Iterable[str]) -> tuple[list[str], dict[int, list[str]]]:
    """DCP keys split into the ordinary ones and, by rank, the top-level names of the per-rank
    values among them (``__per_rank__.1.rng.torch`` -> ``{1: ["rng"]}``)."""
    ordinary: list[str] = []
    per_rank: dict[int, list[str]] = {}
    for key in keys:
        parts = key.split(".", 3)
        if len(parts) < 3 or parts[0] != PER_RANK_KEY or not parts[1].isdigit():
            ordinary.append(key)
            continue
        names = per_rank.setdefault(int(parts[1]), [])
        if parts[2] not in names:
            names.append(parts[2])
    return ordinary, dict(sorted(per_rank.items()))


def per_rank_not_read(
    metadata: Metadata, rank: int, *, same_ranks: bool, read_own: bool
) -> dict[int, list[str]]:
    """By rank, the sorted top-level names of the saved per-rank values this rank's restore leaves
    unread and should say so: its own when it asked for none (``read_own`` false), and every
    rank's after a world-size change. With the same ranks, the others' are theirs to read."""
    own = f"{PER_RANK_KEY}.{rank}."
    keys = [key for key in metadata.state_dict_metadata if not (read_own and key.startswith(own))]
    _, per_rank = split_per_rank_keys(keys)
    return {r: sorted(names) for r, names in per_rank.items() if r == rank or not same_ranks}


def key_mismatch_as_read(
    template: Any, metadata: Metadata, rank: int, fix_prefixes: bool
) -> LoadReport:
    """The keys on one side only, and the tensors whose saved shape differs, compared as the
    read will ask for them: per-rank values split
    out and wrapper prefixes mapped (a compiled model's checkpoint into a bare model is no
    mismatch when the mapping applies). Per-rank values are compared by place: one this rank
    asks for is missing when the checkpoint holds nothing under its place in this rank's
    namespace (its saved structure may differ from a fresh one's); per-rank values nobody
    asks for are not unexpected but logged by the read (:func:`per_rank_not_read`), so a
    restore by another world size may leave them out. A sub-dict the checkpoint holds
    nothing of is reported as itself, as "torch" reports it (:func:`fold_missing_places`)."""
    shared, marked = split_per_rank(template)
    if fix_prefixes:
        shared, _ = rename_to_saved(shared, saved_paths(metadata), "", log=False)
    flat = flat_state(shared)
    report = key_mismatch(flat, metadata)
    report.mismatched_shapes = shape_mismatches(flat, metadata)
    report.unexpected_keys = [
        key for key in report.unexpected_keys if not key.startswith(f"{PER_RANK_KEY}.")
    ]
    # The settings an LR scheduler adds to a group are not compared (a group built before the
    # scheduler lacks them); the read loads the saved ones (with_saved_group_settings).
    report.missing_keys = [key for key in report.missing_keys if not _SCHEDULER_SETTING.search(key)]
    report.unexpected_keys = [
        key for key in report.unexpected_keys if not _SCHEDULER_SETTING.search(key)
    ]
    own = [key for key in metadata.state_dict_metadata if key.startswith(f"{PER_RANK_KEY}.{rank}.")]
    for path, _ in marked:
        place = f"{PER_RANK_KEY}.{rank}.{dotted(path)}"
        if not any(key == place or key.startswith(f"{place}.") for key in own):
            report.missing_keys.append(dotted(path))
    report_list_lengths(report, lists_of_other_length(shared, metadata.state_dict_metadata))
    report.missing_keys = fold_missing_places(
        report.missing_keys, shared, metadata.state_dict_metadata
    )
    report.leaves_of_missing = {
        key: leaves
        for key in report.missing_keys
        if (leaves := [leaf for leaf in flat if leaf.startswith(f"{key}.")])
    }
    return report


def with_saved_group_settings(state: Any, metadata: Metadata) -> None:
    """Add to the optimizer parameter groups of ``state`` (a copy of the template's containers,
    as the read loads it) what the checkpoint saved and they lack, as placeholders the read
    fills (:func:`_placeholder`: a tensor learning rate's is a tensor): each group's settings
    an LR scheduler saved (``initial_lr``;
    :data:`~distckpt.model_state_keys.SCHEDULER_GROUP_KEYS`), which a scheduler built after the
    restore needs and a group built before it lacks; and the ``params`` of each saved group
    beyond the given ones, so that the restore sees the saved groups' number and refuses a
    change of it (:func:`~distckpt.model_state_keys.param_group_changes`)."""
    paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    for key, entry in metadata.state_dict_metadata.items():
        path = tuple(paths.get(key, (key,)))
        if _GROUP_PARAMS.search(key):
            found, groups = get_saved(state, path[:-2])
            index = int(path[-2])
            if found and isinstance(groups, list):
                # the given groups all have their params: an empty dict is one added here
                groups.extend({} for _ in range(index + 1 - len(groups)))
                if groups[index] == {}:
                    groups[index]["params"] = _placeholder(entry)
        elif _SCHEDULER_SETTING.search(key):
            found, group = get_saved(state, path[:-1])
            if found and isinstance(group, dict) and path[-1] not in group:
                group[path[-1]] = _placeholder(entry)


def lists_of_other_length(shared: Any, saved_keys: Iterable[str]) -> list[tuple[Path_, int, int]]:
    """Each list of ``shared`` (the state as the read asks for it) that DCP saves item by item
    (:func:`~distckpt.formats.dcp_text_keys.flattened_whole`), or an empty one, whose saved
    items (``saved_keys``: DCP's flat keys, ``lst.0``, ``lst.1.x``) number another count, as
    (its place, its length, the saved length), outermost first. A list the checkpoint holds
    no item of is none of these: its keys are missing as they are. "torch" loads none of such
    a list, and DCP would load the items both have: :func:`with_saved_lists` keeps it apart."""
    counts: dict[str, int] = {}
    for key in saved_keys:
        parts = key.split(".")
        for depth in range(1, len(parts)):
            if parts[depth].isdigit():
                place = ".".join(parts[:depth])
                counts[place] = max(counts.get(place, 0), int(parts[depth]) + 1)
    found: list[tuple[Path_, int, int]] = []

    def walk(node: Any, path: Path_) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, (*path, key))
        elif isinstance(node, list) and (not node or not flattened_whole(node)):
            saved = counts.get(dotted(path))
            if saved is not None and saved != len(node):
                found.append((path, len(node), saved))
                return
            for index, item in enumerate(node):
                walk(item, (*path, index))

    walk(shared, ())
    return found


def report_list_lengths(report: LoadReport, lists: list[tuple[Path_, int, int]]) -> None:
    """Report each list of another length (:func:`lists_of_other_length`) as "torch" does, one
    missing key ``lst[len 2 != 1]`` (:func:`~distckpt.load_report.list_length_key`) where its
    first missing item was, in place of its items missing, unexpected or of another shape: a
    list's items are not keys a newer version adds, so ``optional_keys`` covers none of them."""
    for path, given, saved in lists:
        place = dotted(path)

        def under(key: str, place: str = place) -> bool:
            return key == place or key.startswith(f"{place}.")

        length_key = list_length_key(place, given, saved)
        items = [index for index, key in enumerate(report.missing_keys) if under(key)]
        kept = [key for key in report.missing_keys if not under(key)]
        kept.insert(items[0] if items else len(kept), length_key)
        report.missing_keys = kept
        report.unexpected_keys = [key for key in report.unexpected_keys if not under(key)]
        report.mismatched_shapes = [
            difference for difference in report.mismatched_shapes if not under(difference[0])
        ]


def with_saved_lists(state: Any, lists: list[tuple[Path_, int, int]], metadata: Metadata) -> None:
    """Put in ``state`` (a copy of the template's containers, as the read loads it), at the
    place of each list of another length (:func:`lists_of_other_length`), a fresh list of
    placeholders of the saved items (:func:`_placeholder`): the read loads the saved list
    there, as "torch" gives it back, and none of it into the given list's tensors, which the
    restore then leaves as they are (reported as ``lst[len 2 != 1]``)."""
    paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    for path, _, _ in lists:
        fresh: list[Any] = []
        items = f"{dotted(path)}."
        for key, entry in metadata.state_dict_metadata.items():
            if key.startswith(items):
                saved_path = tuple(paths.get(key, key.split(".")))
                set_path(fresh, saved_path[len(path) :], _placeholder(entry))
        set_path(state, path, fresh)


def fold_missing_places(missing: list[str], shared: Any, saved_keys: Iterable[str]) -> list[str]:
    """``missing`` (flat keys of ``shared``, the state as read) with each key under a dict
    place the checkpoint holds no key of (``saved_keys``: DCP's flat keys) replaced by the
    outermost such place, listed once where its first key was: DCP flattens the state, so it
    finds a whole missing sub-dict as its leaves, where "torch" finds the sub-dict. Only the
    places of dicts count, as in "torch": an item of a list is no key, and the flat keys of a
    dict (a model's ``3.weight``) are keys of their own, not a ``3`` holding a ``weight``.
    Keys that are no flat key of ``shared`` are kept as they are."""
    paths = flat_paths(shared)
    held = {prefix for key in saved_keys for prefix in dotted_prefixes(key)}
    folded: list[str] = []
    for key in missing:
        path = paths.get(key, ())
        place = key
        for depth in range(1, len(path)):
            _, parent = get_saved(shared, path[: depth - 1])
            if isinstance(parent, Mapping) and dotted(path[:depth]) not in held:
                place = dotted(path[:depth])
                break
        if place not in folded:
            folded.append(place)
    return folded


# ---------------------------------------------------------------------------------------------
# Wrapper prefixes


def saved_paths(metadata: Metadata) -> list[Path_]:
    """Every key the checkpoint holds, as its place in the nested state."""
    paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    return [tuple(paths.get(key, (key,))) for key in metadata.state_dict_metadata]


def _children_index(saved_paths: Iterable[Path_]) -> dict[Path_, set[Any]]:
    """For every prefix of a saved key path, the keys that follow it."""
    index: dict[Path_, set[Any]] = {}
    for path in saved_paths:
        for depth in range(len(path)):
            index.setdefault(tuple(path[:depth]), set()).add(path[depth])
    return index


def rename_to_saved(
    state: Any, saved: Iterable[Path_], where: str, *, log: bool = True
) -> tuple[Any, list[tuple[Path_, dict[str, str]]]]:
    """``state`` with the keys of every dict that differ from the checkpoint's (``saved``
    paths) only by wrapper prefixes renamed to the saved ones (with ``log``, one INFO line
    each), and the renames made, each as (its dict's place in saved names, {target key: saved
    key}), outermost first."""
    index = _children_index(saved)
    renames: list[tuple[Path_, dict[str, str]]] = []

    def walk(node: Any, path: Path_) -> Any:
        if not isinstance(node, dict):
            return node
        mapping = matching_prefixes(node, index.get(path, ()))
        if mapping is not None:
            if log:
                log_prefix_mapping(dotted((where, *path)), mapping)
            renames.append((path, mapping))
            node = {mapping.get(key, key): value for key, value in node.items()}
        return {key: walk(value, (*path, key)) for key, value in node.items()}

    return walk(state, ()), renames


def rename_back(state: Any, renames: list[tuple[Path_, dict[str, str]]]) -> None:
    """Undo :func:`rename_to_saved` on the loaded ``state``, innermost first (keys a load
    left out stay out)."""
    for path, mapping in reversed(renames):
        found, node = get_saved(state, path)
        if not found or not isinstance(node, dict):
            continue
        back = {saved: target for target, saved in mapping.items()}
        renamed = {back.get(key, key): value for key, value in node.items()}
        node.clear()
        node.update(renamed)
