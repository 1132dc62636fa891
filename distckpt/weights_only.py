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
import sys
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from distckpt.per_rank import PerRank

logger = logging.getLogger("distckpt")

#: The types whose values pickle without naming any global: a state of only these (in dicts,
#: lists and tuples), plain tensors and None needs no look at its pickle.
_PLAIN_TYPES: frozenset[type] = frozenset({int, float, str, bytes, bool, type(None)})


def unusual_values(state: Any) -> dict[Hashable, Any]:
    """What in ``state`` could make its pickle name a global, one value per kind (the first met):
    each value (or dict key) that is neither of :data:`_PLAIN_TYPES` nor a dict, OrderedDict,
    list, tuple or plain tensor (taken as it is), the class of a named tuple or of a tensor
    subclass (not its data: a DTensor's shard would be pickled again for nothing). Its pickle
    names the globals the state's pickle names.

    The kind of a value is its type; of a class (a named tuple's, a subclass's), the class; of
    a NumPy array, its type and dtype, and it stands as a slice of its first element, which names
    the same globals without the rest of its data (an array of objects: its first item only). A
    value of any other type stands for all of its type (a set of NumPy scalars met after a set
    of ints is not looked at again): values of one type name the same globals but for such
    holders of values, which a state seldom holds."""
    found: dict[Hashable, Any] = {}
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
            found.setdefault(kind, kind)
            pending.extend(value)
        elif isinstance(value, torch.Tensor):  # a subclass: torch.save names its class
            found.setdefault(kind, kind)
        elif isinstance(value, type):  # a class saved as a value: its pickle names it
            found.setdefault(value, value)
        elif _is_numpy_array(value):
            # One element at most: an empty slice's pickle would name builtins.bytes besides,
            # and indexing a 0-d array (one element already) gives a NumPy scalar.
            first = value[(slice(0, 1),) * value.ndim] if value.ndim else value
            found.setdefault((kind, value.dtype), first)
        else:  # any other value (another mapping too) is pickled whole
            found.setdefault(kind, value)
    return found


def _is_numpy_array(value: Any) -> bool:
    """Whether ``value`` is a NumPy array, without importing NumPy for a state that has none."""
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, numpy.ndarray)


def refused_globals(values: Sequence[Any]) -> tuple[frozenset[str], int]:
    """The globals (``module.name``) that ``torch.save(values)`` names and that
    ``torch.load(weights_only=True)`` refuses, as torch itself tells them apart (its default
    allow-list and what ``torch.serialization.add_safe_globals`` added), and the bytes of that
    pickle."""
    pickled = io.BytesIO()
    torch.save(list(values), pickled)
    size = pickled.tell()
    pickled.seek(0)
    return frozenset(torch.serialization.get_unsafe_globals_in_checkpoint(pickled)), size


class RefusedValuesWarning:
    """Warns once (a WARNING of the ``distckpt`` logger) per distinct set of refused globals a
    saved state holds (:func:`refused_globals`); one per manager, shared by its saves (sync
    ones in the caller's thread, async ones in the background thread).

    Each kind of value (:func:`unusual_values`) is pickled once per manager, as one small
    value, and a set of kinds already judged is not looked at again: a save repeats the last
    one's kinds, and pickling its values again (a NumPy array's data included) cost seconds and
    a copy of them in memory at every save."""

    def __init__(self) -> None:
        self._warned: set[frozenset[str]] = set()
        #: the refused globals of each kind of value pickled so far (no value is kept)
        self._refused_by_kind: dict[Hashable, frozenset[str]] = {}
        #: the sets of kinds whose states were looked at already
        self._judged: set[frozenset[Hashable]] = set()
        #: how many values were pickled to tell their globals, and their pickles' bytes
        self.pickled_values = 0
        self.pickled_bytes = 0
        self._lock = threading.Lock()

    def check(self, state: Any) -> None:
        """Look at ``state`` (plain data, as the format writes it) and warn if a default restore
        would refuse some of it. Never raises: a value that cannot be pickled at all fails the
        format's write, which says so."""
        values = unusual_values(state)
        if not values:
            return
        kinds = frozenset(values)
        with self._lock:
            if kinds in self._judged:
                return
            for kind in kinds - self._refused_by_kind.keys():
                self._refused_by_kind[kind] = self._refused_globals_of(values[kind])
            self._judged.add(kinds)
            refused = frozenset().union(*(self._refused_by_kind[kind] for kind in kinds))
            if not refused or refused in self._warned:
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

    def _refused_globals_of(self, value: Any) -> frozenset[str]:
        """:func:`refused_globals` of one value, counted in :attr:`pickled_values` and
        :attr:`pickled_bytes`; none for a value that cannot be pickled (the write reports it)."""
        try:
            refused, size = refused_globals([value])
        except Exception:  # the write itself reports a value that cannot be pickled
            return frozenset()
        self.pickled_values += 1
        self.pickled_bytes += size
        return refused
