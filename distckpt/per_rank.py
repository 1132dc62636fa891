"""Values that differ from rank to rank, and how a state marks them.

The "torch" format saves each rank's whole state, so every value is per rank there. The "dcp"
format saves everything that is not a DTensor once, as if every rank held the same value; a
value that differs between ranks (a rank's RNG state, its data-loader position) must be marked
so the format stores one copy per rank and hands each rank its own back. Marked are:

* values wrapped in :class:`PerRank` by the user;
* :class:`~distckpt.RNGState` (every rank draws its own random numbers: dropout masks);
* a ``torch.Generator`` (a sampler's, or any the ranks seed apart: its stream is the rank's);
* torchdata's ``StatefulDataLoader`` (every rank reads its own part of the data).

:func:`distckpt.state.to_plain` keeps the mark (a :class:`PerRank` around the plain value) for
formats that ask for it and drops it for the others.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from distckpt.rng import RNGState

__all__ = ["PerRank", "is_per_rank"]

# Modules defining loaders whose state is a rank's own position in the data; looked up, never
# imported (a job without torchdata must not pay for importing it).
_PER_RANK_LOADERS = (("torchdata.stateful_dataloader", "StatefulDataLoader"),)


class PerRank:
    """Marks ``value`` as different on every rank: a "dcp" checkpoint stores one copy per rank
    and restores each rank's own copy to the same rank (the "torch" format does so for every
    value anyway). ``value`` is anything a state may hold: a tensor, a plain value, or an object
    with ``state_dict()`` / ``load_state_dict()``::

        state = {"app": ModelOptimizerState(model, optim), "seen": PerRank(samples_seen)}

    Per-rank values cannot be resharded: restoring them with a different number of ranks than
    saved them raises :class:`~distckpt.WorldSizeMismatch` naming them (leave them out of
    ``state=`` to restore the rest). On restore, a plain value comes back in the result's
    ``.state`` at its place, unwrapped, and replaces the given mark's ``value``."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        if isinstance(value, PerRank):
            value = value.value
        self.value = value

    def __repr__(self) -> str:
        return f"PerRank({self.value!r})"


def _is_per_rank_loader(value: Any) -> bool:
    for module_name, class_name in _PER_RANK_LOADERS:
        module = sys.modules.get(module_name)
        loader_type = getattr(module, class_name, None) if module is not None else None
        if isinstance(loader_type, type) and isinstance(value, loader_type):
            return True
    return False


def is_per_rank(value: Any) -> bool:
    """Whether ``value`` differs per rank by its mark or by its nature (see the module doc)."""
    return isinstance(value, (PerRank, RNGState, torch.Generator)) or _is_per_rank_loader(value)


def unwrap(value: Any) -> Any:
    """The value inside a :class:`PerRank` mark; anything else as it is."""
    return value.value if isinstance(value, PerRank) else value
