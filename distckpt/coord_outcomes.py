"""What one rank reports to the others in a :class:`~distckpt.coord.Coordinator`'s verb, and
how a reported failure is raised on every rank alike.

A rank's part of a verb ends as an :class:`Outcome`: its value, or its error as the class
name, message and structured fields (:meth:`~distckpt.errors.CheckpointError.fields`) of the
distckpt exception, so that the other side rebuilds the same exception. :func:`raise_failures`
turns the outcomes of every rank into the one error every rank raises.

A module of its own because it is the rules of errors crossing ranks, not collectives: nothing
here calls ``torch.distributed``. :mod:`distckpt.coord` runs the collectives that carry these
outcomes (as :mod:`distckpt.coord_frames` frames them); :mod:`distckpt.reader` builds and
checks outcomes of its own restore rounds with the same rules.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from distckpt import errors
from distckpt.errors import CheckpointError, RankFailure, describe_error

logger = logging.getLogger("distckpt")
T = TypeVar("T")


@dataclass(frozen=True)
class Outcome:
    """What one rank reports to the others: its result, or its error (as text, plus the name
    of the distckpt exception class and its structured fields, so every rank can raise the same
    error)."""

    value: Any = None
    error: str | None = None
    error_type: str | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def failure(cls, exc: BaseException, *, rank: int | None = None) -> Outcome:
        """The report of ``exc``; ``rank`` fills the error's ``rank`` field if it has none."""
        if isinstance(exc, CheckpointError):
            fields = exc.fields()
            if rank is not None and fields.get("rank") is None and not isinstance(exc, RankFailure):
                fields["rank"] = rank
            return cls(error=str(exc), error_type=type(exc).__name__, fields=fields)
        return cls(error=describe_error(exc))

    @classmethod
    def of(
        cls, func: Callable[[], T], *, rank: int | None = None
    ) -> tuple[Outcome, Exception | None]:
        """Run ``func`` and capture its result or its exception (not raised: the ranks must
        first agree, or the others would wait for this one in the next collective)."""
        try:
            return cls(value=func()), None
        except Exception as exc:  # any failure must reach the other ranks
            logger.debug("failure to report to the other ranks:\n%s", traceback.format_exc())
            return cls.failure(exc, rank=rank), exc

    def unwrap(self, *, what: str, cause: BaseException | None = None) -> Any:
        """The value of a decision rank 0 took for everyone, or its error raised here."""
        if self.error is None:
            return self.value
        raise _rebuild(self.error_type, self.error, self.fields, what=what) from cause


def _rebuild(
    error_type: str | None, message: str, fields: Mapping[str, Any], *, what: str
) -> CheckpointError:
    cls = getattr(errors, error_type, None) if error_type else None
    if isinstance(cls, type) and issubclass(cls, CheckpointError):
        return cls.rebuild(message, fields)
    return CheckpointError(f"{what} failed: {message}")


def raise_failures(
    outcomes: Sequence[Outcome], *, what: str, cause: BaseException | None = None
) -> None:
    """Raise on every rank alike if any rank's outcome carries an error: the distckpt
    exception type the failing ranks share (a precondition every rank checked), otherwise
    :class:`RankFailure` naming each failing rank and its error."""
    failing = {rank: o for rank, o in enumerate(outcomes) if o.error is not None}
    if not failing:
        return
    types = {o.error_type for o in failing.values()}
    error_type = types.pop() if len(types) == 1 else None
    if error_type is not None and error_type != "RankFailure":
        messages = {o.error for o in failing.values()}
        ranks = ", ".join(map(str, failing))  # named in the message: which ranks hit it
        fields = next(iter(failing.values())).fields  # the first failing rank's
        if len(messages) == 1:
            suffix = f" (on rank {ranks})" if len(outcomes) > 1 else ""
            raise _rebuild(error_type, messages.pop() + suffix, fields, what=what) from cause
        details = "; ".join(f"rank {rank}: {o.error}" for rank, o in failing.items())
        raise _rebuild(
            error_type, f"{what} failed on ranks {ranks}: {details}", fields, what=what
        ) from cause
    failures = {
        rank: (f"{o.error_type}: {o.error}" if o.error_type else str(o.error))
        for rank, o in failing.items()
    }
    raise RankFailure(what, failures) from cause
