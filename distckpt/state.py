"""Turning a user's state into plain data to save, and loading saved data back into it.

A state is a nested dict/list/tuple of tensors and plain values; any value with
``state_dict()`` / ``load_state_dict()`` (a model, an optimizer, a scheduler, a GradScaler, a
sampler, a :class:`~distckpt.StepTracker`) is saved through ``state_dict()``. On restore, the
same structure passed as ``state=`` is loaded in place: such objects get ``load_state_dict``,
tensors are copied into, and plain values (ints, strings, tuples, ...) are replaced inside the
dicts and lists that hold them. A :class:`torch.Generator` is saved as its state and device
(:func:`saved_generator`), per rank, and restored in place with ``set_state``: the same
object continues.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import torch

from distckpt.containers import same_kind_of_mapping, same_kind_of_tuple
from distckpt.errors import InvalidArgument
from distckpt.key_prefixes import log_prefix_mapping, matching_prefixes
from distckpt.load_report import (
    LoadReport,
    folded_under,
    holds_any,
    leaves_at,
    list_length_key,
)
from distckpt.model_state_keys import (
    join_key,
    model_optimizer_state_type,
    param_group_changes,
    without_scheduler_settings,
    without_unsaved_init_state,
)
from distckpt.per_rank import PerRank, is_per_rank
from distckpt.rng import load_generator, restores_partly, saved_generator
from distckpt.tensor_writes import copy_into, unwritable_given, unwritable_reason

logger = logging.getLogger("distckpt")


def dtensor_type() -> type | None:
    """DTensor's class if its module is loaded. A DTensor can only exist once it is, and
    importing it costs half a second, which a job without DTensors should not pay."""
    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "DTensor"):
            return module.DTensor
    return None


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
    if isinstance(value, model_optimizer_state_type() or ()):
        return value.template_state_dict()  # its optimizers left without state they lacked
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
        elif isinstance(state, torch.Generator):
            inner = saved_generator(state)
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
    """Set ``value`` at ``path`` in nested dicts/lists/tuples, creating missing containers (a
    list where the next key is an int). A tuple on the way cannot take an item: it is rebuilt
    with it (the same kind of tuple) and put in its parent's place instead, so ``root`` itself
    must be a dict or a list."""
    path = list(path)
    if isinstance(root, tuple):
        raise TypeError(f"cannot set {path!r} inside a tuple at the top level")
    _with_item(root, path, value)


def _with_item(node: Any, path: list[Any], value: Any) -> Any:
    """``node`` holding ``value`` at ``path``: the same dict or list, or a new tuple."""
    key, rest = path[0], path[1:]
    items = list(node) if isinstance(node, tuple) else node
    if isinstance(items, list):
        items.extend([None] * (key + 1 - len(items)))
    if rest:
        fresh: Any = [] if isinstance(rest[0], int) else {}
        if isinstance(items, list):
            child = fresh if items[key] is None else items[key]
        else:
            # anything but a mapping here is a path that contradicts another: raise as indexing it
            child = items.get(key, fresh) if isinstance(items, Mapping) else items[key]
        value = _with_item(child, rest, value)
    items[key] = value
    return same_kind_of_tuple(node, items) if isinstance(node, tuple) else items


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


def check_load(
    template: Any,
    loaded: Any,
    *,
    strict: bool,
    fix_key_prefixes: bool = True,
    where: str | os.PathLike[str] | None = None,
    step: int | None = None,
    optional_keys: Collection[str] = (),
    optional_whole_keys: Collection[str] = (),
    unread_keys: Collection[str] = (),
) -> LoadReport:
    """A dry run of loading ``loaded`` (as saved) into ``template`` (the user's live objects),
    changing nothing (:func:`apply_load` loads it): a tensor (a module's too) whose shape
    differs from the saved one raises :class:`~distckpt.errors.ShapeMismatch`; with
    ``strict=True`` any key present on one side only raises
    :class:`~distckpt.errors.KeyMismatch` listing them all; with ``strict=False`` the keys are
    reported. A key under which the two hold different kinds of value (a sub-dict given where a
    leaf or a list was saved, a list where a leaf or a dict was, a tensor where a dict or a list
    was, a plain value where a dict was) is on both sides only: missing and unexpected, as "dcp"
    reports it. With ``fix_key_prefixes``, a module's (or dict's) keys that differ from the
    saved ones only by wrapper prefixes (``_orig_mod.``, ``module.``) are compared mapped (see
    :mod:`distckpt.key_prefixes`). An object's own ``load_state_dict`` is not run, so what it
    alone refuses (an optimizer's parameter groups of other sizes) is only found by
    :func:`apply_load`. ``where`` and ``step``: the checkpoint ``loaded`` comes from, for the
    errors; ``optional_keys``: the dotted keys of ``template`` that ``loaded`` may lack even
    with ``strict`` (reported, not refused), and ``optional_whole_keys`` those it may lack only
    as a whole. ``unread_keys``: the saved keys the read left out of ``loaded`` (a "dcp" read
    of a value shared by the ranks gives only the keys ``template`` asked for; the others are
    its unexpected keys), counted among the saved keys of an object with ``state_dict()``
    whose keys differ (``changed_keys``)."""
    report = LoadReport()
    _load(
        template,
        loaded,
        "",
        report,
        apply=False,
        fix_prefixes=fix_key_prefixes,
        unread_keys=unread_keys,
    )
    report.leaves_of_missing = {
        key: leaves for key in report.missing_keys if (leaves := leaves_at(template, key))
    }
    for key in optional_whole_keys:
        if not holds_any(loaded, key):
            # DCP reads a sub-dict it holds nothing of as empty; reported whole, as "torch" does.
            report.missing_keys = folded_under(report.missing_keys, key)
    report.check(
        strict=strict,
        where=where,
        step=step,
        optional_keys=optional_keys,
        optional_whole_keys=optional_whole_keys,
    )
    return report


def apply_load(
    template: Any,
    loaded: Any,
    *,
    strict: bool = True,
    fix_key_prefixes: bool = True,
    unread_keys: Collection[str] = (),
) -> None:
    """Load ``loaded`` into ``template`` in place, what matches (after :func:`check_load`
    with the same ``strict``, which a :class:`~distckpt.ModelOptimizerState`'s own
    ``load_state_dict`` is given), logging one INFO line per wrapper-prefix mapping. Objects
    with ``load_state_dict`` load through it, tensors are copied into, and any other value
    inside a dict or list of ``template`` is replaced by the loaded one (a tuple by a new
    tuple), but by no saved dict (a key of another kind, which :func:`check_load` reports); a
    plain value at the top level cannot be replaced: read it from the result. An
    object's ``load_state_dict`` that fails raises :class:`InvalidArgument`, leaving what was
    loaded before it loaded. ``unread_keys`` as for :func:`check_load`: the warning about an
    object whose keys differ names them among its saved keys."""
    _load(
        template,
        loaded,
        "",
        LoadReport(),
        apply=True,
        fix_prefixes=fix_key_prefixes,
        strict=strict,
        unread_keys=unread_keys,
    )


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
    template: Any,
    loaded: Any,
    path: str,
    report: LoadReport,
    *,
    apply: bool,
    fix_prefixes: bool,
    strict: bool = True,
    unread_keys: Collection[str] = (),
) -> Any:
    """Walk ``template`` and ``loaded`` together, recording mismatches in ``report`` and, with
    ``apply``, loading what matches (``strict`` goes to a ModelOptimizerState's own load).
    Returns what the template's place should hold: the template itself when it was loaded in
    place (or left alone), else the loaded value."""
    if isinstance(template, PerRank):
        # The mark matters to the format only; the mark stays, its value is loaded.
        new = _load(
            template.value,
            loaded,
            path,
            report,
            apply=apply,
            fix_prefixes=fix_prefixes,
            strict=strict,
            unread_keys=unread_keys,
        )
        if apply and new is not template.value:
            template.value = new
        return template
    if isinstance(template, torch.nn.Module):
        current = template.state_dict()
        loaded = _renamed(current, loaded, path, fix=fix_prefixes, log=apply)
        expected, got = set(current), set(loaded) if isinstance(loaded, Mapping) else set()
        report.missing_keys += [join_key(path, k) for k in sorted(expected - got)]
        report.unexpected_keys += [join_key(path, k) for k in sorted(got - expected)]
        for key in sorted(expected & got):
            given, saved, place = current[key], loaded[key], join_key(path, key)
            if (
                _compare_shapes(given, saved, place, report)
                and not apply
                and isinstance(given, torch.Tensor)
                and isinstance(saved, torch.Tensor)
                and (reason := unwritable_reason(given, saved)) is not None
            ):
                report.unwritable.append((place, reason))
        if apply:
            _checked(path, lambda: template.load_state_dict(loaded, strict=False))
    elif isinstance(template, model_optimizer_state_type() or ()):
        # Compared key by key, as a nested dict (so a strict restore refuses before torch
        # loads anything), then loaded by its own load_state_dict with the restore's strict.
        current = without_unsaved_init_state(
            template_state_dict(template), loaded, template.made_by_init
        )
        report.changed_param_groups += [
            (join_key(path, f"optim.param_groups.{index}"), saved, given)
            for index, saved, given in param_group_changes(current, loaded)
        ]
        _load(
            without_scheduler_settings(current),
            without_scheduler_settings(loaded),
            path,
            report,
            apply=False,
            fix_prefixes=fix_prefixes,
        )
        if apply:
            _checked(path, lambda: template.load_state_dict(loaded, strict=strict))
    elif is_stateful(template):
        current = template_state_dict(template)
        # RNGState restores the parts it has (a checkpoint from a node with CUDA, or without).
        if restores_partly(template, loaded) or _same_keys(current, loaded):
            if apply:
                _checked(path, lambda: template.load_state_dict(loaded))
            else:  # its load_state_dict may copy into these (a wrapped module's)
                report.unwritable += list(unwritable_given(current, path))
        else:
            # A changed optimizer or scheduler cannot load a partial dict: report, skip.
            report.missing_keys.append(path)
            if isinstance(current, Mapping) and isinstance(loaded, Mapping):
                saved = list(map(str, loaded))
                saved += [key for key in _top_keys(unread_keys, path) if key not in saved]
                expected = list(map(str, current))
                report.changed_keys.append((path, saved, expected))
                if apply:
                    logger.warning(
                        "%s: present in the checkpoint, but its keys differ: saved %s vs "
                        "expected %s; not loaded",
                        path or "state",
                        saved,
                        expected,
                    )
    elif isinstance(template, torch.Generator):
        load_generator(template, loaded, path, report, apply=apply)
    elif isinstance(template, torch.Tensor):
        if not isinstance(loaded, torch.Tensor):
            report.missing_keys.append(path)
            if isinstance(loaded, (Mapping, list)):
                # Saved a sub-tree: its keys are none the tensor has (DCP's report too).
                report.unexpected_keys.append(path)
        elif _compare_shapes(template, loaded, path, report):
            if apply:
                _checked(path, lambda: copy_into(template, loaded))
            elif (reason := unwritable_reason(template, loaded)) is not None:
                report.unwritable.append((path, reason))
    elif isinstance(template, Mapping) and isinstance(loaded, Mapping):
        loaded = _renamed(template, loaded, path, fix=fix_prefixes, log=apply)
        for key, value in template.items():
            if key in loaded:
                new = _load(
                    value,
                    loaded[key],
                    join_key(path, key),
                    report,
                    apply=apply,
                    fix_prefixes=fix_prefixes,
                    strict=strict,
                    unread_keys=unread_keys,
                )
                if apply and new is not value and isinstance(template, dict):
                    template[key] = new
            else:
                report.missing_keys.append(join_key(path, key))
        report.unexpected_keys += [join_key(path, k) for k in loaded if k not in template]
    elif isinstance(template, (list, tuple)) and isinstance(loaded, (list, tuple)):
        if len(template) != len(loaded):
            report.missing_keys.append(list_length_key(path, len(template), len(loaded)))
            return template
        items = [
            _load(
                item,
                value,
                join_key(path, index),
                report,
                apply=apply,
                fix_prefixes=fix_prefixes,
                strict=strict,
                unread_keys=unread_keys,
            )
            for index, (item, value) in enumerate(zip(template, loaded))
        ]
        if not apply or all(new is old for new, old in zip(items, template)):
            return template
        if isinstance(template, list):
            template[:] = items
            return template
        return same_kind_of_tuple(template, items)
    elif isinstance(template, (Mapping, list, tuple)) or isinstance(loaded, Mapping):
        # A container where the checkpoint holds another kind of value (a leaf, a list for a
        # dict), or a plain value where it holds a dict: neither fits the other, so the key is
        # on both sides only, reported missing and unexpected as DCP reports it, and left as
        # given.
        report.missing_keys.append(path)
        report.unexpected_keys.append(path)
    else:
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
    """Run an object's own ``load_state_dict``, or a tensor's copy; its errors (shape
    mismatches, a copy torch refuses) become ours."""
    try:
        load()
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise InvalidArgument(
            f"{path or 'state'}: cannot load the checkpoint into it: {exc}"
        ) from exc


def _top_keys(keys: Collection[str], path: str) -> list[str]:
    """The first parts under ``path`` of the dotted ``keys`` inside it, once each, in order."""
    prefix = f"{path}." if path else ""
    under = [key[len(prefix) :] for key in keys if key.startswith(prefix) and key != path]
    return list(dict.fromkeys(key.split(".", 1)[0] for key in under))


def _same_keys(current: Any, loaded: Any) -> bool:
    return not isinstance(current, Mapping) or (
        isinstance(loaded, Mapping) and set(current) == set(loaded)
    )
