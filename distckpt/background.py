"""The background thread of async saves: at most one save in flight, on a group of its own.

An async save's write, agreement and commit run here, with a :class:`Coordinator` spawned for
this thread alone, so its collectives never interleave with those of the training thread. A
save still in flight when the interpreter exits is finished (or its failure logged) by an exit
hook; the collectives' timeout bounds that wait. The hook runs before ``concurrent.futures``
shuts its thread pools down at exit (:func:`_register_exit_hook`): the save's writes and
uploads still run in pools of their own then.

The thread runs at a lower scheduling priority than the training loop (a higher nice value,
:func:`lower_priority`): the write and its checksums are CPU work that would otherwise take
turns with training steps on equal terms.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor

from distckpt.coord import Coordinator
from distckpt.errors import InvalidArgument
from distckpt.results import SaveResult

logger = logging.getLogger("distckpt")


def _register_exit_hook(hook: Callable[[], None]) -> None:
    """Have ``hook`` run at interpreter exit before ``concurrent.futures``' own exit hook.

    That hook (registered with ``threading._register_atexit`` when
    ``concurrent.futures.thread`` is imported, which this module's imports did already) makes
    every later ``ThreadPoolExecutor.submit`` raise "cannot schedule new futures after
    interpreter shutdown", and it runs before any ``atexit`` hook: a save finished from an
    ``atexit`` hook fails at its first write or upload that uses a pool. Hooks registered
    this way run last-registered first, so this one runs before that one.
    ``threading._register_atexit`` is private to CPython; where it is missing (another
    interpreter, a later version that drops it), ``atexit`` is the best there is."""
    register = getattr(threading, "_register_atexit", None)
    if register is None:
        atexit.register(hook)
        return
    register(hook)


#: The saves whose save in flight is finished at exit: every BackgroundSaves not closed yet, or
#: closed while it holds an outcome no caller received (:meth:`BackgroundSaves.close`), but
#: those whose manager was dropped and whose save ended (:meth:`BackgroundSaves.owner_dropped`).
#: Strong references: a manager dropped without close() still has its save finished. No lock
#: guards it: adding, discarding and copying a set are each atomic under the GIL, and a lock
#: another thread held at a fork would stay held for good in the child, whose exit runs the hook.
_open_saves: set[BackgroundSaves] = set()


def _finish_saves_at_exit() -> None:
    """The exit hook: finish (or log the failure of) every open save's save in flight. Nothing
    may escape it, not even a Ctrl-C during a long wait: an exception out of a ``threading``
    exit hook ends the interpreter's shutdown there, so the other managers' saves, the thread
    pools' own exit hook and the join of the program's non-daemon threads would be skipped."""
    for saves in tuple(_open_saves):
        try:
            saves._finish_at_exit()
        except BaseException as exc:  # see the docstring
            logger.error("the checkpoint save in flight at exit was abandoned: %r", exc)


#: The highest nice value Linux has: the lowest priority a thread can take.
MAX_NICE = 19
#: How far the background thread's nice is raised by default: under CFS a thread of nice 10
#: gets about a tenth of the CPU time of a nice-0 thread that wants the same core (weights
#: 110 against 1024), so a training loop keeps nearly all of it, while the save still
#: progresses (docs/benchmark.md, "The background save's priority", has the measurements).
DEFAULT_BACKGROUND_NICE = 10


def check_background_nice(background_nice: object) -> int:
    """``background_nice`` as the increment to apply, refused unless an int from 0 to 19 or
    None (None and 0: leave the thread's priority alone). Negative is refused: raising a
    thread's priority needs a privilege a training job should not need."""
    if background_nice is None:
        return 0
    if (
        isinstance(background_nice, bool)
        or not isinstance(background_nice, int)
        or not 0 <= background_nice <= MAX_NICE
    ):
        raise InvalidArgument(
            f"background_nice must be an int from 0 to {MAX_NICE} or None, not {background_nice!r}"
        )
    return background_nice


def lower_priority(increment: int) -> None:
    """Raise the calling thread's nice value by ``increment`` (capped at 19), not its
    process's: on Linux a thread has a nice value of its own. Raising needs no privilege.
    Where threads have no nice of their own (not Linux) it does nothing, and a refusal (a
    sandbox that forbids setpriority) is logged, not raised: priority changes only the
    scheduling, never what a save writes."""
    if increment == 0:
        return
    if not sys.platform.startswith("linux"):
        logger.debug("background_nice ignored: per-thread nice values need Linux")
        return
    thread = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(MAX_NICE, current + increment))
    except OSError as exc:
        logger.warning("could not lower the background save thread's priority: %s", exc)


class BackgroundSaves:
    """One worker thread and its private coordinator. Collective to create (it takes a group).

    Any thread may :meth:`wait`: every caller waiting while a save runs blocks until it ends
    and gets its result or its error; the save counts as in flight until one caller got its
    result or its error (after that, :meth:`wait` returns None); a caller interrupted while
    waiting does not count."""

    def __init__(self, coord: Coordinator, *, nice: int = 0) -> None:
        """``nice``: how much to raise the worker thread's nice value over that of the thread
        whose first :meth:`submit` starts it (checked by :func:`check_background_nice`)."""
        self.coord = coord.spawn()
        self._executor = ThreadPoolExecutor(
            1,
            thread_name_prefix="distckpt-commit",
            initializer=lower_priority,
            initargs=(check_background_nice(nice),),
        )
        self._inflight: Future[SaveResult] | None = None
        # Guards _inflight between the training thread and other threads that wait. Reentrant:
        # a garbage collection while a thread holds it may run owner_dropped in that thread.
        self._lock = threading.RLock()
        # The exit hook is inherited by a forked child, but the worker thread is not: only
        # the process that made it waits for its save (see _finish_at_exit).
        self._creator_pid = os.getpid()
        #: Whether close() completed: the thread ended and its group was given back.
        self.closed = False
        _open_saves.add(self)

    def submit(
        self, save: Callable[[Coordinator], SaveResult], outcome: Future[SaveResult]
    ) -> None:
        """Run ``save`` with this thread's coordinator into ``outcome``, a fresh Future the
        caller made before anything of the hand-off ran; the caller waits for the one before.
        Each save is one operation of that coordinator.

        The save has one owner at a time: the caller until the thread starts it, the thread
        from then on. :meth:`cancel` tells which, atomically against the thread starting the
        save (Future's own lock): it succeeds only while the thread has not started it, and a
        cancelled save is skipped whenever a thread reaches it. So a caller interrupted
        anywhere in the hand-off, before this call or inside it, cancels ``outcome`` and, when
        that succeeds, ends what the save would have ended. When the submission fails before
        the thread started the save (the thread could not be started, or takes no work at
        interpreter exit), it is cancelled here and the error raised. When it fails after (an
        interrupt landing inside the submission), the save runs and is in flight as if the
        submission had returned, and the error is raised all the same.

        ``outcome`` is in flight (what :meth:`wait` waits for) only once the thread will run
        it: another thread's :meth:`wait` never sees a save that never runs, nor its
        cancellation."""
        self.coord.begin_operation()
        try:
            self._executor.submit(_run_unless_cancelled, outcome, save, self.coord)
        except BaseException:
            # ThreadPoolExecutor.submit queues the work before it starts the thread: a start
            # that fails leaves it queued, and the thread a later submission starts would run
            # it first. Cancelling makes that thread skip it; a cancel that fails means the
            # thread started it already, so it is in flight.
            if not self.cancel(outcome):
                self.keep_in_flight(outcome)
            raise
        self.keep_in_flight(outcome)

    def cancel(self, outcome: Future[SaveResult]) -> bool:
        """Cancel ``outcome`` unless the thread started it (``Future.cancel``), and then it is
        no longer in flight either, also when :meth:`submit` had made it so before an interrupt
        landed: :meth:`wait` never waits for a save that never runs. Whether it is cancelled."""
        with self._lock:
            if not outcome.cancel():
                return False
            if self._inflight is outcome:
                self._inflight = None
            return True

    def keep_in_flight(self, outcome: Future[SaveResult]) -> None:
        """Make ``outcome``, a save the thread took (see :meth:`submit`), the one in flight:
        what :meth:`wait` waits for. Again for the same save does nothing more."""
        with self._lock:
            self._inflight = outcome

    def wait(self, on_failure: Callable[[], None] | None = None) -> SaveResult | None:
        """The save in flight's result, or its error raised; None with none in flight.

        The save stops being in flight only once a caller has its outcome: its result
        returned, or its own error raised, after which the one caller that ended it runs
        ``on_failure`` (a failed save's schedule count is put back once). A caller interrupted
        while it waits (a Ctrl-C), even once the save ended, leaves it in flight, so a later
        wait returns its result or raises its error. A save cancelled before the thread took
        it (see :meth:`cancel`) ended without running: it is forgotten and None returned."""
        with self._lock:
            inflight = self._inflight
        if inflight is None:
            return None
        try:
            result = inflight.result()
        except BaseException as exc:
            # Only the Future's own cancellation: a CancelledError the save's code raised (an
            # inner future of it cancelled) is its failure, handled as any other.
            if isinstance(exc, CancelledError) and inflight.cancelled():
                self._forget(inflight)
                return None
            # The save's own error (not an interrupt of this waiter): the save ended with it.
            failed = inflight.done() and not inflight.cancelled() and inflight.exception() is exc
            if failed and self._forget(inflight) and on_failure is not None:
                on_failure()
            raise
        self._forget(inflight)
        return result

    def _forget(self, ended: Future[SaveResult]) -> bool:
        """``ended`` is no longer in flight; whether it still was (False: another waiter, or
        a later submission, saw to it already)."""
        with self._lock:
            if self._inflight is not ended:
                return False
            self._inflight = None
            return True

    @property
    def holds_outcome(self) -> bool:
        """Whether a save is in flight: running, or ended with an outcome no caller of
        :meth:`wait` received yet (one was interrupted)."""
        return self._inflight is not None

    @property
    def in_flight(self) -> bool:
        """Whether the save submitted last is still running."""
        inflight = self._inflight
        return inflight is not None and not inflight.done()

    def close(self) -> None:
        """Stop the thread (after the save in flight) and give its group back; :attr:`closed`
        once both are done. Safe to call again after an interrupt. While it
        :attr:`holds_outcome` (a caller's wait was interrupted), it stays in ``_open_saves``:
        a program that exits without waiting again still has that save's failure logged."""
        self._executor.shutdown(wait=True)
        if not self.holds_outcome:
            _open_saves.discard(self)
        self.coord.close()
        self.closed = True

    def owned_by(self, owner: object) -> None:
        """Call :meth:`owner_dropped` once ``owner`` (the manager) is garbage collected; not
        at exit, where the exit hook finishes the save in flight first."""
        weakref.finalize(owner, self.owner_dropped).atexit = False

    def owner_dropped(self) -> None:
        """The manager that owns these saves was collected without close(): the thread ends
        now when idle, else once the save in flight ended, which until then is still finished
        at exit (this stays in ``_open_saves``); that save's failure, which no one will wait
        for, is logged. The thread's group is not given back to the pool: each rank collects
        its manager when its own garbage collection runs, so one rank could hand that group
        out to its next manager while another makes a new one, and their collectives would
        never meet."""
        with self._lock:
            inflight = self._inflight
        if inflight is not None and not inflight.done():
            inflight.add_done_callback(lambda _: self.owner_dropped())
            return
        self._executor.shutdown(wait=False)  # a worker ends its thread on the next item
        _open_saves.discard(self)
        if inflight is None or inflight.cancelled():  # a cancelled save has no failure
            return
        failure = inflight.exception()
        if failure is not None and self._forget(inflight):
            logger.error("the checkpoint save of a manager dropped unclosed failed: %s", failure)

    def _finish_at_exit(self) -> None:
        """Finish the save in flight at exit (or log its failure, once: not one another caller
        received or :meth:`owner_dropped` logged); nothing in a forked child, whose copy of
        the save has no thread to finish it and would wait forever."""
        if os.getpid() != self._creator_pid:
            return
        ended_here: list[bool] = []
        try:
            # on_failure runs only for the one caller that ended the failed save: a failure
            # another caller received (or owner_dropped logged) already is not logged again.
            result = self.wait(on_failure=lambda: ended_here.append(True))
            if result is not None:
                logger.info("finished the save of step %d in flight at exit", result.step)
        except Exception as exc:
            if ended_here:
                logger.error("the checkpoint save in flight at exit failed: %s", exc)


def _run_unless_cancelled(
    outcome: Future[SaveResult], save: Callable[[Coordinator], SaveResult], coord: Coordinator
) -> None:
    """The worker thread's part of :meth:`BackgroundSaves.submit`: run ``save`` into
    ``outcome``, unless its submission failed and cancelled it first (its caller ended it)."""
    if not outcome.set_running_or_notify_cancel():
        return
    try:
        result = save(coord)
    except BaseException as exc:  # as ThreadPoolExecutor's own work items: wait() raises it
        outcome.set_exception(exc)
    else:
        outcome.set_result(result)


# At import, after ``concurrent.futures.thread`` registered its exit hook (imported above).
_register_exit_hook(_finish_saves_at_exit)
