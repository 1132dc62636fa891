"""Locks between processes that share a root but no process group.

Two mechanisms, both ``flock``-style locks from the ``filelock`` package, which the kernel drops
when the holding process dies (so a crashed job never blocks its restarted successor):

* :class:`RootLock` (``root/.lock``) serialises everything that changes what is published in
  a root: commits, link swaps, retention, deletes, cleanup of leftovers.
* :class:`WriterLock` (``root/.staging/<name>.lock``) is held by the committing rank for as long
  as it writes a staging dir. Cleanup removes a staging dir only if it can take that lock, i.e.
  its writer is gone; a live writer's staging is never touched.

Guarantees and limits: on local filesystems and on NFSv4 / Lustre with locking enabled,
``flock`` locks are exclusive across machines. On a filesystem mounted without lock support
``flock`` fails with an error, which distckpt reports rather than silently running unlocked.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import TracebackType

import filelock

from distckpt.errors import CheckpointError, CoordinationTimeout
from distckpt.layout import RootLayout

logger = logging.getLogger("distckpt")


class RootLock:
    """The commit lock of one root. Reentrant within a process; a context manager."""

    def __init__(self, path: Path, *, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._lock = filelock.FileLock(os.fspath(path), timeout=timeout, thread_local=False)

    def __enter__(self) -> RootLock:
        try:
            self._lock.acquire()
        except filelock.Timeout as exc:
            raise CoordinationTimeout(
                f"could not take the commit lock {self.path} within {self.timeout:g} s: another "
                "process (a second job or a maintenance command on the same root) holds it"
            ) from exc
        except OSError as exc:
            raise CheckpointError(
                f"could not take the commit lock {self.path}: {exc}. The filesystem may not "
                "support file locks (mount with locking enabled)"
            ) from exc
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._lock.release()


class WriterLock:
    """Marks a staging dir as being written by a live process."""

    def __init__(self, staging_dir: Path) -> None:
        self.path = RootLayout.writer_lock_path(staging_dir)
        self._lock = filelock.FileLock(os.fspath(self.path), timeout=0, thread_local=False)

    def acquire(self) -> None:
        try:
            self._lock.acquire()
        except (filelock.Timeout, OSError) as exc:
            raise CheckpointError(f"could not lock staging {self.path}: {exc}") from exc

    def release(self) -> None:
        """Release and remove the lock file."""
        if self._lock.is_locked:
            self._lock.release()
        self.path.unlink(missing_ok=True)

    @staticmethod
    def writer_is_alive(staging_dir: Path) -> bool:
        """Whether some process holds the lock beside ``staging_dir``. A dir with no lock file
        at all was left by a writer that died before or after holding it: not alive."""
        lock_path = RootLayout.writer_lock_path(staging_dir)
        if not lock_path.exists():
            return False
        probe = filelock.FileLock(os.fspath(lock_path), timeout=0, thread_local=False)
        try:
            probe.acquire()
        except filelock.Timeout:
            return True
        probe.release()
        return False
