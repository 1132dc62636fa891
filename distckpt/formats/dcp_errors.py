"""DCP's errors as distckpt's: :func:`run_dcp` runs a ``dcp.save`` or ``dcp.load`` and raises
the :class:`~distckpt.errors.CheckpointError` of its first failing rank, naming every one."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, NoReturn

from torch.distributed.checkpoint.api import CheckpointException

from distckpt.errors import CheckpointError, InvalidArgument, RankFailure, describe_error

# DCP warns when it runs without a process group, which distckpt does on purpose.
_NO_DIST_WARNING = r".*(torch\.distributed is|assuming the intent is to)"


def _failures(exc: CheckpointException) -> list[tuple[int, BaseException]]:
    found = []
    for rank, failure in sorted(exc.failures.items()):
        error = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(error, BaseException):
            found.append((rank, error))
    return found


def raise_from_dcp(
    exc: CheckpointException,
    action: str,
    default: type[CheckpointError],
    *,
    path: Path | None = None,
    step: int | None = None,
) -> NoReturn:
    """Turn DCP's CheckpointException (a BaseException carrying every rank's error) into the
    distckpt error of the first failing rank, naming every failing rank. That rank's own
    distckpt error keeps its class and fields; anything else becomes ``default`` (or an
    :class:`InvalidArgument` for a mismatch) about the checkpoint ``path`` of ``step``."""
    failures = _failures(exc)
    if not failures:
        raise default(f"DCP failed while {action}: {exc}", path=path, step=step) from None
    ranks = ", ".join(str(rank) for rank, _ in failures)
    first = failures[0][1]
    details = "; ".join(f"rank {r}: {describe_error(e)}" for r, e in failures)
    message = f"DCP failed while {action} on rank {ranks}: {details}"
    if isinstance(first, CheckpointError) and not isinstance(first, RankFailure):
        fields = first.fields()
        if first.path is None and path is not None:
            fields["path"] = str(path)
        if first.step is None:
            fields["step"] = step
        raise type(first).rebuild(message, fields) from first
    if isinstance(first, ValueError) and "mismatch" in str(first).lower():
        hint = "the given state does not match the checkpoint"
        raise InvalidArgument(f"{message}; {hint}", path=path, step=step) from first
    raise default(message, path=path, step=step) from first


def run_dcp(
    func: Callable[[], Any],
    action: str,
    default: type[CheckpointError],
    *,
    path: Path | None = None,
    step: int | None = None,
) -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
        try:
            return func()
        except CheckpointException as exc:
            raise_from_dcp(exc, action, default, path=path, step=step)
