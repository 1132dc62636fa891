"""Per-rank values in the "dcp" format: moved under a namespace of their rank before a save, and
put back at their places after a read.

DCP saves every non-DTensor value once, as if every rank held the same one.
A value marked per rank (:mod:`distckpt.per_rank`) is therefore moved, before ``dcp.save``,
from its place to ``__per_rank__.<rank>.<its place>``: a key only that rank has, which that rank
writes into its own ``.distcp`` file. DCP's ``.metadata`` then lists every rank's copy, so
``verify`` checks them with the rest, ``export`` includes them (under ``__per_rank__``, by rank),
and a restore knows they are there. On restore each rank asks for its own namespace and the
values are put back at their places. They cannot be resharded: a restore by another number of
ranks that asks for ones the checkpoint holds is refused, naming them (:func:`per_rank_held`;
one it holds nothing of is missing, as any key); one that does not ask logs that they were not
restored.

DCP gives an empty dict no key, so a per-rank value rebuilt from the saved keys alone would lack
its empty dicts (``{"pos": 3, "seen": {}}`` would come back as ``{"pos": 3}``). A save therefore
lists each one's place in DCP's ``planner_data`` (flat key to place) under a key that
``state_dict_metadata`` lacks (:class:`PerRankSavePlanner`), and a restore recreates them
(:func:`saved_empty_dicts`); a checkpoint saved before lists none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import STATE_DICT_TYPE, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.storage import StorageMeta

from distckpt.containers import same_kind_of_tuple
from distckpt.errors import WorldSizeMismatch
from distckpt.formats.base import ShardContext, check_saved_rank
from distckpt.formats.dcp_kinds import as_saved
from distckpt.formats.dcp_storage import Path_, dotted, placeholder, saved_paths
from distckpt.formats.dcp_text_keys import flattened_whole, get_saved, holds_containers, keys_like
from distckpt.manifest import Manifest
from distckpt.per_rank import PerRank
from distckpt.state import set_path

__all__ = [
    "PER_RANK_KEY",
    "split_per_rank",
    "with_per_rank",
    "PerRankSavePlanner",
    "flattened_places",
    "saved_empty_dicts",
    "per_rank_placeholders",
    "restore_per_rank",
    "split_per_rank_keys",
    "per_rank_not_read",
    "per_rank_held_whole",
    "per_rank_held",
    "refuse_unreadable_per_rank",
]

#: the top-level key under which every rank's per-rank values are saved, by rank
PER_RANK_KEY = "__per_rank__"

_REMOVED = object()


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


def flattened_places(state: Mapping[str, Any]) -> list[tuple[Path_, bool]]:
    """The places of the per-rank values in ``state`` (as :func:`with_per_rank` makes it) as
    DCP's flattening reaches them, in its order, with dict keys as text: each value it saves,
    and each empty dict, which it gives no key (True), but not those inside a tuple or a list
    it pickles whole, which keep theirs."""
    places: list[tuple[Path_, bool]] = []

    def walk(node: Any, place: Path_) -> None:
        if isinstance(node, Mapping) and node:
            for key, value in node.items():
                walk(value, (*place, str(key)))
        elif isinstance(node, list) and not flattened_whole(node):
            for index, value in enumerate(node):
                walk(value, (*place, index))
        else:
            places.append((place, isinstance(node, Mapping)))

    walk(state.get(PER_RANK_KEY, {}), (PER_RANK_KEY,))
    return places


class PerRankSavePlanner(DefaultSavePlanner):
    """DCP's save planner, also listing the places of this rank's per-rank empty dicts
    (:func:`flattened_places`) in the ``planner_data`` it sends to the coordinator, which
    merges every rank's into the checkpoint's metadata, each among the saved values in the
    order of the state, so that a restore rebuilds its dicts in their order."""

    def set_up_planner(
        self,
        state_dict: STATE_DICT_TYPE,
        storage_meta: StorageMeta | None = None,
        is_coordinator: bool = False,
    ) -> None:
        super().set_up_planner(state_dict, storage_meta, is_coordinator)
        flat = self.mappings
        namespace = f"{PER_RANK_KEY}."
        ordered = {key: place for key, place in flat.items() if not key.startswith(namespace)}
        for place, empty_dict in flattened_places(state_dict):
            key = dotted(place)
            # a saved value's own key (``{"a.b": 1, "a": {"b": {}}}``) keeps its place
            if key in flat or empty_dict:
                ordered.setdefault(key, flat.get(key, place))
        self.mappings = {**ordered, **flat}


def saved_empty_dicts(metadata: Metadata, rank: int) -> dict[str, Path_]:
    """The places of ``rank``'s per-rank empty dicts the checkpoint lists
    (:class:`PerRankSavePlanner`), by flat key: its ``planner_data`` entries in that rank's
    namespace that name no saved value."""
    paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    prefix = f"{PER_RANK_KEY}.{rank}."
    return {
        key: tuple(place)
        for key, place in paths.items()
        if key.startswith(prefix) and key not in metadata.state_dict_metadata
    }


def per_rank_placeholders(metadata: Metadata, rank: int) -> dict[str, Any]:
    """Something for DCP to load each of this rank's saved per-rank values into, by its flat
    key: an empty tensor of the saved size, or None for a plain value. Built from the
    checkpoint rather than from the state given to restore, whose per-rank values may have
    another shape now (a fresh data loader's state has no iterator position yet)."""
    prefix = f"{PER_RANK_KEY}.{rank}."
    return {
        key: placeholder(entry)
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(prefix)
    }


def restore_per_rank(
    state: dict[str, Any], marked: list[tuple[Path_, Any]], rank: int, metadata: Metadata
) -> list[Path_]:
    """Move this rank's loaded per-rank values (:func:`per_rank_placeholders`, filled) back to
    their places, with the empty dicts saved in them (:func:`saved_empty_dicts`); a value the
    checkpoint lacks stays absent (so it is reported missing). The
    places of ``marked`` restored: an item of a list saved whole only if that list has it."""
    paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    prefix = f"{PER_RANK_KEY}.{rank}."
    empty_dicts = saved_empty_dicts(metadata, rank)
    # in the order the save listed them, which is the state's
    listed = [key for key in paths if key.startswith(prefix)]
    keys = [*listed, *per_rank_placeholders(metadata, rank)]
    nested: dict[str, Any] = {}
    for key in dict.fromkeys(keys):
        if key in empty_dicts:
            set_path(nested, empty_dicts[key], {})
        elif key in state:
            set_path(nested, paths.get(key, (key,)), state.pop(key))
    found_own, own = get_saved(nested, (PER_RANK_KEY, str(rank)))
    restored: list[Path_] = []
    for path, template in marked:
        found, value = get_saved(own, path) if found_own else (False, None)
        if found:
            # Built from saved places: its dicts' keys as text, mapped back onto the template's.
            set_path(state, path, keys_like(template, value))
            restored.append(path)
    return restored


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
    metadata: Metadata, rank: int, *, same_ranks: bool, read_own: Iterable[Path_]
) -> dict[int, list[str]]:
    """By rank, the sorted top-level names of the saved per-rank values this rank's restore leaves
    unread and should say so: those of its own not at, under or around (a list saved whole) a
    place of ``read_own`` (the places of its per-rank values it restored,
    :func:`restore_per_rank`, so a saved list counts as read only when the item asked for was
    in it; none after a world-size change), and every rank's after a world-size change. With
    the same ranks, the others' are theirs to read."""
    own = (PER_RANK_KEY, str(rank))
    read_places = [as_saved(path) for path in read_own]
    keys = [
        key
        for key, saved in zip(metadata.state_dict_metadata, map(as_saved, saved_paths(metadata)))
        if not (saved[:2] == own and any(_overlap(saved[2:], place) for place in read_places))
    ]
    _, per_rank = split_per_rank_keys(keys)
    return {r: sorted(names) for r, names in per_rank.items() if r == rank or not same_ranks}


