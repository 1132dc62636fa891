"""What the "dcp" format refuses to save, checked before DCP's collective write starts: a state
that is no dict with string top-level keys, keys that would not come back as saved, per-rank
values holding DTensors, tensor types DCP would write wrongly, an optimizer state keyed by
parameter number (see :mod:`distckpt.formats.dcp`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from distckpt.errors import InvalidArgument
from distckpt.formats.dcp_keys import dotted
from distckpt.formats.dcp_per_rank import PER_RANK_KEY, split_per_rank
from distckpt.formats.dcp_tensor_kinds import check_tensor_types
from distckpt.formats.dcp_text_keys import check_restorable_keys, holds_containers
from distckpt.state import dtensor_type

__all__ = ["check_keys", "check_saveable"]


def _find_id_keyed_optimizer(state: Any, path: str = "") -> str | None:
    """The key of a value that looks like ``optimizer.state_dict()`` (parameters numbered), if
    any: DCP would save it, but a fresh optimizer has no state tensors to load it back into."""
    if isinstance(state, Mapping):
        groups = state.get("param_groups")
        if (
            set(state) == {"state", "param_groups"}
            and isinstance(groups, list)
            and any(
                isinstance(group, Mapping)
                and any(isinstance(p, int) for p in group.get("params", ()))
                for group in groups
            )
        ):
            return path or "<top level>"
        for key, value in state.items():
            found = _find_id_keyed_optimizer(value, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    elif isinstance(state, (list, tuple)) and holds_containers(state):
        for index, value in enumerate(state):
            found = _find_id_keyed_optimizer(value, f"{path}.{index}" if path else str(index))
            if found is not None:
                return found
    return None


def check_saveable(state: Any) -> None:
    """Refuse (:class:`InvalidArgument`) a state the "dcp" format would save wrongly or not
    restore: see :mod:`distckpt.formats.dcp` for what it saves."""
    check_keys(state, "saves")
    check_restorable_keys(state)
    if PER_RANK_KEY in state:
        raise InvalidArgument(
            f"the top-level key {PER_RANK_KEY!r} is where the 'dcp' format keeps per-rank "
            "values; rename yours"
        )
    dtensor = dtensor_type()
    _, marked = split_per_rank(state)
    sharded = [dotted(path) for path, value in marked if _holds(value, dtensor)]
    if sharded:
        raise InvalidArgument(
            f"{', '.join(sharded)}: marked per rank but holds DTensors, which are sharded "
            "across the ranks already; leave them unmarked"
        )
    check_tensor_types(state, dtensor)
    optimizer_key = _find_id_keyed_optimizer(state)
    if optimizer_key is not None:
        raise InvalidArgument(
            f"{optimizer_key!r} looks like optimizer.state_dict(), keyed by parameter number: "
            "the 'dcp' format needs the optimizer state keyed by parameter name, or a resume "
            "into a fresh optimizer would silently drop it. Save "
            "ModelOptimizerState(model, optimizer) (from distckpt.formats.dcp) instead of the "
            "model and the optimizer"
        )


def _holds(value: Any, kind: type | None) -> bool:
    """Whether ``value`` is or contains (in dicts, lists, tuples) an instance of ``kind``."""
    if kind is None:
        return False
    if isinstance(value, kind):
        return True
    if isinstance(value, Mapping):
        return any(_holds(item, kind) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds(item, kind) for item in value)
    return False


def check_keys(state: Any, what: str) -> None:
    """Refuse (:class:`InvalidArgument`) a ``state`` the "dcp" format ``what`` (saves,
    restores into) that is no dict with string keys at the top level."""
    if not isinstance(state, Mapping):
        raise InvalidArgument(
            f"the 'dcp' format {what} a dict at the top level, not a {type(state).__name__}"
        )
    bad = [key for key in state if not isinstance(key, str)]
    if bad:
        raise InvalidArgument(f"the 'dcp' format needs string top-level keys, got {bad!r}")
