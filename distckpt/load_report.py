"""What a restore's dry run found between the ``state=`` template and the checkpoint
(:class:`LoadReport`), the rules that turn it into a refusal before anything is loaded (shapes,
optimizer parameter groups, keys on one side only under ``strict``, the optional keys), and
the lookups of the template's sub-trees those rules need. :func:`distckpt.state.check_load`
fills a report; the formats fill theirs from what they read.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from distckpt.errors import InvalidArgument, KeyMismatch, ShapeMismatch
from distckpt.per_rank import PerRank

#: A tensor of the template whose shape differs from the saved one under the same key:
#: (dotted key, saved shape, current shape).
ShapeDifference = tuple[str, tuple[int, ...], tuple[int, ...]]


@dataclass
class LoadReport:
    """What did not line up between the ``state=`` template and the checkpoint, each key as a
    dotted path (``model.layer.weight``): keys on one side only, and tensors present on both
    sides with different shapes (which nothing can load, strict or not)."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_shapes: list[ShapeDifference] = field(default_factory=list)
    #: the parameter groups of a ModelOptimizerState whose parameters differ from the saved
    #: ones: (the group's dotted place, its saved parameter names, the given ones)
    changed_param_groups: list[tuple[str, list[str], list[str]]] = field(default_factory=list)
    #: the given state's leaves under each missing key that is a whole sub-tree (a missing
    #: key absent here is a leaf itself): the sub-tree is optional when each leaf is
    leaves_of_missing: dict[str, list[str]] = field(default_factory=dict)
    #: the objects with ``state_dict()`` the checkpoint holds with other top-level keys, also
    #: in ``missing_keys`` (not loaded): (dotted place, saved keys, expected keys)
    changed_keys: list[tuple[str, list[str], list[str]]] = field(default_factory=list)
    #: the given tensors the saved ones cannot be copied into: (dotted place, why)
    unwritable: list[tuple[str, str]] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """Whether no key is on one side only (shapes are :meth:`check_shapes`' business)."""
        return not self.missing_keys and not self.unexpected_keys

    def check(
        self,
        *,
        strict: bool,
        where: str | os.PathLike[str] | None = None,
        step: int | None = None,
        optional_keys: Collection[str] = (),
        optional_whole_keys: Collection[str] = (),
    ) -> None:
        """Raise what a restore refuses before loading anything: a shape mismatch always
        (:meth:`check_shapes`) and a changed set of optimizer parameter groups
        (:meth:`check_param_groups`) and a given tensor nothing can be copied into
        (:meth:`check_writable`) always, keys on one side only with ``strict``
        (:meth:`check_strict`), but for the missing keys that are or are under
        ``optional_keys`` (:func:`optional_cover`) or are one of ``optional_whole_keys``,
        naming the checkpoint ``where`` of ``step`` (the error's ``path`` and ``step``)."""
        self.check_shapes(where, step)
        self.check_writable(where, step)
        self.check_param_groups(where, step)
        if strict:
            self.check_strict(where, step, optional_keys, optional_whole_keys)

    def check_shapes(
        self, where: str | os.PathLike[str] | None = None, step: int | None = None
    ) -> None:
        """Raise :class:`~distckpt.errors.ShapeMismatch` naming every tensor whose saved shape
        differs from the given one, if any, and the checkpoint ``where`` (its ``path``) of
        ``step`` when known: whatever ``strict`` is, as torch's own ``load_state_dict`` and DCP
        do, since nothing can be loaded into such a tensor."""
        if self.mismatched_shapes:
            listed = "; ".join(
                f"{key}: saved {list(saved)}, given {list(current)}"
                for key, saved, current in self.mismatched_shapes
            )
            raise ShapeMismatch(
                f"{_about(where)}the checkpoint's tensors do not have the shapes of the given"
                f" state's ({listed}). A shape mismatch is refused even with strict=False:"
                " nothing can be loaded into a tensor of another shape",
                mismatches=tuple(self.mismatched_shapes),
                path=where,
                step=step,
            )

    def check_writable(
        self, where: str | os.PathLike[str] | None = None, step: int | None = None
    ) -> None:
        """Raise :class:`~distckpt.errors.InvalidArgument` naming every given tensor the saved
        one cannot be copied into (:func:`distckpt.tensor_writes.unwritable_reason`), whatever
        ``strict`` is: loading would fail or do nothing there, after loading the others."""
        if self.unwritable:
            listed = "; ".join(f"{key}: {reason}" for key, reason in self.unwritable)
            raise InvalidArgument(
                f"{_about(where)}the checkpoint's tensors cannot be loaded into these of the "
                f"given state ({listed}); nothing was loaded",
                path=where,
                step=step,
            )

    def check_param_groups(
        self, where: str | os.PathLike[str] | None = None, step: int | None = None
    ) -> None:
        """Raise :class:`~distckpt.errors.KeyMismatch` naming every parameter group of a
        ModelOptimizerState whose parameters differ from the saved group's (a group added or
        removed, or parameters moved between groups), whatever ``strict`` is: torch's
        optimizer loads groups by position, so nothing sensible can be loaded. Its
        ``missing_keys`` are ``<group>.params.<name>`` for each given parameter the saved group
        lacks, ``unexpected_keys`` the same for each saved one the given group lacks."""
        if not self.changed_param_groups:
            return
        listed = "; ".join(
            f"{place}: saved {saved}, given {given}"
            for place, saved, given in self.changed_param_groups
        )
        missing = [
            f"{place}.params.{name}"
            for place, saved, given in self.changed_param_groups
            for name in given
            if name not in saved
        ]
        unexpected = [
            f"{place}.params.{name}"
            for place, saved, given in self.changed_param_groups
            for name in saved
            if name not in given
        ]
        raise KeyMismatch(
            f"{_about(where)}the optimizer's parameter groups do not hold the saved ones' "
            f"parameters ({listed}). A changed number of groups or a parameter moved between "
            "groups is refused even with strict=False: the optimizer loads groups by position",
            missing_keys=tuple(missing),
            unexpected_keys=tuple(unexpected),
            path=where,
            step=step,
        )

    def check_strict(
        self,
        where: str | os.PathLike[str] | None = None,
        step: int | None = None,
        optional_keys: Collection[str] = (),
        optional_whole_keys: Collection[str] = (),
    ) -> None:
        """Raise :class:`~distckpt.errors.KeyMismatch` listing every key on one side only,
        unless clean but for the ``optional_keys`` (or keys under them) and the
        ``optional_whole_keys`` (those alone) missing from the checkpoint, naming the
        checkpoint ``where`` of ``step`` when known: what ``strict=True`` means for every
        format; an object holding other top-level keys than saved is named with both, not as
        missing (unless optional as well). A list longer than the saved one
        (:func:`is_grown_list`) is never optional: its items are no keys a newer version added,
        and the formats would load it differently (DCP its first items, "torch" none)."""
        changed_keys = [
            (place, saved, expected)
            for place, saved, expected in self.changed_keys
            if optional_cover(place, optional_keys) is None and place not in optional_whole_keys
        ]
        changed = {place for place, _, _ in self.changed_keys}
        missing = [
            key
            for key in self.missing_keys
            if is_grown_list(key)
            or (
                optional_cover(key, optional_keys) is None
                and key not in optional_whole_keys
                and key not in changed
                and not self._leaves_all_optional(key, optional_keys)
            )
        ]
        if missing or self.unexpected_keys or changed_keys:
            found = [
                f"{place!r} present, but its keys differ: saved {saved} vs expected {expected}"
                for place, saved, expected in changed_keys
            ]
            if missing or self.unexpected_keys or not found:
                found.insert(
                    0,
                    f"missing from the checkpoint {missing}, "
                    f"not in the given state {self.unexpected_keys}",
                )
            raise KeyMismatch(
                f"{_about(where)}the checkpoint does not match the given state: "
                f"{'; '.join(found)}. Pass strict=False to load what matches.",
                missing_keys=tuple(missing),
                unexpected_keys=tuple(self.unexpected_keys),
                changed_keys=tuple(
                    (place, tuple(saved), tuple(expected))
                    for place, saved, expected in changed_keys
                ),
                path=where,
                step=step,
            )

    def _leaves_all_optional(self, key: str, optional_keys: Collection[str]) -> bool:
        """Whether ``key`` is a missing sub-tree whose every leaf is optional: a whole
        sub-dict a newer version added, named by its leaves, is as optional as named by it."""
        leaves = self.leaves_of_missing.get(key, [])
        return bool(leaves) and all(optional_cover(leaf, optional_keys) for leaf in leaves)


