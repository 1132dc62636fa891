"""Whether to save at a step: the schedule, a preemption signal and the ranks' votes.

Every rank must take the same decision, or some ranks would enter a save's collectives and the
others not. Step and epoch schedules need no collective (every rank computes the same answer
from the same arguments); a time decision or a signal does: rank 0's clock decides time (the
``every_seconds`` schedule and the ``min_seconds_between_saves`` throttle, which also counts an
async save in flight on rank 0), and a signal seen by any rank decides preemption, by one small
:meth:`~distckpt.coord.Coordinator.all_reduce` of the ranks' votes (an all-gather at 2 ranks,
a gather to rank 0 and a broadcast of its tally from 3 on).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import weakref
from collections.abc import Callable, Collection
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from distckpt.coord import Coordinator
from distckpt.errors import InvalidArgument
from distckpt.policy import SaveSchedule, seconds_since_created
from distckpt.protocol import check_step_and_epoch

if TYPE_CHECKING:
    from distckpt.results import Checkpoint
    from distckpt.storage import OpenedRoot
    from distckpt.storage.views import RootView

logger = logging.getLogger("distckpt")


@dataclass(frozen=True)
class SaveDecision:
    """Whether to save at a step, taken identically on every rank. ``explicit`` is True for a
    save nothing but the call asked for (no schedule or throttle, no ``force``, no signal):
    only such a save of an already committed step raises instead of returning that
    checkpoint."""

    step: int
    epoch: int | None
    save: bool
    explicit: bool = True
    preempt: bool = False

    def forced(self) -> SaveDecision:
        """This decision, with ``force=True`` added."""
        return SaveDecision(self.step, self.epoch, True, explicit=False, preempt=self.preempt)


@dataclass(frozen=True)
class LastSave:
    """What the schedule counts from: the last save that committed (or is in flight)."""

    step: int | None = None
    epoch: int | None = None
    time: float = 0.0

    @classmethod
    def at(cls, step: int | None, epoch: int | None, *, seconds_ago: float = 0.0) -> LastSave:
        """A save of ``step`` and ``epoch`` made ``seconds_ago`` before now."""
        return cls(step, epoch, time.monotonic() - seconds_ago)


@dataclass(frozen=True)
class _Vote:
    """What one rank sends when the ranks decide together; only rank 0's time verdicts count."""

    time_due: bool
    throttled: bool
    signalled: bool


def _tally(votes: list[_Vote]) -> _Vote:
    """The ranks' votes as one: rank 0's clock decides time-based saves and the throttle
    (clocks differ between nodes); any signalled rank decides preemption (the signal may reach
    only some)."""
    first = votes[0]
    return _Vote(first.time_due, first.throttled, any(v.signalled for v in votes))


