"""The collective start of a :class:`~distckpt.CheckpointManager`, once its arguments are
checked and its store made: the counterpart of :mod:`distckpt.closing`.

Rank 0 opens the root (taking its lease, repairing its links) and every rank learns the
outcome, the root's newest checkpoint (which the save schedule counts from) and the token
that names this manager's staging areas; then every rank checks that it sees the same root.

A start that finds the root held and may wait for it says so once, at INFO on the "distckpt"
logger (naming the holder and the longest wait), and once more when it gets the root, with
how long it waited: nothing per poll, whichever store waits.
"""

from __future__ import annotations

import logging
import time
import uuid

from distckpt.coord import Coordinator
from distckpt.decisions import SaveDecider, newest_to_count_from
from distckpt.errors import RootInUse
from distckpt.lease import LeaseHolder
from distckpt.lease_tokens import holder_phrase
from distckpt.storage import OpenedRoot, RootStore

logger = logging.getLogger("distckpt")


def open_root(
    coord: Coordinator, store: RootStore, decider: SaveDecider, *, wait_for_root: float
) -> str:
    """Open ``store``'s root on rank 0, waiting up to ``wait_for_root`` seconds for a job that
    holds it (:class:`~distckpt.RootInUse` on every rank after that), have ``decider`` count
    from its newest checkpoint, and check from every rank that the root is the one rank 0
    opened. Returns the token rank 0 names this manager's staging areas after (unique to this
    manager), the same on every rank."""
    started = time.monotonic()
    wait = RootWait(store, wait_for_root)

    def open_once(seconds: float) -> tuple[tuple[tuple[int, int | None] | None, float], str]:
        try:
            opened = wait.open(seconds)
        except RootInUse as exc:
            # decide_within waits in pieces, and store.open's refusal says its piece alone.
            raise exc.after_waiting(time.monotonic() - started) from exc.__cause__
        return newest_to_count_from(opened, time.time()), uuid.uuid4().hex[:12]

    (newest, newest_age), token = coord.decide_within(
        open_once,
        wait=wait_for_root,
        retry_on=RootInUse,
        what="opening the checkpoint root",
    )
    decider.count_from_newest(newest, newest_age)
    coord.all_gather(
        lambda: store.check_visible(coord.rank), what="checking the root from every rank"
    )
    return token


class RootWait:
    """Rank 0's opening of ``store`` in the tries of one start, which says once, as the store
    finds the root held and begins to wait for its holder, that it is held (through the
    store's ``on_held``: no try of its own), and then when it got the root."""

    def __init__(self, store: RootStore, wait_for_root: float) -> None:
        self.store = store
        self.wait_for_root = wait_for_root
        #: when (``time.monotonic()``) this start found the root held and began to wait
        self.waiting_since: float | None = None

    def open(self, seconds: float) -> OpenedRoot:
        """``store.open``, waiting up to ``seconds`` (one try's share of the wait)."""
        said = self.waiting_since is not None
        opened = self.store.open(wait_for_root=seconds, on_held=None if said else self._held)
        if self.waiting_since is not None:
            logger.info(
                "got checkpoint root %s after waiting %.1f s for its holder to end",
                self.store.root,
                time.monotonic() - self.waiting_since,
            )
        return opened

    def _held(self, holder: LeaseHolder | None) -> None:
        self.waiting_since = time.monotonic()
        logger.info(
            "checkpoint root %s is held by %s: waiting up to %g s for it to end",
            self.store.root,
            holder_phrase(holder),
            self.wait_for_root,
        )
