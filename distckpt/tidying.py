"""Rank 0's tidying of the root, in a thread of its own: the removals a start, a commit, a
delete or a prune leave (:meth:`RootStore.tidy <distckpt.storage.RootStore.tidy>`) never hold
up the next call.

The other ranks do not wait for rank 0's removals: once an outcome reached them they go on to
their next call and wait in its collective. A removal run in rank 0's calling thread, even
after that outcome, would therefore still run inside the next call's timeout. Here it runs in
a daemon thread instead, one tidy at a time per store: a request made while one runs is
coalesced into a single pass after it (never two removals of the same trash side by side).

:meth:`BackgroundTidy.close` waits for a running tidy for a bounded time
(:func:`close_wait_seconds`), then leaves it to its daemon thread, which the process's exit
never waits for; whatever it had not removed stays a leftover that the next start or ``gc``
removes. A forked child (a data loader worker) has no copy of the thread, and no part in it:
there :meth:`~BackgroundTidy.request` starts nothing and :meth:`~BackgroundTidy.wait` does not
wait.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

logger = logging.getLogger("distckpt")

#: The longest :meth:`BackgroundTidy.close` waits for a tidy still running, whatever the
#: manager's timeout: long enough for the usual trash (a few checkpoints of a local disk), short
#: enough that a job's end (and under a preemption, the save window before SIGKILL) is not
#: spent deleting what the next start removes anyway.
CLOSE_WAIT_CAP_SECONDS = 10.0


def close_wait_seconds(timeout: float) -> float:
    """How long a manager with collectives' ``timeout`` waits at close for a running tidy:
    the smaller of the two."""
    return min(timeout, CLOSE_WAIT_CAP_SECONDS)


class BackgroundTidy:
    """Runs ``tidy`` (a store's :meth:`~distckpt.storage.RootStore.tidy`, which never raises)
    in a daemon thread on :meth:`request`, one run at a time."""

    def __init__(self, tidy: Callable[[], None], *, name: str = "distckpt-tidy") -> None:
        self._tidy = tidy
        self._name = name
        # Guards the three fields below; held only to read or change them, never while tidying.
        self._state = threading.Condition()
        self._running = False
        #: a request came while a run was going on: one more run follows it
        self._pending = False
        #: closed: requests start nothing more
        self._closed = False
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
        with self._state:
            if self._closed:
                return
            if self._running:
                self._pending = True
                return
            self._running = True
        try:
            threading.Thread(target=self._run, name=self._name, daemon=True).start()
        except RuntimeError as exc:  # "can't start new thread"
            # The caller's outcome (a committed save, an opened root) is told already: a
            # removal left for later must not turn it into a failure, nor leave _running set,
            # which would keep every wait() (a gc, a close) waiting for a run that never ends.
            self._stopped()
            logger.warning(
                "could not start removing the root's leftovers in the background (%s): they "
                "are removed at the next save, delete, prune or gc",
                exc,
            )

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until no run is going on or pending (at most ``timeout`` seconds; None: for as
        long as it takes); whether none is. At once in a forked child."""
        if not self._in_owner():
            return True
        with self._state:
            return self._state.wait_for(lambda: not self._running, timeout)

    def close(self, timeout: float) -> bool:
        """Take no more requests, then wait at most ``timeout`` seconds for the run going on
        and the one pending after it; whether they ended. Past ``timeout`` the pending run is
        dropped and the one going on is left to its daemon thread."""
        if not self._in_owner():
            return True
        with self._state:
            self._closed = True
        started = time.monotonic()
        if self.wait(timeout):
            return True
        with self._state:
            self._pending = False
        logger.info(
            "left the root's removals running after %.1f s at close: what they do not "
            "finish is removed at the next start or gc",
            time.monotonic() - started,
        )
        return False

    @property
    def running(self) -> bool:
        """Whether a run is going on (or pending) in this process."""
        return self._in_owner() and self._running

    def _run(self) -> None:
        while True:
            try:
                self._tidy()
            except Exception as exc:  # tidy never raises; this thread must not die silently
                logger.warning("tidying the checkpoint root failed: %s", exc)
            with self._state:
                if not self._pending:
                    self._running = False
                    self._state.notify_all()
                    return
                self._pending = False

    def _stopped(self) -> None:
        """No run going on nor pending any more (its thread never started): wake the waiters."""
        with self._state:
            self._running = False
            self._pending = False
            self._state.notify_all()

    def _in_owner(self) -> bool:
        """Whether this is the process that made the runner (not a forked child of it)."""
        return os.getpid() == self._owner_pid