def decide(
    step: int,
    epoch: int | None,
    *,
    force: bool,
    overwrite: bool,
    schedule: SaveSchedule,
    last: LastSave,
    last_started: float | None,
    in_flight: bool,
    signals: SignalFlag,
    coord: Coordinator,
    at_step_boundary: bool,
) -> SaveDecision:
    """Whether to save now, the same on every rank (collective when ``schedule`` or
    ``signals`` need the ranks' votes; see the module doc).

    ``last_started`` is when this rank's previous save began (monotonic clock; None when none
    did in this process) and ``in_flight`` whether an async save is still running here: the
    ``min_seconds_between_saves`` throttle reads them, and rank 0's verdict counts. A throttled
    save is neither forced nor a preemption save, and leaves ``last`` as it is (deferred).
    ``every_seconds`` is due only at a step past ``last``'s, and a plain save the throttle
    governs (no schedule) not at ``last``'s step, which is committed or in flight already,
    unless it asks to ``overwrite`` it.

    ``at_step_boundary`` is False for a call at the same step as the previous call (a
    micro-batch in the middle of a gradient-accumulation window, whose gradients no checkpoint
    holds): an epoch, time or signal trigger that is due then is held (it stays due) until a
    call at a boundary, except a signal at a step ``last`` already counts (that checkpoint is
    the preemption save). The step schedules (``every_n_steps``, ``save_on_steps``) are held
    likewise: a step save the throttle deferred (or one due again after a failed async save or
    a ``delete`` of the newest) stays due, ``last`` unchanged, until the next new step. An
    explicit or forced save is never held.

    A step or epoch a schedule or a vote would compare is checked first (a str or float step
    would be answered, a str epoch fail with ``TypeError``): inside the vote when there is one,
    so that a bad one on any rank raises on every rank instead of leaving the others waiting
    in the vote until their timeout. With neither a schedule nor a vote, nothing here reads
    them: the save's proposal checks them inside its collective. With counter schedules and no
    vote they are checked here, on each rank alone (no rank can tell whether the others' save
    is due without a collective, which these schedules do without): a bad one raises on its
    rank only and leaves the ranks out of step, a programming error after which the job should
    stop. The others' due save waits in its proposal until their timeout, or, if the rank that
    raised calls ``save`` again, meets that call's proposal, and both raise
    :class:`~distckpt.InvalidStep` for different steps, the ranks then a call apart: so does
    every later save on every rank, and a save no other rank meets fails after the timeout."""

    def local_vote() -> _Vote:
        check_step_and_epoch(step, epoch)
        now = time.monotonic()
        # A step the schedule already counts from is committed (or in flight): saving it again
        # would only return that checkpoint and restart the interval without a new one (a
        # requeued job saving after every micro-batch would then never save).
        past_last = last.step is None or step > last.step
        return _Vote(
            time_due=at_step_boundary
            and past_last
            and schedule.due_by_time(now, last_time=last.time),
            throttled=schedule.throttled(now, last_started=last_started, in_flight=in_flight),
            signalled=signals.is_set(),
        )

    voting = schedule.needs_agreement or signals.watched
    if voting:
        tally = coord.all_reduce(local_vote, _tally, what="deciding whether to save")
    else:
        if schedule.is_set:
            check_step_and_epoch(step, epoch)
        tally = _Vote(time_due=False, throttled=False, signalled=False)
    if schedule.is_set:
        due = at_step_boundary and schedule.due_by_counters(
            step, epoch, last_step=last.step, last_epoch=last.epoch
        )
    else:
        # Continuous checkpointing calls save() after every micro-batch: a call at the step
        # saved last has nothing new (a lower step is still refused by the proposal), unless
        # it asks to overwrite that step.
        due = schedule.min_seconds_between_saves is None or overwrite or step != last.step
    due = due or tally.time_due
    # A held signal stays set: the first call at a step boundary saves for it. A step already
    # committed needs no wait: its checkpoint is the preemption save.
    committed = last.step is not None and step == last.step
    throttled = tally.throttled
    preempt = tally.signalled and (at_step_boundary or committed)
    return SaveDecision(
        step,
        epoch,
        save=(due and not throttled) or force or preempt,
        # The throttle, like a schedule, decides whether a plain save() saves: not explicit.
        explicit=not (schedule.is_set or schedule.needs_agreement or force or preempt),
        preempt=preempt,
    )


def newest_to_count_from(
    opened: OpenedRoot, now: float
) -> tuple[tuple[int, int | None] | None, float]:
    """On rank 0, right after opening the root: its newest checkpoint's step and epoch, and
    how many seconds before ``now`` (``time.time()``, this clock) it was created."""
    return opened.newest, seconds_since_created(opened.newest_created, now)


