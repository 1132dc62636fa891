"""How a :class:`~distckpt.manager.CheckpointManager` closes: the order in which it lets go of
what it holds, and what becomes of a failure of the close when another exception is already
leaving a ``with`` block. A module of its own so that the manager reads as its calls.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from distckpt.background import BackgroundSaves
from distckpt.coord import Coordinator
from distckpt.decisions import SignalFlag
from distckpt.errors import describe_error
from distckpt.saving import Saver
from distckpt.storage import RootStore
from distckpt.tidying import BackgroundTidy

logger = logging.getLogger("distckpt")


def release(
    background: BackgroundSaves | None,
    store: RootStore,
    signals: SignalFlag,
    coord: Coordinator,
    *,
    tidying: BackgroundTidy,
    tidy_wait: float,
    saver: Saver | None = None,
) -> bool:
    """Stop the background thread (giving its group back; its last commit may have asked for a
    tidy), wait at most ``tidy_wait`` seconds for the removals of ``tidying`` and leave what
    still runs to its daemon thread, release the root's lease, restore the signal handlers and
    release the coordinator's group: each even if one before failed or was interrupted (a
    Ctrl-C), the first failure raised. The coordinator's group is kept until the thread's stop
    completed, so that every rank gives the two back to the pool in the same order. Each step
    may run again, so a repeated close finishes what an interrupted one left. The lease is kept
    while the async save in flight still runs (a Ctrl-C interrupted the thread's stop), so that
    no other job takes the root under its commit: the repeated close releases it, or the end of
    the process.
    The lease goes after the wait, not before, so that the usual removals end while this job
    still holds the root; the ones left only delete what was already in the trash or left by
    dead writers, which is safe whoever holds the root then.

    Right after the thread's stop, ``saver`` lets go of its snapshot buffers (a copy of the
    state), which would otherwise live as long as the manager: nothing saves after a close,
    even one that does not complete.

    Returns whether the close is complete: not while the stopped thread holds the outcome of a
    save that no caller received (a Ctrl-C interrupted the close's wait), which the repeated
    close's wait then returns or raises."""

    def stop_background() -> None:
        if background is not None:
            background.close()

    def release_lease() -> None:
        # Still in flight only when the thread's stop failed: then release() raises, and the
        # repeated close comes back here.
        if background is None or not background.in_flight:
            store.close()

    def release_group() -> None:
        # Every rank gives its groups back to the pool in the same order (coord_groups): the
        # thread's group, then this one. A rank whose thread's stop was interrupted keeps this
        # one until the repeated close gave the thread's back.
        if background is None or background.closed:
            coord.close()

    def drop_snapshot() -> None:
        # Nothing saves once the manager is closed, whether or not the rest of the close
        # completes; a save still in flight keeps what it writes from by itself.
        if saver is not None:
            saver.drop_snapshot()

    run_each(
        stop_background,
        drop_snapshot,
        lambda: tidying.close(tidy_wait),
        release_lease,
        signals.restore,
        release_group,
    )
    return background is None or not background.holds_outcome


def run_each(*steps: Callable[[], object]) -> None:
    """Run every one of ``steps`` in order, even if one before failed or was interrupted;
    then raise the first failure (the later ones are logged)."""
    first: BaseException | None = None
    for step in steps:
        try:
            step()
        except BaseException as exc:  # a KeyboardInterrupt too: the next steps still run
            if first is None:
                first = exc
            else:
                logger.error("closing the checkpoint manager: another step failed too: %r", exc)
    if first is not None:
        raise first


def close_keeping(close: Callable[[], None], exc: BaseException | None) -> None:
    """Run ``close`` as a ``with`` block ends. With an exception ``exc`` leaving the block,
    ``exc`` stays the one raised: an error of the close (a failed save in flight) is logged
    and added to it as a note, instead of replacing it; with none, the close's error is
    raised."""
    if exc is None:
        close()
        return
    try:
        close()
    except Exception as close_error:
        logger.error(
            "closing the checkpoint manager after %s failed: %s",
            type(exc).__name__,
            close_error,
        )
        exc.add_note(
            f"distckpt: closing the checkpoint manager also failed: {describe_error(close_error)}"
        )