def _overlap(saved: Path_, place: Path_) -> bool:
    """Whether a per-rank key saved at ``saved`` (in its rank's namespace) is at or under
    ``place``, or holds it whole (a list of plain values)."""
    return saved[: len(place)] == place or place[: len(saved)] == saved


def per_rank_held_whole(
    marked: list[tuple[Path_, Any]],
    metadata: Metadata,
    read_saved: Callable[[list[str]], Mapping[str, Any]],
    rank: int | None = None,
) -> set[Path_]:
    """The places of ``marked`` (per-rank values asked for) that ``rank``'s namespace (any
    rank's when None) holds inside a value saved whole: DCP pickles a list of plain values as
    one value, so a per-rank item of a list or tuple (``[PerRank(3), 5]``) is saved as the list
    ``[3]`` at the list's place, with no key of its own. The saved lists are read with
    ``read_saved`` (flat keys to saved values) to see that one has the item; with any rank's,
    one rank at a time from rank 0, each for the items no rank before it held, as one rank
    holding an item is enough (each rank's lists are in its own data file)."""
    by_rank: dict[int, dict[Path_, list[tuple[str, Path_]]]] = {}
    for key, saved, entry in zip(
        metadata.state_dict_metadata, saved_paths(metadata), metadata.state_dict_metadata.values()
    ):
        in_namespace = len(saved) > 2 and saved[0] == PER_RANK_KEY
        of_rank = in_namespace and (rank is None or saved[1] == str(rank))
        if not of_rank or isinstance(entry, TensorStorageMetadata):
            continue
        inside = by_rank.setdefault(int(saved[1]), {})
        depth = len(saved) - 2
        for path, _ in marked:
            if len(path) > depth and as_saved(path[:depth]) == as_saved(saved[2:]):
                inside.setdefault(path, []).append((key, path[depth:]))
    held: set[Path_] = set()
    for _, inside in sorted(by_rank.items()):
        asked = {path: places for path, places in inside.items() if path not in held}
        if not asked:
            continue
        values = read_saved(sorted({key for places in asked.values() for key, _ in places}))
        held.update(
            path
            for path, places in asked.items()
            if any(get_saved(values.get(key), rest)[0] for key, rest in places)
        )
    return held