class SaveDecider:
    """The save decisions of one manager: the schedule, the signals, the last save counted
    from (kept by the ``count_*`` methods, every rank alike), when the last save began, and the
    decision :meth:`should_save` took for a step (reused by the save)."""

    def __init__(
        self,
        schedule: SaveSchedule,
        signals: SignalFlag,
        coord: Coordinator,
    ) -> None:
        self.schedule = schedule
        self.signals = signals
        self.coord = coord
        self.last = LastSave()
        #: when the previous save of any kind began (this rank's monotonic clock; None before
        #: the first save of this process): what ``min_seconds_between_saves`` counts from
        self.last_started: float | None = None
        self._pending: SaveDecision | None = None
        #: whether the step of :attr:`_pending` was a step boundary when it was decided: a save
        #: at that step deciding again (with another epoch) must not find it a repeated call
        self._pending_at_step_boundary = False
        #: ``last`` before the async save in flight: put back if that save fails
        self._before_in_flight = LastSave()
        #: no save or restore yet: the first restore (the resume) sets ``last`` to its step
        self.resuming = True
        #: a save a signal asked for is durable (``CheckpointManager.preempted``)
        self.preempted = False
        #: the step of the previous decision (the resumed step after the resume): a call at
        #: another step follows an optimizer step. A fresh run counts from step 0, before any
        #: optimizer step, so a trigger at its first micro-batches is held too.
        self.previous_step: int = 0

    def count_from_newest(self, newest: tuple[int, int | None] | None, seconds_ago: float) -> None:
        """At the start: count from the root's newest checkpoint (step, epoch), created
        ``seconds_ago`` by rank 0's clock, not from this start: a job requeued more often than
        ``every_seconds`` would never save again."""
        self.last = LastSave.at(*(newest or (None, None)), seconds_ago=seconds_ago)

    def count_save(self, step: int, epoch: int | None) -> None:
        """The save of ``step`` committed (or was committed already): count from it."""
        self.last = LastSave.at(step, epoch)

    def count_in_flight(self, step: int, epoch: int | None) -> None:
        """An async save of ``step`` was submitted: counted at once, so the next steps do not
        save again while it is in flight; :meth:`in_flight_failed` puts the count back."""
        self._before_in_flight, self.last = self.last, LastSave.at(step, epoch)

    def in_flight_failed(self) -> None:
        """The async save in flight failed: count from what came before it."""
        self.last = self._before_in_flight

    def count_restore(self, loaded: Checkpoint | None, view: RootView) -> None:
        """A restore loaded ``loaded`` (None: nothing). The first restore is the resume, from
        wherever the job resumes (an older step when the newest was set aside or skipped);
        later ones only move forward: loading an older checkpoint (``best`` into an eval
        model) mid-run must not make the schedule due again at once. A checkpoint that is not
        this root's (``view``'s), loaded by path, counts for nothing: its step (a pretrained
        model's, a teacher's) is no step of this run, and no resume either."""
        if loaded is not None and not view.holds_checkpoint(loaded.path, loaded.step):
            return
        last = self.last
        if (
            loaded is not None
            and loaded.step != last.step
            and (self.resuming or last.step is None or loaded.step > last.step)
        ):
            self.last = LastSave.at(loaded.step, loaded.epoch)
        if self.resuming and loaded is not None:
            self.previous_step = loaded.step
        self.resuming = self.resuming and loaded is None

    def count_delete(self, step: int, newest_left: int | None) -> None:
        """``step`` was deleted and ``newest_left`` (rank 0's view, so every rank's schedule
        agrees) is the newest step left: counting from ``step`` moves to it, at the same time."""
        if self.last.step == step:
            self.last = LastSave(newest_left, self.last.epoch, self.last.time)

    def preemption_saved(self, step: int, *, report: bool) -> None:
        """The checkpoint of ``step`` is durable after a signal asked for it (every rank
        decided so together): set :attr:`preempted`, and log it where ``report``."""
        self.signals.clear()
        self.preempted = True
        if report:
            logger.warning("preemption save of step %d committed; stop and requeue", step)

    def should_save(self, step: int, epoch: int | None, *, in_flight: bool) -> bool:
        """Decide for ``step`` now and keep the decision for the save of that step.
        ``in_flight``: whether an async save is still running on this rank."""
        at_step_boundary = step != self.previous_step
        self._pending = self._decide(
            step,
            epoch,
            force=False,
            overwrite=False,
            in_flight=in_flight,
            at_step_boundary=at_step_boundary,
        )
        self._pending_at_step_boundary = at_step_boundary
        return self._pending.save

    def take(
        self, step: int, epoch: int | None, *, force: bool, overwrite: bool, in_flight: bool
    ) -> SaveDecision:
        """The decision for the save of ``step``: the one :meth:`should_save` took for it, or
        a new one (also when ``overwrite`` may save what that one, taken without it, did not).
        A decision to save marks the start of a save, whatever its outcome."""
        pending, self._pending = self._pending, None
        if (
            pending is not None
            and pending.step == step
            and pending.epoch == epoch
            and (pending.save or not overwrite)
        ):
            decision = pending.forced() if force else pending
        else:
            # should_save already counted this step as reached: its verdict on the boundary
            # holds for the save that follows it, whatever epoch the save passes.
            at_step_boundary = (
                self._pending_at_step_boundary
                if pending is not None and pending.step == step
                else step != self.previous_step
            )
            decision = self._decide(
                step,
                epoch,
                force=force,
                overwrite=overwrite,
                in_flight=in_flight,
                at_step_boundary=at_step_boundary,
            )
        if decision.save:
            self.last_started = time.monotonic()
        return decision

    def _decide(
        self,
        step: int,
        epoch: int | None,
        *,
        force: bool,
        overwrite: bool,
        in_flight: bool,
        at_step_boundary: bool,
    ) -> SaveDecision:
        """``decide`` for this manager; once it answered (a refused step or epoch leaves no
        trace), ``step`` is the previous call's."""
        decision = decide(
            step,
            epoch,
            force=force,
            overwrite=overwrite,
            schedule=self.schedule,
            last=self.last,
            last_started=self.last_started,
            in_flight=in_flight,
            signals=self.signals,
            coord=self.coord,
            at_step_boundary=at_step_boundary,
        )
        self.previous_step = step
        return decision


