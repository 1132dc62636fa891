"""The POSIX directory-rename store: a checkpoint root on a local or shared filesystem.

Every save gets its own staging dir under ``root/.staging``, claimed by a :class:`WriterLock`
for as long as it is written. The commit is, under the root's file lock (:class:`RootLock`):
check the staged files, write the manifest, fsync, rename the staging dir to ``step-N`` and
fsync the root — the rename is the moment of publication. ``last``/``best`` are relative
symlinks (or pointer files where symlinks are refused) swapped atomically; retention and
deletes rename a checkpoint into ``root/.trash`` under the lock and delete its bytes after
(:mod:`distckpt.storage.posix_removal`, with cleanup and the setting aside of a damaged one).

Power loss: every guarantee stands on an fsync of its own, in the order the persistence model
of ``docs/faults.md`` needs. The root and ``.staging`` are created durably (an fsync of the
parent after each creation), and each staging dir's creation is made durable (an fsync of
``.staging``) in rank 0's write phase, before the agreement, so the commit rename never depends
on a creation a power loss may drop. A checkpoint that ``last`` or ``best`` may name is
unlinked (the links moved to another checkpoint, durably) before it is moved into the trash, so
no durable state has a link naming nothing. Everything that creates a temporary name in the
root (the writability probes, a link under construction) does so under the lock, so what such a
name is found under the lock was left by a writer that died, and cleanup removes it.

An opened store holds the root's writer lease (:mod:`distckpt.lease`) until it is closed, and
checks it under the root lock before every change it publishes, so a job that lost the root to
another one changes nothing in it.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path

from distckpt import events, faults, policy
from distckpt.checksums import ChecksumWriter
from distckpt.errors import (
    CheckpointError,
    CommitLost,
    ConcurrentCommit,
    InsufficientSpace,
    InvalidArgument,
    LeaseLost,
    RootNotWritable,
    StagedFileMismatch,
)
from distckpt.fsutil import (
    LINK_MODES,
    LinkMode,
    atomic_write_bytes,
    exchange_dirs,
    fsync_ancestors,
    fsync_dir,
    make_dirs,
    move_to_trash,
    probe_writable,
    remove_tree,
    rename_dir,
)
from distckpt.fsutil import free_bytes as filesystem_free_bytes
from distckpt.layout import MANIFEST_NAME, RootLayout
from distckpt.lease import LeaseHolder, RootLease, read_holder
from distckpt.lease_break import break_lease
from distckpt.lease_tokens import HeldCallback
from distckpt.lock import RootLock, WriterLock
from distckpt.manifest import FileRecord, Manifest
from distckpt.results import CheckpointLocation, SaveResult
from distckpt.storage import ExtraFile, OpenedRoot, StagingArea, store_files
from distckpt.storage.nesting import refuse_a_nested_root
from distckpt.storage.posix_links import COMMITTING_RANK, LinksAndRetention
from distckpt.storage.posix_overwrite import OverwriteUndo
from distckpt.storage.posix_removal import Removals
from distckpt.storage.posix_view import ManifestMemo, PosixRootView
from distckpt.storage.shared import (
    ViewedStore,
    log_upkeep_failure,
    opened_no_more,
    release_at_exit,
)

logger = logging.getLogger("distckpt")


class PosixRootStore(Removals, OverwriteUndo, LinksAndRetention, ViewedStore):
    """A checkpoint root that is a directory (see the module doc)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        retention: policy.RetentionPolicy,
        link: LinkMode,
        fsync: bool,
        lock_timeout: float,
        read_only: bool = False,
    ) -> None:
        if link not in LINK_MODES:
            raise InvalidArgument(f"link must be one of {LINK_MODES}, not {link!r}")
        self.retention = retention
        self.fsync = fsync
        self.link_mode: LinkMode = link
        self._lock_timeout = lock_timeout
        self._spell_root(root)
        self._removed_at_open: list[CheckpointLocation] = []
        #: whether the leftovers of dead writers were removed since the root was opened
        self._leftovers_checked = True
        self._warned_missing_monitor = False
        self._warned_unknown_space = False
        #: never write: no probe, no lock file, no cleanup or link repair (a read-only mount)
        self.read_only = read_only
        self._lease: RootLease | None = None
        self._opened_by_pid = 0

    def _spell_root(self, root: str | os.PathLike[str]) -> None:
        """Name ``root``, its view and its lock as the disk spells it (RootLayout.at)."""
        self.layout = RootLayout.at(root)
        self.view = PosixRootView(self.layout.root)
        # The links' and retention's own: their manifests never reach a user (ManifestMemo).
        self.manifest_memo = ManifestMemo()
        self.links_view = PosixRootView(self.layout.root, memo=self.manifest_memo)
        self.root = self.layout.root
        self._lock = RootLock(self.layout.lock_path, timeout=self._lock_timeout)

    # ------------------------------------------------------------------ open

    def open(self, *, wait_for_root: float = 0.0, on_held: HeldCallback = None) -> OpenedRoot:
        root = self.root
        # Before anything is created: a root inside another's step dir or link would write
        # into that root's checkpoint (README, "On disk").
        refuse_a_nested_root(root)
        if self.read_only:
            if not root.is_dir():
                raise RootNotWritable(
                    f"checkpoint root {root} is not a directory (opened read-only: it is "
                    "not created)",
                    path=root,
                )
            return self._opened()
        try:
            return self._create_and_open(root, wait_for_root, on_held)
        except Exception as exc:  # a Ctrl-C (not an Exception) stays what it is
            full = None if isinstance(exc, InsufficientSpace) else _no_room_for_a_file(exc)
            if full is None:
                raise
            # A lock file (.lease, .lock) the disk had no room or inode for: as the record's
            # write, InsufficientSpace, not the lock's "cannot lock".
            raise _open_write_failed(root, "cannot lock its files", full) from exc

    def _create_and_open(
        self, root: Path, wait_for_root: float, on_held: HeldCallback
    ) -> OpenedRoot:
        try:
            # Durably, parents included: a root whose name a power loss can drop would take
            # every checkpoint saved in it along, even one made before this process started.
            make_dirs(root, fsync=self.fsync)
            if self.fsync:
                fsync_ancestors(root)
        except OSError as exc:
            raise _open_write_failed(root, "cannot be created", exc) from exc
        # Spelled again now that it exists: another job may have created it in another case
        # since (on exFAT ``RUN`` is then its ``run``), and the lease and the lock must be
        # taken in the spelling that job takes them in.
        self._spell_root(root)
        root = self.root
        if not root.is_dir():
            raise RootNotWritable(
                f"checkpoint root {root} exists and is not a directory", path=root
            )
        self.check_visible(COMMITTING_RANK)  # before the lease and lock files are created in it
        self._take_lease(wait_for_root, on_held)
        try:
            with self._lock:
                # The probes run under the lock, so that a probe found by a cleanup holding the
                # lock was left by a process that died between creating and removing it.
                try:
                    probe_writable(root)
                except OSError as exc:
                    raise _open_write_failed(root, "is not writable", exc) from exc
                self._settle_link_mode()
                # The leftovers of dead writers are removed by tidy(), once every rank knows
                # the root is open: a slow removal here would run inside their timeout.
                self._leftovers_checked = False
                try:
                    self._update_links()
                except (OSError, CheckpointError) as exc:  # derived state: never block a start
                    logger.error("could not repair the links of %s: %s", root, exc)
        except BaseException:
            self.close()
            raise
        return self._opened(tuple(self._removed_at_open))

    def _take_lease(self, wait: float, on_held: HeldCallback) -> None:
        if self._lease is not None and self._lease.held:
            return  # opened already
        try:
            self._lease = RootLease.acquire(self.root, wait=wait, on_held=on_held)
        except CheckpointError:
            raise  # RootInUse (an OSError too) and the lease's own errors say it already
        except OSError as exc:
            raise _open_write_failed(self.root, "cannot take its lease", exc) from exc
        self._opened_by_pid = os.getpid()
        release_at_exit(self)
        logger.info("holding the lease of %s (generation %d)", self.root, self._lease.generation)

    def close(self) -> None:
        # A forked child (a data loader worker) inherits the store, but the lease is its
        # parent's: releasing it there would let another job in while the parent writes.
        if self._lease is not None and os.getpid() == self._opened_by_pid:
            self._lease.release()  # kept, so a commit after close is refused (LeaseLost)
        opened_no_more(self)

    def check_lease(self) -> None:
        """Under the lock before a change is published, and after a save's writes found its
        staging dir gone: this store's job still owns the root (:class:`~distckpt.LeaseLost` if
        not). A store never opened holds no lease: the CLI's
        maintenance commands rely on the lock alone."""
        if self._lease is not None:
            self._lease.check_current()

    def _holds_current_lease(self) -> bool:
        """Whether the root's lease record names this store's lease, read now. A store never
        opened (the CLI's) holds none."""
        if self._lease is None:
            return False
        try:
            self._lease.check_current()
        except LeaseLost:
            return False
        return True

    def lease_holder(self) -> LeaseHolder | None:
        return read_holder(self.root)

    def break_lease(self) -> LeaseHolder | None:
        return break_lease(self.root)

    def check_visible(self, rank: int) -> None:
        if not self.root.is_dir():
            raise RootNotWritable(
                f"checkpoint root {self.root} does not exist on rank {rank}: the root must be a "
                "directory shared by every rank (a shared filesystem across nodes)",
                path=self.root,
            )
        if not self.read_only and not os.access(self.root, os.W_OK | os.X_OK):
            raise RootNotWritable(
                f"checkpoint root {self.root} is not writable here", path=self.root
            )

    def free_bytes(self) -> int | None:
        free = filesystem_free_bytes(self.root)
        if free is None and not self._warned_unknown_space:
            logger.warning(
                "the filesystem of %s reports no size (0 blocks in statvfs): its free space is "
                "unknown, so saves are not checked against it",
                self.root,
            )
            self._warned_unknown_space = True
        return free

    # ------------------------------------------------------------------ staging

    def begin_staging(self, step: int, token: str) -> StagingArea:
        self._refuse_if_read_only(f"save step {step}")
        staging = self.layout.staging_dir(step, token)
        # Under the root lock, so that a cleanup (another job's start, `distckpt gc`) never
        # sees the lock file before it is locked, or the dir before its lock exists.
        with self._lock:
            make_dirs(self.layout.staging_root, fsync=self.fsync)
            claim = WriterLock(staging)
            claim.acquire()
            try:
                # Not durable yet: only the commit needs that (:meth:`make_staging_durable`).
                staging.mkdir()
            except BaseException:
                claim.release()
                raise
        return StagingArea(step, os.fspath(staging), claim)

    def make_staging_durable(self, area: StagingArea) -> None:
        if self.fsync:
            # The commit renames this dir: a rename of a dir whose creation a power loss may
            # drop is lost with it, whatever the fsyncs after the rename.
            fsync_dir(self.layout.staging_root)

    def discard_staging(self, area: StagingArea) -> None:
        staging = Path(area.location)
        try:
            if staging.exists():
                remove_tree(staging)
        finally:
            # Even when the dir cannot be removed (a read-only filesystem): the writer is done
            # with it, and a held claim would keep the next cleanup from removing it.
            if isinstance(area.claim, WriterLock):
                area.claim.release()

    def write_extra_files(
        self, area: StagingArea, files: Mapping[str, ExtraFile]
    ) -> dict[str, FileRecord]:
        return store_files(
            files, lambda name: ChecksumWriter(Path(area.location, name), fsync=self.fsync)
        )

    def check_staged(self, area: StagingArea, files: Mapping[str, FileRecord]) -> None:
        staging = Path(area.location)
        for name, record in files.items():
            try:
                size = (staging / name).stat().st_size
            except FileNotFoundError:
                # Rank 0 made the staging dir itself: gone, it was removed under this save
                # (a gc that could not see this writer's lock), not hidden by the filesystem.
                # Here a look at the dir is the only way to tell the two causes apart; a write
                # (Removals.staging_removed) needs none, its failed path proving the dir gone.
                why = (
                    f"the staging dir {staging} was removed while this save wrote it, e.g. "
                    "by a 'distckpt gc' on a machine this writer's lock does not reach"
                    if not staging.is_dir()
                    else f"rank {record.rank}'s file {name} is not visible from rank 0 in "
                    f"{staging}: the root must be on a filesystem shared by every rank"
                )
                raise StagedFileMismatch(
                    why,
                    rank=record.rank,
                    path=staging / name,
                    written_bytes=record.size,
                    found_bytes=None,
                ) from None
            if size != record.size:
                raise StagedFileMismatch(
                    f"{staging / name} has {size} bytes on rank 0 but rank {record.rank} "
                    f"wrote {record.size}",
                    rank=record.rank,
                    path=staging / name,
                    written_bytes=record.size,
                    found_bytes=size,
                )

    # ------------------------------------------------------------------ commit

    def commit(self, area: StagingArea, manifest: Manifest, *, overwrite: bool) -> SaveResult:
        staging, step = Path(area.location), manifest.step
        final = self.layout.step_dir(step)
        rank = COMMITTING_RANK
        with ExitStack() as held:
            with events.phase("commit.lock", rank=rank, step=step):
                held.enter_context(self._lock)
            self.check_lease()
            self.check_staged(area, manifest.files)
            # Re-checked under the lock: another job may have committed since the proposal.
            self.check_step(step, overwrite=overwrite, explicit=True)
            # An existing dir of the step is replaced where it is, whatever its zero padding
            # (else the canonical name), so that an overwrite never adds a second dir of one
            # step that a delete would then uncover.
            final = self.view.checkpoint(step).location
            with events.phase("commit.manifest", rank=rank, step=step):
                faults.hit("before_manifest", rank)
                manifest_bytes = manifest.to_json()
                atomic_write_bytes(staging / MANIFEST_NAME, manifest_bytes, fsync=self.fsync)
                faults.hit("after_manifest", rank)
            with events.phase("commit.publish", rank=rank, step=step):
                faults.hit("before_rename", rank)
                replaced = None
                if final.exists() and overwrite:
                    replaced = self._replace_committed(staging, final)
                else:
                    self._rename_into_place(staging, final, step)
                self._check_committed(
                    final, manifest, manifest_size=len(manifest_bytes), replaced=replaced
                )
            # Committed: the dir is the truth from here on. A failure to update the derived
            # links or to apply retention must not report the save as failed (see the log).
            try:
                faults.hit("after_rename", rank)
                with events.phase("commit.links", rank=rank, step=step):
                    records = self._update_links()
                with events.phase("commit.retention", rank=rank, step=step):
                    self._apply_retention(records)
            except Exception as exc:
                log_upkeep_failure(final.name, "links", exc)
        # The trash (what retention removed) is emptied by tidy(), after every rank heard of
        # this commit.
        self._warn_missing_monitor(manifest)
        return SaveResult(manifest.step, final, manifest.epoch, dict(manifest.metrics))

    def _rename_into_place(self, staging: Path, final: Path, step: int) -> None:
        try:
            rename_dir(staging, final, fsync=self.fsync)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            # check_step found no step dir under the lock a moment ago: only a writer that
            # does not share that lock can have committed it since.
            raise ConcurrentCommit(
                f"step {step} was committed by another writer meanwhile, at {final}: the lock "
                f"of {self.root} does not reach that writer (another machine, with a filesystem "
                "that keeps locks per client, such as NFS mounted with local locks?); give "
                "each job a root of its own",
                path=final,
                step=step,
            ) from exc

    def _check_committed(
        self, final: Path, manifest: Manifest, *, manifest_size: int, replaced: Path | None
    ) -> None:
        """After the rename: the committed dir holds the manifest (of ``manifest_size`` bytes,
        as written) and every file with its size. A filesystem that loses them in a rename
        (fusefat empties a directory it renames) must fail the save, not report a checkpoint
        that is not there; what is left of it goes to the trash, so it is not taken for a
        committed step, and the checkpoint an overwrite replaced (now at ``replaced``) comes
        back under its name, as after any failed save."""
        expected = {MANIFEST_NAME: manifest_size} | {
            name: record.size for name, record in manifest.files.items()
        }
        for name, size in expected.items():
            try:
                found: int | None = (final / name).stat().st_size
            except FileNotFoundError:
                found = None
            if found == size:
                continue
            what = "is missing" if found is None else f"has {found} bytes instead of {size}"
            # Claimed kept only where the checkpoint under ``final`` is whole again.
            put_back = self._undo_lost_commit(final, replaced) and (final / MANIFEST_NAME).is_file()
            kept = " (the checkpoint it was to replace is kept)" if put_back else ""
            raise CommitLost(
                f"the filesystem of {self.root} lost step {manifest.step} when renaming it into "
                f"place: {name} {what} in {final} after the rename (fusefat does this); "
                f"nothing was committed{kept}: keep checkpoints on another filesystem",
                path=final / name,
                step=manifest.step,
            )

    def _warn_missing_monitor(self, manifest: Manifest) -> None:
        missing = policy.missing_monitor(manifest.metrics, self.retention.monitor)
        if missing and not self._warned_missing_monitor:
            logger.warning(
                "metrics %s lack the monitored %r: such checkpoints are never best",
                sorted(manifest.metrics),
                self.retention.monitor,
            )
            self._warned_missing_monitor = True

    def _replace_committed(self, staging: Path, final: Path) -> Path | None:
        """``overwrite=True``: put the new checkpoint under ``final`` in place of the old one;
        returns where the old one is now (None if it vanished meanwhile). Where the filesystem
        can swap two names atomically, ``final`` always holds a whole checkpoint, old or new;
        elsewhere there is a window between two renames in which it holds neither (a crash
        there leaves the old one in the trash)."""
        if self.fsync:
            fsync_dir(staging)
        if exchange_dirs(staging, final, fsync=self.fsync):
            return staging  # holds the old one now, removed after the commit as usual
        # Two renames: first move the links off the old checkpoint, so that no durable state
        # has ``last`` naming the missing step-N between them.
        self._update_links(leaving=final)
        trashed = move_to_trash(final, self.layout.trash_root, fsync=self.fsync)
        try:
            faults.hit("during_delete", COMMITTING_RANK)
            rename_dir(staging, final, fsync=self.fsync)
        except BaseException:
            # A failed save leaves the root as it was: the old checkpoint must not stay in
            # the trash, whose next emptying would delete it (a crash here leaves it there,
            # the documented window of this fallback).
            if trashed is not None:
                self._put_back(trashed, final)
            raise
        return trashed


