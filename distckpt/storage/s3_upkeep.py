"""The ``s3://`` store's upkeep: the ``last``/``best`` pointer objects, retention, unpublishing a
step (``COMMIT`` first, its objects after) and the leftovers of dead writers. A mixin of
:class:`~distckpt.storage.s3.S3RootStore`, run by the committing rank. A removal is split in
two. Inside the operation (a commit's retention or replacement, a delete, a prune), while the
other ranks wait for its outcome, only the quick part runs: the pointers move and the step's
``COMMIT`` goes, one request per step, and the save it named is remembered. Listing and deleting
that save's objects (thousands for a large job) is :meth:`Upkeep.tidy`'s, after the outcome
reached every rank, as are dead writers' leftovers found at a start. Setting a damaged save
aside is :mod:`distckpt.storage.s3_set_aside`'s. A crash in between leaves
saves that no ``COMMIT`` names and no live claim protects: the next start or ``gc`` removes them
as a dead writer's."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Collection

from distckpt import faults, policy, resolve
from distckpt.errors import (
    CheckpointError,
    CorruptCheckpoint,
    ObjectExists,
    ObjectNotFound,
    PreconditionFailed,
)
from distckpt.layout import BEST, LAST, parse_set_aside_name, parse_step_dir_name, step_dir_name
from distckpt.lease import local_process_gone
from distckpt.lock import Leftover
from distckpt.manifest import Manifest
from distckpt.objlease import LeaseRecord
from distckpt.objstore import ObjectStore
from distckpt.results import CheckpointLocation
from distckpt.storage.nesting import root_shown_by
from distckpt.storage.posix_links import COMMITTING_RANK
from distckpt.storage.s3_root import (
    UNKNOWN_ATTEMPT,
    WRITERS_PREFIX,
    CommitRecord,
    save_whose_manifest,
    step_of_commit,
)
from distckpt.storage.s3_set_aside import SetAside
from distckpt.storage.s3_step_reads import confirm_listed, read_for_checks
from distckpt.storage.s3_view import S3RootView

logger = logging.getLogger("distckpt")

_POINTER_RETRIES = 3  # compare-and-swap of a pointer that another process moved meanwhile
#: How far a claim's expiry, a wall-clock time written by its writer, is trusted past its
#: end: the clocks of the writer and of the cleaning process may disagree by this much.
CLOCK_SKEW_SECONDS = 60.0


class Upkeep(SetAside):
    """Pointers, retention, removals and leftovers of the ``s3://`` store (a mixin: the store
    supplies these attributes, and those of :class:`SetAside`)."""

    view: S3RootView
    root: str
    retention: policy.RetentionPolicy
    #: manifests of committed steps found valid, by (step, ETag of the step's COMMIT)
    _checked: dict[tuple[int, str], Manifest]
    #: the attempts of this store's saves in flight (their claims are live)
    _claims: set[str]
    #: each pointer's target and ETag as this store last wrote it
    _pointers_written: dict[str, tuple[str, str]]
    #: whether the last pointers' update left ``last`` on a step committed after its listing
    #: (by another process): the newest step it checked is then not the newest committed
    _last_on_unlisted_step: bool
    #: the saves unpublished (their step's ``COMMIT`` deleted or replaced) as (step, attempt),
    #: whose objects :meth:`tidy` deletes; guarded by ``_unpublished_lock``
    _unpublished: list[tuple[int, str]]
    #: whether the leftovers of dead writers were removed since the root was opened
    _leftovers_checked: bool
    #: the dead writers' saves the tidy after the open removed, until gc reports them
    _removed_at_open: list[CheckpointLocation]
    #: held for all of :meth:`tidy` and of ``collect_leftovers`` (tidy may run in a thread of
    #: its own): guards ``_leftovers_checked`` and ``_removed_at_open``, so that one cleanup's
    #: removals are reported once, and a gc never removes what a tidy is removing
    _tidy_lock: threading.Lock
    read_only: bool
    _steps_retention_removes: Callable[[list[policy.CheckpointRecord], Collection[int]], list[int]]

    def _delete_prefix(self, prefix: str, store: ObjectStore | None = None) -> None:
        """Delete every object under ``prefix``, through ``store`` (by default the root's
        client)."""
        store = store or self.s3.client
        store.delete(info.key for info in list(store.list(prefix)))

    def _delete_published_save(self, step: int, attempt: str) -> None:
        """Delete every object of a save that was published (unpublished now: removed or
        replaced), with the set-aside record naming it and the part of its copy that a
        set-aside killed before it unpublished the save leaves behind (they would list a save
        that is gone)."""
        self._delete_prefix(self.s3.attempt_prefix(step, attempt))
        self._delete_prefix(self.s3.set_aside_prefix(step, attempt))
        self.s3.client.delete([self.s3.set_aside_record_name(step, attempt)])

    def tidy(self) -> None:
        """Delete the objects of the saves unpublished since the last call, and after an open
        the leftovers of dead writers; raises no error (what it could not delete is logged and
        deleted by a later call, or by the next start or gc as a dead writer's leftover), but
        lets a ``KeyboardInterrupt`` through. It may run in a thread of its own:
        ``collect_leftovers`` waits for it (:attr:`_tidy_lock`)."""
        if self.read_only:
            return
        with self._tidy_lock:
            try:
                self._delete_unpublished()
                if not self._leftovers_checked:
                    self._removed_at_open = self._remove_leftovers()
                    self._leftovers_checked = True
            except Exception as exc:  # the outcome was told already: a removal never fails it
                logger.warning("could not tidy %s (tried again later): %s", self.root, exc)

    def _delete_unpublished(self) -> None:
        """Delete the objects of each save :meth:`_unpublish` (or a replacing commit) left;
        one that fails is logged and kept for the next call, with those after it. Anything
        else that stops it (a bug's exception, a ``KeyboardInterrupt``) keeps them too and is
        raised."""
        with self._unpublished_lock:
            saves, self._unpublished = self._unpublished, []
        for index, (step, attempt) in enumerate(saves):
            try:
                self._delete_published_save(step, attempt)
            except CheckpointError as exc:
                logger.warning(
                    "could not delete the objects of %s, unpublished (tried again later): %s",
                    self.s3.attempt_location(step, attempt),
                    exc,
                )
                self._keep_for_next_tidy(saves[index:])
                return  # the store is failing: the rest wait for the next call too
            except BaseException:
                # taken out of the list above: dropped here, nothing would delete them
                self._keep_for_next_tidy(saves[index:])
                raise

    def _keep_for_next_tidy(self, saves: list[tuple[int, str]]) -> None:
        """Put ``saves`` back first in the list of those :meth:`tidy` deletes."""
        with self._unpublished_lock:
            self._unpublished[:0] = saves

    def _leave_to_tidy(self, step: int, attempt: str) -> None:
        """Remember the save ``attempt`` of ``step``, unpublished now, for :meth:`tidy`."""
        with self._unpublished_lock:
            self._unpublished.append((step, attempt))
            self._unpublished_here.add((step, attempt))

    def _update_pointers(self, *, leaving: int | None = None) -> list[policy.CheckpointRecord]:
        """Point ``last`` at the newest committed checkpoint that passes its check and
        ``best`` at the best, or remove a pointer that names nothing valid. ``leaving``: a
        step about to be removed, counted as gone. The records it read."""
        listing = self.s3.step_listing()
        commits = dict(listing.commits)
        self._forget_changed(commits)
        unchecked = [  # not the step leaving: it need not be readable (one from a newer version)
            step
            for step, etag in commits.items()
            if step != leaving and (step, etag) not in self._checked
        ]
        sources, unchecked = (
            (reads := read_for_checks(self.s3, unchecked, listing)).sources,
            reads.steps,
        )
        for _ in range(_POINTER_RETRIES + 1):  # each round checks a changed step again
            for source, manifest in resolve.iter_valid(self.view, steps=unchecked, sources=sources):
                self._checked[(source.expected_step, commits[source.expected_step])] = manifest
            valid = sorted(
                (m for (step, _), m in self._checked.items() if step != leaving),
                key=lambda manifest: manifest.step,
            )
            records = [resolve.record_of(manifest) for manifest in valid]
            best = policy.best_step(records, self.retention.monitor, self.retention.mode)
            last = records[-1].step if records else None
            unchecked, sources = confirm_listed(self.s3, (last, best), reads, commits), {}
            if self._forget_changed(commits):  # neither changed since the listing: they stand
                break
        else:
            raise CheckpointError(f"{self.root}: the steps chosen kept changing while checked")
        valid_steps = {manifest.step for manifest in valid}
        faults.hit("during_link_swap", COMMITTING_RANK)
        # A monitor that ranks none leaves no best, as on a POSIX root (posix_links)
        best_valid = valid_steps if self.retention.monitor is None else set()
        self._last_on_unlisted_step = False
        for name, step, valid in ((LAST, last, valid_steps), (BEST, best, best_valid)):
            if step is not None:
                kept_newer = self._swap_pointer(name, step, listed=commits.keys())
                self._last_on_unlisted_step |= kept_newer
            else:
                self._remove_pointer_unless_valid(name, valid)
        return records

    def _forget_changed(self, commits: dict[int, str]) -> bool:
        """Forget the steps checked whose ``COMMIT`` is not in ``commits`` as it was then
        (deleted or replaced since); whether none was."""
        before, self._checked = (
            self._checked,
            {key: m for key, m in self._checked.items() if commits.get(key[0]) == key[1]},
        )
        return len(before) == len(self._checked)

    def _swap_pointer(self, name: str, step: int, listed: Collection[int] = ()) -> bool:
        """Point ``name`` at ``step``, found newest or best among the ``listed`` commits. But
        ``last`` never moves back off a newer step committed since (a live job's save, which
        pointed it there): it is left there, as the compare-and-swap on the ETag read holds.
        Whether it was left on such a step."""
        target = step_dir_name(step)
        # What this store last wrote saves a read, but only as the ETag of the compare-and-swap:
        # another process may have moved the pointer since (a delete of the step it named), so
        # even a cached target equal to ``target`` is written; a 412 reads the pointer again.
        current, etag = self._pointers_written.get(name, (None, None))
        cached = etag is not None
        for _ in range(_POINTER_RETRIES):
            if etag is None:
                current, etag = self.s3.read_pointer(name)
                cached = False
            if current == target and not cached:
                return False
            if name == LAST and self._committed_since(current, step, listed):
                return True
            content = f"{target}\n".encode()
            try:
                if etag is None:
                    written = self.s3.client.put_bytes(name, content, if_absent=True)
                else:
                    written = self.s3.client.put_bytes(name, content, if_match=etag)
                self._pointers_written[name] = (target, written)
                return False
            except (ObjectExists, PreconditionFailed):
                # Moved by another process meanwhile: maybe a job that took the root since, whose
                # pointer a fenced job must not overwrite; else read it again.
                self.check_lease()
                current, etag = None, None
        raise CheckpointError(f"{self.root}/{name} kept changing while it was being moved")

    def _committed_since(self, target: str | None, step: int, listed: Collection[int]) -> bool:
        """Whether the pointer ``target`` names a step past ``step`` committed after the
        ``listed`` commits were read."""
        newer = parse_step_dir_name(target) if target else None
        if newer is None or newer <= step or newer in listed:
            return False
        with contextlib.suppress(CorruptCheckpoint):  # a damaged COMMIT: no step to keep
            return self.s3.read_commit(newer) is not None
        return False

    def _remove_pointer_unless_valid(self, name: str, valid_steps: set[int]) -> None:
        target, etag = self.s3.read_pointer(name)
        if etag is None:
            return
        step = parse_step_dir_name(target) if target else None
        if step not in valid_steps:
            logger.info("removing %s/%s: it names no checkpoint to keep", self.root, name)
            self._pointers_written.pop(name, None)
            self.s3.client.delete([name])

    def _apply_retention(
        self, records: list[policy.CheckpointRecord], linked_before: Collection[int] = ()
    ) -> list[int]:
        """Remove what the retention rules do not keep, never the ``linked_before`` steps;
        returns the steps removed."""
        doomed = self._steps_retention_removes(records, linked_before)
        for step in doomed:
            faults.hit("during_retention", COMMITTING_RANK)
            logger.info("retention: removing %s", self.s3.location(step))
            self._unpublish(step)
        return doomed

    def _unpublish(self, step: int, commit_etag: str | None = None) -> None:
        """Unpublish ``step`` at once: the set-aside record naming its save (if a set-aside
        was killed before its copy was whole) goes, then its ``COMMIT`` (only the version
        ``commit_etag``, read before the last lease check, if given), one request each;
        the objects of the save, and any part of a copy, are left to :meth:`tidy`."""
        record = self.s3.read_commit_or_unknown(step)
        if record is None:
            return  # gone meanwhile
        etag = commit_etag or record.etag
        # An unknown save (a damaged COMMIT) gc removes once unpublished; another version
        # than the one read before is no save of this removal's (left, unless ignoring If-Match).
        known = record.attempt != UNKNOWN_ATTEMPT and record.etag == etag
        if known:
            self._drop_set_aside_record(step, record.attempt)
        self._delete_commit(step, etag)
        faults.hit("during_delete", COMMITTING_RANK)
        if known:
            self._leave_to_tidy(step, record.attempt)

    def leftovers(self, *, force: bool = False) -> list[Leftover]:
        # writers are judged by their claims, which force does not change
        return [leftover for leftover, _ in self._find_leftovers()]

    def _find_leftovers(self) -> list[tuple[Leftover, list[str]]]:
        """Every save's prefix that its step's ``COMMIT`` does not name (``writer_alive``
        while its writer's claim is live), with the names of its objects and claim; and the
        other claims not live (no objects left, or a committed save's), of writers that died.
        A step's prefix, or one under it, that holds a root of its own (its lease object holding
        a lease record, or a committed step's ``COMMIT``: made by a version that let a manager
        open it) is left alone, with a warning: it is no save of this root's. A save's prefix
        (a ``manifest.json`` at its top, which no root has) is never taken for one. Only a
        prefix of a step's own name (:func:`step_dir_name`) is a step's: what is under one of
        another width (``step-2/``, which no manager writes) is left alone."""
        attempts: dict[tuple[int, str], list[str]] = {}
        claims: set[str] = set()
        #: the objects of each set-aside copy, and the saves a set-aside record names
        copies: dict[tuple[int, str], list[str]] = {}
        records: set[tuple[int, str]] = set()
        #: the step prefixes ("" for the step's own) holding a root of their own, as (step, name)
        nested_roots: set[tuple[int, str]] = set()
        #: the objects that show one if they hold a lease record, and the saves (a manifest at
        #: their top, which no root has)
        lease_objects: dict[str, tuple[int, str]] = {}
        saves: set[tuple[int, str]] = set()
        #: each step's object names under its prefix, which tell a COMMIT naming a missing save
        keys_in_step: dict[int, list[str]] = {}
        #: the ETag of each step's COMMIT the listing saw
        listed_commits: dict[int, str] = {}
        for info in self.s3.client.list(""):
            head, slash, rest = info.key.partition("/")
            step = parse_step_dir_name(head)
            if step is not None and head != step_dir_name(step):
                # no manager writes step-2/ (step 2's is step-00000002/): someone else's objects
                step = None
            if (committed := step_of_commit(info.key)) is not None:
                listed_commits[committed] = info.etag
            set_aside = parse_set_aside_name(head)
            if step is not None and (shown := root_shown_by(rest)) is not None:
                inside, needs_a_record = shown
                if needs_a_record:
                    lease_objects[info.key] = (step, inside)
                else:
                    nested_roots.add((step, inside))
            if step is not None:
                keys_in_step.setdefault(step, []).append(rest)
                if (attempt := save_whose_manifest(rest)) is not None:
                    saves.add((step, attempt))
            if info.key.startswith(WRITERS_PREFIX):
                claims.add(info.key[len(WRITERS_PREFIX) :])
            elif step is not None and "/" in rest:
                attempts.setdefault((step, rest.partition("/")[0]), []).append(info.key)
            elif set_aside is not None and slash:
                copies.setdefault(set_aside, []).append(info.key)
            elif set_aside is not None:
                records.add(set_aside)
        nested_roots.update(
            where
            for key, where in lease_objects.items()
            if where not in nested_roots and LeaseRecord.read(self.s3.client, key) is not None
        )
        nested_roots -= saves
        # A save is a leftover only if a COMMIT read *after* its claim does not name it. A
        # writer creates its claim, then its objects, then COMMIT, and deletes its claim
        # last; the listing above saw some of its objects, so its claim existed before it.
        # Against any order of the writer's steps between gc's claim read and COMMIT read:
        # - the claim is read live: the save is left alone, whatever COMMIT says;
        # - the claim is read gone: the writer deleted it after writing COMMIT, so the COMMIT
        #   read after it sees that commit and the save is kept (a COMMIT read only before
        #   the claim read may predate the commit while the claim read follows the claim's
        #   delete, and the committed save would be taken for a dead writer's);
        # - the claim is read expired, or its process dead: the writer is gone (or stalled
        #   past its lease, which also stops it from committing: it checks its lease first).
        # The first COMMIT read of each step only spares the claim read of the committed save:
        # the record of the version the listing saw, when this process read that one already.
        # A committed save's claim stays a candidate: a writer killed after its commit, or
        # whose delete of it failed, leaves it, and it protects nothing once not live.
        first_read: dict[int, CommitRecord | None] = {}
        found: list[tuple[Leftover, list[str]]] = []
        for step, inside in sorted(nested_roots):
            logger.warning(
                "leaving %s alone: a checkpoint root of its own is there, inside this root "
                "under a step dir's name (which no manager makes now); move it out",
                f"{self.s3.location(step)}/{inside}".rstrip("/"),
            )
        for (step, attempt), names in sorted(attempts.items()):
            if {(step, ""), (step, attempt)} & nested_roots:
                continue
            if step not in first_read:
                known = self.s3.known_commit(step, listed_commits.get(step))
                first_read[step] = self._read_commit_or_none(step, keys_in_step[step], known)
            if self._names(first_read[step], attempt):
                continue
            writer_alive = self._claim_live(attempt)
            if not writer_alive and self._names(
                self._read_commit_or_none(step, keys_in_step[step]), attempt
            ):
                continue
            where = self.s3.attempt_location(step, attempt)
            # its claim goes with it (a dead writer's)
            claim = [self.s3.claim_name(attempt)] if attempt in claims else []
            found.append((Leftover(where, "staging", writer_alive), names + claim))
            claims.discard(attempt)
        for attempt in sorted(claims):
            name = self.s3.claim_name(attempt)
            if not self._claim_live(attempt):
                found.append((Leftover(f"{self.root}/{name}", "lock"), [name]))
        for (step, attempt), names in sorted(copies.items()):
            in_step = keys_in_step.get(step, [])
            if (step, attempt) not in records and self._orphan_copy(step, attempt, in_step):
                found.append((Leftover(self.s3.set_aside_location(step, attempt), "stray"), names))
        return found

    def _orphan_copy(self, step: int, attempt: str, keys_in_step: list[str]) -> bool:
        """Whether the objects under ``damaged-step-N-<attempt>/`` are part of a copy that no
        set-aside will complete: no record names the save (read after its step's ``COMMIT``)
        and ``COMMIT`` does not name it. A set-aside writes its record before its first copy
        and deletes ``COMMIT`` only once its copy is whole, so a completed one always has its
        record, and one in progress too. A record deleted while the save was still committed
        (a delete or a replacing commit drops it first) leaves a part that the next restore's
        set-aside of the still committed save goes on with; once ``COMMIT`` no longer names
        the save, nothing does. ``keys_in_step``: the names a listing saw under the step's
        prefix."""
        if self._names(self._read_commit_or_none(step, keys_in_step), attempt):
            return False
        return not self.s3.is_set_aside(step, attempt)

    def _read_commit_or_none(
        self, step: int, keys_in_step: list[str], known: CommitRecord | None = None
    ) -> CommitRecord | None:
        """The step's commit record (``known``, else read), a damaged one's naming
        :data:`UNKNOWN_ATTEMPT`, as is one naming a save that is not there beside another save
        of the step (:meth:`_names_a_missing_save`, judged from ``keys_in_step``, the names a
        listing taken before this read saw under the step's prefix: no request more). A save
        committed after that listing is not in it: only when that listing says the save is
        missing is the step's prefix listed again, to tell such a save from a damaged
        ``COMMIT``."""
        record = known if known is not None else self.s3.read_commit_or_unknown(step)
        if (
            record is not None
            and self._names_a_missing_save(step, record, keys_in_step)
            and self._names_a_missing_save(step, record)
        ):
            record = CommitRecord(step, UNKNOWN_ATTEMPT, record.etag)
        if record is not None and record.attempt == UNKNOWN_ATTEMPT:
            logger.warning("leaving the saves of %s: its COMMIT is damaged", step)
        return record

    @staticmethod
    def _names(record: CommitRecord | None, attempt: str) -> bool:
        """Whether ``record`` publishes ``attempt``, or might (a damaged ``COMMIT``: which
        save it publishes is unknown, so every save of its step is left)."""
        return record is not None and record.attempt in (attempt, UNKNOWN_ATTEMPT)

    def _remove_leftovers(self) -> list[CheckpointLocation]:
        """Remove what :meth:`_find_leftovers` found whose writer is not alive (a live
        writer's objects are never touched); returns the saves' prefixes removed, as URLs."""
        removed: list[CheckpointLocation] = []
        for leftover, names in self._find_leftovers():
            if leftover.writer_alive:
                logger.info("leaving %s alone: its writer is alive", leftover.path)
                continue
            ours = leftover.kind == "staging" and self._unpublished_by_this_store(leftover.path)
            if leftover.kind == "staging" and not ours:
                logger.info("removing %s, left by a writer that died", leftover.path)
            elif leftover.kind == "stray":
                logger.info("removing %s, part of a copy of a save removed", leftover.path)
            try:
                if leftover.kind == "staging":
                    self._complete_set_aside_copy(leftover.path)
                faults.hit("during_staging_cleanup", COMMITTING_RANK)
                self.s3.client.delete(names)
            except CheckpointError as exc:
                logger.warning(
                    "could not remove leftover %s (tried again later): %s", leftover.path, exc
                )
                continue
            if leftover.kind != "lock" and not ours:
                removed.append(leftover.path)
        return removed

    def _unpublished_by_this_store(self, location: str) -> bool:
        """Whether the save at ``location`` is one this store unpublished (not a leftover)."""
        with self._unpublished_lock:
            return self.s3.parse_attempt_location(location) in self._unpublished_here

    def _claim_live(self, attempt: str) -> bool:
        """Whether the writer of ``attempt`` may still be writing: its claim exists and has
        not expired (by more than the clock skew allowed), and its process is not known dead."""
        if attempt in self._claims:
            return True
        try:
            claim = json.loads(self.s3.client.get_bytes(self.s3.claim_name(attempt)))
            host, pid, expires = str(claim["host"]), int(claim["pid"]), float(claim["expires_unix"])
        except ObjectNotFound:
            return False  # no claim: nobody protects these objects
        except (ValueError, TypeError, KeyError):
            return False  # not a claim: it protects nothing
        # Any other store error (unavailable, refused) leaves the claim unknown: raised, so that
        # the cleanup stops rather than take a live writer's save for a dead one's.
        if local_process_gone(host, pid):
            return False
        return time.time() < expires + CLOCK_SKEW_SECONDS