class SignalFlag:
    """Signals that request a preemption save: their handlers only set a flag, because the
    save itself must happen where every rank takes part.

    Managers may close in any order: :meth:`restore` puts back the handler :meth:`install`
    replaced only where this flag's handler is still the one installed. Where another flag's
    handler replaced it since (a manager made later, still open), that one is left in place and
    takes over what this one had replaced, to put back in its turn.

    Once restored, this flag's handler hands a signal to the handler it had replaced, as if
    that one were installed (the default action re-raises the signal, an ignored signal stays
    ignored): others may keep it and put it back after :meth:`restore`, as Lightning's signal
    connector does when it wraps it in a handler of its own, so a closed manager never swallows
    a signal."""

    def __init__(self, signals: object) -> None:
        self.watched = checked_signals(signals)
        self._flag = threading.Event()
        self._previous: dict[int, Any] = {}
        # Filled by restore(): a signal the handler gets afterwards goes to the one it replaced.
        self._replaced_when_restored: dict[int, Any] = {}
        self._handler: Callable[[int, FrameType | None], None] | None = None
        #: Called with the signal's number right after the flag is set, inside the handler:
        #: what must change before the interrupted code runs on (Lightning's own SIGTERM flag,
        #: which its handler set just before, held back until the save) cannot wait for a poll.
        self.on_set: Callable[[int], None] | None = None

    def install(self) -> None:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            if signum in self._replaced_when_restored:
                _hand_on(signum, frame, self._replaced_when_restored[signum])
            else:
                self._flag.set()
                if self.on_set is not None:
                    self.on_set(signum)

        self._handler = on_signal
        for signum in self.watched:
            self._previous[signum] = signal.signal(signum, on_signal)
        _installed.add(self)

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`, where this flag's
        handler is still installed (see the class doc); outside the main thread, where Python
        cannot, it stays installed with a warning and hands each signal on to the handler it
        replaced, as it does once restored. A signal still pending (no save call
        at a step boundary came after it) is logged as a warning: no preemption save was made,
        and the next run resumes from the last checkpoint."""
        _installed.discard(self)
        if self._flag.is_set():
            self._flag.clear()
            logger.warning(
                "closing with a preemption signal pending: no save() call at a new step came "
                "after it, so no preemption save was made (the next run resumes from the last "
                "checkpoint)"
            )
        off_main_thread = threading.current_thread() is not threading.main_thread()
        for signum, previous in self._previous.items():
            self._replaced_when_restored[signum] = previous
            if signal.getsignal(signum) is self._handler and off_main_thread:
                # signal.signal() works in the main thread alone: a close elsewhere completes,
                # and the handler left installed hands the signal on to the one it replaced.
                logger.warning(
                    "closing outside the main thread: the handler of %s is left installed (only "
                    "the main thread can restore one); it passes the signal on to the one it "
                    "replaced",
                    signal.Signals(signum).name,
                )
            elif signal.getsignal(signum) is self._handler:
                # None: a handler not installed from Python (set from C before the interpreter
                # started), which Python cannot put back; the default action is the nearest.
                signal.signal(signum, signal.SIG_DFL if previous is None else previous)
                continue
            for later in list(_installed):
                if later._previous.get(signum) is self._handler:
                    later._previous[signum] = previous
        self._previous.clear()

    def is_set(self) -> bool:
        return self._flag.is_set()

    def clear(self) -> None:
        self._flag.clear()


def _hand_on(signum: int, frame: FrameType | None, handler: Any) -> None:
    """Handles ``signum`` as ``handler`` (a value ``signal.signal`` returned) would have, had it
    been installed: a Python handler is called, an ignored signal is dropped, and the default
    action (also for a handler not installed from Python, None) is taken by putting it back and
    raising the signal again."""
    if callable(handler):
        handler(signum, frame)
    elif handler != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


#: The flags whose handlers are installed (until :meth:`SignalFlag.restore`).
_installed: weakref.WeakSet[SignalFlag] = weakref.WeakSet()


def checked_signals(signals: object) -> tuple[int, ...]:
    """``save_on_signal`` as signal numbers, refused before anything is set up."""
    if isinstance(signals, int) or not isinstance(signals, Collection):
        raise InvalidArgument(f"save_on_signal must be a tuple of signals, not {signals!r}")
    checked = []
    for signum in signals:
        try:
            checked.append(int(signal.Signals(signum)))
        except (ValueError, TypeError):
            raise InvalidArgument(f"save_on_signal: {signum!r} is not a signal") from None
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            raise InvalidArgument(f"save_on_signal: {signal.Signals(signum).name} cannot be caught")
    if checked and threading.current_thread() is not threading.main_thread():
        raise InvalidArgument("save_on_signal needs the manager created in the main thread")
    return tuple(checked)
