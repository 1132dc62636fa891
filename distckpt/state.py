"""Turning a user's state into plain data to save, and loading saved data back into it.

A state is a nested dict/list/tuple of tensors and plain values; any value with
``state_dict()`` / ``load_state_dict()`` (a model, an optimizer, a scheduler, a GradScaler, a
sampler, a :class:`~distckpt.StepTracker`) is saved through ``state_dict()``. On restore, the
same structure passed as ``state=`` is loaded in place: such objects get ``load_state_dict``,
tensors are copied into, and plain values (ints, strings, tuples, ...) are replaced inside the
dicts and lists that hold them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from distckpt.containers import same_kind_of_mapping, same_kind_of_tuple
from distckpt.errors import InvalidArgument, ShapeMismatch
from distckpt.key_prefixes import log_prefix_mapping, matching_prefixes
from distckpt.per_rank import PerRank, is_per_rank


def dtensor_type() -> type | None:
    """DTensor's class if its module is loaded. A DTensor can only exist once it is, and
    importing it costs half a second, which a job without DTensors should not pay."""
    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "DTensor"):
            return module.DTensor
    return None


def element_bytes(state: Any) -> int:
    """Bytes of the elements of the tensors in a nested state, as a format that writes each
    tensor's elements (DCP) writes them: numel times item size of each (a DTensor: its local shard;
    a sparse one: the tensors it is made of). An expanded or overlapping view counts every
    element it shows, however few bytes its storage holds; a tensor met twice counts twice."""
    return sum(
        part.numel() * part.element_size()
        for tensor in local_tensors(state)
        for part in tensor_parts(tensor)
    )


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


def is_stateful(value: Any) -> bool:
    return callable(getattr(value, "state_dict", None)) and callable(
        getattr(value, "load_state_dict", None)
    )


def _generators_an_iterator_draws_from(loader: Any) -> list[torch.Generator]:
    """The generators a data loader's new iterator draws from: the loader's own (its workers'
    base seed), its sampler's and its batch sampler's (an epoch's order), and torch's default
    one (a sampler without a generator of its own draws from it); each once."""
    owners = [loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)]
    owners.append(getattr(owners[-1], "sampler", None))
    found: dict[int, torch.Generator] = {}
    for owner in owners:
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator):
            found.setdefault(id(generator), generator)
    found.setdefault(id(torch.default_generator), torch.default_generator)
    return list(found.values())


def template_state_dict(value: Any) -> Any:
    """``value.state_dict()`` asked by a restore, which only reads it (its keys, a template to
    load into), leaving ``value`` and the generators it draws from as they were, when it has a
    generator of its own (``value.generator``: a data loader's). A fresh
    ``StatefulDataLoader`` with workers answers by building an iterator, which draws its
    workers' base seed from the loader's generator and its first epoch's order from the
    sampler's: a restore would advance them once more than the uninterrupted run did, and every
    later epoch's workers would get other seeds (the iterator a resumed epoch builds draws once,
    as the interrupted one did).

    The loader also keeps that iterator, and its first epoch would run on it (its seed drawn
    before the generator was put back) when no ``load_state_dict`` follows: a restore with
    ``strict=False`` whose checkpoint lacks the loader, or a failed one before a fresh start.
    The next epoch would then draw that same seed again, and its workers repeat the first
    epoch's noise. So an iterator built only to answer is dropped (``load_state_dict`` with the
    state the loader was waiting to resume from, or none), and the loader runs as a fresh one."""
    if not isinstance(getattr(value, "generator", None), torch.Generator):
        return value.state_dict()
    generators = _generators_an_iterator_draws_from(value)
    before = [generator.get_state() for generator in generators]
    # StatefulDataLoader's own attributes: no public call says whether it holds an iterator.
    had_no_iterator = hasattr(value, "_iterator") and value._iterator is None
    pending_resume = getattr(value, "next_iter_state", None)
    try:
        return value.state_dict()
    finally:
        for generator, state in zip(generators, before):
            generator.set_state(state)
        if had_no_iterator and getattr(value, "_iterator", None) is not None:
            value.load_state_dict(pending_resume if pending_resume is not None else {})


def to_plain(state: Any, *, mark_per_rank: bool = False, template: bool = False) -> Any:
    """``state`` with every stateful object replaced by its ``state_dict()``, recursively.
    With ``mark_per_rank``, a value that differs per rank (:func:`distckpt.per_rank.is_per_rank`)
    comes out as :class:`~distckpt.PerRank` around its plain value; without, unmarked. With
    ``template`` (a restore's ``state=``), through :func:`template_state_dict`."""
    if is_per_rank(state):
        # An RNGState or a loader is Stateful itself; a PerRank holds its value.
        if isinstance(state, PerRank):
            inner = state.value
        else:
            inner = template_state_dict(state) if template else state.state_dict()
        plain = to_plain(inner, template=template)
        return PerRank(plain) if mark_per_rank else plain
    if isinstance(state, torch.Tensor):
        return state.detach()
    if is_stateful(state):
        inner = template_state_dict(state) if template else state.state_dict()
        return to_plain(inner, mark_per_rank=mark_per_rank, template=template)
    if isinstance(state, Mapping):
        return same_kind_of_mapping(
            state,
            {
                key: to_plain(value, mark_per_rank=mark_per_rank, template=template)
                for key, value in state.items()
            },
        )
    if isinstance(state, (list, tuple)):
        items = [to_plain(value, mark_per_rank=mark_per_rank, template=template) for value in state]
        return type(state)(items) if isinstance(state, list) else same_kind_of_tuple(state, items)
    return state


# ---------------------------------------------------------------------------------------------
# Nested paths: a value's place in a nested state as a tuple of keys and list indices


def set_path(root: Any, path: Iterable[Any], value: Any) -> None:
    """Set ``value`` at ``path`` in nested dicts/lists, creating missing containers (a list
    where the next key is an int)."""
    path = list(path)
    node = root
    for key, next_key in zip(path, path[1:]):
        fresh: Any = [] if isinstance(next_key, int) else {}
        if isinstance(node, list):
            node.extend([None] * (key + 1 - len(node)))
            if node[key] is None:
                node[key] = fresh
        elif key not in node:
            node[key] = fresh
        node = node[key]
    last = path[-1]
    if isinstance(node, list):
        node.extend([None] * (last + 1 - len(node)))
    node[last] = value


def remove_path(root: Any, path: tuple[Any, ...]) -> bool:
    """Drop the dict entry at ``path``; False if there is none (an item of a list or tuple is
    never dropped: that would shift the rest)."""
    node = root
    for key in path[:-1]:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return False
    if isinstance(node, dict) and path[-1] in node:
        del node[path[-1]]
        return True
    return False


def copy_containers(value: Any) -> Any:
    """``value`` with fresh dicts and lists but the same tensors, so filling it in place never
    rearranges a container owned by the user's objects."""
    if isinstance(value, Mapping):
        return {key: copy_containers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [copy_containers(item) for item in value]
    return value


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
    #: the given state's leaves under each missing key that is a whole sub-tree (a missing
    #: key absent here is a leaf itself): the sub-tree is optional when each leaf is
    leaves_of_missing: dict[str, list[str]] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        """Whether no key is on one side only (shapes are :meth:`check_shapes`' business)."""
        return not self.missing_keys and not self.unexpected_keys

    def check(
        self,
        *,
        strict: bool,
        where: str | os.PathLike[str] | None = None,
        optional_keys: Collection[str] = (),
        optional_whole_keys: Collection[str] = (),
    ) -> None:
        """Raise what a restore refuses before loading anything: a shape mismatch always
        (:meth:`check_shapes`, naming the checkpoint ``where``), keys on one side only with
        ``strict`` (:meth:`check_strict`), but for the missing keys that are or are under
        ``optional_keys`` (:func:`optional_cover`) or are one of ``optional_whole_keys``."""
        self.check_shapes(where)
        if strict:
            self.check_strict(optional_keys, optional_whole_keys)

    def check_shapes(self, where: str | os.PathLike[str] | None = None) -> None:
        """Raise :class:`~distckpt.errors.ShapeMismatch` naming every tensor whose saved shape
        differs from the given one, if any, and the checkpoint ``where`` (its ``path``) when
        known: whatever ``strict`` is, as torch's own ``load_state_dict`` and DCP do, since
        nothing can be loaded into such a tensor."""
        if self.mismatched_shapes:
            listed = "; ".join(
                f"{key}: saved {list(saved)}, given {list(current)}"
                for key, saved, current in self.mismatched_shapes
            )
            checkpoint = f"{os.fspath(where)}: the checkpoint's" if where else "the checkpoint's"
            raise ShapeMismatch(
                f"{checkpoint} tensors do not have the shapes of the given state's ({listed})."
                " A shape mismatch is refused even with strict=False: nothing can be loaded into"
                " a tensor of another shape",
                mismatches=tuple(self.mismatched_shapes),
                path=where,
            )

    def check_strict(
        self, optional_keys: Collection[str] = (), optional_whole_keys: Collection[str] = ()
    ) -> None:
        """Raise :class:`InvalidArgument` listing every key on one side only, unless clean but
        for the ``optional_keys`` (or keys under them) and the ``optional_whole_keys`` (those
        alone) missing from the checkpoint: what ``strict=True`` means for every format."""
        missing = [
            key
            for key in self.missing_keys
            if optional_cover(key, optional_keys) is None
            and key not in optional_whole_keys
            and not self._leaves_all_optional(key, optional_keys)
        ]
        if missing or self.unexpected_keys:
            raise InvalidArgument(
                "the checkpoint does not match the given state: "
                f"missing from the checkpoint {missing}, "
                f"not in the given state {self.unexpected_keys}. "
                "Pass strict=False to load what matches."
            )

    def _leaves_all_optional(self, key: str, optional_keys: Collection[str]) -> bool:
        """Whether ``key`` is a missing sub-tree whose every leaf is optional: a whole
        sub-dict a newer version added, named by its leaves, is as optional as named by it."""
        leaves = self.leaves_of_missing.get(key, [])
        return bool(leaves) and all(optional_cover(leaf, optional_keys) for leaf in leaves)


def dotted_prefixes(key: str) -> list[str]:
    """``key``'s dotted parents, outermost first, then ``key`` (``a``, ``a.b``, ``a.b.c``)."""
    parts = key.split(".")
    return [".".join(parts[:length]) for length in range(1, len(parts) + 1)]


def optional_cover(key: str, optional_keys: Collection[str]) -> str | None:
    """The shortest of ``key`` and its dotted parents that is in ``optional_keys``, or None
    when the key is not optional."""
    return next((prefix for prefix in dotted_prefixes(key) if prefix in optional_keys), None)


def check_load(
    template: Any,
    loaded: Any,
    *,
    strict: bool,
    fix_key_prefixes: bool = True,
    where: str | os.PathLike[str] | None = None,
    optional_keys: Collection[str] = (),
    optional_whole_keys: Collection[str] = (),
) -> LoadReport:
    """A dry run of loading ``loaded`` (as saved) into ``template`` (the user's live objects),
    changing nothing (:func:`apply_load` loads it): a tensor (a module's too) whose shape
    differs from the saved one raises :class:`~distckpt.errors.ShapeMismatch`; with
    ``strict=True`` any key present on one side only raises :class:`InvalidArgument` listing
    them all; with ``strict=False`` the keys are reported. With ``fix_key_prefixes``, a
    module's (or dict's) keys that differ from the saved ones only by wrapper prefixes
    (``_orig_mod.``, ``module.``) are compared mapped (see :mod:`distckpt.key_prefixes`). An
    object's own ``load_state_dict`` is not run, so what it alone refuses (an optimizer's
    parameter groups of other sizes) is only found by :func:`apply_load`. ``where``: the
    checkpoint ``loaded`` comes from, for the errors; ``optional_keys``: the dotted keys of
    ``template`` that ``loaded`` may lack even with ``strict`` (reported, not refused), and
    ``optional_whole_keys`` those it may lack only as a whole."""
    report = LoadReport()
    _load(template, loaded, "", report, apply=False, fix_prefixes=fix_key_prefixes)
    report.leaves_of_missing = {
        key: leaves for key in report.missing_keys if (leaves := _leaves_at(template, key))
    }
    for key in optional_whole_keys:
        if not _holds_any(loaded, key):
            # DCP reads a sub-dict it holds nothing of as empty; reported whole, as "torch" does.
            report.missing_keys = _folded_under(report.missing_keys, key)
    report.check(
        strict=strict,
        where=where,
        optional_keys=optional_keys,
        optional_whole_keys=optional_whole_keys,
    )
    return report


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


def _leaves_at(template: Any, key: str) -> list[str]:
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


def _holds_any(loaded: Any, key: str) -> bool:
    """Whether ``loaded`` holds anything at the dotted ``key`` (an empty mapping is nothing)."""
    found, value = _value_at(loaded, key)
    return found and (not isinstance(value, Mapping) or bool(value))


def _folded_under(missing: list[str], key: str) -> list[str]:
    """``missing`` with the keys under ``key`` listed once, as ``key``, where the first was."""
    under = [name for name in missing if name == key or name.startswith(f"{key}.")]
    if not under:
        return missing
    first = missing.index(under[0])
    kept = [name for name in missing if name not in under]
    kept.insert(first, key)
    return kept


def apply_load(template: Any, loaded: Any, *, fix_key_prefixes: bool = True) -> None:
    """Load ``loaded`` into ``template`` in place, what matches (after :func:`check_load`),
    logging one INFO line per wrapper-prefix mapping. Objects with ``load_state_dict`` load
    through it, tensors are copied into, and any other value inside a dict or list of
    ``template`` is replaced by the loaded one (a tuple by a new tuple); a plain value at the
    top level cannot be replaced: read it from the result. An object's ``load_state_dict``
    that fails raises :class:`InvalidArgument`, leaving what was loaded before it loaded."""
    _load(template, loaded, "", LoadReport(), apply=True, fix_prefixes=fix_key_prefixes)


def _join(prefix: str, key: object) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _renamed(expected: Any, loaded: Any, path: str, *, fix: bool, log: bool) -> Any:
    """``loaded`` with its keys renamed to ``expected``'s when they differ only by wrapper
    prefixes (and ``fix``); otherwise ``loaded`` itself."""
    if not fix or not isinstance(loaded, Mapping):
        return loaded
    mapping = matching_prefixes(expected, loaded)
    if mapping is None:
        return loaded
    if log:
        log_prefix_mapping(path, mapping)
    return {target: loaded[saved] for target, saved in mapping.items()}


def _load(
    template: Any, loaded: Any, path: str, report: LoadReport, *, apply: bool, fix_prefixes: bool
) -> Any:
    """Walk ``template`` and ``loaded`` together, recording mismatches in ``report`` and, with
    ``apply``, loading what matches. Returns what the template's place should hold: the
    template itself when it was loaded in place (or left alone), else the loaded value."""
    if isinstance(template, PerRank):
        # The mark matters to the format only; the mark stays, its value is loaded.
        new = _load(template.value, loaded, path, report, apply=apply, fix_prefixes=fix_prefixes)
        if apply and new is not template.value:
            template.value = new
        return template
    if isinstance(template, torch.nn.Module):
        current = template.state_dict()
        loaded = _renamed(current, loaded, path, fix=fix_prefixes, log=apply)
        expected, got = set(current), set(loaded) if isinstance(loaded, Mapping) else set()
        report.missing_keys += [_join(path, k) for k in sorted(expected - got)]
        report.unexpected_keys += [_join(path, k) for k in sorted(got - expected)]
        for key in sorted(expected & got):
            _compare_shapes(current[key], loaded[key], _join(path, key), report)
        if apply:
            _checked(path, lambda: template.load_state_dict(loaded, strict=False))
    elif is_stateful(template):
        if _same_keys(template_state_dict(template), loaded):
            if apply:
                _checked(path, lambda: template.load_state_dict(loaded))
        else:
            # A changed optimizer or scheduler cannot load a partial dict: report, skip.
            report.missing_keys.append(path)
    elif isinstance(template, torch.Tensor):
        if not isinstance(loaded, torch.Tensor):
            report.missing_keys.append(path)
        elif _compare_shapes(template, loaded, path, report) and apply:
            with torch.no_grad():
                template.copy_(loaded)
    elif isinstance(template, Mapping) and isinstance(loaded, Mapping):
        loaded = _renamed(template, loaded, path, fix=fix_prefixes, log=apply)
        for key, value in template.items():
            if key in loaded:
                new = _load(
                    value,
                    loaded[key],
                    _join(path, key),
                    report,
                    apply=apply,
                    fix_prefixes=fix_prefixes,
                )
                if apply and new is not value and isinstance(template, dict):
                    template[key] = new
            else:
                report.missing_keys.append(_join(path, key))
        report.unexpected_keys += [_join(path, k) for k in loaded if k not in template]
    elif isinstance(template, (list, tuple)) and isinstance(loaded, (list, tuple)):
        if len(template) != len(loaded):
            report.missing_keys.append(f"{path}[len {len(template)} != {len(loaded)}]")
            return template
        items = [
            _load(item, value, _join(path, index), report, apply=apply, fix_prefixes=fix_prefixes)
            for index, (item, value) in enumerate(zip(template, loaded))
        ]
        if not apply or all(new is old for new, old in zip(items, template)):
            return template
        if isinstance(template, list):
            template[:] = items
            return template
        return same_kind_of_tuple(template, items)
    elif not isinstance(template, (Mapping, list, tuple)):
        return loaded  # a plain value: its container takes the loaded one
    return template


def _compare_shapes(current: Any, loaded: Any, path: str, report: LoadReport) -> bool:
    """Whether ``loaded`` fits into ``current`` as far as shapes go; a pair of tensors of
    different shapes is added to ``report`` (anything else is left to the caller)."""
    if (
        isinstance(current, torch.Tensor)
        and isinstance(loaded, torch.Tensor)
        and current.shape != loaded.shape
    ):
        report.mismatched_shapes.append((path, tuple(loaded.shape), tuple(current.shape)))
        return False
    return True


def _checked(path: str, load: Any) -> None:
    """Run an object's own ``load_state_dict``; its errors (shape mismatches) become ours."""
    try:
        load()
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise InvalidArgument(
            f"{path or 'state'}: cannot load the checkpoint into it: {exc}"
        ) from exc


def _same_keys(current: Any, loaded: Any) -> bool:
    return not isinstance(current, Mapping) or (
        isinstance(loaded, Mapping) and set(current) == set(loaded)
    )
