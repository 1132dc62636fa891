"""What a restore needs to know of a :class:`~distckpt.ModelOptimizerState` without importing
it (its module imports ``torch.distributed.checkpoint``, about 0.6 s, which a job that never
uses one should not pay): whether a value is one, which of its keys a restore compares with a
checkpoint's, and whether its own ``strict`` contradicts the restore's.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from distckpt.errors import InvalidArgument
from distckpt.per_rank import PerRank


def join_key(prefix: str, key: object) -> str:
    """``key``'s dotted place inside ``prefix`` (``""``: the top level)."""
    return f"{prefix}.{key}" if prefix else str(key)


def model_optimizer_state_type() -> type | None:
    """:class:`~distckpt.ModelOptimizerState` if its module is loaded: an instance can only
    exist once it is, and importing it imports ``torch.distributed.checkpoint``."""
    module = sys.modules.get("distckpt.model_state")
    return getattr(module, "ModelOptimizerState", None)


def check_strict_options(template: Any, *, strict: bool, path: str = "") -> None:
    """Refuse a :class:`~distckpt.ModelOptimizerState` of ``template`` whose own options say
    ``strict=False`` in a restore with ``strict=True``: the restore's ``strict`` decides for
    every key, and one asking for the other is refused before anything is read rather than
    one of them ignored."""
    kind = model_optimizer_state_type()
    if not strict or kind is None:
        return
    if isinstance(template, kind):
        if template.options is not None and not template.options.strict:
            raise InvalidArgument(
                f"{path or 'state'}: ModelOptimizerState(options=StateDictOptions(strict=False))"
                " given to a restore with strict=True; the restore's strict decides which keys"
                " must match: pass strict=False to the restore to load what matches"
            )
    elif isinstance(template, PerRank):
        check_strict_options(template.value, strict=strict, path=path)
    elif isinstance(template, Mapping):
        for key, value in template.items():
            check_strict_options(value, strict=strict, path=join_key(path, key))
    elif isinstance(template, (list, tuple)):
        for index, value in enumerate(template):
            check_strict_options(value, strict=strict, path=join_key(path, index))


def without_param_lists(state: Any) -> Any:
    """A ModelOptimizerState's state dict without each parameter group's ``params`` (the
    names of its parameters, whose state is compared under ``optim.state``): a list that
    differs whenever a parameter is added or removed, which is no key of its own."""
    optim = state.get("optim") if isinstance(state, Mapping) else None
    groups = optim.get("param_groups") if isinstance(optim, Mapping) else None
    if not isinstance(groups, list):
        return state
    bare = [
        {k: v for k, v in group.items() if k != "params"} if isinstance(group, Mapping) else group
        for group in groups
    ]
    return {**state, "optim": {**optim, "param_groups": bare}}
