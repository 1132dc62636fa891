"""The background thread of async saves: at most one save in flight, on a group of its own.

An async save's write, agreement and commit run here, with a :class:`Coordinator` spawned for
this thread alone, so its collectives never interleave with those of the training thread. A
save still in flight when the interpreter exits is finished (or its failure logged) by an
``atexit`` hook; the collectives' timeout bounds that wait.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from distckpt.coord import Coordinator
from distckpt.results import SaveResult

logger = logging.getLogger("distckpt")


class BackgroundSaves:
    """One worker thread and its private coordinator. Collective to create (it takes a group).

    Any thread may :meth:`wait`: every caller waiting while a save runs blocks until it ends
    and gets its result or its error; the save counts as in flight until one caller has
    returned from waiting on it (after that, :meth:`wait` returns None)."""

    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord.spawn()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="distckpt-commit")
        self._inflight: Future[SaveResult] | None = None
        # Guards _inflight between the training thread and other threads that wait.
        self._lock = threading.Lock()
        atexit.register(self._finish_at_exit)

    def submit(self, save: Callable[[Coordinator], SaveResult]) -> None:
        """Run ``save`` with this thread's coordinator; the caller waits for the one before."""
        with self._lock:
            self._inflight = self._executor.submit(save, self.coord)

    def wait(self) -> SaveResult | None:
        """The save in flight's result, or its error raised; None with none in flight."""
        with self._lock:
            inflight = self._inflight
        if inflight is None:
            return None
        try:
            return inflight.result()
        finally:
            # Cleared only once it ended (not when a waiter is interrupted), so concurrent
            # waiters all see the same outcome.
            with self._lock:
                if self._inflight is inflight and inflight.done():
                    self._inflight = None

    @property
    def in_flight(self) -> bool:
        """Whether the save submitted last is still running."""
        inflight = self._inflight
        return inflight is not None and not inflight.done()

    def close(self) -> None:
        """Stop the thread (after the save in flight) and give its group back."""
        self._executor.shutdown(wait=True)
        atexit.unregister(self._finish_at_exit)
        self.coord.close()

    def _finish_at_exit(self) -> None:
        try:
            result = self.wait()
            if result is not None:
                logger.info("finished the save of step %d in flight at exit", result.step)
        except Exception as exc:
            logger.error("the checkpoint save in flight at exit failed: %s", exc)
