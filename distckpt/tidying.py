"""Rank 0's tidying of the root, in a thread of its own: the removals a start, a commit, a
delete or a prune leave (:meth:`RootStore.tidy <distckpt.storage.RootStore.tidy>`) never hold
up the next call.

The other ranks do not wait for rank 0's removals: once an outcome reached them they go on to
their next call and wait in its collective. A removal run in rank 0's calling thread, even
after that outcome, would therefore still run inside the next call's timeout. Here it runs in
a daemon thread instead, one tidy at a time per store: a request made while one runs is
coalesced into a single pass after it (never two removals of the same trash side by side).

The thread stays for the next request until it has waited :data:`IDLE_SECONDS` for one: a
request then only wakes it. Starting a thread per save cost rank 0 about a millisecond of every
save on a busy machine (``Thread.start`` waits until the new thread runs), most of a tiny
save's coordination; a manager that saves less often than that starts one per save, and one
never closed leaves no thread behind for long.

:meth:`BackgroundTidy.close` waits for a running tidy for a bounded time
(:func:`close_wait_seconds`), then leaves it to its daemon thread, which the process's exit
never waits for; whatever it had not removed stays a leftover that the next start or ``gc``
removes. An idle thread ends at the close. A forked child (a data loader worker) has no copy of
the thread, and no part in it: there :meth:`~BackgroundTidy.request` starts nothing and
:meth:`~BackgroundTidy.wait` does not wait.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable

logger = logging.getLogger("distckpt")

#: The longest :meth:`BackgroundTidy.close` waits for a tidy still running, whatever the
#: manager's timeout: long enough for the usual trash (a few checkpoints of a local disk), short
#: enough that a job's end (and under a preemption, the save window before SIGKILL) is not
#: spent deleting what the next start removes anyway.
CLOSE_WAIT_CAP_SECONDS = 10.0

#: How long the tidy thread waits for another request before it ends (the next request then
#: starts a new one).
IDLE_SECONDS = 30.0


def close_wait_seconds(timeout: float) -> float:
    """How long a manager with collectives' ``timeout`` waits at close for a running tidy:
    the smaller of the two."""
    return min(timeout, CLOSE_WAIT_CAP_SECONDS)


class _Requests:
    """What a :class:`BackgroundTidy` shares with its thread. It holds nothing of the tidy (nor
    of the store behind it): the thread keeps only this and a weak reference to its runner, so
    a manager dropped without ``close`` (its store, and the root's lease the store holds) is
    freed while the thread waits for a request, as it was before the thread outlived a run."""

    def __init__(self) -> None:
        # Guards the fields below; held only to read or change them, never while tidying.
        self.state = threading.Condition()
        #: a run was requested and has not started yet
        self.wanted = False
        #: a run is going on
        self.running = False
        #: the thread serving requests (running one or waiting for one), if any
        self.thread: threading.Thread | None = None
        #: closed: requests start nothing more, and the thread ends once idle
        self.closed = False

    def idle(self) -> bool:
        """No run going on nor wanted; under ``state``."""
        return not self.running and not self.wanted

    def close(self) -> None:
        """Take no more requests and have an idle thread end now."""
        with self.state:
            self.closed = True
            self.state.notify_all()


def _serve(requests: _Requests, runner: weakref.ref[BackgroundTidy], idle_seconds: float) -> None:
    """The thread: run the runner's tidy once per wake-up that found a request, until closed
    (also by the runner's collection) or idle for ``idle_seconds``; it holds the runner only
    during a run."""
    while True:
        with requests.state:
            requests.state.wait_for(lambda: requests.wanted or requests.closed, idle_seconds)
            if not requests.wanted:  # idle too long, or closed: a new request starts anew
                requests.thread = None
                return
            requests.wanted = False
            requests.running = True
        owner = runner()
        try:
            if owner is not None:
                owner._tidy()
        except Exception as exc:  # tidy never raises; this thread must not die silently
            logger.warning("tidying the checkpoint root failed: %s", exc)
        finally:
            owner = None  # not held while waiting: see _Requests
            with requests.state:
                requests.running = False
                requests.state.notify_all()


class BackgroundTidy:
    """Runs ``tidy`` (a store's :meth:`~distckpt.storage.RootStore.tidy`, which never raises)
    in a daemon thread on :meth:`request`, one run at a time; the thread waits up to
    ``idle_seconds`` for the next request before it ends."""

    def __init__(
        self,
        tidy: Callable[[], None],
        *,
        name: str = "distckpt-tidy",
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        self._tidy = tidy
        self._name = name
        self._idle_seconds = idle_seconds
        self._requests = _Requests()
        weakref.finalize(self, self._requests.close)  # dropped unclosed: the thread ends
        # The thread is not copied into a forked child: only this process runs or waits.
        self._owner_pid = os.getpid()

    def request(self) -> None:
        """Have ``tidy`` run soon, in the background; returns at once and never raises. While
        a run is going on, it is run once more after it, however many requests come meanwhile.
        Nothing once closed, or in a forked child. Where no thread can be started (a
        container's pids limit reached), nothing runs: a warning is logged, and what was to be
        removed stays for the next request, or for ``gc``, which removes it in its own call."""
        if not self._in_owner():
            return
        requests = self._requests
        with requests.state:
            if requests.closed:
                return
            requests.wanted = True
            if requests.thread is not None:  # waiting for a request, or running one
                requests.state.notify_all()
                return
            thread = requests.thread = threading.Thread(
                target=_serve,
                args=(requests, weakref.ref(self), self._idle_seconds),
                name=self._name,
                daemon=True,
            )
        try:
            thread.start()
        except RuntimeError as exc:  # "can't start new thread"
            # The caller's outcome (a committed save, an opened root) is told already: a
            # removal left for later must not turn it into a failure, nor leave the request
            # wanted, which would keep every wait() (a gc, a close) waiting for a run that
            # never comes.
            with requests.state:
                if requests.thread is thread:
                    requests.thread = None
                requests.wanted = False
                requests.state.notify_all()
            logger.warning(
                "could not start removing the root's leftovers in the background (%s): they "
                "are removed at the next save, delete, prune or gc",
                exc,
            )

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until no run is going on or wanted (at most ``timeout`` seconds; None: for as
        long as it takes); whether none is. At once in a forked child."""
        if not self._in_owner():
            return True
        with self._requests.state:
            return self._requests.state.wait_for(self._requests.idle, timeout)

    def close(self, timeout: float) -> bool:
        """Take no more requests, then wait at most ``timeout`` seconds for the run going on
        and the one wanted after it, and for the thread to end; whether the runs ended. Past
        ``timeout`` the wanted run is dropped and the one going on is left to its daemon
        thread, which ends after it."""
        if not self._in_owner():
            return True
        started = time.monotonic()
        self._requests.close()
        if self.wait(timeout):
            with self._requests.state:
                thread = self._requests.thread
            if thread is not None and thread.is_alive():  # ending: nothing is left for it
                thread.join(max(0.0, timeout - (time.monotonic() - started)))
            return True
        with self._requests.state:
            self._requests.wanted = False
        logger.info(
            "left the root's removals running after %.1f s at close: what they do not "
            "finish is removed at the next start or gc",
            time.monotonic() - started,
        )
        return False

    @property
    def running(self) -> bool:
        """Whether a run is going on (or wanted) in this process."""
        if not self._in_owner():
            return False
        with self._requests.state:
            return not self._requests.idle()

    def _in_owner(self) -> bool:
        """Whether this is the process that made the runner (not a forked child of it)."""
        return os.getpid() == self._owner_pid
