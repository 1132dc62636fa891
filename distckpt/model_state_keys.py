"""What a restore needs to know of a :class:`~distckpt.ModelOptimizerState` without importing
it (its module imports ``torch.distributed.checkpoint``, about 0.6 s, which a job that never
uses one should not pay): whether a value is one, and which of its keys a restore compares
with a checkpoint's.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

from distckpt.per_rank import PerRank

#: what a walk of :func:`found_in_state` collects
Found = TypeVar("Found")


def join_key(prefix: str, key: object) -> str:
    """``key``'s dotted place inside ``prefix`` (``""``: the top level)."""
    return f"{prefix}.{key}" if prefix else str(key)


def without_unsaved_init_state(current: Any, saved: Any, made_by_init: Collection[str]) -> Any:
    """``current`` (a ModelOptimizerState's template state dict) without the optimizer state of
    the parameters named in ``made_by_init`` (whose state only torch's step creating it made:
    ``ModelOptimizerState.made_by_init``) that ``saved`` (the checkpoint's) has the weights of
    but no optimizer state for, so that a restore does not expect what the saving run never had
    (an unused head's)."""
    optim = current.get("optim") if isinstance(current, Mapping) else None
    state = optim.get("state") if isinstance(optim, Mapping) else None
    if not made_by_init or not isinstance(state, Mapping):
        return current
    saved_optim = saved.get("optim") if isinstance(saved, Mapping) else None
    held = saved_param_states(saved_optim)
    listed = saved_optim.get("state") if isinstance(saved_optim, Mapping) else None
    saved_model = saved.get("model") if isinstance(saved, Mapping) else None
    kept: dict[str, Any] = {}
    for name, value in state.items():
        # a parameter the saving run lacked (one added since) is missing as before
        unsaved_param = not (isinstance(saved_model, Mapping) and name in saved_model)
        if name not in made_by_init or name in held or unsaved_param:
            kept[name] = value
        elif isinstance(listed, Mapping) and name in listed:
            kept[name] = {}  # the empty dict a "dcp" read leaves: nothing expected under it
    return {**current, "optim": {**optim, "state": kept}}


def saved_param_states(optim_state: Any) -> dict[str, Any]:
    """The parameters' entries of ``optim_state`` (an optimizer state dict keyed by parameter
    name) that hold something: a "dcp" read leaves an empty dict where the checkpoint has
    nothing of a parameter whose state the template has."""
    state = optim_state.get("state") if isinstance(optim_state, Mapping) else None
    if not isinstance(state, Mapping):
        return {}
    return {
        name: value
        for name, value in state.items()
        if not (isinstance(value, Mapping) and not value)
    }


def found_in_state(
    state: Any, find: Callable[[Any, str], list[Found] | None], path: str = ""
) -> list[Found]:
    """What ``find`` (given a value and its dotted place) answers for the values of ``state``
    it answers for (not ``None``), those not looked into further; the others are looked into
    through a :class:`~distckpt.PerRank`'s value, a mapping's values and a list's or tuple's
    items."""
    answer = find(state, path)
    if answer is not None:
        return answer
    if isinstance(state, PerRank):
        return found_in_state(state.value, find, path)
    if isinstance(state, Mapping):
        items: Any = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return []
    return [
        found for key, value in items for found in found_in_state(value, find, join_key(path, key))
    ]


def init_state_places(template: Any) -> list[tuple[str, str]]:
    """The dotted places, in a restore's ``template``, of the optimizer state each
    ModelOptimizerState in it has only from torch's step creating it (its ``made_by_init``,
    as its last ``template_state_dict`` found), each with the place of its parameter's
    weights: a checkpoint that holds the weights but not that state lacks nothing."""
    kind = model_optimizer_state_type()

    def places(value: Any, path: str) -> list[tuple[str, str]] | None:
        if kind is None or not isinstance(value, kind):
            return None
        return [
            (join_key(path, f"optim.state.{name}"), join_key(path, f"model.{name}"))
            for name in sorted(value.made_by_init)
        ]

    return found_in_state(template, places)


