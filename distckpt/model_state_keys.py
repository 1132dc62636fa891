"""What a restore needs to know of a :class:`~distckpt.ModelOptimizerState` without importing
it (its module imports ``torch.distributed.checkpoint``, about 0.6 s, which a job that never
uses one should not pay): whether a value is one, and which of its keys a restore compares
with a checkpoint's.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any


def join_key(prefix: str, key: object) -> str:
    """``key``'s dotted place inside ``prefix`` (``""``: the top level)."""
    return f"{prefix}.{key}" if prefix else str(key)


def model_optimizer_state_type() -> type | None:
    """:class:`~distckpt.ModelOptimizerState` if its module is loaded: an instance can only
    exist once it is, and importing it imports ``torch.distributed.checkpoint``."""
    module = sys.modules.get("distckpt.model_state")
    return getattr(module, "ModelOptimizerState", None)


def without_group_settings(state: Any) -> Any:
    """A ModelOptimizerState's state dict with each parameter group reduced to an empty dict,
    so that a comparison of keys counts the groups and compares the per-parameter state (under
    ``optim.state``) only. A group's settings are no keys to compare: an LR scheduler adds its
    own (``initial_lr``; OneCycleLR more) to every group, so a checkpoint saved with one holds
    settings that a group built before the scheduler lacks, and the optimizer's
    ``load_state_dict`` takes the saved settings wholesale, so nothing is lost. Its ``params``
    (the names of its parameters, whose state is compared under ``optim.state``) differ
    whenever a parameter is added or removed."""
    optim = state.get("optim") if isinstance(state, Mapping) else None
    groups = optim.get("param_groups") if isinstance(optim, Mapping) else None
    if not isinstance(groups, list):
        return state
    return {**state, "optim": {**optim, "param_groups": [{} for _ in groups]}}