def _about(where: str | os.PathLike[str] | None) -> str:
    """``"<where>: "``, what an error's message starts with to name the checkpoint ``where``;
    ``""`` when it is not known."""
    return f"{os.fspath(where)}: " if where else ""


def dotted_prefixes(key: str) -> list[str]:
    """``key``'s dotted parents, outermost first, then ``key`` (``a``, ``a.b``, ``a.b.c``)."""
    parts = key.split(".")
    return [".".join(parts[:length]) for length in range(1, len(parts) + 1)]


def optional_cover(key: str, optional_keys: Collection[str]) -> str | None:
    """The shortest of ``key`` and its dotted parents that is in ``optional_keys``, or None
    when the key is not optional."""
    return next((prefix for prefix in dotted_prefixes(key) if prefix in optional_keys), None)


def _value_at(root: Any, key: str) -> tuple[bool, Any]:
    """(found, value) at the dotted ``key`` of ``root``, through its mappings (and the values
    marked :class:`PerRank`)."""
    value = root
    for part in key.split("."):
        if isinstance(value, PerRank):
            value = value.value
        if not isinstance(value, Mapping) or part not in value:
            return False, None
        value = value[part]
    return True, value.value if isinstance(value, PerRank) else value


def leaves_at(template: Any, key: str) -> list[str]:
    """The dotted keys of the leaves of ``template``'s sub-dict at ``key`` (anything but a
    mapping, an object with ``state_dict()`` or a list too, is one leaf), or no keys when
    ``key`` names no sub-dict of it."""
    _, value = _value_at(template, key)
    return _leaves(value, key) if isinstance(value, Mapping) else []


