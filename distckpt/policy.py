"""When to save and what to keep: pure functions of plain data.

Nothing here does I/O, reads a clock, or talks to other ranks. The caller passes in the current
step, epoch and time, and the records of the committed checkpoints (read from their manifests);
the functions return decisions. That keeps every rule testable on its own and lets the manager
decide where each decision is made (locally, or on rank 0 and then broadcast).

Guarantees the manager relies on:

* Step and epoch schedules fire when a counter *crosses* a multiple of ``n`` since the last save,
  not when it *equals* one, so counters that jump over a multiple never skip a save, and a run
  restarted with ``last_step`` set to the restored step neither saves again at once nor skips
  the next due save.
* Retention never removes the newest checkpoint, the best one (by ``monitor``), or any step the
  caller marks as protected; records whose monitored metric is missing, NaN or infinite are never
  ranked, so never "best", but other rules can still keep them.

This module must not import torch or NumPy: metric values are converted by duck typing.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from distckpt.errors import InvalidArgument

Mode = Literal["min", "max"]
MODES: tuple[str, ...] = ("min", "max")


def _check_positive_int(name: str, value: object) -> None:
    """Raise InvalidArgument unless ``value`` is None or an int >= 1 (bools are not ints here)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument(f"{name} must be a positive int or None, got {value!r}")


def _check_positive_seconds(name: str, value: object) -> None:
    """Raise InvalidArgument unless ``value`` is None or a finite number > 0."""
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise InvalidArgument(f"{name} must be a positive, finite number of seconds, got {value!r}")


# --------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class CheckpointRecord:
    """Plain facts about one committed checkpoint, as read from its manifest.

    ``metrics`` holds floats and may include NaN or infinities; such values are kept as facts
    but never ranked (see :func:`metric_value`).
    """

    step: int
    epoch: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Save schedules


def crossed_multiple(value: int, last: int | None, n: int) -> bool:
    """True when ``value`` has crossed a multiple of ``n`` since ``last`` (None means since 0).

    That is ``value // n > last // n``. Compared with ``value % n == 0`` this never misses a save
    when the counter jumps over a multiple (steps 4 -> 6 with ``n=5`` fires at 6), and never
    fires twice for the same multiple. A ``value`` at or below ``last`` never fires.
    """
    if n < 1:
        raise InvalidArgument(f"n must be a positive int, got {n!r}")
    return value // n > (last or 0) // n


@dataclass(frozen=True)
class SaveSchedule:
    """When to save: every ``n`` steps, every ``n`` epochs, every so many seconds, in any
    combination. A save is due when *any* of the given schedules is due.

    Counter schedules are judged on local, deterministic counters, so every rank reaches the
    same answer on its own. The time schedule is not (ranks' clocks and progress differ), so
    when it is set (:attr:`needs_agreement`) the ranks must agree on the decision collectively.
    """

    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    every_seconds: float | None = None

    def __post_init__(self) -> None:
        _check_positive_int("every_n_steps", self.every_n_steps)
        _check_positive_int("every_n_epochs", self.every_n_epochs)
        _check_positive_seconds("every_seconds", self.every_seconds)

    @property
    def is_set(self) -> bool:
        """True when at least one schedule is given."""
        return (
            self.every_n_steps is not None
            or self.every_n_epochs is not None
            or self.every_seconds is not None
        )

    @property
    def needs_agreement(self) -> bool:
        """True when the time schedule is set: its decision differs across ranks unless one
        rank decides and the others follow."""
        return self.every_seconds is not None

    def due_by_counters(
        self,
        step: int,
        epoch: int | None,
        *,
        last_step: int | None,
        last_epoch: int | None,
    ) -> bool:
        """True when the step schedule or the epoch schedule is due.

        The step schedule fires when ``step`` crosses a multiple of ``every_n_steps`` since
        ``last_step``; the epoch schedule likewise on ``epoch`` and ``last_epoch``, and never
        when ``epoch`` is None. ``last_*`` None means "since 0". False when neither is set.
        """
        if self.every_n_steps is not None and crossed_multiple(step, last_step, self.every_n_steps):
            return True
        return (
            self.every_n_epochs is not None
            and epoch is not None
            and crossed_multiple(epoch, last_epoch, self.every_n_epochs)
        )

    def due_by_time(self, now: float, *, last_time: float) -> bool:
        """True when ``every_seconds`` is set and at least that long has passed since
        ``last_time`` (both on the same monotonic clock, read by the caller)."""
        return self.every_seconds is not None and now - last_time >= self.every_seconds


