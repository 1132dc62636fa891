"""The collective start of a :class:`~distckpt.CheckpointManager`, once its arguments are
checked and its store made: the counterpart of :mod:`distckpt.closing`.

Rank 0 opens the root (taking its lease, repairing its links) and every rank learns the
outcome, the root's newest checkpoint (which the save schedule counts from) and the token
that names this manager's staging areas; then every rank checks that it sees the same root.
"""

from __future__ import annotations

import time
import uuid

from distckpt.coord import Coordinator
from distckpt.decisions import SaveDecider, newest_to_count_from
from distckpt.errors import RootInUse
from distckpt.storage import RootStore


def open_root(
    coord: Coordinator, store: RootStore, decider: SaveDecider, *, wait_for_root: float
) -> str:
    """Open ``store``'s root on rank 0, waiting up to ``wait_for_root`` seconds for a job that
    holds it (:class:`~distckpt.RootInUse` on every rank after that), have ``decider`` count
    from its newest checkpoint, and check from every rank that the root is the one rank 0
    opened. Returns the token rank 0 names this manager's staging areas after (unique to this
    manager), the same on every rank."""
    started = time.monotonic()

    def open_once(seconds: float) -> tuple[tuple[tuple[int, int | None] | None, float], str]:
        try:
            opened = store.open(wait_for_root=seconds)
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
