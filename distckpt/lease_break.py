"""``distckpt lease ROOT --break``: breaking the lease of a holder on another machine that is
known to be dead (:mod:`distckpt.lease`), without taking the root from a job that claimed it
meanwhile."""

from __future__ import annotations

import contextlib
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
from distckpt.lock import PROBE_GRACE, mount_of

logger = logging.getLogger("distckpt")
_PF_KTHREAD = 0x00200000  # include/linux/sched.h: the task is a kernel thread


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
    is removed when the break ends (a cleanup removes it where the break was killed first),
    but put back where the break, holding the new file's lock, then leaves the record alone:
    a job claiming the root from another machine may hold its lock, and has written its
    record meanwhile. Where a waiting job locked the new file first, the moved file is
    removed all the same (it cannot go back over the file that job holds): of a claimer on it
    and that job, whichever writes its record last holds the root, and the other is fenced.
    A claimer on another machine that writes its record only after the break read it again
    has its lease broken like the dead holder's. A lock that a process of this machine holds,
    in a PID namespace the break's can see (:func:`_locked_here`), is no dead machine's: it
    is a job claiming the root that has not written its record yet, left alone with
    :class:`~distckpt.LeaseTakenMeanwhile`, its lock file where it is (moved aside, no later
    job would lock the file it holds, and the next would take the root from it). A break run
    in a PID namespace that cannot see the claimer (another container of the machine) takes
    its lock for another machine's, as it does a claimer's on another machine."""
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
    written = False
    try:
        if lock is None:
            current = _refuse_unless_still_judged(root_path, holder)
            if _locked_here(lock_path):
                # slower than PROBE_GRACE between its lock and its record (a loaded disk's
                # fsync, a stopped process): a live claimer, whatever the record still says
                raise _taken_meanwhile(root_path, holder, current)
            # Held past PROBE_GRACE with the record unchanged, by no process of this machine:
            # a lock the dead machine left behind. Writing without a lock would race a waiting
            # job that takes it the moment it ends; the break takes the lock of a new lock
            # file instead, which later jobs lock too. (Should it end between this read and
            # the move, a job taking it then holds the file moved aside: its record still
            # fences whichever job loses.)
            moved_aside = _move_aside(root_path)
            lock = _try_lock(lock_path, PROBE_GRACE)
        current = _refuse_unless_still_judged(root_path, holder)
        if lock is None:  # a waiting job took the new lock file first and is claiming the root
            raise _taken_meanwhile(root_path, holder, current)
        logger.warning("breaking the lease of %s held by %s", root_path, holder.describe())
        broken = replace(current, broken_utc=now_utc(), alive=None)
        atomic_write_bytes(_record_path(root_path), broken.to_json(), fsync=True)
        written = True
    finally:
        try:
            if moved_aside is not None and lock is not None and not written:
                # Left alone: a job claiming the root from another machine may hold the lock
                # of the file moved aside, which every later job must lock again. A cleanup
                # may have removed it all the same (a break killed long ago left one of its
                # name): the break's refusal, and the release below, still stand.
                with contextlib.suppress(FileNotFoundError):
                    os.replace(moved_aside, lock_path)
            elif moved_aside is not None:
                moved_aside.unlink(missing_ok=True)
        finally:
            if lock is not None:
                lock.release()
    return broken


def _locked_here(path: Path) -> bool:
    """Whether a process of this machine whose PID namespace this one can see (this one's
    and those made inside it) holds a lock on the file ``path`` names. ``/proc/locks`` lists
    the locks of those processes alone, with their pids, and leaves out the others' (a
    container beside this one); a waiter's line, marked ``->``, holds none. False where
    ``/proc`` does not say, and for a lock another machine holds on a network file system,
    which only its server knows."""
    try:
        file = os.stat(path)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return False
    devices = {(os.major(file.st_dev), os.minor(file.st_dev))}
    mount = mount_of(path)
    if mount is not None:  # on btrfs, st_dev is the subvolume's; /proc/locks names the fs's
        devices.add(mount.device)
    places = {f"{major:02x}:{minor:02x}:{file.st_ino}" for major, minor in devices}
    # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:2721173 0 EOF" (NFS emulates flock with POSIX)
    return any(
        len(fields) >= 6
        and fields[1] in ("FLOCK", "POSIX", "OFDLCK")
        and fields[5] in places
        and not _kernel_thread(fields[4])
        for fields in (line.split() for line in lines)
    )


def _kernel_thread(pid: str, proc: Path = Path("/proc")) -> bool:
    """Whether ``pid`` names a kernel thread: its flags in ``/proc/<pid>/stat`` carry
    ``PF_KTHREAD``. On an NFS server, the locks of its clients are held by its ``lockd`` and
    ``nfsd`` threads: a dead client's lingering lock among them, which the break must be able
    to get past when run on the server. No job of this machine holds its lock through a kernel
    thread. (Its parent's pid would not tell: kthreadd is pid 2 on the host alone, and in a
    PID namespace pid 2 may be a job's launcher, whose ranks are live claimers.) ``proc``: where
    procfs is mounted."""
    try:
        stat = (proc / pid / "stat").read_text()
    except OSError:
        return False
    # "<pid> (<comm, which may hold spaces and parentheses>) <state> <ppid> <pgrp> <session>
    # <tty_nr> <tpgid> <flags> ...": flags is the 9th field, the 7th after the comm
    after_comm = stat.rpartition(")")[2].split()
    return len(after_comm) > 6 and int(after_comm[6]) & _PF_KTHREAD != 0


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
    # A rename keeps the file's mtime, which may be days old: a cleanup judges a moved-aside
    # lock file by its age alone (lock._dead_temporary), and would take this one for a killed
    # break's leftover while this break may still have to put it back.
    with contextlib.suppress(FileNotFoundError):
        os.utime(moved_aside)
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
