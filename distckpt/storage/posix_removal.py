"""The POSIX store's removals: deletes, pruning, cleanup of dead writers' leftovers, the
setting aside of a damaged checkpoint, and what a save whose staging dir another job's cleanup
removed raises.

A delete (or retention) moves the links off a checkpoint, durably, then renames it into
``root/.trash`` under the root's lock; its bytes are deleted by ``tidy()``, outside the lock,
after every rank heard the outcome and in a thread of the manager's own (as are dead writers'
leftovers after a start): what it deletes it lists under the lock. A
checkpoint a restore found damaged is set aside instead: the links move off it, then it is
renamed, whole, to ``root/damaged-step-N-<token>`` (durably), a name no step listing, link,
retention rule or cleanup treats as a checkpoint or a leftover; nothing of it is deleted.
Everything here runs on the committing rank, as part of
:class:`~distckpt.storage.posix.PosixRootStore`.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Callable, Collection
from pathlib import Path

from distckpt import faults, policy, resolve
from distckpt.errors import StagingRemoved
from distckpt.fsutil import move_to_trash, remove_tree, rename_dir
from distckpt.layout import RootLayout
from distckpt.lease import holder_beyond_judgement
from distckpt.lock import Leftover, RootLock, WriterLock, find_leftovers
from distckpt.results import CheckpointLocation
from distckpt.storage.posix_links import COMMITTING_RANK
from distckpt.storage.posix_view import PosixRootView

logger = logging.getLogger("distckpt")


class Removals:
    """The removing half of the POSIX store (a mixin: the store supplies these attributes)."""

    layout: RootLayout
    view: PosixRootView
    root: Path
    fsync: bool
    _lock: RootLock
    _removed_at_open: list[CheckpointLocation]
    #: whether the leftovers of dead writers were removed since the root was opened
    _leftovers_checked: bool
    read_only: bool
    check_lease: Callable[[], None]
    _holds_current_lease: Callable[[], bool]
    _refuse_if_read_only: Callable[[str], None]
    _update_links: Callable[..., list[policy.CheckpointRecord]]
    _apply_retention: Callable[[list[policy.CheckpointRecord], Collection[int]], list[int]]
    _linked_steps: Callable[[], set[int]]

    def staging_removed(
        self, location: str, missing: str, *, step: int, rank: int
    ) -> StagingRemoved | None:
        # Told by the failed write's path, not by looking at the dir: a FUSE or NFS client may
        # answer from its cache for a dir removed through another mount.
        if not Path(missing).is_relative_to(location):
            return None
        return StagingRemoved(
            f"the staging dir {location} of step {step}'s save was removed meanwhile, by someone "
            "else (a start or 'distckpt gc' of another job, which took it for a dead writer's: "
            "the writer lock does not reach between them, as between NFS clients locking "
            "locally); nothing was committed",
            rank=rank,
            path=location,
            step=step,
        )

    def delete(self, step: int) -> int | None:
        self._refuse_if_read_only(f"delete step {step}")
        with self._lock:
            self.check_lease()
            directory = Path(resolve.committed_dir(self.view, step).location)
            # Links first, durably, then the trash: the other order leaves a durable state
            # in which ``last`` names a checkpoint that is gone.
            records = self._update_links(leaving=directory)
            faults.hit("during_delete", COMMITTING_RANK)
            move_to_trash(directory, self.layout.trash_root, fsync=self.fsync)
        return records[-1].step if records else None  # its bytes go at tidy()

    def set_aside(self, step: int, location: CheckpointLocation) -> CheckpointLocation | None:
        self._refuse_if_read_only(f"set aside step {step}")
        # The restore may have named it by a path through a symlink to the root: what moves
        # is the root's own step dir, which the links compare against.
        directory = Path(self.view.checkpoint(step).location)
        with self._lock:
            self.check_lease()
            if not self.view.holds_checkpoint(location, step) or not directory.is_dir():
                return None  # another root's, or deleted since the restore judged it
            target = self.layout.set_aside_dir(step, uuid.uuid4().hex[:12])
            # Links first, durably, as for a delete: no durable state has ``last`` naming a
            # step dir that is gone. A crash between the two leaves the checkpoint committed
            # (and skipped) as before: the next restore sets it aside.
            self._update_links(leaving=directory)
            rename_dir(directory, target, fsync=self.fsync)
        return target

    def prune(self) -> list[int]:
        self._refuse_if_read_only("prune")
        with self._lock:
            self.check_lease()
            # Read before the links move: this prune's monitor/mode may disagree with the job's.
            linked_before = self._linked_steps()
            removed = self._apply_retention(self._update_links(), linked_before)
        return removed  # their bytes go at tidy()

    def leftovers(self, *, force: bool = False) -> list[Leftover]:
        judged = self._judged_leftovers(locked=False, force=force)
        return [item for item in judged if item.kind != "lock"]

    def collect_leftovers(self, *, force: bool = False) -> list[CheckpointLocation]:
        self._refuse_if_read_only("collect leftovers")
        with self._lock:
            self.check_lease()
            removed, in_trash = self._remove_leftovers(force=force)
        removed = self._removed_at_open + removed + self._empty_found_trash(in_trash)
        self._removed_at_open = []  # reported once
        return removed

    def tidy(self) -> None:
        # Runs in a thread of its own beside the store's other calls (RootStore.tidy): it only
        # deletes trash entries it listed, and leftovers it found, under the root lock. An entry
        # is moved into the trash under that lock, and out of it only by the same locked call
        # (an overwrite putting back the checkpoint it replaced): listed under the lock, it is
        # no longer anyone's.
        if self.read_only:
            return
        try:
            if self._leftovers_checked:
                with self._lock:
                    in_trash = self._trash_entries()
                self._empty_found_trash({entry: entry for entry in in_trash})
                return
            with self._lock:
                removed, found = self._remove_leftovers()
            self._removed_at_open = removed + self._empty_found_trash(found)
            self._leftovers_checked = True
        except Exception as exc:  # the outcome was told already: a removal never fails it
            logger.warning("could not tidy %s (tried again later): %s", self.root, exc)

    def _trash_entries(self) -> list[Path]:
        """Under the lock: what retention, deletes and cleanups moved into the trash."""
        if not self.layout.trash_root.is_dir():
            return []
        return list(self.layout.trash_root.iterdir())

    def _empty_found_trash(self, in_trash: dict[Path, Path]) -> list[CheckpointLocation]:
        """Outside the lock: delete the trash entries listed under it. ``in_trash`` maps the
        trash entries a cleanup found or made (the dead writers' staging dirs it moved there
        included) to what it reports for each (the entry itself, or the staging dir moved
        there); returns the reports of those whose entry it deleted. One it could not delete
        stays in the trash, a leftover for the next cleanup, not reported as removed. An entry
        moved in after the listing is left to the next tidy or cleanup."""
        return [report for entry, report in in_trash.items() if self._remove_quietly(entry)]

    def _judged_leftovers(self, *, locked: bool, force: bool = False) -> list[Leftover]:
        """:func:`find_leftovers`, with the staging dirs and writer lock files of a lease
        holder whose liveness this machine cannot tell marked ``kept_because`` (unless
        ``force``): where locks are local to each machine, a writer lock that looks free here
        may be held on the holder's machine. The root lock does not reach that machine either,
        so probes and links under construction are then judged by their age, as without it;
        so they are unless this store holds the root's current lease
        (:func:`~distckpt.lock.find_leftovers`)."""
        holder = None if force else holder_beyond_judgement(self.root)
        found = find_leftovers(
            self.layout, locked=locked and holder is None, holds_lease=self._holds_current_lease
        )
        if holder is None:
            return found
        reason = (
            f"the lease holder, {holder.describe()}, may be writing it: locks on this "
            "filesystem are local to each machine, so whether it lives cannot be told from "
            "here ('distckpt gc --force' removes it, only when no job runs on this root)"
        )
        return [
            dataclasses.replace(item, kept_because=reason)
            if item.kind in ("staging", "lock") and item.writer_alive is False
            else item
            for item in found
        ]

    def _remove_leftovers(
        self, *, force: bool = False
    ) -> tuple[list[CheckpointLocation], dict[Path, Path]]:
        """Under the lock: staging dirs whose writer is dead, orphaned lock files, and the
        temporary files a killed process left in the root (probes and links under construction
        at once if this store holds the root's current lease, else by their age:
        :func:`~distckpt.lock.find_leftovers`). A live writer's staging is never touched, nor
        one whose writer lock cannot be probed here, nor
        (unless ``force``) one a lease holder on another machine may be writing where locks
        are local to each machine (:meth:`_judged_leftovers`). A
        dead writer's staging dir is only renamed into the trash here, and the trash is left
        as it is: deleting a large save's files takes seconds, during which the lock would
        keep every other writer from committing (a live job's save failing with "could not
        take the commit lock"); the caller empties the trash after releasing the lock
        (:meth:`_empty_found_trash`). Returns what it removed, and the trash entries it found or
        made, each mapped to what to report once that emptying deleted it: the entry, or the
        staging dir moved there."""
        removed: list[CheckpointLocation] = []
        in_trash: dict[Path, Path] = {}
        for leftover in self._judged_leftovers(locked=True, force=force):
            path = Path(leftover.path)
            if leftover.writer_alive:
                logger.info("leaving %s alone: its writer is alive", path)
            elif leftover.writer_alive is None:
                logger.warning("leaving %s alone: whether its writer lives cannot be told", path)
            elif leftover.kept_because is not None:
                logger.warning("leaving %s alone: %s", path, leftover.kept_because)
            elif leftover.in_use:
                # a deleted file a reader still holds open (.fuse_hidden*, .nfs*): removing it
                # fails (EBUSY) until the reader closes it; the next cleanup tries again
                logger.info("leaving %s: in use by a reader, removed at a later cleanup", path)
            elif leftover.kind == "lock":
                path.unlink(missing_ok=True)
            elif leftover.kind == "trash":
                in_trash[path] = path  # deleted with the rest of the trash, after the lock
            elif leftover.kind == "staging":
                logger.info("removing %s, left by a writer that died", path)
                entry = self._trash_quietly(path)
                if entry is not None:
                    WriterLock(path).release()  # removes its lock file
                    in_trash[entry] = path
            elif self._remove_quietly(path):
                removed.append(path)
        return removed, in_trash

    def _trash_quietly(self, staging: Path) -> Path | None:
        """Move a dead writer's staging dir into the trash, under the lock: its entry there, or
        None if it could not be moved (or was gone); a failure is reported, not raised, as in
        :meth:`_remove_quietly`."""
        try:
            faults.hit("during_staging_cleanup", COMMITTING_RANK)
            return move_to_trash(staging, self.layout.trash_root, fsync=self.fsync)
        except Exception as exc:
            logger.warning(
                "could not remove leftover %s (tried again at next start): %s", staging, exc
            )
            return None

    def _remove_quietly(self, leftover: Path) -> bool:
        """Remove a leftover; one that cannot be removed is reported, not raised, so it can
        never stop a job from starting (the next start tries again)."""
        try:
            faults.hit("during_staging_cleanup", COMMITTING_RANK)
            remove_tree(leftover)
        except Exception as exc:
            logger.warning(
                "could not remove leftover %s (tried again at next start): %s", leftover, exc
            )
            return False
        return True
