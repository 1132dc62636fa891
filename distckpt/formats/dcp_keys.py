"""How the "dcp" format compares a state's keys with a checkpoint's before a read (per-rank
values by their place in this rank's namespace, :mod:`distckpt.formats.dcp_per_rank`), and maps
wrapper prefixes (``_orig_mod.``, ``module.``) between the state given to restore and the keys
a checkpoint holds.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata

from distckpt.formats.dcp_kinds import (
    as_saved,
    container_for_saved_tensor,
    dict_list_swaps,
    dicts_for_saved_values,
    given_for_saved_tensors,
    tensors_for_saved_values,
)
from distckpt.formats.dcp_lists import lists_of_other_length, report_list_lengths
from distckpt.formats.dcp_per_rank import (
    PER_RANK_KEY,
    per_rank_held_whole,
    saved_empty_dicts,
    split_per_rank,
)
from distckpt.formats.dcp_storage import (
    Path_,
    dotted,
    flat_paths,
    flat_state,
    key_mismatch,
    placeholder,
    saved_paths,
    shape_mismatches,
)
from distckpt.formats.dcp_text_keys import (
    get_saved,
)
from distckpt.key_prefixes import log_prefix_mapping, matching_prefixes
from distckpt.load_report import LoadReport, folded_under
from distckpt.model_state_keys import SCHEDULER_GROUP_KEYS, param_group_changes

__all__ = [
    "key_mismatch_as_read",
    "saved_paths",
    "dotted",
    "rename_to_saved",
    "rename_back",
]

logger = logging.getLogger("distckpt")

#: the flat key of a setting an LR scheduler adds to an optimizer parameter group
#: (``...param_groups.0.initial_lr``; :data:`~distckpt.model_state_keys.SCHEDULER_GROUP_KEYS`)
_SCHEDULER_SETTING = re.compile(
    rf"(?:^|\.)param_groups\.\d+\.(?:{'|'.join(sorted(SCHEDULER_GROUP_KEYS))})$"
)
#: the flat key of the names of an optimizer parameter group's parameters: its list's place
#: (``app.optim.param_groups``) and its index in it
_GROUP_PARAMS = re.compile(r"^(?P<place>(?:.+\.)?param_groups)\.(?P<index>\d+)\.params$")


def key_mismatch_as_read(
    template: Any,
    metadata: Metadata,
    rank: int,
    fix_prefixes: bool,
    read_saved: Callable[[list[str]], Mapping[str, Any]],
    optional_whole_keys: Collection[str] = (),
) -> LoadReport:
    """The keys on one side only, and the tensors whose saved shape differs, compared as the
    read will ask for them: per-rank values split
    out and wrapper prefixes mapped (a compiled model's checkpoint into a bare model is no
    mismatch when the mapping applies). Per-rank values are compared by place: one this rank
    asks for is missing when the checkpoint holds nothing under its place in this rank's
    namespace (its saved structure may differ from a fresh one's), nor, for an item of a list
    or tuple, that item in the list saved whole there (read with ``read_saved``:
    :func:`~distckpt.formats.dcp_per_rank.per_rank_held_whole`); saved per-rank values the
    given state does not ask for are not unexpected but logged by the read
    (:func:`~distckpt.formats.dcp_per_rank.per_rank_not_read`), so a restore by another world
    size may leave them out. A dict's value (a sub-dict or a list) at
    any depth, or one of ``optional_whole_keys``, that the checkpoint holds nothing under is
    reported as itself, and so is a saved one the given state holds nothing under, as "torch"
    reports a sub-dict on one side only (:func:`fold_whole_subtrees`); a list of another
    length is reported as one key (:func:`~distckpt.formats.dcp_lists.report_list_lengths`);
    a dict given where a list was saved, or the reverse, is on both sides only
    (:func:`~distckpt.formats.dcp_kinds.dict_list_swaps`), as is a dict or a list given where
    a tensor was saved (:func:`~distckpt.formats.dcp_kinds.given_for_saved_tensors`), a
    per-rank one too, or a dict where a plain value was
    (:func:`~distckpt.formats.dcp_kinds.dicts_for_saved_values`); a
    tensor given where a plain value was saved is missing
    (:func:`~distckpt.formats.dcp_kinds.tensors_for_saved_values`). Where the
    number of an optimizer's parameter groups differs from the saved one, the saved groups'
    parameter names are read with ``read_saved`` (flat keys to saved values) to name
    each group (:func:`changed_param_groups`), so that a restore refuses it as "torch" does,
    whatever ``strict`` is, before the keys of those groups and before anything is loaded."""
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
    own += saved_empty_dicts(metadata, rank)
    held_whole = per_rank_held_whole(marked, metadata, read_saved, rank)
    for path, value in marked:
        place = f"{PER_RANK_KEY}.{rank}.{dotted(path)}"
        held = any(key == place or key.startswith(f"{place}.") for key in own)
        # an item of a list or tuple missing whole (one added since the save) is reported once
        within_missing = any(dotted(path).startswith(f"{key}.") for key in report.missing_keys)
        if not held and path not in held_whole and not within_missing:
            report.missing_keys.append(dotted(path))
        elif container_for_saved_tensor(value, metadata.state_dict_metadata.get(place)):
            report.missing_keys.append(dotted(path))
            report.unexpected_keys.append(dotted(path))
    # a tensor cannot take a saved plain value: missing, found here rather than after the read
    report.missing_keys += tensors_for_saved_values(flat, metadata)
    saved_groups = [key for key in metadata.state_dict_metadata if _GROUP_PARAMS.match(key)]
    given_groups = {key: value for key, value in flat.items() if _GROUP_PARAMS.match(key)}
    if _group_counts(saved_groups) != _group_counts(given_groups):
        report.changed_param_groups = changed_param_groups(given_groups, read_saved(saved_groups))
    report_list_lengths(report, lists_of_other_length(shared, metadata), read_saved)
    containers, _ = given_for_saved_tensors(shared, metadata)
    swapped = [*dict_list_swaps(shared, metadata), *containers]
    for place in map(dotted, [*swapped, *dicts_for_saved_values(shared, metadata)]):
        # On both sides only, as "torch" reports it; the read leaves it out.
        report.missing_keys = folded_under([*report.missing_keys, place], place)
        report.unexpected_keys = folded_under([*report.unexpected_keys, place], place)
        # nothing under it is compared, so no shape either
        report.mismatched_shapes = [
            shape
            for shape in report.mismatched_shapes
            if not (shape[0] == place or shape[0].startswith(f"{place}."))
        ]
    asked = flat_paths(shared)
    held = dict(zip(metadata.state_dict_metadata, saved_paths(metadata)))
    report.missing_keys = fold_whole_subtrees(
        report.missing_keys, asked, subtrees_of(report.missing_keys, asked), held.values()
    )
    report.missing_keys = fold_whole_subtrees(
        report.missing_keys, asked, optional_whole_keys, held.values()
    )
    # the given containers count as held, empty ones too (DCP gives an empty dict no key): each
    # as a place one deeper, whose prefixes fold_whole_subtrees takes as held
    given_places = [*asked.values(), *((*place, None) for place in container_places(shared))]
    report.unexpected_keys = fold_whole_subtrees(
        report.unexpected_keys, held, subtrees_of(report.unexpected_keys, held), given_places
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
    fills (:func:`~distckpt.formats.dcp_storage.placeholder`: a tensor learning rate's is a
    tensor): each group's settings an LR scheduler saved (``initial_lr``;
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
                    groups[index]["params"] = placeholder(entry)
        elif _SCHEDULER_SETTING.search(key):
            found, group = get_saved(state, path[:-1])
            if found and isinstance(group, dict) and path[-1] not in group:
                group[path[-1]] = placeholder(entry)


def _group_counts(keys: Iterable[str]) -> dict[str, int]:
    """The number of parameter groups under each place among the flat ``keys`` of their
    parameter names (``app.optim.param_groups.1.params``: two at ``app.optim.param_groups``)."""
    counts: dict[str, int] = {}
    for key in keys:
        if match := _GROUP_PARAMS.match(key):
            place, index = match["place"], int(match["index"])
            counts[place] = max(counts.get(place, 0), index + 1)
    return counts


def changed_param_groups(
    given: Mapping[str, Any], saved: Mapping[str, Any]
) -> list[tuple[str, list[str], list[str]]]:
    """The parameter groups that cannot load
    (:func:`~distckpt.model_state_keys.param_group_changes`) from the flat keys of the
    ``saved`` groups' parameter names and their values into the ``given`` ones, as
    :attr:`~distckpt.load_report.LoadReport.changed_param_groups` holds them
    (``app.optim.param_groups.0``, saved names, given names)."""

    def as_state(flat: Mapping[str, Any], place: str, count: int) -> dict[str, Any]:
        """The groups at ``place`` in the shape of a ModelOptimizerState's state dict."""
        groups = [{"params": flat.get(f"{place}.{index}.params")} for index in range(count)]
        return {"optim": {"param_groups": groups}}

    changes: list[tuple[str, list[str], list[str]]] = []
    given_counts, saved_counts = _group_counts(given), _group_counts(saved)
    for place in sorted(given_counts.keys() & saved_counts.keys()):
        groups = (
            as_state(given, place, given_counts[place]),
            as_state(saved, place, saved_counts[place]),
        )
        changes += [
            (f"{place}.{index}", saved_names, given_names)
            for index, saved_names, given_names in param_group_changes(*groups)
        ]
    return changes


def subtrees_of(keys: Iterable[str], paths: Mapping[str, Path_]) -> set[str]:
    """The flat keys of the sub-trees holding any of ``keys`` that are a dict's values (dicts
    and lists, at every depth), by their places in the nested state (``paths``, each flat
    key's), as "torch" names keys: an item of a list is no key of its own, and a module's
    ``layer.weight`` is one key of its dict, never a sub-tree ``layer``."""
    return {
        dotted(path[:depth])
        for key in keys
        if (path := paths.get(key)) is not None
        for depth in range(1, len(path))
        if not isinstance(path[depth - 1], int)
    }


def fold_whole_subtrees(
    keys: list[str],
    paths: Mapping[str, Path_],
    subtrees: Collection[str],
    other_side: Iterable[Path_],
) -> list[str]:
    """``keys`` (flat keys on one side only: missing from the checkpoint, or unexpected)
    with the leaves of each of ``subtrees`` (sub-trees found by :func:`subtrees_of`, or
    optional keys) replaced by that key when every leaf of it (among the flat keys of that
    side, ``paths`` to their places) is in ``keys`` and the ``other_side`` (the other side's
    places) holds nothing under it, outermost first
    (:func:`~distckpt.load_report.folded_under`): DCP flattens the state, so it finds a whole
    sub-dict on one side only as its leaves, where "torch" finds the sub-dict; one whose keys
    partly differ keeps its keys listed, in both formats. A sub-tree is matched by place where
    one has its text (so a dict key ``"a.b"`` is not the ``b`` under ``a``), else by text (an
    optional key naming part of a flat key, a model's ``3`` of ``3.weight``)."""
    # a leaf of the other side at the sub-tree's own place is another kind of value, which
    # leaves it on this side only
    held = {as_saved(place[:depth]) for place in other_side for depth in range(1, len(place))}
    held_text = {dotted(place) for place in held}
    folded = list(keys)
    for subtree in sorted(subtrees, key=len):
        places = {
            place[:depth]
            for place in paths.values()
            for depth in range(1, len(place) + 1)
            if dotted(place[:depth]) == subtree
        }
        if places:
            for place in places:
                leaves = [key for key, path in paths.items() if path[: len(place)] == place]
                if as_saved(place) not in held and all(leaf in folded for leaf in leaves):
                    folded = folded_under(folded, subtree)
            continue
        leaves = [key for key in paths if key.startswith(f"{subtree}.")]
        if leaves and subtree not in held_text and all(leaf in folded for leaf in leaves):
            folded = folded_under(folded, subtree)
    return folded


def container_places(state: Any) -> list[Path_]:
    """The places of the dicts and lists (empty ones too) inside ``state``, at every depth."""
    places: list[Path_] = []

    def walk(node: Any, path: Path_) -> None:
        if isinstance(node, Mapping):
            children: Iterable[tuple[Any, Any]] = node.items()
        elif isinstance(node, list):
            children = enumerate(node)
        else:
            return
        if path:
            places.append(path)
        for key, value in children:
            walk(value, (*path, key))

    walk(state, ())
    return places


# ---------------------------------------------------------------------------------------------
# Wrapper prefixes


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
