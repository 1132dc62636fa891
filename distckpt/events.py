"""Phase events: where the time of a save or a restore goes, for benchmarks and tracing.

The save and restore protocols wrap each of their phases in :func:`phase`. With no listener
this costs one ``perf_counter`` call per phase; a listener added with :func:`add_listener`
receives a :class:`PhaseEvent` when each phase ends (also when it ends with an error), in the
thread that ran it (an async save's background thread for its write and commit phases, rank
0's proposing thread for an async save's ``propose.root``, the gathering thread for the
all-gather of an async save's proposals).

Phase names are dotted: the first part names the operation, the rest the phase. A save emits,
on every rank, ``save.propose`` (:mod:`distckpt.proposal`), ``save.write``, ``save.agree``
and ``save.commit`` (:mod:`distckpt.protocol`). Inside ``save.propose`` every rank emits
``propose.snapshot`` (reducing the state to plain data and, for an async save, readying the
snapshot's buffers), for an async save ``propose.copy`` after it (copying the tensors into
those buffers, while the proposals' ``collective.all_gather`` runs in a thread beside it), and
rank 0 alone ``propose.root`` (checking the step, opening the staging area, reading the free
space; for an async save in a thread of its own, beside the snapshot and the copy). Inside
``save.commit`` rank 0 alone emits ``commit.lock`` (taking the root's lock),
``commit.manifest``, ``commit.publish`` (the rename), ``commit.links`` and
``commit.retention`` (the store; an ``s3://`` store emits only ``commit.manifest`` and
``commit.publish``, the creation of ``COMMIT``). Every collective emits ``collective.all_gather``,
``collective.gather`` or ``collective.broadcast`` (the :class:`~distckpt.coord.Coordinator`,
with no step; a gather's second, point-to-point round for a long value is a
``collective.gather`` too). Restores
emit no phases yet (``restore.*`` names are reserved for them). A listener must be quick and
must not raise: an exception it raises is logged and otherwise ignored.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

logger = logging.getLogger("distckpt")


@dataclass(frozen=True)
class PhaseEvent:
    """One phase that ended on one rank."""

    #: dotted name, e.g. ``"save.write"``
    phase: str
    #: the rank of the manager's group that ran it (0 in a plain process)
    rank: int
    #: the step being saved or restored, where known
    step: int | None
    #: wall-clock duration of the phase
    seconds: float
    #: False when the phase ended with an exception
    ok: bool = True


Listener = Callable[[PhaseEvent], None]

_listeners: tuple[Listener, ...] = ()
_listeners_lock = threading.Lock()


def add_listener(listener: Listener) -> Callable[[], None]:
    """Call ``listener`` with every :class:`PhaseEvent` of this process from now on; returns a
    function that removes it again."""
    global _listeners
    with _listeners_lock:
        _listeners = (*_listeners, listener)

    def remove() -> None:
        global _listeners
        with _listeners_lock:
            _listeners = tuple(x for x in _listeners if x is not listener)

    return remove


@contextmanager
def phase(name: str, *, rank: int, step: int | None = None) -> Iterator[None]:
    """Time the block as the phase ``name`` and tell every listener when it ends."""
    started = time.perf_counter()
    ok = False
    try:
        yield
        ok = True
    finally:
        listeners = _listeners
        if listeners:
            event = PhaseEvent(name, rank, step, time.perf_counter() - started, ok)
            for listener in listeners:
                try:
                    listener(event)
                except Exception as exc:  # a broken listener must never break a save
                    logger.warning("phase-event listener %r failed: %s", listener, exc)
