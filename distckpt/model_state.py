"""``ModelOptimizerState``: a model and its optimizer(s) as one Stateful value, keyed by
parameter name through torch's ``get_state_dict`` / ``set_state_dict``, so a "dcp" checkpoint
reshards. Importing this module imports ``torch.distributed.checkpoint`` (about 0.6 s), which is
why ``distckpt.ModelOptimizerState`` is resolved only on first use.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from distckpt.errors import InvalidArgument
from distckpt.model_state_keys import group_params, saved_param_states
from distckpt.steps import steps_not_counted

__all__ = ["ModelOptimizerState"]

logger = logging.getLogger("distckpt")


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
    ``get_state_dict`` / ``set_state_dict``, but for its ``strict`` on a restore: there the
    restore's own ``strict`` decides for every key, this object's too, and is passed on to
    ``set_state_dict`` (see :meth:`load_state_dict`). So ``options.strict=False`` in a restore
    with ``strict=True`` loads as usual when the keys match, and a key on one side only is
    refused as any other is (:class:`~distckpt.errors.KeyMismatch`); ``options.strict`` applies
    to a ``load_state_dict`` called with no ``strict``. A parameter group's settings are
    compared as keys (another optimizer class has others), but for those an LR scheduler adds
    (``initial_lr``; :data:`~distckpt.model_state_keys.SCHEDULER_GROUP_KEYS`): the optimizer
    takes the saved ones wholesale, so a scheduler built after the restore finds the ones it
    saved. A restore refuses a changed number of groups or a parameter moved between groups
    whatever ``strict`` is (:class:`~distckpt.errors.KeyMismatch`): torch loads groups by
    position.

    ``get_state_dict`` / ``set_state_dict`` create the state of an optimizer that has none
    (one that has never stepped, or plain SGD without momentum, whose state stays empty) by one
    step with zero gradients and a zero learning rate, at every save and restore. That step is
    taken inside :func:`distckpt.steps.steps_not_counted`, so a :class:`~distckpt.StepTracker`
    does not count it, wherever the tracker sits in the state: its count is the real training
    steps only. A restore asks for its template through :meth:`template_state_dict`, which
    leaves an optimizer without state as it was; a parameter whose weights the checkpoint holds
    without optimizer state (a head no loss reached before the save) is then not expected to
    have any, and has none after the load (see :meth:`load_state_dict`).

    Several optimizers (a list) are saved as one ``optim`` part, their groups one after the
    other, and each is loaded its own groups and state (:func:`optimizer_parts`).

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
        #: the names of the parameters whose optimizer state the last
        #: :meth:`template_state_dict` found only made by torch's creating step
        self.made_by_init: frozenset[str] = frozenset()

    def state_dict(self) -> dict[str, Any]:
        if not self.optimizers:
            return {"model": get_model_state_dict(self.model, options=self.options)}
        # The step torch may take here to create an empty optimizer state is no training step.
        with steps_not_counted():
            model_state, optim_state = get_state_dict(
                self.model, self.optimizers, options=self.options
            )
        return {"model": model_state, "optim": optim_state}

    def template_state_dict(self) -> dict[str, Any]:
        """:meth:`state_dict` asked by a restore, which only reads it (its keys, a template to
        load into): the optimizers are left as they were, an optimizer without state too, and
        the parameters whose state only torch's step creating it holds are recorded in
        :attr:`made_by_init` (their state is not expected from a checkpoint)."""
        stateless = [optimizer for optimizer in self.optimizers if not optimizer.state]
        fresh = self._stateless_param_ids()
        state = self.state_dict()
        for optimizer in stateless:
            # The state the creating step made is in ``state`` (a template to load into); the
            # optimizer keeps none, so that a load leaves none where the checkpoint has none.
            optimizer.state.clear()
        names = self._param_names(state.get("optim"))
        self.made_by_init = frozenset(name for name, param in names.items() if id(param) in fresh)
        return state

    def _stateless_param_ids(self) -> set[int]:
        """The ids of the parameters of the optimizers that have no state yet (fresh ones)."""
        return {
            id(param)
            for optimizer in self.optimizers
            if not optimizer.state
            for group in optimizer.param_groups
            for param in group["params"]
        }

    def _param_names(self, optim_state: Any) -> dict[str, torch.nn.Parameter]:
        """The optimizers' parameters by the name ``optim_state`` (``get_optimizer_state_dict``'s
        result for them) gives each: its groups list the names in the order of the
        optimizers' groups and parameters. A parameter tied under two names is named once, as
        torch keys its optimizer state (wrapper prefixes such as DDP's ``module.`` left out)."""
        groups = optim_state.get("param_groups") if isinstance(optim_state, Mapping) else None
        if not isinstance(groups, list):
            return {}
        names = [name for group in groups for name in group.get("params", [])]
        params = [
            param
            for optimizer in self.optimizers
            for group in optimizer.param_groups
            for param in group["params"]
        ]
        return dict(zip(names, params))

    def load_state_dict(self, state: Mapping[str, Any], strict: bool | None = None) -> None:
        """Load ``state`` (as :meth:`state_dict` gives it) through ``set_state_dict``, each
        optimizer given its own part (:func:`optimizer_parts`), the model last.

        ``strict`` (None: ``options.strict``, True without options) is passed to
        ``set_state_dict``. With ``strict=False`` what ``state`` lacks keeps its current
        value: the model's missing keys are left alone, and the optimizer's state, parameter
        group settings or whole optimizer part missing from ``state`` are filled in from the
        optimizer's current state dict before it is loaded (torch's optimizer needs every
        group's settings). With ``strict=True`` ``state`` must have exactly the keys
        ``{"model", "optim"}`` (``{"model"}`` without an optimizer). A state that does not fit
        raises :class:`~distckpt.errors.InvalidArgument` with torch's whole message (the keys
        it names); torch loads the optimizer before the model, and either may be partly loaded
        by then: a restore checks the keys before loading, so it only meets this for what its
        check cannot see. A parameter of an optimizer without state (a fresh one) that
        ``state`` has no optimizer state for (an unused head when saved) has none after the
        load either, whatever ``strict`` is, as in the run that saved it: torch's step creating
        the state gives it some, which is removed once loaded; one INFO line of the
        ``distckpt`` logger names these parameters.
        """
        if strict is None:
            strict = self.options.strict if self.options is not None else True
        expected = {"model", "optim"} if self.optimizers else {"model"}
        if not isinstance(state, Mapping) or (strict and set(state) != expected):
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise InvalidArgument(
                f"ModelOptimizerState expects a state dict with keys {sorted(expected)}, got "
                f"{got}: save and restore with the same model/optimizer arrangement"
            )
        options = dataclasses.replace(self.options or StateDictOptions(), strict=strict)
        try:
            if self.optimizers:
                # As in state_dict(): a tracker restored before this must keep its count.
                with steps_not_counted():
                    optim_state = state.get("optim", {})
                    saved = saved_param_states(optim_state)
                    fresh = self._stateless_param_ids()
                    current = (
                        get_optimizer_state_dict(self.model, self.optimizers, options=options)
                        if fresh or not strict
                        else {}
                    )
                    unsaved = {
                        name: param
                        for name, param in self._param_names(current).items()
                        if id(param) in fresh and name not in saved
                    }
                    if not strict or unsaved:
                        # torch refuses a parameter without state under strict: it is given
                        # the state its creating step made, removed once loaded
                        made = current.get("state", {})
                        filled = {name: made[name] for name in unsaved if name in made}
                        if isinstance(optim_state, Mapping):
                            optim_state = {**optim_state, "state": {**saved, **filled}}
                        if not strict:
                            optim_state = with_current_values(optim_state, current)
                    parts = optimizer_parts(optim_state, self.optimizers)
                    # Each optimizer gets its own part, the model loaded last, as torch does.
                    for optimizer, part in zip(self.optimizers[:-1], parts):
                        set_optimizer_state_dict(self.model, optimizer, part, options=options)
                    set_state_dict(
                        self.model,
                        self.optimizers[-1],
                        model_state_dict=state.get("model", {}),
                        optim_state_dict=parts[-1],
                        options=options,
                    )
                    for param in unsaved.values():
                        for optimizer in self.optimizers:
                            optimizer.state.pop(param, None)
                    if unsaved:
                        logger.info(
                            "restored without optimizer state (the checkpoint has none): %s",
                            ", ".join(sorted(unsaved)),
                        )
            else:
                set_model_state_dict(self.model, state.get("model", {}), options=options)
        except (RuntimeError, KeyError, ValueError) as exc:
            # torch reports missing/unexpected keys and shape mismatches this way, the keys on
            # the lines after the first: the whole message is kept.
            raise InvalidArgument(
                f"the checkpoint does not fit this model/optimizer: {type(exc).__name__}: {exc}"
            ) from exc

    def __repr__(self) -> str:
        return (
            f"ModelOptimizerState({type(self.model).__name__}, {len(self.optimizers)} optimizer(s))"
        )


def with_current_values(loaded: Any, current: Any) -> Any:
    """``loaded`` (part of a saved state dict), with what it lacks taken from ``current`` (the
    live one): a key of a dict only in ``current`` is added with its value, dicts present on
    both sides are merged the same way, and a list of dicts (an optimizer's parameter groups)
    is merged item by item, ``current``'s extra items added (a restore has refused groups
    that differ in number or membership first). Anything else is ``loaded``'s.
    Copies the dicts and lists it merges, not the values."""
    if isinstance(loaded, Mapping) and isinstance(current, Mapping):
        merged = dict(loaded)
        for key, value in current.items():
            merged[key] = with_current_values(loaded[key], value) if key in loaded else value
        return merged
    if (
        isinstance(loaded, list)
        and isinstance(current, list)
        and all(isinstance(item, Mapping) for item in (*loaded, *current))
    ):
        merged_items = [with_current_values(a, b) for a, b in zip(loaded, current)]
        return merged_items + list(current[len(loaded) :])
    return loaded


def optimizer_parts(optim_state: Any, optimizers: tuple[torch.optim.Optimizer, ...]) -> list[Any]:
    """``optim_state`` (the ``optim`` part of :meth:`ModelOptimizerState.state_dict`, every
    optimizer's merged) split into one part per optimizer, as ``set_state_dict`` needs it
    given one optimizer at a time: each optimizer's parameter groups, by position
    (``get_state_dict`` lists them optimizer after optimizer), and the per-parameter state
    but the entries of the other optimizers' groups' parameters. Given them all at once,
    torch's ``_split_optim_state_dict`` takes a ``state`` with no entry for a whole
    ``{"state", "param_groups"}`` (its ``all(isinstance(k, int) ...)`` test holds for no
    keys), so with several optimizers that all have an empty state (plain SGD) each is given
    every group and refuses them ("a different number of parameter groups"); and under
    ``strict`` it refuses a parameter without state (plain SGD beside Adam) unless its
    optimizer's part has no state at all. A state whose groups do not add up to the
    optimizers' is given whole to each, for torch to refuse as it would."""
    groups = optim_state.get("param_groups") if isinstance(optim_state, Mapping) else None
    counts = [len(optimizer.param_groups) for optimizer in optimizers]
    if len(optimizers) == 1 or not isinstance(groups, list) or len(groups) != sum(counts):
        return [optim_state] * len(optimizers)
    starts = [sum(counts[:index]) for index in range(len(counts))]
    slices = [groups[start : start + count] for start, count in zip(starts, counts)]
    owners = [
        {name for at in range(len(part)) for name in group_params(part, at)} for part in slices
    ]
    state = optim_state.get("state", {})
    parts = []
    for index, part_groups in enumerate(slices):
        others = set().union(*(names for other, names in enumerate(owners) if other != index))
        own_state = {name: entry for name, entry in state.items() if name not in others}
        parts.append({**optim_state, "state": own_state, "param_groups": part_groups})
    return parts