def per_rank_held(
    marked: list[tuple[Path_, Any]],
    metadata: Metadata,
    read_saved: Callable[[list[str]], Mapping[str, Any]],
) -> list[Path_]:
    """The places of ``marked`` (per-rank values asked for) that the checkpoint holds per rank,
    in any rank's namespace: at the place, under it (a Stateful value's dict), or as an item of
    a value saved whole at a place holding it (a list of plain values, read with
    ``read_saved`` as :func:`per_rank_held_whole` does). The rest it holds nothing of (a value
    added to the state since, an item its saved list lacks) are ordinary missing keys."""
    saved = [
        place[2:]
        for place in map(as_saved, saved_paths(metadata))
        if len(place) > 2 and place[0] == PER_RANK_KEY
    ]
    whole = per_rank_held_whole(marked, metadata, read_saved)
    return [
        path
        for path, _ in marked
        if path in whole or any(held[: len(path)] == as_saved(path) for held in saved)
    ]


def refuse_unreadable_per_rank(
    marked: list[tuple[Path_, Any]],
    directory: Path,
    manifest: Manifest,
    metadata: Metadata,
    ctx: ShardContext,
    read_saved: Callable[[list[str]], Mapping[str, Any]],
) -> None:
    """Refuse a restore asking for per-rank values (``marked``) the checkpoint holds
    (:func:`per_rank_held`) that this rank cannot have: by another number of ranks than saved
    it (:class:`~distckpt.errors.WorldSizeMismatch`), or by a plain process's rank past the
    saved ones (:class:`~distckpt.errors.CheckpointNotFound`), which may read all the rest."""
    other_ranks = ctx.world_size != manifest.world_size
    unsaved_rank = not 0 <= ctx.rank < manifest.world_size
    held = per_rank_held(marked, metadata, read_saved) if other_ranks or unsaved_rank else []
    keys = ", ".join(dotted(path) for path in held)
    if held and other_ranks:
        raise WorldSizeMismatch(
            f"{directory} was saved by {manifest.world_size} ranks and holds per-rank "
            f"values, which cannot be resharded to {ctx.world_size} ranks: {keys}. Restore "
            f"with {manifest.world_size} ranks, or leave these keys out of state= to "
            "restore everything else (they then start afresh on every rank)",
            saved_world_size=manifest.world_size,
            world_size=ctx.world_size,
            path=directory,
            step=manifest.step,
        )
    if held:
        purpose = f" to read the per-rank values {keys} from; leave them out of state="
        check_saved_rank(directory, manifest, ctx.rank, f"{purpose} to read the rest")
