"""Containers rebuilt as the kind the user's state held: a module's ``state_dict()`` (an
``OrderedDict`` carrying ``_metadata``) and named tuples come back as what they were, on the
save path (plain state, snapshot, rank file) and the restore path alike."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any


def same_kind_of_mapping(
    template: Mapping[Any, Any], items: dict[Any, Any], *, copy_metadata: bool = False
) -> dict[Any, Any]:
    """``items`` (a fresh dict of ``template``'s keys) itself, or as an ``OrderedDict`` with the
    ``_metadata`` attribute of ``template`` when that is one: as ``torch.save`` and
    ``torch.load(weights_only=True)`` keep a module's ``state_dict()``, whose ``_metadata``
    holds its modules' versions (which ``load_state_dict`` passes on to each module's loading,
    e.g. ``BatchNorm``'s). Any other mapping becomes a plain dict.

    The ``_metadata`` is ``template``'s own unless ``copy_metadata`` (an async save's snapshot,
    which must not see later changes to it): a sync save writes it before returning, and a copy
    at 10,000 modules cost 35 ms a save."""
    if not isinstance(template, OrderedDict):
        return items  # the common case costs no copy: this runs for every dict of every save
    result: OrderedDict[Any, Any] = OrderedDict(items)
    metadata = getattr(template, "_metadata", None)
    if metadata is not None:
        kept = copy_of_metadata(metadata) if copy_metadata else metadata
        result._metadata = kept  # type: ignore[attr-defined]
    return result


def copy_of_metadata(metadata: Any) -> Any:
    """A copy of a module's ``state_dict()._metadata`` (an OrderedDict of each module's dict of
    plain values): two levels, which a deep copy's bookkeeping made several times slower; any
    other shape, a deep copy."""
    if type(metadata) is not OrderedDict or not all(type(v) is dict for v in metadata.values()):
        return copy.deepcopy(metadata)
    return OrderedDict((key, dict(value)) for key, value in metadata.items())


def same_kind_of_tuple(template: tuple[Any, ...], items: list[Any]) -> tuple[Any, ...]:
    """``items`` as a tuple of ``template``'s type (a named tuple takes them as arguments)."""
    if hasattr(template, "_fields"):
        return type(template)(*items)
    return type(template)(items)