@dataclass(frozen=True)
class RetentionPolicy:
    """Which committed checkpoints to keep; everything else may be removed.

    A checkpoint is kept when any rule keeps it: among the newest ``keep_last``; among the best
    ``keep_best`` by ``monitor`` (lowest first for ``mode="min"``, highest for ``"max"``); a
    milestone (``step % keep_every_n_steps == 0``). The newest and the best checkpoint are
    always kept. With no rule set, everything is kept.

    ``monitor`` without ``keep_best`` is allowed: it still defines the best checkpoint (which
    is then always kept).
    """

    keep_last: int | None = None
    keep_best: int | None = None
    monitor: str | None = None
    mode: Mode = "min"
    keep_every_n_steps: int | None = None

    def __post_init__(self) -> None:
        _check_positive_int("keep_last", self.keep_last)
        _check_positive_int("keep_best", self.keep_best)
        _check_positive_int("keep_every_n_steps", self.keep_every_n_steps)
        if self.mode not in MODES:
            raise InvalidArgument(f"mode must be 'min' or 'max', got {self.mode!r}")
        if self.monitor is not None and (not isinstance(self.monitor, str) or not self.monitor):
            raise InvalidArgument(f"monitor must be a non-empty str or None, got {self.monitor!r}")
        if self.keep_best is not None and self.monitor is None:
            raise InvalidArgument(
                "keep_best needs monitor=... (the metric name that ranks checkpoints)"
            )

    @property
    def keeps_everything(self) -> bool:
        """True when no retention rule is set, so nothing is ever removed."""
        return self.keep_last is None and self.keep_best is None and self.keep_every_n_steps is None


def metric_value(record: CheckpointRecord, monitor: str) -> float | None:
    """The monitored metric of ``record`` as a float, or None when it is missing, not a number,
    NaN or infinite. Only non-None values are ever ranked."""
    value = record.metrics.get(monitor)
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise InvalidArgument(f"mode must be 'min' or 'max', got {mode!r}")


def rank_by_metric(
    records: Iterable[CheckpointRecord], monitor: str, mode: Mode
) -> list[CheckpointRecord]:
    """The records with a finite ``monitor`` value, best first.

    ``mode="min"`` ranks lower values higher, ``"max"`` higher values. Ties go to the *earlier*
    step: a later checkpoint must strictly improve on the metric to rank above an earlier one,
    so the best checkpoint does not move on a plateau. Records without a finite value (missing,
    NaN, +/-inf) are left out, so they can never be best.
    """
    _check_mode(mode)
    sign = 1.0 if mode == "min" else -1.0
    scored = []
    for record in records:
        value = metric_value(record, monitor)
        if value is not None:
            scored.append((sign * value, record.step, record))
    scored.sort(key=lambda item: (item[0], item[1]))
    return [record for _, _, record in scored]


def best_step(records: Iterable[CheckpointRecord], monitor: str | None, mode: Mode) -> int | None:
    """The step of the best record by ``monitor`` (ties to the earlier step), or None when
    ``monitor`` is None or no record has a finite value for it."""
    if monitor is None:
        return None
    ranked = rank_by_metric(records, monitor, mode)
    return ranked[0].step if ranked else None


def steps_to_keep(
    records: Iterable[CheckpointRecord],
    policy: RetentionPolicy,
    *,
    protected: Collection[int] = (),
) -> set[int]:
    """The steps among ``records`` that ``policy`` keeps.

    All of them when :attr:`RetentionPolicy.keeps_everything`. Otherwise the union of: the
    newest ``keep_last`` steps; the best ``keep_best`` by ``monitor``; the milestones
    (``step % keep_every_n_steps == 0``); the ``protected`` steps (for instance the targets of
    the ``last`` and ``best`` links); and always the newest step and the best step. The result
    is a subset of the records' steps: a protected step with no record is not added.
    """
    records = list(records)
    steps = {record.step for record in records}
    if policy.keeps_everything or not steps:
        return steps

    keep = steps & set(protected)
    newest_first = sorted(steps, reverse=True)
    keep.add(newest_first[0])
    if policy.keep_last is not None:
        keep.update(newest_first[: policy.keep_last])
    if policy.monitor is not None:
        ranked = rank_by_metric(records, policy.monitor, policy.mode)
        if ranked:
            keep.add(ranked[0].step)
        if policy.keep_best is not None:
            # Distinct steps, in case two records share one (a re-read manifest, say).
            best_steps = list(dict.fromkeys(record.step for record in ranked))
            keep.update(best_steps[: policy.keep_best])
    if policy.keep_every_n_steps is not None:
        keep.update(step for step in steps if step % policy.keep_every_n_steps == 0)
    return keep


