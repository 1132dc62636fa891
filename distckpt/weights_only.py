"""Values a save writes that a restore with the default ``allow_pickle=False`` would refuse.

A restore loads what was pickled as ``torch.load(weights_only=True)`` does, which refuses every
class and function not on torch's allow-list (a NumPy scalar or array, a named tuple, a
``range``, a tensor subclass). A save does not refuse them (a user who restores with
``allow_pickle=True`` relies on saving them), but finding out only when a requeued job resumes
is too late: :class:`RefusedValuesWarning` logs, at the save, which globals such values would
make a default restore refuse, and the ways out.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from distckpt.per_rank import PerRank

logger = logging.getLogger("distckpt")

#: The types whose values pickle without naming any global: a state of only these (in dicts,
#: lists and tuples), plain tensors and None needs no look at its pickle.
_PLAIN_TYPES: frozenset[type] = frozenset({int, float, str, bytes, bool, type(None)})


def unusual_values(state: Any) -> list[Any]:
    """What in ``state`` could make its pickle name a global: each value (or dict key) that is
    neither of :data:`_PLAIN_TYPES` nor a dict, OrderedDict, list, tuple or plain tensor (taken
    as it is), the class of a named tuple or of a tensor subclass (not its data: a DTensor's
    shard would be pickled again for nothing). Their pickle names the globals the state's
    pickle names."""
    found: list[Any] = []
    pending = [state]
    while pending:
        value = pending.pop()
        kind = type(value)
        if kind in _PLAIN_TYPES or kind is torch.Tensor:
            continue
        if isinstance(value, PerRank):
            pending.append(value.value)
        elif kind is dict or kind is OrderedDict:
            # torch allows OrderedDict; the _metadata of a module's holds plain values
            pending.extend(value.keys())
            pending.extend(value.values())
        elif kind is list or kind is tuple:
            # Told by the set of the items' types first: a long list of plain values (a
            # million token ids) costs no step of this loop per item.
            if not _PLAIN_TYPES.issuperset(set(map(type, value))):
                pending.extend(value)
        elif isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
            found.append(kind)
            pending.extend(value)
        elif isinstance(value, torch.Tensor):  # a subclass: torch.save names its class
            found.append(kind)
        else:  # any other value (another mapping too) is pickled whole
            found.append(value)
    return found


def refused_globals(values: Sequence[Any]) -> frozenset[str]:
    """The globals (``module.name``) that ``torch.save(values)`` names and that
    ``torch.load(weights_only=True)`` refuses, as torch itself tells them apart (its default
    allow-list and what ``torch.serialization.add_safe_globals`` added)."""
    pickled = io.BytesIO()
    torch.save(list(values), pickled)
    pickled.seek(0)
    return frozenset(torch.serialization.get_unsafe_globals_in_checkpoint(pickled))


class RefusedValuesWarning:
    """Warns once (a WARNING of the ``distckpt`` logger) per distinct set of refused globals a
    saved state holds (:func:`refused_globals`); one per manager, shared by its saves (sync
    ones in the caller's thread, async ones in the background thread)."""

    def __init__(self) -> None:
        self._warned: set[frozenset[str]] = set()
        self._lock = threading.Lock()

    def check(self, state: Any) -> None:
        """Look at ``state`` (plain data, as the format writes it) and warn if a default restore
        would refuse some of it. Never raises: a value that cannot be pickled at all fails the
        format's write, which says so."""
        values = unusual_values(state)
        if not values:
            return
        try:
            refused = refused_globals(values)
        except Exception:  # the write itself reports a value that cannot be pickled
            return
        if not refused:
            return
        with self._lock:
            if refused in self._warned:
                return
            self._warned.add(refused)
        names = ", ".join(sorted(refused))
        logger.warning(
            "this save holds values of %s, which a restore with the default "
            "allow_pickle=False refuses (it loads as torch.load(weights_only=True) does). "
            "Convert them to Python values or tensors (float(x) for a NumPy scalar, "
            "torch.from_numpy(a) for an array, tuple(t) for a named tuple), or allow them with "
            "torch.serialization.add_safe_globals([...]) before restoring, or restore with "
            "allow_pickle=True (trusted checkpoints only)",
            names,
        )
