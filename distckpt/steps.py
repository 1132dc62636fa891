"""Counting real optimizer steps, wherever ``optimizer.step()`` is called.

Frameworks keep their own step counters, and those can disagree with what actually happened: a
counter that only advances under automatic optimization never moves when the user steps the
optimizer by hand, so step-based checkpoints never fire; a counter bumped once per optimizer
counts a two-optimizer step twice. :class:`StepTracker` avoids both by counting the step itself,
through the optimizer's step post-hooks.

Not every ``optimizer.step()`` is a training step: torch's ``get_state_dict`` /
``set_state_dict`` create the state of an optimizer that has none (plain SGD without momentum
never has any) by one step with zero gradients and a zero learning rate. distckpt makes those
calls inside :func:`steps_not_counted`, and no tracker counts a step taken there.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from types import TracebackType
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from distckpt.errors import InvalidArgument

STEP_KEY = "step"
BY_OPTIMIZER_KEY = "by_optimizer"

#: True while the current thread is inside :func:`steps_not_counted`. A context variable, not a
#: global flag: each thread has its own value, so a real step the training thread takes while
#: another thread is inside the block is still counted.
_NOT_TRAINING: ContextVar[bool] = ContextVar("distckpt_steps_not_training", default=False)


@contextlib.contextmanager
def steps_not_counted() -> Iterator[None]:
    """A block of the current thread whose optimizer steps no :class:`StepTracker` counts.

    For calls that step an optimizer without training, as torch's ``get_state_dict`` /
    ``set_state_dict`` do to create the state of an optimizer that has none. Steps other
    threads take meanwhile are counted as usual. Blocks nest.
    """
    token = _NOT_TRAINING.set(True)
    try:
        yield
    finally:
        _NOT_TRAINING.reset(token)


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"{name} must be a non-negative int, got {value!r}")
    return value


class StepTracker:
    """Counts real optimizer steps, wherever ``optimizer.step()`` is called.

    Each completed ``optimizer.step()`` call counts once, whoever makes it: a training loop,
    manual optimization in a framework, a batch-end hook. Micro-batches of gradient
    accumulation that run ``backward()`` without stepping do not count, and neither does a step
    that raises or that is never called (for instance one ``torch.amp.GradScaler`` skips because
    of inf/NaN gradients), nor one taken inside :func:`steps_not_counted` in the same thread
    (the zero-learning-rate step torch takes to create an empty optimizer state when
    :class:`~distckpt.ModelOptimizerState` saves or restores it).

    With several optimizers, a training step is a step of the *first* one: :attr:`step` follows
    the first optimizer only, so stepping two optimizers per batch counts one step, not two.
    The others are counted separately, in :attr:`steps_by_optimizer`, for information only.

    The tracker is Stateful (:meth:`state_dict` / :meth:`load_state_dict`), so it can be saved in
    a checkpoint and restored on resume. It holds the hooks' handles but no reference to the
    optimizers; :meth:`close` (or leaving a ``with`` block) removes the hooks, after which the
    counts stay readable but no longer change.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, *more_optimizers: torch.optim.Optimizer
    ) -> None:
        optimizers = (optimizer, *more_optimizers)
        seen: set[int] = set()
        for index, opt in enumerate(optimizers):
            if not callable(getattr(opt, "register_step_post_hook", None)):
                raise InvalidArgument(
                    f"optimizer {index} must be a torch.optim.Optimizer, got {type(opt).__name__}"
                )
            # The same optimizer twice would count each step twice.
            if id(opt) in seen:
                raise InvalidArgument(f"optimizer {index} was given more than once")
            seen.add(id(opt))

        self._counts: list[int] = [0] * len(optimizers)
        self._handles: list[RemovableHandle] = []
        try:
            for index, opt in enumerate(optimizers):
                hook = functools.partial(self._on_step, index)
                self._handles.append(opt.register_step_post_hook(hook))
        except BaseException:
            # Leave no half-installed hooks behind.
            self.close()
            raise

    def _on_step(self, index: int, optimizer: object, args: object, kwargs: object) -> None:
        if _NOT_TRAINING.get():
            return
        self._counts[index] += 1

    @property
    def step(self) -> int:
        """Training steps taken: completed steps of the first optimizer, plus the restored
        count."""
        return self._counts[0]

    @property
    def steps_by_optimizer(self) -> tuple[int, ...]:
        """Each optimizer's own count of completed steps, in the order they were given."""
        return tuple(self._counts)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has removed the hooks."""
        return not self._handles

    def state_dict(self) -> dict[str, Any]:
        """``{"step": n, "by_optimizer": [n, m, ...]}``: plain ints, safe to save anywhere."""
        return {STEP_KEY: self._counts[0], BY_OPTIMIZER_KEY: list(self._counts)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the counts from :meth:`state_dict` output.

        ``"step"`` is required and must be a non-negative int. ``"by_optimizer"`` is optional;
        when present it must be a list of non-negative ints whose first entry equals
        ``"step"``. If it was saved with a different number of optimizers than this tracker
        has, only ``"step"`` is restored and the other optimizers' counts start from 0, so
        adding or dropping an optimizer does not block a resume. Raises InvalidArgument, and
        changes nothing, on invalid input.
        """
        if not isinstance(state, Mapping):
            raise InvalidArgument(f"StepTracker state must be a mapping, got {state!r}")
        if STEP_KEY not in state:
            raise InvalidArgument(f"StepTracker state has no {STEP_KEY!r} entry: {state!r}")
        step = _check_count("StepTracker state 'step'", state[STEP_KEY])

        counts = [step] + [0] * (len(self._counts) - 1)
        by_optimizer = state.get(BY_OPTIMIZER_KEY)
        if by_optimizer is not None:
            if not isinstance(by_optimizer, (list, tuple)) or not by_optimizer:
                raise InvalidArgument(
                    f"StepTracker state 'by_optimizer' must be a non-empty list, "
                    f"got {by_optimizer!r}"
                )
            saved = [
                _check_count(f"StepTracker state 'by_optimizer'[{i}]", value)
                for i, value in enumerate(by_optimizer)
            ]
            if saved[0] != step:
                raise InvalidArgument(
                    f"StepTracker state is inconsistent: 'step' is {step} but the first "
                    f"optimizer's count is {saved[0]}"
                )
            if len(saved) == len(counts):
                counts = saved
        self._counts = counts

    def close(self) -> None:
        """Remove the hooks; the counts stay readable. Safe to call more than once."""
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> StepTracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"StepTracker(step={self.step}, by_optimizer={list(self._counts)}, {state})"