def _leaves(value: Any, key: str) -> list[str]:
    if isinstance(value, PerRank):
        return _leaves(value.value, key)
    if isinstance(value, Mapping) and value:
        return [leaf for name, item in value.items() for leaf in _leaves(item, f"{key}.{name}")]
    return [key]


def holds_any(loaded: Any, key: str) -> bool:
    """Whether ``loaded`` holds anything at the dotted ``key``: a mapping holding only empty
    mappings is nothing (DCP reads a sub-dict it holds nothing of as its empty containers)."""
    found, value = _value_at(loaded, key)
    return found and _holds_a_value(value)


def _holds_a_value(value: Any) -> bool:
    if isinstance(value, PerRank):
        return _holds_a_value(value.value)
    if isinstance(value, Mapping):
        return any(_holds_a_value(item) for item in value.values())
    return True


def list_length_key(place: str, given: int, saved: int) -> str:
    """The key both formats report a list of ``given`` items under for one saved with
    ``saved`` (``lst[len 2 != 1]``): the one spelling :func:`is_grown_list` reads."""
    return f"{place}[len {given} != {saved}]"


def is_grown_list(key: str) -> bool:
    """Whether ``key`` is a list of another length than the saved one, as both formats report
    it (:func:`list_length_key`)."""
    return key.endswith("]") and "[len " in key


def folded_under(missing: list[str], key: str) -> list[str]:
    """``missing`` with the keys under ``key`` listed once, as ``key``, where the first was."""
    under = [name for name in missing if name == key or name.startswith(f"{key}.")]
    if not under:
        return missing
    first = missing.index(under[0])
    kept = [name for name in missing if name not in under]
    kept.insert(first, key)
    return kept
