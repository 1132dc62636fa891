"""The POSIX store's undoing of a failed overwrite: the checkpoint an ``overwrite=True``
moved away (to the trash, or to the staging dir by an exchange) comes back under its name.
Everything here runs under the root's lock, on the committing rank, as part of
:class:`~distckpt.storage.posix.PosixRootStore`, and is best effort: a failure is logged,
never raised over the save's own error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from distckpt.errors import CheckpointError
from distckpt.fsutil import exchange_dirs, move_to_trash, rename_dir
from distckpt.layout import RootLayout

logger = logging.getLogger("distckpt")


class OverwriteUndo:
    """The overwrite-undo part of the POSIX store (a mixin: the store supplies these
    attributes)."""

    layout: RootLayout
    root: Path
    fsync: bool

    _update_links: Callable[..., object]

    def _undo_lost_commit(self, final: Path, replaced: Path | None) -> bool:
        """Under the lock, a commit found lost: what it left under ``final`` goes, and the
        checkpoint an overwrite replaced comes back, atomically where it was exchanged (the
        lost one is then in the staging dir, which the failed save removes), else by the
        trash and :meth:`_put_back`. Returns whether ``final`` holds the replaced checkpoint
        again. A failure here is logged, never raised over the ``CommitLost`` it undoes."""
        if replaced is not None and replaced.parent == self.layout.staging_root:
            replaced_inode = _inode(replaced)
            try:
                if exchange_dirs(replaced, final, fsync=self.fsync):
                    return True
            except OSError as exc:
                if replaced_inode is not None and _inode(final) == replaced_inode:
                    # Exchanged: only the fsync after it failed.
                    logger.error("the exchange back of %s was not made durable: %s", final, exc)
                    return True
                logger.error("could not exchange %s back (trying two renames): %s", final, exc)
        try:
            move_to_trash(final, self.layout.trash_root, fsync=self.fsync)
        except OSError as exc:
            logger.error("could not move the lost commit %s to the trash: %s", final, exc)
            if replaced is not None:
                self._keep_from_the_staging_dir(replaced, final)
            return False
        if replaced is None:
            return False
        if self._put_back(replaced, final):
            return True
        self._keep_from_the_staging_dir(replaced, final)
        return False

    def _keep_from_the_staging_dir(self, replaced: Path, final: Path) -> None:
        """The replaced checkpoint could not be put back: where it is in the staging dir, which
        the failed save removes, it goes to the trash instead, whose emptying waits for the
        next start, and the log says how to rename it back."""
        if replaced.parent != self.layout.staging_root or not replaced.is_dir():
            return
        try:
            kept = move_to_trash(replaced, self.layout.trash_root, fsync=self.fsync)
        except OSError as exc:
            logger.critical(
                "the old checkpoint of %s is only in %s, which the failed save removes, and "
                "could not be moved away: %s",
                final,
                replaced,
                exc,
            )
            return
        logger.critical(
            "the old checkpoint of %s is now %s: rename it back (mv %s %s, once %s is "
            "gone) before the next start empties the trash",
            final,
            kept,
            kept,
            final,
            final,
        )

    def _put_back(self, trashed: Path, final: Path) -> bool:
        """Best effort, under the lock, after an overwrite failed once the old checkpoint was
        moved away (to the trash, or to the staging dir by an exchange): rename it back and
        point the links at it again; returns whether it is back. A failure here is logged,
        never raised over the save's own error."""
        try:
            rename_dir(trashed, final, fsync=self.fsync)
        except OSError as exc:
            logger.error(
                "the overwrite of %s failed and its old checkpoint could not be put back from "
                "%s (rename it back by hand before the next start empties the trash): %s",
                final,
                trashed,
                exc,
            )
            return False
        try:
            self._update_links()
        except (OSError, CheckpointError) as exc:  # derived state: the next commit redoes it
            logger.error("could not repair the links of %s: %s", self.root, exc)
        return True


def _inode(path: Path) -> int | None:
    """The inode number of ``path``, None if it cannot be read (gone, or an I/O error)."""
    try:
        return path.stat().st_ino
    except OSError:
        return None