#: a write that failed for want of room: the disk is full, or the user's quota is used up
_NO_ROOM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def _no_room_for_a_file(exc: Exception) -> OSError | None:
    """The no-room OSError that ``exc`` is, or that a lock's :class:`CheckpointError` was
    raised from. Not one further up the ``__context__`` chain: an error raised while handling a
    full disk (a failing cleanup) is another failure, which must not pass for a full disk."""
    failure = exc.__cause__ if isinstance(exc, CheckpointError) else exc
    if isinstance(failure, OSError) and failure.errno in _NO_ROOM_ERRNOS:
        return failure
    return None


def _open_write_failed(root: Path, what: str, exc: OSError) -> CheckpointError:
    """The error for a write that opening ``root`` needs (the lease record, the writability
    probe): :class:`InsufficientSpace` when the filesystem has no room left, which freeing space
    fixes, else :class:`RootNotWritable`; either names the root and the file."""
    message = f"checkpoint root {root} {what}: {exc}"
    if exc.errno in _NO_ROOM_ERRNOS:
        # ENOSPC is also the errno of a full inode table, which ``statvfs`` space does not show
        why = (
            "the space or the filesystem's free inodes ran out"
            if exc.errno == errno.ENOSPC
            else "the quota is used up"
        )
        return InsufficientSpace(f"{message} ({why})", path=exc.filename or root)
    return RootNotWritable(message, path=exc.filename or root)
