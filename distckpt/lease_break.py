"""``distckpt lease ROOT --break``: breaking the lease of a holder on another machine that is
known to be dead (:mod:`distckpt.lease`), without taking the root from a job that claimed it
meanwhile."""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import replace
from pathlib import Path

from distckpt.errors import LeaseTakenMeanwhile, RootInUse
from distckpt.fsutil import atomic_write_bytes
from distckpt.layout import RootLayout
from distckpt.lease import (
    LeaseHolder,
    _in_use,
    _lock_path,
    _read_record,
    _record_path,
    _try_lock,
    now_utc,
    read_holder,
)
from distckpt.lock import PROBE_GRACE

logger = logging.getLogger("distckpt")


def break_lease(root: str | os.PathLike[str]) -> LeaseHolder | None:
    """Break the lease of a holder that is on another machine and known dead: the record is
    marked broken, so that the next job takes the root and the holder, if it lives after all,
    is fenced at its next commit. Returns the broken holder, or None if nobody held it. A
    holder on this machine (:meth:`LeaseHolder.on_this_machine`, in any PID namespace) is
    never broken: its lock tells whether it lives; a live one is refused with
    :class:`~distckpt.RootInUse` (stop it first), as is one whose lock cannot be probed here
    (a lock file this user may not read: run as the root's owner), and a root whose record
    this user may not read (it may name a live holder).

    The record is re-read and rewritten under the lock an acquisition claims with, and broken
    only if it still names the holder judged dead (its token and generation): a job that took
    the root over since (a requeued job waiting with ``wait_for_root``) is left alone, with
    :class:`~distckpt.LeaseTakenMeanwhile`. Where that lock stays held (a lock that machine's
    death left behind: an NFS server's lease) and the record is unchanged, the lock file is
    moved aside and the record re-read and rewritten under the lock of a new lock file, which
    stays: a job waiting on the lock retries on the new file
    (:func:`~distckpt.lease._try_lock`), and either it claims the root before this break takes
    that lock (the break then leaves the record alone) or after the break. The file moved aside
    is removed when the break ends (a cleanup removes it where the break was killed first)."""
    root_path = RootLayout.at(root).root
    holder = read_holder(root_path)
    if holder is None:
        if _record_unreadable_here(root_path):  # it may name a live holder: not "nobody"
            raise RootInUse(
                f"cannot tell whether root {root_path} is held: its lease record "
                f"{_record_path(root_path)} cannot be read by this user: run this as the "
                "root's owner"
            )
        return None
    if holder.on_this_machine():
        if holder.alive is None:  # not known dead: taken for dead, it was left alone unsaid
            raise _in_use(
                root_path,
                holder,
                ", on this machine, but whether it lives cannot be told here (its lock file "
                "cannot be probed by this user): run this as the root's owner",
            )
        if holder.alive:
            raise _in_use(root_path, holder, ", on this machine and alive: stop it, not its lease")
        return holder  # dead: the next acquire takes over by itself
    lock_path = _lock_path(root_path)
    moved_aside: Path | None = None
    # A starting job holds this lock from before it reads the record until it dies, so within
    # PROBE_GRACE it is either ours or a claimer's whose record is written by then.
    lock = _try_lock(lock_path, PROBE_GRACE)
    try:
        if lock is None:
            # Held past PROBE_GRACE with the record unchanged: a lock the dead machine left
            # behind. Writing without a lock would race a waiting job that takes it the moment
            # it ends; the break takes the lock of a new lock file instead, which later jobs
            # lock too. (Should it end between this read and the move, a job taking it then
            # holds the file moved aside: its record still fences whichever job loses.)
            _refuse_unless_still_judged(root_path, holder)
            moved_aside = _move_aside(root_path)
            lock = _try_lock(lock_path, PROBE_GRACE)
        current = _refuse_unless_still_judged(root_path, holder)
        if lock is None:  # a waiting job took the new lock file first and is claiming the root
            raise _taken_meanwhile(root_path, holder, current)
        logger.warning("breaking the lease of %s held by %s", root_path, holder.describe())
        broken = replace(current, broken_utc=now_utc(), alive=None)
        atomic_write_bytes(_record_path(root_path), broken.to_json(), fsync=True)
    finally:
        if lock is not None:
            lock.release()
        if moved_aside is not None:
            moved_aside.unlink(missing_ok=True)
    return broken


def _record_unreadable_here(root: Path) -> bool:
    """Whether the root's lease record exists but this user may not read it."""
    try:
        with _record_path(root).open("rb"):
            return False
    except FileNotFoundError:
        return False
    except PermissionError:
        return True


def _move_aside(root: Path) -> Path | None:
    """Rename the lease's lock file to a name of its own: where it went, or None if it was
    gone already (its lock lingered on a file nobody can open any more)."""
    moved_aside = RootLayout(root).lingering_lease_lock_path(uuid.uuid4().hex)
    try:
        os.rename(_lock_path(root), moved_aside)
    except FileNotFoundError:
        return None
    return moved_aside


def _refuse_unless_still_judged(root: Path, judged: LeaseHolder) -> LeaseHolder:
    """The current record, if it still names the holder judged dead and has not been released
    or broken; else :class:`~distckpt.LeaseTakenMeanwhile`."""
    current = _read_record(root)
    if (
        current is None
        or not current.held
        or (current.token, current.generation) != (judged.token, judged.generation)
    ):
        raise _taken_meanwhile(root, judged, current)
    return current


def _taken_meanwhile(
    root: Path, judged: LeaseHolder, current: LeaseHolder | None
) -> LeaseTakenMeanwhile:
    if current is None:
        now = "no readable lease record is there any more"
    elif (current.token, current.generation) != (judged.token, judged.generation):
        now = f"it was taken meanwhile by {current.describe()}"
    elif current.broken_utc is not None:
        now = f"it was broken meanwhile, at {current.broken_utc}"
    elif current.released_utc is not None:
        now = f"its holder released it meanwhile, at {current.released_utc}"
    else:
        now = "a job took the lease's lock meanwhile and has not written its record yet"
    return LeaseTakenMeanwhile(
        f"did not break the lease of {root}, judged dead as {judged.describe()}: {now}. "
        "The lease record was left as it was",
        current,
        judged,
    )
