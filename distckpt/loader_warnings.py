"""A warning at the save of a data loader whose next epoch a resume would shuffle differently.

``StatefulDataLoader(data, shuffle=True, generator=g)`` gives its sampler the loader's own
generator. With ``num_workers=0``, torchdata's state holds that generator as it stood when the
epoch began, and a resumed loader redraws the epoch's order from it without the seed its
iterator drew after the order: the generator ends one draw short of the uninterrupted run's,
and the next epoch is shuffled differently (README, "Exact resume: the data", rule 2). Told
apart by public attributes only (``num_workers``, ``generator``, ``sampler``), so that any
loader built that way is caught, not only torchdata's: a plain ``DataLoader`` built so is
warned about too, and the remedy names both (README rule 3: it has no position to save).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from distckpt.model_state_keys import found_in_state

logger = logging.getLogger("distckpt")


#: values that are never a data loader nor hold one: the walk neither asks them for
#: attributes nor looks into them, so that a state of many tensors costs little at each save
_NOT_LOADERS = (torch.Tensor, str, bytes, int, float, bool, type(None))


def _sampler_shares_the_generator(value: Any) -> bool:
    """Whether ``value`` is a single-process data loader whose sampler draws from the loader's
    own generator; ``False`` for a value whose attribute lookups raise."""
    try:
        generator = getattr(value, "generator", None)
        if not isinstance(generator, torch.Generator) or getattr(value, "num_workers", None) != 0:
            return False
        return getattr(getattr(value, "sampler", None), "generator", None) is generator
    except Exception:
        # Any user object can sit in a state, and its property or __getattr__ may raise
        # anything (not only AttributeError); a warning's check must never fail the save.
        return False


def loaders_sharing_their_generator(state: Any) -> list[str]:
    """The dotted keys in ``state`` (a save's live state) of the data loaders that
    :func:`_sampler_shares_the_generator` finds; tensors and plain scalars are skipped."""

    def key_if_sharing(value: Any, path: str) -> list[str] | None:
        if isinstance(value, _NOT_LOADERS):
            return []
        return [path or "state"] if _sampler_shares_the_generator(value) else None

    return found_in_state(state, key_if_sharing)


class SharedGeneratorLoaderWarning:
    """Warns once per manager (a WARNING of the ``distckpt`` logger), at the first save holding
    a loader :func:`loaders_sharing_their_generator` finds, naming its key and the remedy."""

    def __init__(self) -> None:
        self._warned = False

    def check(self, state: Any) -> None:
        if self._warned:
            return
        keys = loaders_sharing_their_generator(state)
        if not keys:
            return
        self._warned = True
        logger.warning(
            "%s: a data loader with num_workers=0 whose sampler draws from the loader's own "
            "generator (shuffle=True with generator=): after a resume its next epoch is "
            "shuffled differently. Use a torchdata StatefulDataLoader (a plain DataLoader has "
            "no position to save) with sampler=torchdata.stateful_dataloader.sampler."
            "RandomSampler(data, generator=torch.Generator().manual_seed(seed)) instead of "
            "shuffle=True",
            ", ".join(keys),
        )
