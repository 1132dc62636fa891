"""Locks between processes that share a root but no process group.

Two mechanisms, both ``flock``-style locks from the ``filelock`` package, which the kernel drops
when the holding process dies (so a crashed job never blocks its restarted successor):

* :class:`RootLock` (``root/.lock``) serialises everything that changes what is published in
  a root: commits, link swaps, retention, deletes, cleanup of leftovers.
* :class:`WriterLock` (``root/.staging/<name>.lock``) is held by the committing rank for as long
  as it writes a staging dir. Cleanup removes a staging dir only if it can take that lock, i.e.
  its writer is gone; a live writer's staging is never touched.

Guarantees and limits, per filesystem:

* local filesystems (ext4, xfs, btrfs, tmpfs): exclusive between processes; released by the
  kernel when the holder dies.
* NFSv4, and NFSv3 with a running lock manager: ``flock`` is mapped to byte-range locks held by
  the server, exclusive across machines; the server releases the locks of a dead client after
  its lease (typically 90 s). Mounted with ``nolock`` or ``local_lock=all``, locks are local to
  each machine: never run two *machines* writing one root on such a mount.
* Lustre mounted with ``-o flock``: exclusive across machines. Mounted with ``-o localflock``:
  local to each machine, as above. Mounted with neither, ``flock`` fails with ENOSYS.
* Where locks are local to each machine, a cleanup keeps every staging dir and writer lock
  file while the root's lease record names an unreleased holder on another machine, whose
  writer locks look free from here (:mod:`distckpt.storage.posix_removal`; ``gc --force``
  overrides it).

Where ``flock`` is not supported at all, distckpt raises :class:`~distckpt.CheckpointError`
instead of degrading to a marker-file lock (which survives its process and would block a
restarted job). It never runs unlocked.

A lock belongs to the process that took it, never to its forked children (a data loader
worker, a ``multiprocessing`` pool): ``flock`` locks an open file description, which a fork
shares, so a child holding its copy would keep the lock after its parent died, and a child
unlocking its copy (at exit) would unlock the parent's. ``filelock`` (from the version
pyproject.toml requires) closes a child's copies at the fork, also of a lock another thread is
taking right then, and its release in a child does nothing; the lease and the writer lock
leave their record and lock file to the parent there too.
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

import filelock

from distckpt.errors import CheckpointError, CoordinationTimeout, RootNotWritable
from distckpt.layout import (
    BEST,
    LAST,
    LEASE_RECORD_NAME,
    RootLayout,
    is_lingering_lease_lock,
)

logger = logging.getLogger("distckpt")


#: A probe (``distckpt ls``, ``read_holder``, a cleanup's ``writer_is_alive``) holds a lock for
#: an instant, without the root lock: a taker of a lock only a probe can hold besides it (the
#: lease lock, a new writer lock) retries this long before it counts the lock as taken.
PROBE_GRACE = 0.5


def _flock(
    path: Path, timeout: float, *, on_acquired: Callable[[int], None] | None = None
) -> filelock.BaseFileLock:
    """A ``filelock`` lock of ``path``, never the marker-file kind. filelock decides what a
    fork does to it (see the module docstring and pyproject's floor of its version).
    ``on_acquired`` is called with the locked file's descriptor each time the lock is taken."""
    options: dict[str, object] = {"timeout": timeout, "thread_local": False}
    if on_acquired is not None:
        options["on_acquired"] = on_acquired
    if _HAS_SOFT_FALLBACK:
        options["fallback_to_soft"] = False  # a marker file would outlive a crashed holder
    return filelock.FileLock(os.fspath(path), **options)


_HAS_SOFT_FALLBACK = "fallback_to_soft" in inspect.signature(filelock.FileLock).parameters


def _held_elsewhere(path: Path) -> bool:
    """Whether another process holds the lock of ``path`` (probed for an instant); ``OSError``
    or ``NotImplementedError`` where it cannot be told."""
    probe = _flock(path, 0)
    try:
        probe.acquire()
    except filelock.Timeout:
        return True
    probe.release()
    return False


def lock_is_held(path: Path) -> bool | None:
    """Whether a process holds the lock of ``path``, probed for an instant; None where it
    cannot be told (no flock, no ``fcntl``). A lock file this process may not open for
    writing, which taking its lock needs (another user's, made under a umask that denies its
    group; a read-only mount), is probed through a read-only descriptor with a shared lock,
    which a holder's exclusive lock refuses as well; such a file that is no regular file (a FIFO,
    which would block the open) is not probed: None; one that does not exist is free: False."""
    try:
        return _held_elsewhere(path)
    except (OSError, NotImplementedError) as exc:
        if not isinstance(exc, OSError) or exc.errno not in _CANNOT_OPEN_FOR_WRITING:
            return None
    try:
        import fcntl  # here: the module imports where there is none (Windows), as filelock does
    except ImportError:
        return None

    try:
        # Without blocking: a FIFO in the lock file's place would block a read-only open
        # until some writer opened it. Only a regular file is probed.
        descriptor = os.open(
            path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        )
    except FileNotFoundError:
        return False  # as the writable probe finds it: created, and locked by nobody
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            return None
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(descriptor)  # which lets go of the shared lock, if taken
    return False


_NO_FLOCK = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP}
#: why a lock file cannot be opened for writing, which filelock does to take its lock
_CANNOT_OPEN_FOR_WRITING = {errno.EROFS, errno.EACCES, errno.EPERM}


