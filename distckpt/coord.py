"""Rank coordination: the one place distckpt calls torch.distributed collectives.

Every decision that ranks must share goes through a :class:`Coordinator`, so ranks cannot drift
apart: rank 0 decides and broadcasts, or every rank contributes and every rank computes the same
answer from the same gathered data. Collectives run on the coordinator's own gloo group, created
with the manager's timeout, so a dead or hung rank surfaces as :class:`CoordinationError` after
that timeout instead of gloo's 30-minute default, and distckpt's collectives never interleave
with the training loop's. Nothing here knows about files or formats.
"""

from __future__ import annotations

import datetime
import logging
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.distributed as dist

from distckpt.errors import CoordinationError, CoordinationTimeout, RankFailure

logger = logging.getLogger("distckpt")
T = TypeVar("T")


def describe_error(exc: BaseException) -> str:
    """One line naming an exception: what travels between ranks when one fails."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


@dataclass(frozen=True)
class Outcome:
    """What one rank reports when the ranks agree on a step: its error, or its result."""

    error: str | None = None
    value: Any = None

    @classmethod
    def of(cls, func: Callable[[], T]) -> tuple[Outcome, BaseException | None]:
        """Run ``func`` and capture its result or its exception (not raised: the ranks must
        first agree, or the others would wait for this one in the next collective)."""
        try:
            return cls(value=func()), None
        except Exception as exc:  # noqa: BLE001 - any failure must reach the other ranks
            logger.debug("local failure before agreement:\n%s", traceback.format_exc())
            return cls(error=describe_error(exc)), exc


class Coordinator:
    """Collectives among the ranks of one group, on a private gloo group.

    With no initialised process group it stands for a single process (rank 0 of 1) and every
    collective is a no-op, so the same code runs in plain scripts.

    The private group is made with ``new_group(..., use_local_synchronization=True)``: only the
    ranks of ``group`` take part in creating it, so a manager can live on a subgroup.
    """

    def __init__(self, group: dist.ProcessGroup | None, timeout: float) -> None:
        self.timeout = timeout
        self._group: dist.ProcessGroup | None = None
        self._src = 0
        if not (dist.is_available() and dist.is_initialized()):
            if group is not None:
                raise CoordinationError("group= was given but torch.distributed is not initialised")
            self.rank, self.world_size = 0, 1
            return
        parent = group if group is not None else dist.group.WORLD
        ranks = dist.get_process_group_ranks(parent)
        if dist.get_rank() not in ranks:
            raise CoordinationError(
                f"this process (global rank {dist.get_rank()}) is not a member of the given group"
            )
        try:
            self._group = dist.new_group(
                ranks=ranks,
                backend="gloo",
                timeout=datetime.timedelta(seconds=timeout),
                use_local_synchronization=True,
            )
        except Exception as exc:
            raise CoordinationError(f"could not create distckpt's gloo group: {exc}") from exc
        self.rank = dist.get_rank(self._group)
        self.world_size = dist.get_world_size(self._group)
        self._src = dist.get_global_rank(self._group, 0)

    @property
    def is_coordinator(self) -> bool:
        """Whether this is rank 0 of the group: the rank that commits."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self._group is not None

    def _run(self, what: str, collective: Callable[[], None]) -> None:
        try:
            collective()
        except Exception as exc:
            text = str(exc)
            hint = (
                f"another rank died, hung or stopped calling distckpt in step with this one "
                f"(timeout {self.timeout:g} s)"
            )
            error_type = CoordinationTimeout if "timeout" in text.lower() else CoordinationError
            raise error_type(
                f"{what}: the collective among {self.world_size} ranks failed on rank "
                f"{self.rank}; {hint}: {describe_error(exc)}"
            ) from exc

    def broadcast(self, value: T, *, what: str) -> T:
        """Rank 0's ``value`` on every rank (the others' argument is ignored)."""
        if self._group is None:
            return value
        box = [value]
        self._run(
            what, lambda: dist.broadcast_object_list(box, src=self._src, group=self._group)
        )
        return box[0]

    def all_gather(self, value: T, *, what: str) -> list[T]:
        """Every rank's ``value``, indexed by rank, on every rank."""
        if self._group is None:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        self._run(what, lambda: dist.all_gather_object(gathered, value, group=self._group))
        return gathered

    def agree(self, outcome: Outcome, *, what: str) -> list[Any]:
        """Gather every rank's outcome; if any rank failed, raise :class:`RankFailure` naming
        each failing rank and its error, on every rank alike. Returns the values by rank."""
        outcomes = self.all_gather(outcome, what=what)
        raise_failures(outcomes, what=what)
        return [o.value for o in outcomes]

    def barrier(self, *, what: str) -> None:
        if self._group is not None:
            self._run(what, lambda: dist.barrier(group=self._group))

    def close(self) -> None:
        """Release the private group. Safe to call twice."""
        group, self._group = self._group, None
        if group is not None and dist.is_initialized():
            try:
                dist.destroy_process_group(group)
            except Exception as exc:  # noqa: BLE001 - shutting down: report, never mask
                logger.debug("destroying distckpt's group failed: %s", exc)


def raise_failures(outcomes: Sequence[Outcome], *, what: str) -> None:
    """Raise :class:`RankFailure` if any rank's outcome carries an error."""
    failures = {rank: o.error for rank, o in enumerate(outcomes) if o.error is not None}
    if failures:
        raise RankFailure(what, failures)
