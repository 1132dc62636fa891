"""Dict keys that are not strings, through the "dcp" format.

DCP flattens a nested state into dotted keys and records each value's place as a tuple of its
dicts' keys turned to text (``{"hist": {0: 0.5}}`` is saved as ``hist.0``, placed at
``("hist", "0")``); a list's items keep int indices. A restore puts each value back at the place
the given state has for it: a saved key is mapped back onto the key of the given state's dict
whose text it is (``"0"`` onto ``0``), so a dict of int keys comes back with int keys, into the
same entries. That needs every key of a dict to have one fixed text that no other key of that
dict shares: a save refuses (:class:`~distckpt.errors.UnrestorableKeys`) keys that read the same
(``1`` and ``"1"``) and keys of any type but :data:`TEXT_KEY_TYPES`, in the dicts DCP places key
by key: one it pickles whole (in a tuple, or in a list of plain values) keeps its keys as they
are, whatever they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from distckpt.errors import UnrestorableKeys
from distckpt.per_rank import PerRank

__all__ = [
    "TEXT_KEY_TYPES",
    "SavedPlaces",
    "check_restorable_keys",
    "get_saved",
    "holds_containers",
    "keys_like",
]

#: The key types whose text (``str(key)``) is the same in every process and names one value:
#: what a restore can map a saved key back from. ``bool`` is an ``int``.
TEXT_KEY_TYPES: tuple[type, ...] = (str, int, float, type(None))


class SavedPlaces:
    """Maps places as DCP saved them (dict keys as text) onto the keys of one given state's
    dicts, remembering each dict's keys by text so a dict of many keys is indexed once."""

    def __init__(self, root: Any) -> None:
        self.root = root
        #: id of a dict of ``root`` -> its keys by their text
        self._by_text: dict[int, dict[str, Any]] = {}

    def place(self, saved: tuple[Any, ...]) -> tuple[Any, ...]:
        """``saved`` with each text key replaced by the key of the given state's dict at that
        place whose text it is; a part the state has as it is, or has not at all (a value the
        load is to create), stays as it is."""
        node: Any = self.root
        place: list[Any] = []
        for part in saved:
            if isinstance(node, Mapping) and isinstance(part, str) and part not in node:
                by_text = self._by_text.get(id(node))
                if by_text is None:
                    by_text = self._by_text[id(node)] = {str(key): key for key in node}
                part = by_text.get(part, part)
            place.append(part)
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                node = None  # below a place the state lacks: nothing more to map
        return tuple(place)


def get_saved(root: Any, place: tuple[Any, ...]) -> tuple[bool, Any]:
    """(found, value) at ``place`` (the given state's keys) in ``root``: a key is looked up as
    it is, then as its text, so a tree built from saved places (dict keys as text) answers as
    well as one with the keys themselves."""
    node = root
    for part in place:
        if isinstance(node, Mapping) and part not in node:
            part = str(part)
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return False, None
    return True, node


def keys_like(template: Any, loaded: Any) -> Any:
    """``loaded`` (built from saved places: dict keys as text) with each dict's keys replaced
    by the keys of ``template``'s dict at the same place whose text they are, recursively."""
    if isinstance(template, Mapping) and isinstance(loaded, Mapping):
        by_text = {str(key): key for key in template}
        renamed: dict[Any, Any] = {}
        for key, value in loaded.items():
            own = key if key in template else by_text.get(str(key), key)
            renamed[own] = keys_like(template.get(own), value)
        return renamed
    if isinstance(template, (list, tuple)) and isinstance(loaded, list):
        return [keys_like(item, value) for item, value in zip(template, loaded)] + loaded[
            len(template) :
        ]
    return loaded


def check_restorable_keys(state: Any, where: str = "", *, flattened: bool = True) -> None:
    """Raise :class:`~distckpt.errors.UnrestorableKeys` for the first dict of ``state`` with
    keys a restore could not map back: two that read the same, or one not of
    :data:`TEXT_KEY_TYPES`. Only the dicts DCP's flattening places key by key are checked
    (``flattened``: ``state`` is one of its places; see :func:`flattened_whole`): a dict DCP
    pickles whole, in a tuple or a list of plain values, keeps its keys as they are. A per-rank
    mark's value is saved at a place of its own, wherever the mark is, so it is looked for in
    those too."""
    if isinstance(state, PerRank):
        check_restorable_keys(state.value, where)
        return
    if isinstance(state, Mapping):
        if flattened:
            _check_keys_of(state, where)
        items: Iterable[tuple[Any, Any]] = state.items()
    elif isinstance(state, (list, tuple)) and holds_containers(state):
        flattened = flattened and isinstance(state, list) and not flattened_whole(state)
        items = enumerate(state)
    else:
        return
    for key, value in items:
        check_restorable_keys(value, f"{where}.{key}" if where else str(key), flattened=flattened)


def _check_keys_of(mapping: Mapping[Any, Any], where: str) -> None:
    by_text: dict[str, list[Any]] = {}
    for key in mapping:
        by_text.setdefault(str(key), []).append(key)
    untyped = [key for key in mapping if not isinstance(key, TEXT_KEY_TYPES)]
    same_text = [key for keys in by_text.values() if len(keys) > 1 for key in keys]
    if not untyped and not same_text:
        return
    place = repr(where) if where else "the top level"
    problem = (
        f"keys of types whose text may differ between processes "
        f"({', '.join(sorted({type(key).__name__ for key in untyped}))})"
        if untyped
        else "keys that read the same as text"
    )
    refused = tuple(repr(key) for key in (untyped or same_text))
    raise UnrestorableKeys(
        f"the dict at {place} has {problem}: {', '.join(refused)}. The 'dcp' format "
        "keeps dict keys as text and a restore maps each back onto the key of the "
        "given state with that text, so each dict's keys must be str, int, float, "
        "bool or None, with no two of the same text; use the 'torch' format, or "
        "convert these keys",
        where=where,
        keys=refused,
    )


def holds_containers(items: list[Any] | tuple[Any, ...]) -> bool:
    """Whether ``items`` holds anything with places inside (a mapping, list, tuple or per-rank
    mark), told by the set of its items' types: a walk skips a long list of plain values (a
    million token ids) without a look at each."""
    return any(issubclass(kind, (Mapping, list, tuple, PerRank)) for kind in set(map(type, items)))


def flattened_whole(items: list[Any]) -> bool:
    """Whether DCP's flattening (``traverse_state_dict`` in
    ``torch.distributed.checkpoint._traverse``) saves the list ``items`` as one pickled value,
    as its ``_is_terminal`` decides: when it holds no tensor, no mapping and no list it would
    walk into (a tuple is always pickled whole). A per-rank mark does not count: it is taken
    out of the list before (None keeps its index), its value saved at a place of its own."""
    for item in items:
        if isinstance(item, (Mapping, torch.Tensor)):
            return False
        if isinstance(item, list) and not flattened_whole(item):
            return False
    return True
