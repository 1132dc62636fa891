"""Dict keys that are not strings, through the "dcp" format.

DCP flattens a nested state into dotted keys and records each value's place as a tuple of its
dicts' keys turned to text (``{"hist": {0: 0.5}}`` is saved as ``hist.0``, placed at
``("hist", "0")``); a list's items keep int indices. A restore puts each value back at the place
the given state has for it: a saved key is mapped back onto the key of the given state's dict
whose text it is (``"0"`` onto ``0``), so a dict of int keys comes back with int keys, into the
same entries. That needs every key of a dict to have one fixed text that no other key of that
dict shares: a save refuses (:class:`~distckpt.errors.UnrestorableKeys`) keys that read the same
(``1`` and ``"1"``) and keys of any type but :data:`TEXT_KEY_TYPES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from distckpt.errors import UnrestorableKeys
from distckpt.per_rank import PerRank

__all__ = ["TEXT_KEY_TYPES", "SavedPlaces", "check_restorable_keys", "keys_like", "get_saved"]

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
    """(found, value) at ``place`` (the given state's keys) in ``root`` built from saved places,
    whose dict keys are text: a key is looked up as it is, then as its text."""
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


def check_restorable_keys(state: Any, where: str = "") -> None:
    """Raise :class:`~distckpt.errors.UnrestorableKeys` for the first dict of ``state`` (walked
    through dicts, lists, tuples and per-rank marks) with keys a restore could not map back:
    two that read the same, or one not of :data:`TEXT_KEY_TYPES`."""
    if isinstance(state, PerRank):
        check_restorable_keys(state.value, where)
    elif isinstance(state, Mapping):
        by_text: dict[str, list[Any]] = {}
        for key in state:
            by_text.setdefault(str(key), []).append(key)
        untyped = [key for key in state if not isinstance(key, TEXT_KEY_TYPES)]
        same_text = [key for keys in by_text.values() if len(keys) > 1 for key in keys]
        if untyped or same_text:
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
        for key, value in state.items():
            check_restorable_keys(value, f"{where}.{key}" if where else str(key))
    elif isinstance(state, (list, tuple)):
        for index, value in enumerate(state):
            check_restorable_keys(value, f"{where}.{index}" if where else str(index))
