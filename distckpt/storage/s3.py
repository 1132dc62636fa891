"""The object-store store: a checkpoint root under ``s3://BUCKET/PREFIX`` (layout in
:mod:`distckpt.storage.s3_root`).

A save writes every object under a prefix of its own, ``step-N/<attempt>/``: each rank's
format writes into a local spool dir, whose files the rank then uploads (parallel multipart,
with the manifest's CRC-32 sent for the store to check). Rank 0 commits by creating
``step-N/COMMIT`` with ``If-None-Match: *``: that creation is the moment of publication, and
of two writers only one can make it (the other gets :class:`~distckpt.ConcurrentCommit`).
``overwrite=True`` replaces ``COMMIT`` by compare-and-swap on its ETag; the old attempt's
objects go after. The save is then listed once more: one that lost objects since its check
puts ``COMMIT`` back as it was and fails (:class:`~distckpt.CommitLost`). ``last``/``best``
are pointer objects moved by compare-and-swap after the commit; retention and deletes remove
``COMMIT`` first (the step stops being committed at once) and the objects after, so a
half-deleted step never looks committed. Those objects, and the
leftovers of dead writers a start finds, are deleted by :meth:`~S3RootStore.tidy`, once the
operation's outcome reached every rank: a listing and batched deletes of thousands of objects
must not run inside the other ranks' timeout.

Locks: rank 0 of a writing job holds the root's lease object ``.lease``
(:class:`~distckpt.objlease.ObjectLease`), renewed by a daemon thread every third of its
duration and checked before every change to what is published; and a claim object
``.writers/<attempt>`` for each save in flight, renewed the same way, so that cleanup (``gc``,
another job's start) never deletes a live writer's objects. There is no fsync: a completed
PUT is durable, so ``fsync=`` means nothing here, and ``last``/``best`` are always pointer
objects whatever ``link=`` says. The lease, the claims, their renewing thread and closing are
in :mod:`distckpt.storage.s3_lease`; pointers, retention and leftovers in
:mod:`distckpt.storage.s3_upkeep`.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from distckpt import events, faults, policy
from distckpt.errors import (
    CheckpointError,
    CheckpointNotFound,
    CommitLost,
    ConcurrentCommit,
    ObjectExists,
    PreconditionFailed,
    StagedFileMismatch,
)
from distckpt.layout import MANIFEST_NAME
from distckpt.lease_tokens import HeldCallback
from distckpt.manifest import MAX_MANIFEST_BYTES, FileRecord, Manifest
from distckpt.objstore import ObjectStore
from distckpt.results import CheckpointLocation, SaveResult
from distckpt.storage import ExtraFile, OpenedRoot, StagingArea, store_files
from distckpt.storage.nesting import refuse_a_nested_root
from distckpt.storage.posix_links import COMMITTING_RANK
from distckpt.storage.s3_lease import LeaseKeeping
from distckpt.storage.s3_root import DOWNLOAD_CONCURRENCY, UNKNOWN_ATTEMPT, CommitRecord, S3Root
from distckpt.storage.s3_spool import SpoolUploads, make_temp_dir, remove_dead_temp_dirs
from distckpt.storage.s3_upkeep import Upkeep
from distckpt.storage.s3_view import S3RootView
from distckpt.storage.shared import ViewedStore, log_upkeep_failure

logger = logging.getLogger("distckpt")

#: how often a pointer's compare-and-swap is tried again when another process moved it meanwhile
_POINTER_RETRIES = 3
#: how often putting ``COMMIT`` back after a lost commit is tried: a transient failure must
#: not leave the lost save committed and the checkpoint it replaced named by nothing
_UNDO_TRIES = 3


class S3RootStore(LeaseKeeping, Upkeep, ViewedStore):
    """A checkpoint root in an S3-protocol object store (see the module doc)."""

    #: a completed PUT is durable: nothing to fsync
    fsync = False
    #: the spool's files are streamed into objects while the format writes them: reading them
    #: back from the page cache is what keeps that cheap (and a follower's buffered reads
    #: beside direct writes could see pages not yet written)
    shards_read_back = True

    def __init__(
        self,
        url: str,
        *,
        storage_options: Mapping[str, Any] | None,
        retention: policy.RetentionPolicy,
        read_only: bool = False,
        set_aside_budget: float | None = None,
    ) -> None:
        self.s3 = S3Root(url, storage_options)
        self.set_aside_budget = set_aside_budget
        self.view = S3RootView(url, storage_options, s3=self.s3)
        self.root: str = self.s3.root
        self.retention = retention
        self.read_only = read_only
        self._init_lease_keeping()
        self._removed_at_open: list[CheckpointLocation] = []
        self._leftovers_checked = True
        self._tidy_lock = threading.Lock()
        self._unpublished: list[tuple[int, str]] = []
        self._unpublished_lock = threading.Lock()
        self._unpublished_here: set[tuple[int, str]] = set()
        #: manifests of the committed steps this store found valid, by (step, ETag of the
        #: step's COMMIT): a committed save is never changed, only replaced (a new COMMIT)
        #: or deleted, so each is checked once, not at every commit
        self._checked: dict[tuple[int, str], Manifest] = {}
        self._pointers_written: dict[str, tuple[str, str]] = {}
        self._last_on_unlisted_step = False
        #: saves this store committed: their objects are never removed by a discard
        self._published: set[str] = set()
        #: the uploads following each spool dir of this process's saves in flight
        self._spools: dict[Path, SpoolUploads] = {}

    # ------------------------------------------------------------------ open / close

    def open(self, *, wait_for_root: float = 0.0, on_held: HeldCallback = None) -> OpenedRoot:
        # Before the lease object is written: the outer root's gc would take this root's
        # saves for a dead writer's leftovers (README, "On disk").
        refuse_a_nested_root(self.root, self.s3.storage_options)
        if self.read_only:
            return self._opened()
        self.check_visible(COMMITTING_RANK)
        self._take_lease(wait_for_root, on_held)
        # the manifests of every committed step that passes its check, once all were checked
        checked: list[Manifest] | None = None
        try:
            # The leftovers of dead writers are removed by tidy(), once every rank knows the
            # root is open: a slow removal here would run inside their timeout.
            with self._tidy_lock:
                self._leftovers_checked = False
            try:
                self._update_pointers()
                # the store's first update checks every committed step: the newest of them is
                # what a second listing and check would find, unless another process committed
                # a newer step after the update listed them (and moved last to it)
                if not self._last_on_unlisted_step:
                    checked = list(self._checked.values())
            except CheckpointError as exc:  # derived state: never block a start
                logger.error("could not repair the pointers of %s: %s", self.root, exc)
        except BaseException:
            self.close()
            raise
        return self._opened(tuple(self._removed_at_open), checked=checked)

    def check_visible(self, rank: int) -> None:
        # One small listing proves the endpoint, the credentials and the bucket.
        next(iter(self.s3.client.list("", page_size=1)), None)

    def free_bytes(self) -> int | None:
        return None  # an object store reports no free space; saves are not checked against it

    # ------------------------------------------------------------------ staging

    def begin_staging(self, step: int, token: str) -> StagingArea:
        self._refuse_if_read_only(f"save step {step}")
        # Written before the lock is taken: a slow data client must not hold up the lease's
        # renewals, which take that lock.
        etag = self._write_claim(token)
        with self._lease_lock:
            self._claims.add(token)
            self._claim_etags[token] = etag
        return StagingArea(step, self.s3.attempt_location(step, token), token)

    def make_staging_durable(self, area: StagingArea) -> None:
        # Nothing to do: a prefix is not created, and an object is durable once written.
        return

    def discard_staging(self, area: StagingArea) -> None:
        step, attempt = self.s3.parse_attempt_location(area.location)
        # Runs after a failed save too: its own error must not hide that one, nor its time
        # add a whole retry budget per request to a save failing on a store that stopped
        # answering: one attempt each. What is left is a dead writer's leftover, removed by
        # the next gc or start. A published save's claim delete keeps the retries: one
        # transient error must not leave the claim of every successful save behind.
        published = attempt in self._published
        try:
            # the one-attempt client is made only for a failed save: it costs a client's setup
            if not published:
                quick = self.s3.client.one_attempt
                if not self._commit_names(step, attempt, quick):
                    self._delete_prefix(self.s3.attempt_prefix(step, attempt), quick)
        except CheckpointError as exc:
            logger.warning("could not remove the save %s (left for gc): %s", area.location, exc)
        finally:
            self._published.discard(attempt)
            self._drop_claim(attempt, one_attempt=not published)

    def _commit_names(self, step: int, attempt: str, store: ObjectStore | None = None) -> bool:
        """Whether the step's ``COMMIT`` names the save ``attempt``: its commit may have been
        made with the answer lost. A damaged ``COMMIT`` names none (this store writes only
        whole records): cleanup, which cannot tell whose it is, would keep every save of its
        step while it stays damaged, so the save's own prefix must go here."""
        record = self.s3.read_commit_or_unknown(step, store)
        return record is not None and record.attempt == attempt

    def open_shard(self, location: str, rank: int) -> AbstractContextManager[Path]:
        return self._spool(location, rank)

    @contextmanager
    def _spool(self, location: str, rank: int) -> Iterator[Path]:
        """A spool dir private to this rank's part of one save, whose files are uploaded while
        the format writes them (:class:`~distckpt.storage.s3_spool.SpoolUploads`)."""
        step, attempt = self.s3.parse_attempt_location(location)
        remove_dead_temp_dirs()  # what killed saves and reads left on this machine
        directory = make_temp_dir("spool", f"{attempt}-r{rank}")
        uploads = SpoolUploads(self.s3.client, directory, self.s3.attempt_prefix(step, attempt))
        self._spools[directory] = uploads
        try:
            yield directory
        finally:
            if self._spools.pop(directory, None) is not None:
                uploads.abort()  # not published: the format failed
            shutil.rmtree(directory, ignore_errors=True)

    def publish_shard(
        self, location: str, directory: Path, records: Mapping[str, FileRecord]
    ) -> dict[str, FileRecord]:
        step, attempt = self.s3.parse_attempt_location(location)
        prefix = self.s3.attempt_prefix(step, attempt)
        uploads = self._spools.pop(directory, None)
        done = uploads.finish(records) if uploads is not None else set()
        # What was not followed whole (renamed, rewritten, or too quick to see) goes now.
        with ThreadPoolExecutor(DOWNLOAD_CONCURRENCY) as pool:
            futures = [
                pool.submit(self._upload, directory / name, prefix + name, record)
                for name, record in records.items()
                if name not in done
            ]
            for future in futures:
                future.result()
        return dict(records)

    def _upload(self, source: Path, name: str, record: FileRecord) -> None:
        """Upload one file a format wrote, checking that what went out is what it recorded."""
        uploaded = store_files({name: source}, self.s3.client.open_write, rank=record.rank)[name]
        if (uploaded.size, uploaded.checksum) != (record.size, record.checksum):
            raise CheckpointError(
                f"{source} changed while it was uploaded to {self.root}/{name}: "
                f"{uploaded.size} bytes, CRC-32 {uploaded.checksum}; the format recorded "
                f"{record.size} bytes, {record.checksum}",
                rank=record.rank,
                path=f"{self.root}/{name}",
            )

    def write_extra_files(
        self, area: StagingArea, files: Mapping[str, ExtraFile]
    ) -> dict[str, FileRecord]:
        prefix = self.s3.attempt_prefix(*self.s3.parse_attempt_location(area.location))
        return store_files(files, lambda name: self.s3.client.open_write(prefix + name))

    def check_staged(self, area: StagingArea, files: Mapping[str, FileRecord]) -> None:
        step, attempt = self.s3.parse_attempt_location(area.location)
        prefix = self.s3.attempt_prefix(step, attempt)
        sizes = {info.key[len(prefix) :]: info.size for info in self.s3.client.list(prefix)}
        for name, record in files.items():
            where = f"{area.location}/{name}"
            if name not in sizes:
                raise StagedFileMismatch(
                    f"rank {record.rank}'s file {name} is not in the store at {where}",
                    rank=record.rank,
                    path=where,
                    written_bytes=record.size,
                    found_bytes=None,
                )
            if sizes[name] != record.size:
                raise StagedFileMismatch(
                    f"{where} has {sizes[name]} bytes in the store but rank {record.rank} "
                    f"wrote {record.size}",
                    rank=record.rank,
                    path=where,
                    written_bytes=record.size,
                    found_bytes=sizes[name],
                )

    # ------------------------------------------------------------------ commit

    def commit(self, area: StagingArea, manifest: Manifest, *, overwrite: bool) -> SaveResult:
        step, attempt = self.s3.parse_attempt_location(area.location)
        rank = COMMITTING_RANK
        # The step was checked at the proposal; since then only this job, the lease's holder
        # (checked below), may have committed, and a commit of the same step by anyone fails
        # the exclusive create of COMMIT (ConcurrentCommit): the step is not listed again.
        self.check_staged(area, manifest.files)
        with events.phase("commit.manifest", rank=rank, step=step):
            faults.hit("before_manifest", rank)
            manifest_bytes = manifest.to_json()
            self.s3.client.put_bytes(
                self.s3.attempt_prefix(step, attempt) + MANIFEST_NAME, manifest_bytes
            )
            faults.hit("after_manifest", rank)
        with events.phase("commit.publish", rank=rank, step=step):
            faults.hit("before_rename", rank)
            self.check_lease()  # the upload may have outlasted the lease
            replaced, etag = self._publish(step, attempt, overwrite=overwrite)
            self._check_committed(area, manifest, len(manifest_bytes), etag, replaced)
            self._remember_written(step, attempt, etag, manifest_bytes)
        self._published.add(attempt)
        if replaced is not None and replaced.attempt != UNKNOWN_ATTEMPT:
            self._leave_to_tidy(step, replaced.attempt)
        # Committed: COMMIT is the truth from here on. A failure to update the derived
        # pointers or retention must not report the save as failed (see the log).
        try:
            faults.hit("after_rename", rank)
            self._apply_retention(self._update_pointers())
        except Exception as exc:
            log_upkeep_failure(self.s3.location(step), "pointers", exc)
        return SaveResult(step, self.s3.location(step), manifest.epoch, dict(manifest.metrics))

    def _publish(
        self, step: int, attempt: str, *, overwrite: bool
    ) -> tuple[CommitRecord | None, str]:
        """Create (or with ``overwrite`` replace) the step's ``COMMIT`` object naming
        ``attempt``; the commit record it replaced, if any (a damaged one's attempt is
        :data:`UNKNOWN_ATTEMPT`: its save becomes a leftover like a dead writer's), and the
        ETag of the new ``COMMIT``."""
        name = self.s3.commit_name(step)
        content = CommitRecord.encode(step, attempt)
        previous = self.s3.read_commit_or_unknown(step) if overwrite else None
        if previous is not None and previous.attempt != UNKNOWN_ATTEMPT:
            self._drop_set_aside_record(step, previous.attempt)  # before it is uncommitted
        # The attempt token makes the content unique to this save: a commit applied whose
        # answer was lost is recognised as this save's own by reading it back.
        try:
            if previous is not None:
                etag = self.s3.client.put_own_bytes(name, content, if_match=previous.etag)
            else:
                etag = self.s3.client.put_own_bytes(name, content, if_absent=True)
        except (ObjectExists, PreconditionFailed) as exc:
            raise ConcurrentCommit(
                f"step {step} was committed by another writer meanwhile, at "
                f"{self.s3.location(step)}: give each job a root of its own",
                path=self.s3.location(step),
                step=step,
            ) from exc
        return previous, etag

    def _check_committed(
        self,
        area: StagingArea,
        manifest: Manifest,
        manifest_size: int,
        etag: str,
        replaced: CommitRecord | None,
    ) -> None:
        """After ``COMMIT`` was written: the save it names still holds the manifest and every
        file with its size (one listing, as :meth:`check_staged`). Objects lost since that
        check (a ``gc`` whose clock runs ahead took the save for a dead writer's) must fail
        the save, not report a checkpoint that is not there, nor let an ``overwrite`` delete
        the checkpoint it replaced: ``COMMIT`` is put back as it was (conditional on the ETag
        just written; deleted where the step was new), and :class:`~distckpt.CommitLost`
        raised, as the POSIX store does when its filesystem loses a renamed step dir. A
        listing that fails is logged: the save is committed, as after any failure past
        ``COMMIT``."""
        written = {MANIFEST_NAME: FileRecord(manifest_size, "", COMMITTING_RANK)}
        try:
            self.check_staged(area, written | dict(manifest.files))
        except StagedFileMismatch as lost:
            outcome = self._undo_lost_commit(manifest.step, etag, replaced)
            raise CommitLost(
                f"the store of {self.root} lost objects of step {manifest.step} between the "
                f"commit's check and its COMMIT: {lost}; {outcome}: is a gc running beside "
                "the job, on a machine whose clock is ahead?",
                path=lost.path,
                step=manifest.step,
            ) from lost
        except CheckpointError as exc:  # the listing failed: COMMIT stands, the save with it
            logger.error(
                "committed %s, but could not list it again to check it: %s",
                self.s3.location(manifest.step),
                exc,
            )

    def _remember_written(self, step: int, attempt: str, etag: str, manifest_bytes: bytes) -> None:
        """Keep the ``COMMIT`` record (version ``etag``) and the manifest this save wrote, as
        if read: the pointers' update need not read them back, but still lists the save and
        checks it (its objects may be lost after the commit's own listing), and a ``COMMIT``
        replaced since has another ETag. A manifest over the size readers refuse unread is
        not kept: it is refused as if read."""
        self.s3.remember_commit(step, CommitRecord(step, attempt, etag))
        if len(manifest_bytes) <= MAX_MANIFEST_BYTES:
            source = f"{self.s3.attempt_location(step, attempt)}/{MANIFEST_NAME}"
            self.s3.manifests[(step, attempt)] = Manifest.from_json(manifest_bytes, source=source)

    def _undo_lost_commit(self, step: int, etag: str, replaced: CommitRecord | None) -> str:
        """Put the step's ``COMMIT`` back as it was before this save wrote it (version
        ``etag``): the replaced record, else none (a damaged one replaced goes too), trying
        :data:`_UNDO_TRIES` times. What became of the step, for the ``CommitLost`` message. A
        failure is never raised over the ``CommitLost`` it undoes: the lost save stays
        committed, damaged (readers skip it), and a replaced checkpoint is kept from cleanup
        by a set-aside record (:meth:`_keep_replaced`)."""
        name = self.s3.commit_name(step)
        put_back = replaced is not None and replaced.attempt != UNKNOWN_ATTEMPT
        failure: CheckpointError | None = None
        for _ in range(_UNDO_TRIES):
            try:
                if not put_back or replaced is None:
                    # a new step, or one whose damaged COMMIT named no save: uncommitted
                    self.s3.client.delete([name])
                    return "nothing was committed"
                content = CommitRecord.encode(step, replaced.attempt)
                self.s3.client.put_own_bytes(name, content, if_match=etag)
                return "nothing was committed (the checkpoint it was to replace is kept)"
            except CheckpointError as exc:
                failure = exc
        location = self.s3.location(step)
        logger.critical(
            "could not undo the lost commit of %s: %s; it stays committed, damaged (readers "
            "skip it): delete it (manager.delete(%d), or distckpt delete) or save the step "
            "again with overwrite=True",
            location,
            failure,
            step,
        )
        damaged = f"step {step} is now committed damaged (COMMIT could not be put back: {failure})"
        if put_back and replaced is not None:
            return damaged + "; " + self._keep_replaced(step, replaced.attempt)
        return damaged

    def _keep_replaced(self, step: int, attempt: str) -> str:
        """Keep the save ``attempt`` an overwrite replaced, which ``COMMIT`` no longer names,
        from cleanup, as a set-aside does: a set-aside record naming it, so that the next start
        or ``gc`` copies it to ``damaged-step-N-<attempt>/`` (never deleted) before deleting
        its objects. What was done, and how to get it back, logged at critical level."""
        kept_at = self.s3.set_aside_location(step, attempt)
        commit = CommitRecord.encode(step, attempt).decode()
        try:
            self.s3.write_set_aside_record(step, attempt)
        except CheckpointError as exc:
            logger.critical(
                "the checkpoint that save replaced is uncommitted, under %s, and nothing keeps "
                "it from the next start or gc (%s): to get it back, put %s in %s first",
                self.s3.attempt_location(step, attempt),
                exc,
                commit,
                self.s3.location(step) + "/COMMIT",
            )
            return f"the checkpoint it was to replace is uncommitted: see the log ({exc})"
        logger.critical(
            "the checkpoint that save replaced is kept, set aside: the next start or gc copies "
            "it from %s to %s, never deleted; to get it back, copy its objects back under %s "
            "(if gone) and put %s in %s",
            self.s3.attempt_location(step, attempt),
            kept_at,
            self.s3.attempt_location(step, attempt),
            commit,
            self.s3.location(step) + "/COMMIT",
        )
        return f"the checkpoint it was to replace is kept, set aside at {kept_at}"

    # ------------------------------------------------------------------ removal

    def delete(self, step: int) -> int | None:
        self._refuse_if_read_only(f"delete step {step}")
        # Read before the lease check: a COMMIT written after it is a new holder's, kept.
        record = self.s3.read_commit_or_unknown(step)
        self.check_lease()
        committed = self.view.committed_steps()
        if step not in committed or record is None:
            listing = ", ".join(map(str, committed)) if committed else "none"
            raise CheckpointNotFound(
                f"no checkpoint for step {step} in {self.root}; committed steps: {listing}",
                step=step,
            )
        # Pointers first: the other order leaves ``last`` naming a step that is gone.
        records = self._update_pointers(leaving=step)
        # _unpublish reads COMMIT again, on purpose: a job that took the root while the
        # pointers moved may have set the save aside meanwhile (COMMIT gone: its set-aside
        # record, which keeps the copy, must stay) or replaced it; the If-Match delete alone
        # would come after the record's delete. This narrows the race to two requests, it
        # does not close it: a set-aside whose COMMIT delete falls between that read and the
        # record's delete still loses its record.
        self._unpublish(step, record.etag)  # its objects go at tidy()
        return records[-1].step if records else None

    def prune(self) -> list[int]:
        self._refuse_if_read_only("prune")
        self.check_lease()
        # Read before the pointers move: this prune's monitor/mode may disagree with the job's.
        linked_before = self._linked_steps()
        return self._apply_retention(self._update_pointers(), linked_before)

    def collect_leftovers(self, *, force: bool = False) -> list[CheckpointLocation]:
        self._refuse_if_read_only("collect leftovers")
        self.check_lease()
        # Under tidy's lock: a tidy in another thread, removing the same leftovers, finishes
        # first, and what it removed is reported here, once.
        with self._tidy_lock:
            removed = self._removed_at_open + self._remove_leftovers()
            self._removed_at_open = []  # reported once
            self._leftovers_checked = True  # a tidy need not look for them again
        return removed