def _unsupported(path: Path, exc: BaseException) -> CheckpointError:
    """The error for a lock of ``path`` that could not be taken: a lock file this process may
    not open for writing (another user's, made under a umask that denies its group; a
    read-only mount) is :class:`RootNotWritable`, as every other write the root refuses."""
    if isinstance(exc, OSError) and exc.errno in _CANNOT_OPEN_FOR_WRITING:
        return RootNotWritable(f"cannot lock {path}: {exc}", path=path)
    if isinstance(exc, OSError) and exc.errno not in _NO_FLOCK:
        return CheckpointError(f"cannot lock {path}: {exc}")
    return CheckpointError(
        f"cannot lock {path}: {exc}. The filesystem does not support flock; distckpt does not "
        "fall back to a lock that outlives its process. Mount with lock support (NFS: a lock "
        "manager, not 'nolock'; Lustre: '-o flock') or use another root"
    )


class RootLock:
    """The commit lock of one root, exclusive between processes and between the threads of one
    process (re-entrant within a thread); a context manager."""

    def __init__(self, path: Path, *, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._lock = _flock(path, timeout)
        # flock excludes other processes only; an async save's commit thread and the
        # training thread of one process are kept apart by this.
        self._threads = threading.RLock()
        #: how many times the thread holding ``_threads`` entered: the file lock is taken at
        #: the first entry and released at the last exit
        self._depth = 0

    def __enter__(self) -> RootLock:
        if not self._threads.acquire(timeout=self.timeout):
            raise CoordinationTimeout(
                f"could not take the commit lock {self.path} within {self.timeout:g} s: another "
                "thread of this process holds it"
            )
        try:
            if self._depth == 0:
                self._acquire_file_lock()
        except BaseException:
            self._threads.release()
            raise
        self._depth += 1
        return self

    def _acquire_file_lock(self) -> None:
        try:
            self._lock.acquire()
        except filelock.Timeout as exc:
            raise CoordinationTimeout(
                f"could not take the commit lock {self.path} within {self.timeout:g} s: another "
                "process (a second job or a maintenance command on the same root) holds it"
            ) from exc
        except (OSError, NotImplementedError) as exc:
            raise _unsupported(self.path, exc) from exc

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._depth -= 1
            if self._depth == 0:
                self._lock.release()
        finally:
            self._threads.release()


class WriterLock:
    """Marks a staging dir as being written by a live process."""

    def __init__(self, staging_dir: Path) -> None:
        self.path = RootLayout.writer_lock_path(staging_dir)
        # A staging dir's name is new and unique to its save, so no other writer ever takes
        # its lock: only a probe can hold it, which ``distckpt ls`` makes without the root
        # lock, between this process creating the lock file and locking it. It lets go at once.
        self._lock = _flock(self.path, PROBE_GRACE)
        #: the process that took the lock: in its forked children, release leaves it alone
        self._owner_pid = 0

    def acquire(self) -> None:
        """Take the lock, creating its file; a failure leaves no lock file behind."""
        try:
            self._lock.acquire()
        except filelock.Timeout as exc:
            self._remove_lock_file()
            raise CheckpointError(f"staging {self.path} is locked by another writer") from exc
        except (OSError, NotImplementedError) as exc:
            self._remove_lock_file()
            raise _unsupported(self.path, exc) from exc
        self._owner_pid = os.getpid()

    def _remove_lock_file(self) -> None:
        """After a failed acquire: the file is this save's alone (its name is unique), so it
        goes, rather than stay a leftover for the next cleanup."""
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("could not remove %s after failing to lock it: %s", self.path, exc)

    def release(self) -> None:
        """Remove the lock file, then release the lock.

        In this order because of FUSE mounts (bindfs, fuse2fs): a file removed while still
        open is hidden as ``.fuse_hidden*`` and deleted by the daemon once it is closed, but a
        file removed right after its close races the daemon's asynchronous handling of that
        close, and a lost race leaves the ``.fuse_hidden*`` file in ``.staging`` for good
        (2 to 6 releases in 100 on fuse2fs, more under load). Elsewhere the order changes
        nothing a cleanup sees: one that opened the file before it was removed takes the lock
        only after this writer is done with its staging dir.

        In a forked child of the writer it does nothing: the lock file and the lock are the
        parent's, which may still be writing the dir. The lock is released even when removing
        its file fails (that error is raised)."""
        if self._owner_pid not in (0, os.getpid()):
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            # Released even when the file cannot be removed (a read-only filesystem): a lock
            # file nobody holds is a dead writer's, which a later cleanup removes.
            if self._lock.is_locked:
                self._lock.release()

    @staticmethod
    def writer_is_alive(staging_dir: Path) -> bool | None:
        """Whether some process holds the lock beside ``staging_dir``. A dir with no lock file
        at all was left by a writer that died before or after holding it: not alive. None when
        it cannot be told here: the lock file cannot be opened for writing, which taking its
        lock needs (a read-only mount, no permission). Unlike :func:`lock_is_held`, no
        read-only probe: a cleanup that cannot open the lock could not remove the dir either,
        and keeps what it cannot judge."""
        lock_path = RootLayout.writer_lock_path(staging_dir)
        if not lock_path.exists():
            return False
        try:
            return _held_elsewhere(lock_path)
        except OSError as exc:
            if exc.errno in _CANNOT_OPEN_FOR_WRITING:
                return None
            raise


#: names a filesystem gives a file that was deleted while a process still held it open: the
#: FUSE library's (bindfs, fuse2fs, cloud-bucket mounts) and the NFS client's "silly rename".
#: Each vanishes when its last holder closes it; until then nothing can remove it.
_HELD_OPEN_PREFIXES = (".fuse_hidden", ".nfs")
#: the root's writability probes (``probe_writable``, the symlink probe): a process killed
#: between creating and removing one leaves it behind.
_PROBE_PREFIX = ".probe-"
#: a ``last``/``best`` link under construction (``fsutil.swap_link``'s temporary name)
_LINK_UNDER_CONSTRUCTION = re.compile(
    rf"\.(?:{re.escape(LAST)}|{re.escape(BEST)})\.[0-9a-f]{{32}}\.tmp"
)
#: the lease record being replaced (``fsutil.atomic_write``'s temporary name for
#: ``.lease.json``): written by a manager claiming the lease, not under the root lock
_LEASE_RECORD_UNDER_CONSTRUCTION = re.compile(
    rf"\.{re.escape(LEASE_RECORD_NAME)}\.[0-9a-f]{{32}}\.tmp"
)
#: A temporary file younger than this may belong to a process at work on it right now, unless
#: the caller can tell that none is (:func:`_dead_temporary`). Each lives for milliseconds.
PROBE_GRACE_SECONDS = 60.0

# When is a temporary file in the root dead? Who makes each kind, and what keeps others out:
#
# * A lease record under construction is written by a manager claiming the lease, holding the
#   lease lock, and a lingering lease lock is made by ``lease --break`` holding the old one:
#   neither holds the root lock, and where locks do not reach (a bindfs mount and its source
#   dir, two NFS clients with local locks) the lease lock of a live maker looks free from
#   here. Nothing but its age tells such a file dead, so it is judged by age alone.
# * Probes and links under construction are made under the root lock, by a manager after it
#   wrote its lease record (the probes at the start, right after the claim; the links at a
#   commit, delete or prune, after the record was checked), or by a maintenance command
#   (``distckpt prune`` / ``delete``), which takes the root lock only. Where the root lock
#   reaches every maker, holding it is enough. Where it does not, holding it proves nothing:
#   ``distckpt gc`` through the other path, holding no lease, judges them by age. A caller
#   that holds the lease removes them at once only if the record names its lease when read
#   *after* it listed the root: every manager wrote its record before making one of these
#   files, so the maker of a listed file wrote its record before that read, and a record still
#   naming the caller means the maker's claim came first and the caller has taken the root
#   over from it. That maker is fenced already (its next check of the record fails); removing
#   its file fails it at most sooner, inside the window the lease record leaves open on such
#   mounts (:mod:`distckpt.lease`). A caller's mere belief that it holds the lease would not
#   do: a job that took the lease over through the other path may be probing right now, and
#   the caller is the fenced one. A maintenance command through a path the root lock does not
#   reach is excluded by nothing, here or in what it changes: such mounts take one writer.


@dataclass(frozen=True)
class Leftover:
    """Something a root holds besides committed checkpoints: a staging dir (of a live writer
    or a dead one), a writer lock file whose dir is gone, a dir in the trash, or a stray file
    (a probe, a lease lock file a killed ``lease --break`` moved aside, or a deleted file some
    process still holds open).

    ``writer_alive`` (a staging dir, a writer lock file): True while its writer holds the
    lock, None when the lock cannot be probed here (its file cannot be opened for writing: a
    read-only mount); a cleanup removes neither.

    ``in_use`` is True when the leftover is, or holds, a file deleted while a reader still has
    it open (``.fuse_hidden*``, ``.nfs*``): it cannot be removed until that reader closes it,
    so a cleanup leaves it and the next one retries.

    ``kept_because`` says why a cleanup leaves a staging dir or writer lock file whose lock
    looks free: its writer may be alive where this machine's locks do not reach (the lease
    holder on another machine, on a filesystem whose locks are local to each machine). None
    when the lock can be trusted."""

    #: a path; for an ``s3://`` root, the URL of a save's prefix or of a writer's claim, or
    #: (``stray``) of a set-aside copy's prefix whose record is gone, and its save unpublished
    path: Path | str
    kind: Literal["staging", "lock", "trash", "stray"]
    writer_alive: bool | None = False
    in_use: bool = False
    kept_because: str | None = None


def _held_open(path: Path) -> bool:
    """Whether ``path`` is, or (a directory) contains, a deleted file still held open."""
    if path.name.startswith(_HELD_OPEN_PREFIXES):
        return True
    if not path.is_dir() or path.is_symlink():
        return False
    try:
        return any(
            name.startswith(_HELD_OPEN_PREFIXES) for _, _, names in os.walk(path) for name in names
        )
    except OSError:
        return False


def _dead_temporary(path: Path, *, none_at_work: bool) -> bool:
    """Whether ``path`` is a probe, a link under construction, a lease record under
    construction or a lease lock file moved aside whose maker is gone (see the comment above
    :data:`PROBE_GRACE_SECONDS`). ``none_at_work``: the caller can tell that no process is
    making a probe or a link right now; the lease's files go by their age whatever it is."""
    name = path.name
    # a lingering lease lock (layout.is_lingering_lease_lock): a dead machine's lock lingering on
    # it, which the break removes once done, unless it was killed first; made without the root lock
    if _LEASE_RECORD_UNDER_CONSTRUCTION.fullmatch(name) or is_lingering_lease_lock(name):
        return _older_than_grace(path)
    if not (name.startswith(_PROBE_PREFIX) or _LINK_UNDER_CONSTRUCTION.fullmatch(name)):
        return False
    return none_at_work or _older_than_grace(path)


def _older_than_grace(path: Path) -> bool:
    """Whether ``path`` was last changed more than :data:`PROBE_GRACE_SECONDS` ago."""
    try:
        return time.time() - path.lstat().st_mtime > PROBE_GRACE_SECONDS
    except FileNotFoundError:
        return False


def find_leftovers(
    layout: RootLayout, *, locked: bool = False, holds_lease: Callable[[], bool] | None = None
) -> list[Leftover]:
    """The root's leftovers; ``writer_alive`` is True for a staging dir whose writer still
    holds its lock (never to be removed) and for a lock file held by a writer about to create
    its dir, None where that lock cannot be probed from here (a read-only mount: never removed
    either); ``in_use`` marks those holding a file a reader still has open. ``locked``: the
    caller holds the root lock; ``holds_lease``: whether the root's lease record names the
    caller's lease, asked after the root is listed. With both, every probe and link under
    construction is a dead (or fenced) process's, whatever its age; otherwise, and for the
    lease record under construction and a lingering lease lock always, only those older than
    :data:`PROBE_GRACE_SECONDS` are (the comment above it says why)."""
    found: list[Leftover] = []
    if layout.staging_root.is_dir():
        for entry in sorted(layout.staging_root.iterdir()):
            if entry.name.endswith(".lock"):
                staging = entry.with_suffix("")
                if not staging.exists():
                    found.append(Leftover(entry, "lock", WriterLock.writer_is_alive(staging)))
                continue
            alive = WriterLock.writer_is_alive(entry)
            found.append(Leftover(entry, "staging", alive, in_use=_held_open(entry)))
    if layout.trash_root.is_dir():
        found += [
            Leftover(entry, "trash", in_use=_held_open(entry))
            for entry in sorted(layout.trash_root.iterdir())
        ]
    if layout.root.is_dir():
        entries = sorted(layout.root.iterdir())
        # After the listing, not before: see the comment above PROBE_GRACE_SECONDS.
        none_at_work = locked and holds_lease is not None and holds_lease()
        found += [
            Leftover(entry, "stray", in_use=_held_open(entry))
            for entry in entries
            if entry.name.startswith(_HELD_OPEN_PREFIXES)
            or _dead_temporary(entry, none_at_work=none_at_work)
        ]
    return found


# Mount options under which flock locks are kept by each client machine alone: NFS mounted
# "nolock" or "local_lock=flock|all" and Lustre mounted "-o localflock".
_MACHINE_LOCAL_LOCK_OPTIONS = {"nolock", "local_lock=flock", "local_lock=all", "localflock"}


@dataclass(frozen=True)
class MountEntry:
    """What ``/proc/self/mountinfo`` says of the mount holding a path."""

    #: the filesystem's device (major, minor), as ``/proc/locks`` names it; on btrfs a file's
    #: ``st_dev`` is its subvolume's, another
    device: tuple[int, int]
    #: its mount options and its filesystem's options
    options: frozenset[str]


def mount_of(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> MountEntry | None:
    """The mount holding ``path`` (the longest mount point it lies under), or None when it
    cannot be told (no ``/proc``)."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best: tuple[int, MountEntry | None] = (-1, None)
    for line in lines:
        # "<id> <parent> <dev> <root> <mount point> <options> [tags] - <type> <source> <super>"
        before, _, after = line.partition(" - ")
        fields, super_fields = before.split(), after.split()
        if len(fields) < 6 or len(super_fields) < 3:
            continue
        # the kernel writes a space, tab, newline and backslash of a mount point as \040,
        # \011, \012 and \134
        mount_point = re.sub(r"\\([0-7]{3})", lambda code: chr(int(code[1], 8)), fields[4])
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        major, _, minor = fields[2].partition(":")
        if inside and len(mount_point) >= best[0] and major.isdigit() and minor.isdigit():
            options = frozenset(fields[5].split(",")) | frozenset(super_fields[2].split(","))
            best = (len(mount_point), MountEntry((int(major), int(minor)), options))
    return best[1]


def locks_local_to_machine(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> bool:
    """Whether ``flock`` locks on the filesystem holding ``path`` are known not to reach other
    machines (see the module docstring). False when they do, when the filesystem is local, and
    when it cannot be told (no ``/proc``): callers treat only a known limit as one."""
    mount = mount_of(path, mountinfo)
    return mount is not None and bool(mount.options & _MACHINE_LOCAL_LOCK_OPTIONS)
