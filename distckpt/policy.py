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
* Retention is a function of the records alone (creation times come from the manifests), so a
  restarted run rebuilds the same decisions, and applying it to what it kept removes nothing more.
* A schedule's save that ``min_seconds_between_saves`` holds back is deferred, not lost: the
  caller does not advance ``last_step`` / ``last_time``, so the schedule is still due next call.

This module must not import torch or NumPy: metrics reach it as the floats a manifest stores
(:mod:`distckpt.metrics` converts the user's values).
"""

from __future__ import annotations

import bisect
import datetime
import math
import numbers
import operator
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from distckpt.arguments import as_count, as_seconds
from distckpt.errors import InvalidArgument

Mode = Literal["min", "max"]
MODES: tuple[str, ...] = ("min", "max")


def _refused(name: str, value: object, expected: str) -> InvalidArgument:
    """The error for an option ``value`` that is not ``expected`` (nor None). Zero gets its own
    message: other libraries (Lightning's ``every_n_train_steps=0``, ``save_top_k=0``) use it to
    turn an option off, which here is None."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and value == 0:
        return InvalidArgument(f"{name}=0 is not accepted: use None to turn it off")
    return InvalidArgument(f"{name} must be {expected} or None, got {value!r}")


def _positive_int(name: str, value: object) -> int | None:
    """``value`` as an int (:func:`~distckpt.arguments.as_count`, at least 1), or None; refuses
    anything else with InvalidArgument."""
    if value is None:
        return None
    count = as_count(value, 1)
    if count is None:
        raise _refused(name, value, "a positive int")
    return count


def _positive_seconds(name: str, value: object) -> float | None:
    """``value`` as seconds (:func:`~distckpt.arguments.as_seconds`), or None; refuses anything
    else with InvalidArgument."""
    if value is None:
        return None
    seconds = as_seconds(value)
    if seconds is None:
        raise _refused(name, value, "a positive, finite number of seconds")
    return seconds


def _normalize(instance: object, check: Callable[[str, object], object], *names: str) -> None:
    """Replace each field ``names`` of the frozen dataclass ``instance`` by what ``check``
    makes of it (a NumPy count becomes an int), once, at construction."""
    for name in names:
        object.__setattr__(instance, name, check(name, getattr(instance, name)))


def _checked_steps(name: str, value: object) -> tuple[int, ...]:
    """``value`` (None or a collection of ints >= 0) as a sorted tuple without repeats."""
    if value is None:
        return ()
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise InvalidArgument(f"{name} must be a collection of steps, got {value!r}")
    steps = tuple(value)
    for step in steps:
        if as_count(step, 0) is None:
            raise InvalidArgument(f"{name} must hold ints >= 0, got {step!r}")
    return tuple(sorted({operator.index(step) for step in steps}))


# --------------------------------------------------------------------------------------------
# Records


class ManifestFacts(Protocol):
    """What a record is built from: the fields of :class:`distckpt.manifest.Manifest` it reads."""

    @property
    def step(self) -> int: ...
    @property
    def epoch(self) -> int | None: ...
    @property
    def metrics(self) -> Mapping[str, float]: ...
    @property
    def created_utc(self) -> str | None: ...


def parse_created_utc(text: object) -> float | None:
    """A manifest's ``created_utc`` (ISO 8601, as ``datetime.isoformat`` writes it) as seconds
    since the epoch; a trailing ``Z`` or no offset at all means UTC. None when it is not a str
    or does not parse: such a record is never kept by time."""
    if not isinstance(text, str):
        return None
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"  # fromisoformat reads "Z" only from Python 3.11
    try:
        moment = datetime.datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.timezone.utc)
        return moment.timestamp()
    except (ValueError, OverflowError, OSError):
        return None


@dataclass(frozen=True)
class CheckpointRecord:
    """Plain facts about one committed checkpoint, as read from its manifest.

    ``metrics`` holds floats and may include NaN or infinities; such values are kept as facts
    but never ranked (see :func:`metric_value`). ``created`` is when rank 0 wrote the manifest,
    in seconds since the epoch (None when unknown); only ``keep_every_n_seconds`` reads it.
    """

    step: int
    epoch: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    created: float | None = None

    @classmethod
    def from_manifest(cls, manifest: ManifestFacts) -> CheckpointRecord:
        """The record of a committed checkpoint's manifest: the one way records are built."""
        return cls(
            step=manifest.step,
            epoch=manifest.epoch,
            metrics=manifest.metrics,
            created=parse_created_utc(manifest.created_utc),
        )


# --------------------------------------------------------------------------------------------
# Save schedules


def seconds_since_created(created: float | None, now: float) -> float:
    """How long before ``now`` a checkpoint ``created`` then was made (both in seconds since
    the epoch): what ``every_seconds`` counts from when a job starts on a root holding it, so
    a job killed more often than the interval still saves. 0 when ``created`` is unknown
    (the interval starts now) or later than ``now`` (a clock ahead of this one's: counted as
    made just now, never as due already)."""
    if created is None or not math.isfinite(created):
        return 0.0
    return max(0.0, now - created)


def crossed_multiple(value: int, last: int | None, n: int) -> bool:
    """True when ``value`` has crossed a multiple of ``n`` since ``last`` (None means since 0).

    That is ``value // n > last // n``. Compared with ``value % n == 0`` this never misses a save
    when the counter jumps over a multiple (steps 4 -> 6 with ``n=5`` fires at 6), and never
    fires twice for the same multiple. A ``value`` at or below ``last`` never fires.
    """
    if n < 1:
        raise InvalidArgument(f"n must be a positive int, got {n!r}")
    return value // n > (last or 0) // n


def reached_listed_step(step: int, last: int | None, listed: tuple[int, ...]) -> bool:
    """True when ``step`` has reached or crossed one of the ascending ``listed`` steps since
    ``last``: some ``s`` with ``last < s <= step`` (None means no save yet: any ``s <= step``).
    The same crossing rule as :func:`crossed_multiple`, for a list instead of multiples."""
    following = 0 if last is None else bisect.bisect_right(listed, last)
    return following < len(listed) and listed[following] <= step


@dataclass(frozen=True)
class SaveSchedule:
    """When to save: every ``n`` steps, every ``n`` epochs, every so many seconds, at listed
    steps, in any combination; a save is due when *any* of the given schedules is due. Then
    ``min_seconds_between_saves`` may hold back a save (:meth:`throttled`).

    Counter schedules (steps, epochs, listed steps) are judged on local, deterministic
    counters, so every rank reaches the same answer on its own. Time decisions are not (ranks'
    clocks and progress differ), so when one is set (:attr:`needs_agreement`) the ranks must
    agree on rank 0's answer collectively.

    ``save_on_steps`` takes any collection of ints >= 0 (None or empty for none) and is stored
    as a sorted tuple without repeats.
    """

    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    every_seconds: float | None = None
    save_on_steps: Collection[int] = ()
    min_seconds_between_saves: float | None = None

    def __post_init__(self) -> None:
        _normalize(self, _positive_int, "every_n_steps", "every_n_epochs")
        _normalize(self, _positive_seconds, "every_seconds", "min_seconds_between_saves")
        # Frozen: the normalized tuple replaces what was given, once, here.
        object.__setattr__(
            self, "save_on_steps", _checked_steps("save_on_steps", self.save_on_steps)
        )

    @property
    def is_set(self) -> bool:
        """True when at least one schedule is given (the throttle alone is not a schedule)."""
        return (
            self.every_n_steps is not None
            or self.every_n_epochs is not None
            or self.every_seconds is not None
            or bool(self.save_on_steps)
        )

    @property
    def needs_agreement(self) -> bool:
        """True when a time decision is set (``every_seconds`` or ``min_seconds_between_saves``):
        it differs across ranks unless one rank decides and the others follow."""
        return self.every_seconds is not None or self.min_seconds_between_saves is not None

    def due_by_counters(
        self,
        step: int,
        epoch: int | None,
        *,
        last_step: int | None,
        last_epoch: int | None,
    ) -> bool:
        """True when the step, listed-steps or epoch schedule is due.

        The step schedule fires when ``step`` crosses a multiple of ``every_n_steps`` since
        ``last_step``; ``save_on_steps`` when ``step`` reaches or crosses a listed step since
        ``last_step`` (:func:`reached_listed_step`); the epoch schedule likewise on ``epoch``
        and ``last_epoch``, and never when ``epoch`` is None. ``last_*`` None means no save yet.
        False when none is set.
        """
        if self.every_n_steps is not None and crossed_multiple(step, last_step, self.every_n_steps):
            return True
        if reached_listed_step(step, last_step, tuple(self.save_on_steps)):
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

    def throttled(self, now: float, *, last_started: float | None, in_flight: bool) -> bool:
        """True when ``min_seconds_between_saves`` holds a save back: an async save is still in
        flight, or less than that many seconds have passed since the previous save of any kind
        *began* (``last_started``, on the same monotonic clock as ``now``; None when no save
        began in this process). Always False when the option is not set.

        Consult it only for saves a schedule or a plain ``save()`` asks for, never for a forced
        or preemption save. It is a time decision: rank 0's answer counts for every rank.
        """
        if self.min_seconds_between_saves is None:
            return False
        if in_flight:
            return True
        return last_started is not None and now - last_started < self.min_seconds_between_saves


@dataclass(frozen=True)
class RetentionPolicy:
    """Which committed checkpoints to keep; everything else may be removed.

    A checkpoint is kept when any rule keeps it: among the newest ``keep_last``; among the best
    ``keep_best`` by ``monitor`` (lowest first for ``mode="min"``, highest for ``"max"``); a
    milestone (the first step at or after a multiple of ``keep_every_n_steps``, see
    :func:`kept_as_milestones`); in the time history
    (``keep_every_n_seconds``, see :func:`kept_by_time`); unranked, with ``keep_unranked``
    (its monitored metric is missing, NaN or infinite). The newest and the best checkpoint are
    always kept. With no count or seconds rule set, everything is kept.

    ``monitor`` without ``keep_best`` is allowed: it still defines the best checkpoint (which
    is then always kept). ``keep_unranked`` needs ``monitor``; by default unranked checkpoints
    are kept only by the other rules.
    """

    keep_last: int | None = None
    keep_best: int | None = None
    monitor: str | None = None
    mode: Mode = "min"
    keep_every_n_steps: int | None = None
    keep_every_n_seconds: float | None = None
    keep_unranked: bool = False

    def __post_init__(self) -> None:
        _normalize(self, _positive_int, "keep_last", "keep_best", "keep_every_n_steps")
        _normalize(self, _positive_seconds, "keep_every_n_seconds")
        if not isinstance(self.keep_unranked, bool):
            raise InvalidArgument(
                f"keep_unranked must be True or False, got {self.keep_unranked!r}"
            )
        if self.keep_unranked and self.monitor is None:
            raise InvalidArgument(
                "keep_unranked needs monitor=... (the metric whose absence leaves a checkpoint "
                "unranked)"
            )
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
        """True when no count or seconds rule is set, so nothing is ever removed."""
        return (
            self.keep_last is None
            and self.keep_best is None
            and self.keep_every_n_steps is None
            and self.keep_every_n_seconds is None
        )


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


def kept_as_milestones(steps: Iterable[int], every_n_steps: int) -> set[int]:
    """The steps the ``keep_every_n_steps`` rule keeps: for each multiple of ``every_n_steps``
    from ``every_n_steps`` on, the first step at or after it, plus step 0 (each step that
    :func:`crossed_multiple` since the step before it, and step 0).

    The save schedules' crossing rule: saves that land beside the multiples (every 3 steps,
    with ``every_n_steps=500``: 501, 1002, 1500, ...) still leave one milestone per multiple,
    which keeping only exact multiples would not. Removing a step this rule does not keep (it
    shares its multiple with the step before it), or adding newer steps, never changes which
    of the others it keeps, so pruning after every commit keeps what pruning once would.
    """
    _positive_int("every_n_steps", every_n_steps)
    kept: set[int] = set()
    previous: int | None = None
    for step in sorted(set(steps)):
        if step == 0 or crossed_multiple(step, previous, every_n_steps):
            kept.add(step)
        previous = step
    return kept


def kept_by_time(records: Iterable[CheckpointRecord], seconds: float) -> set[int]:
    """The steps the ``keep_every_n_seconds`` rule keeps: a sparse history of a long run.

    Walking the records by step, oldest first, and skipping those whose ``created`` is None:
    the first is kept (the anchor), then each one created at least ``seconds`` after the last
    one kept this way. A record created before that one (a clock stepped back, a step rewritten
    with ``overwrite``) is not kept by time. The answer depends on the records alone, so it is
    rebuilt from the manifests after a restart; and removing records it does not keep, or adding
    newer steps, never changes which of the older ones it keeps.
    """
    _positive_seconds("seconds", seconds)
    dated = sorted(
        (record.step, record.created) for record in records if record.created is not None
    )
    kept: set[int] = set()
    last_kept: float | None = None
    for step, created in dated:
        if last_kept is None or created - last_kept >= seconds:
            kept.add(step)
            last_kept = created
    return kept


def steps_to_keep(
    records: Iterable[CheckpointRecord],
    policy: RetentionPolicy,
    *,
    protected: Collection[int] = (),
) -> set[int]:
    """The steps among ``records`` that ``policy`` keeps.

    All of them when :attr:`RetentionPolicy.keeps_everything`. Otherwise the union of: the
    newest ``keep_last`` steps; the best ``keep_best`` by ``monitor``; the milestones
    (:func:`kept_as_milestones` with ``keep_every_n_steps``); the time history
    (:func:`kept_by_time` with ``keep_every_n_seconds``); with ``keep_unranked``, the
    records without a finite ``monitor`` value; the ``protected`` steps (for instance the
    targets of the ``last`` and ``best`` links); and always the newest step and the best step.
    The result is a subset of the records' steps: a protected step with no record is not
    added.
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
        keep.update(kept_as_milestones(steps, policy.keep_every_n_steps))
    if policy.keep_every_n_seconds is not None:
        keep.update(kept_by_time(records, policy.keep_every_n_seconds))
    if policy.keep_unranked and policy.monitor is not None:
        keep.update(r.step for r in records if metric_value(r, policy.monitor) is None)
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


def missing_monitor(metrics: Mapping[str, float] | None, monitor: str | None) -> bool:
    """True when metrics were given (non-empty) but lack ``monitor``: the likely typo or
    forgotten metric the manager warns about. False when either is None or empty."""
    if monitor is None or not metrics:
        return False
    return monitor not in metrics