def steps_to_remove(
    records: Iterable[CheckpointRecord],
    policy: RetentionPolicy,
    *,
    protected: Collection[int] = (),
) -> list[int]:
    """The steps among ``records`` that ``policy`` does not keep, ascending (oldest first).

    Exactly the complement of :func:`steps_to_keep`, so it never names the newest step, the
    best step or a protected one.
    """
    records = list(records)
    keep = steps_to_keep(records, policy, protected=protected)
    return sorted({record.step for record in records} - keep)


# --------------------------------------------------------------------------------------------
# Metrics given by the user


def _element_count(value: object) -> int | None:
    """How many elements an array-like holds (torch ``numel()``, NumPy ``size``, or 1 for a
    0-dim ``ndim``), or None if ``value`` does not look like an array."""
    numel = getattr(value, "numel", None)
    if callable(numel):
        count = numel()
        return count if isinstance(count, int) else None
    size = getattr(value, "size", None)
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    ndim = getattr(value, "ndim", None)
    if isinstance(ndim, int) and not isinstance(ndim, bool):
        return 1 if ndim == 0 else None
    return None


def _to_float(key: str, value: object) -> float:
    if isinstance(value, (bool, int, float)):
        try:
            return float(value)
        except OverflowError:
            raise InvalidArgument(f"metric {key!r} is too large for a float: {value!r}") from None

    # Tensors and NumPy values: both also define __float__, but going through item() lets a
    # multi-element value be reported clearly instead of with the library's own message.
    item = getattr(value, "item", None)
    if callable(item):
        count = _element_count(value)
        if count is not None and count != 1:
            raise InvalidArgument(
                f"metric {key!r} must be a single number, got a value with {count} elements"
            )
        try:
            scalar = item()
        except Exception as exc:
            raise InvalidArgument(f"metric {key!r} could not be read as a number: {exc}") from exc
        if scalar is value:
            # An item() that returns itself would recurse forever.
            raise InvalidArgument(f"metric {key!r} is not a number: {value!r}")
        return _to_float(key, scalar)

    # Other real numbers (Fraction, Decimal, ...). Strings are refused even when they parse:
    # a str metric is almost always a logging mistake, not a number.
    if isinstance(value, numbers.Real) or (
        hasattr(type(value), "__float__")
        and not isinstance(value, (str, bytes, bytearray, complex))
    ):
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidArgument(f"metric {key!r} is not a number: {value!r}") from exc

    raise InvalidArgument(f"metric {key!r} must be a number, got {type(value).__name__}")


def normalize_metrics(metrics: Mapping[str, object] | None) -> dict[str, float]:
    """``metrics`` as a plain ``dict[str, float]``, ready to be written to a manifest.

    Accepts Python ints, floats and bools (``True`` becomes ``1.0``: refusing them would make a
    save fail over a logging detail), other real numbers, and single-element array values such
    as 0-dim torch tensors, NumPy scalars and 0-d arrays (read with ``.item()``; torch and NumPy
    are never imported). NaN and infinities are kept: they are facts, and ranking ignores them.

    Raises InvalidArgument naming the key for a key that is not a str, a non-numeric value
    (including strings and complex numbers), or a multi-element tensor or array. None gives
    an empty dict. The input is not modified.
    """
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise InvalidArgument(f"metrics must be a mapping of str to number, got {metrics!r}")
    normalized: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise InvalidArgument(f"metric names must be str, got {key!r}")
        normalized[key] = _to_float(key, value)
    return normalized


def missing_monitor(metrics: Mapping[str, float] | None, monitor: str | None) -> bool:
    """True when metrics were given (non-empty) but lack ``monitor``: the likely typo or
    forgotten metric the manager warns about. False when either is None or empty."""
    if monitor is None or not metrics:
        return False
    return monitor not in metrics