def model_optimizer_state_type() -> type | None:
    """:class:`~distckpt.ModelOptimizerState` if its module is loaded: an instance can only
    exist once it is, and importing it imports ``torch.distributed.checkpoint``."""
    module = sys.modules.get("distckpt.model_state")
    return getattr(module, "ModelOptimizerState", None)


#: The keys ``torch.optim.lr_scheduler`` writes into an optimizer's parameter groups beside the
#: optimizer's own settings: ``initial_lr`` (every scheduler), and OneCycleLR's and CyclicLR's
#: ``max_lr``, ``min_lr``, ``base_momentum`` and ``max_momentum``. A checkpoint saved with a
#: scheduler holds them, a group built before the scheduler lacks them, so a restore does not
#: compare them (and the "dcp" format reads the saved ones into a group that lacks them).
SCHEDULER_GROUP_KEYS = frozenset(
    {"initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum"}
)


def without_scheduler_settings(state: Any) -> Any:
    """A ModelOptimizerState's state dict with each parameter group's ``params`` and the
    settings an LR scheduler adds (:data:`SCHEDULER_GROUP_KEYS`) left out, so that a comparison
    of keys counts the groups and compares the optimizer's own settings (another optimizer
    class has others) and its per-parameter state (under ``optim.state``). ``params`` (the
    names of a group's parameters, whose state is compared under ``optim.state``) differ
    whenever a parameter is added or removed; which group holds which parameter is
    :func:`param_group_changes`' business."""
    groups = _param_groups(state)
    if groups is None:
        return state
    bare = [
        {k: v for k, v in group.items() if k != "params" and k not in SCHEDULER_GROUP_KEYS}
        if isinstance(group, Mapping)
        else group
        for group in groups
    ]
    return {**state, "optim": {**state["optim"], "param_groups": bare}}


def param_group_changes(current: Any, saved: Any) -> list[tuple[int, list[str], list[str]]]:
    """The parameter groups that cannot be loaded from ``saved`` (the checkpoint's state dict
    of a ModelOptimizerState) into ``current`` (the given one's), as (the group's index, its
    saved parameter names, its current ones): every group when their number differs, else
    each group holding a parameter that the other side has in another group. torch's
    optimizer loads groups by position, so neither loads, with ``strict`` or not. A parameter
    on one side only is no change of groups (its state is a key on one side only)."""
    current_groups = _param_groups(current) or []
    saved_groups = _param_groups(saved) or []
    saved_names = [group_params(saved_groups, index) for index in range(len(saved_groups))]
    current_names = [group_params(current_groups, index) for index in range(len(current_groups))]
    if len(current_groups) == len(saved_groups):
        saved_group_of = {name: index for index, names in enumerate(saved_names) for name in names}
        moved: set[int] = set()
        for index, names in enumerate(current_names):
            for name in names:
                saved_index = saved_group_of.get(name, index)
                if saved_index != index:
                    moved |= {index, saved_index}
    else:
        moved = set(range(max(len(current_groups), len(saved_groups))))
    return [
        (index, group_params(saved_groups, index), group_params(current_groups, index))
        for index in sorted(moved)
    ]


def _param_groups(state: Any) -> list[Any] | None:
    optim = state.get("optim") if isinstance(state, Mapping) else None
    groups = optim.get("param_groups") if isinstance(optim, Mapping) else None
    return groups if isinstance(groups, list) else None


def group_params(groups: list[Any], index: int) -> list[str]:
    """The names of the parameters of ``groups[index]`` (a state dict's parameter groups), as
    text; none when there is no such group or it names none."""
    group = groups[index] if index < len(groups) else None
    params = group.get("params") if isinstance(group, Mapping) else None
    return [str(name) for name in params] if isinstance(params, (list, tuple)) else []
