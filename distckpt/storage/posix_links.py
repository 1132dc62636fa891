"""The POSIX store's derived state: the ``last``/``best`` links and retention.

The committed ``step-*`` dirs are the truth; the links are derived from them and swapped
atomically (a relative symlink, or a pointer file where the filesystem refuses symlinks), and
retention renames what its rules do not keep into ``root/.trash``. Everything here runs under
the root's lock, on the committing rank, as part of :class:`~distckpt.storage.posix.PosixRootStore`.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Collection
from pathlib import Path

from distckpt import faults, policy, resolve
from distckpt.errors import RootNotWritable
from distckpt.fsutil import LinkMode, fsync_dir, move_to_trash, read_link, remove_link, swap_link
from distckpt.layout import BEST, LAST, RootLayout, parse_step_dir_name
from distckpt.storage.posix_view import ManifestMemo, PosixRootView

logger = logging.getLogger("distckpt")

#: The rank a store works on: only the committing rank (0 of the group) changes a root, and
#: fault points are armed per rank.
COMMITTING_RANK = 0


class LinksAndRetention:
    """The link and retention half of the POSIX store (a mixin: the store supplies these
    attributes)."""

    layout: RootLayout
    view: PosixRootView
    links_view: PosixRootView
    manifest_memo: ManifestMemo
    _steps_retention_removes: Callable[[list[policy.CheckpointRecord], Collection[int]], list[int]]
    root: Path
    retention: policy.RetentionPolicy
    fsync: bool
    link_mode: LinkMode

    def _settle_link_mode(self) -> None:
        """Find out now whether the root takes symlinks, so that a link swap never fails after
        a checkpoint was renamed into place."""
        if self.link_mode == "pointer":
            return
        probe = self.root / f".probe-link-{uuid.uuid4().hex}"
        try:
            os.symlink(self.root.name, probe, target_is_directory=True)
        except OSError as exc:
            if self.link_mode == "symlink":
                raise RootNotWritable(
                    f"the filesystem of {self.root} refuses symlinks ({exc.strerror}); "
                    "use link='auto' or link='pointer'",
                    path=self.root,
                ) from exc
            logger.warning(
                "the filesystem of %s refuses symlinks (%s): last/best are pointer files",
                self.root,
                exc.strerror,
            )
            self.link_mode = "pointer"
        else:
            probe.unlink()

    def _swap(self, name: str, target: Path) -> None:
        if read_link(self.layout.link_path(name)) == target.name:
            if self.fsync:
                # The link may be one a killed process swapped without reaching its fsync:
                # what follows (a checkpoint moved into the trash) relies on it being durable.
                fsync_dir(self.root)
            return
        kind = swap_link(
            self.layout.link_path(name),
            target.name,
            mode=self.link_mode,
            trash_root=self.layout.trash_root,
            fsync=self.fsync,
        )
        if kind == "pointer":
            self.link_mode = "pointer"  # settle "auto" once, instead of failing every time

    def _update_links(self, *, leaving: Path | None = None) -> list[policy.CheckpointRecord]:
        """Under the lock: point ``last`` at the newest committed checkpoint and ``best`` at the
        best, or remove a link with nothing to point at (``best``: none ranked by a monitor).
        ``leaving`` is a checkpoint about to be removed: counted as gone already. Returns the
        records it read."""
        doomed = None if leaving is None else parse_step_dir_name(leaving.name)
        steps = [step for step in self.layout.committed_steps() if step != doomed]
        valid = list(resolve.iter_valid(self.links_view, newest_first=False, steps=steps))
        records = [resolve.record_of(m) for _, m in valid]
        paths = {m.step: Path(source.location) for source, m in valid}
        self.manifest_memo.keep_only(paths.values())
        faults.hit("during_link_swap", COMMITTING_RANK)
        if valid:
            self._swap(LAST, Path(valid[-1][0].location))
            root_synced = True  # by the swap, or on finding the link at its target
        else:
            root_synced = self._remove_link_if_stale(LAST, leaving, root_synced=False)
        best = policy.best_step(records, self.retention.monitor, self.retention.mode)
        if best is not None:
            self._swap(BEST, paths[best])
        else:
            # A monitor that ranks none (a restart with another metric): the best by another
            # metric is no best to restore or keep. Without one (a CLI tool) none is known.
            stale = self.retention.monitor is not None
            self._remove_link_if_stale(BEST, leaving, root_synced=root_synced, stale=stale)
        return records

    def _remove_link_if_stale(
        self, name: str, leaving: Path | None, *, root_synced: bool, stale: bool = False
    ) -> bool:
        """Remove link ``name`` if it names no committed checkpoint, or ``leaving``, or
        whatever it names when ``stale``; returns whether the root was fsynced since this link
        update began (``root_synced``: before this call)."""
        link = self.layout.link_path(name)
        if not (link.is_symlink() or link.is_file()):
            if self.fsync and leaving is not None and not root_synced:
                # The link may be one a killed process removed without reaching its fsync:
                # the trash move of ``leaving`` that follows relies on the removal being
                # durable, as on a swap's when _swap finds a link already at its target.
                fsync_dir(self.root)
                return True
            return root_synced
        target, _ = resolve.link_problem(self.view, name)
        if stale or target is None or target.location == leaving:
            logger.info("removing %s: it names no committed checkpoint to keep", link)
            remove_link(link, fsync=self.fsync)
            return True
        return root_synced

    def _apply_retention(
        self, records: list[policy.CheckpointRecord], linked_before: Collection[int] = ()
    ) -> list[int]:
        """Under the lock: remove what the retention rules do not keep, never the
        ``linked_before`` steps; returns the steps removed."""
        doomed = self._steps_retention_removes(records, linked_before)
        for step in doomed:
            faults.hit("during_retention", COMMITTING_RANK)
            logger.info("retention: removing %s", self.layout.step_dir(step).name)
            # Only renamed here, under the lock; the bytes are deleted after it is released
            # (tidy), so a large delete never holds up other writers.
            move_to_trash(
                Path(resolve.committed_dir(self.view, step).location),
                self.layout.trash_root,
                fsync=self.fsync,
            )
        return doomed
