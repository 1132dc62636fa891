"""``ModelOptimizerState``: a model and its optimizer(s) as one Stateful value, keyed by
parameter name through torch's ``get_state_dict`` / ``set_state_dict``, so a "dcp" checkpoint
reshards. Importing this module imports ``torch.distributed.checkpoint`` (about 0.6 s), which is
why ``distckpt.ModelOptimizerState`` is resolved only on first use.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from distckpt.errors import InvalidArgument, describe_error
from distckpt.steps import steps_not_counted

__all__ = ["ModelOptimizerState"]


class ModelOptimizerState:
    """A model and its optimizer(s) as one Stateful object whose state dict DCP can reshard.

    ``state_dict()`` is ``{"model": ..., "optim": ...}`` from
    ``torch.distributed.checkpoint.state_dict.get_state_dict``: FQN-keyed (the optimizer state
    is keyed by parameter name, not by parameter number), with the DTensors of an FSDP2 model
    and of its optimizer state left sharded. ``load_state_dict`` goes through
    ``set_state_dict``. Put it in the state given to ``save`` and ``restore`` on every rank::

        state = {"app": ModelOptimizerState(model, optimizer), "steps": tracker}
        mgr.restore("last", state=state, missing_ok=True)
        ...
        mgr.save(step, state)

    Without an optimizer the state dict is ``{"model": ...}`` only. ``options`` is passed to
    ``get_state_dict`` / ``set_state_dict`` unchanged (its ``strict`` decides whether missing or
    unexpected keys raise on load).

    ``get_state_dict`` / ``set_state_dict`` create the state of an optimizer that has none
    (one that has never stepped, or plain SGD without momentum, whose state stays empty) by one
    step with zero gradients and a zero learning rate, at every save and restore. That step is
    taken inside :func:`distckpt.steps.steps_not_counted`, so a :class:`~distckpt.StepTracker`
    does not count it, wherever the tracker sits in the state: its count is the real training
    steps only.

    Limits: calling ``state_dict()`` on an FSDP2 model is collective when ``options`` asks for
    full state dicts, so every rank must use it together (as ``save`` and ``restore`` do).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
        *,
        options: StateDictOptions | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise InvalidArgument(f"model must be a torch.nn.Module, not {type(model).__name__}")
        if optimizer is None:
            optimizers: tuple[torch.optim.Optimizer, ...] = ()
        elif isinstance(optimizer, torch.optim.Optimizer):
            optimizers = (optimizer,)
        else:
            optimizers = tuple(optimizer)
        for index, opt in enumerate(optimizers):
            if not isinstance(opt, torch.optim.Optimizer):
                raise InvalidArgument(
                    f"optimizer {index} must be a torch.optim.Optimizer, not {type(opt).__name__}"
                )
        self.model = model
        self.optimizers = optimizers
        self.options = options

    def state_dict(self) -> dict[str, Any]:
        if not self.optimizers:
            return {"model": get_model_state_dict(self.model, options=self.options)}
        # The step torch may take here to create an empty optimizer state is no training step.
        with steps_not_counted():
            model_state, optim_state = get_state_dict(
                self.model, self.optimizers, options=self.options
            )
        return {"model": model_state, "optim": optim_state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {"model", "optim"} if self.optimizers else {"model"}
        if not isinstance(state, Mapping) or set(state) != expected:
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise InvalidArgument(
                f"ModelOptimizerState expects a state dict with keys {sorted(expected)}, got "
                f"{got}: save and restore with the same model/optimizer arrangement"
            )
        try:
            if self.optimizers:
                # As in state_dict(): a tracker restored before this must keep its count.
                with steps_not_counted():
                    set_state_dict(
                        self.model,
                        self.optimizers,
                        model_state_dict=state["model"],
                        optim_state_dict=state["optim"],
                        options=self.options,
                    )
            else:
                set_model_state_dict(self.model, state["model"], options=self.options)
        except (RuntimeError, KeyError, ValueError) as exc:
            # torch reports missing/unexpected keys and shape mismatches this way.
            raise InvalidArgument(
                f"the checkpoint does not fit this model/optimizer: {describe_error(exc)}"
            ) from exc

    def __repr__(self) -> str:
        return (
            f"ModelOptimizerState({type(self.model).__name__}, {len(self.optimizers)} optimizer(s))"
        )
