"""Undoing the creation of a root whose first open failed (a disk out of space or inodes
fails the lease record's write): the directories that open created, and the lease and lock
files it put in them, are removed, so a failed open leaves the filesystem as it found it.

Nothing is removed from a root another job uses: the lease files go only under the lease lock,
taken without waiting, and a directory goes only by ``rmdir``, which refuses one that holds
anything else. What remains possible is the race every lock file's removal has: a job that
opened the lease lock file just before its removal takes the lock on a file no longer named,
and its open fails at writing the record into a removed root, or, if the root is still
there, it holds a lease a third job could take too. Both need two jobs creating the same root
at the same moment, on a full disk.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

from distckpt.errors import CheckpointError
from distckpt.layout import RootLayout
from distckpt.lease import _try_lock

logger = logging.getLogger("distckpt")


def remove_created_root(root: Path, created: list[Path]) -> None:
    """After a failed open of ``root``: remove ``created`` (the directories that open made,
    outermost first: the root last, unless the open failed before making it), innermost
    first, each only if nothing but the lease and lock files that open made is in it. A root
    that existed before is never in ``created``. Failures are logged, never raised: the
    open's own error is the one to report."""
    for directory in reversed(created):
        removed = _try_rmdir(directory)
        if removed is None and directory == root and RootLayout(root).lease_lock_path.exists():
            _remove_unused_lease_files(RootLayout(root))
            removed = _try_rmdir(directory)
        if not removed:
            return


def _remove_unused_lease_files(layout: RootLayout) -> None:
    root = layout.root
    try:
        lock = _try_lock(layout.lease_lock_path, 0.0)
    except (CheckpointError, OSError) as exc:
        logger.warning("left the new root %s after its failed open: %s", root, exc)
        return
    if lock is None:
        return  # another job holds its lease: the root is that job's now
    try:
        for leftover in (layout.lease_record_path, layout.lock_path, layout.lease_lock_path):
            leftover.unlink(missing_ok=True)
    except OSError as exc:
        logger.warning("left the new root %s after its failed open: %s", root, exc)
    finally:
        lock.release()


def _try_rmdir(directory: Path) -> bool | None:
    """True if ``directory`` was removed, None if it holds something, False if it cannot be."""
    try:
        directory.rmdir()
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return None
        logger.warning("left the new directory %s after a failed open: %s", directory, exc)
        return False
    return True
