"""Setting a damaged ``s3://`` checkpoint aside: its save's objects copied under
``damaged-step-N-<attempt>/`` before they are unpublished, and a copy a crash left part-way
completed before the originals go. A mixin of :class:`~distckpt.storage.s3_upkeep.Upkeep`,
run by the committing rank."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from distckpt import policy
from distckpt.errors import ConcurrentCommit, PreconditionFailed
from distckpt.layout import step_dir_name
from distckpt.objinfo import ObjectInfo
from distckpt.results import CheckpointLocation
from distckpt.storage.s3_root import UNKNOWN_ATTEMPT, CommitRecord, S3Root, save_whose_manifest

logger = logging.getLogger("distckpt")


class SetAside:
    """The set-aside of a damaged save (a mixin: the store supplies these attributes)."""

    s3: S3Root
    #: seconds a set-aside may spend copying (rank 0's work inside a restore's collective,
    #: which the other ranks wait for); None: no limit
    set_aside_budget: float | None
    #: every save this store unpublished (a few per save): a cleanup meeting one reports
    #: none; guarded by ``_unpublished_lock``, as the store's list of saves to tidy is
    _unpublished_here: set[tuple[int, str]]
    _unpublished_lock: threading.Lock
    check_lease: Callable[[], None]
    _refuse_if_read_only: Callable[[str], None]
    _delete_prefix: Callable[[str], None]
    _update_pointers: Callable[..., list[policy.CheckpointRecord]]

    def _drop_set_aside_record(self, step: int, attempt: str) -> None:
        """Before the ``COMMIT`` naming the save ``attempt`` of ``step`` is deleted or
        replaced: delete the record a set-aside of that save killed before its copy was whole
        left (one request, nothing if there is none). Left until after, a crash before
        :meth:`tidy` would leave the record naming an uncommitted save: listed as set aside,
        and its copy completed by the next cleanup instead of deleted. Deleted first, a crash
        in between leaves the step committed, set aside again by the next restore."""
        self.s3.client.delete_one(self.s3.set_aside_record_name(step, attempt))

    def _delete_commit(self, step: int, etag: str | None) -> None:
        """Delete the step's ``COMMIT`` if it is still the version ``etag`` read before this
        job's last lease check (any version if None). Another version is left alone: written
        by a job that took the root since (:class:`~distckpt.LeaseLost`), else by a writer
        this job's lease does not exclude (:class:`~distckpt.errors.ConcurrentCommit`)."""
        try:
            self.s3.client.delete_one(self.s3.commit_name(step), if_match=etag)
        except PreconditionFailed as exc:
            self.check_lease()
            raise ConcurrentCommit(
                f"step {step}'s COMMIT was replaced by another writer after this removal read "
                f"it: left in place, step {step} is still committed; the pointers moved off it "
                "are set again from the committed checkpoints at the next commit or start",
                path=self.s3.location(step),
                step=step,
            ) from exc
        finally:
            self.s3.forget_commit(step)

    def _names_a_missing_save(
        self, step: int, record: CommitRecord, keys_in_step: Iterable[str] | None = None
    ) -> bool:
        """Whether the ``COMMIT`` of ``step``, read as ``record``, names a save of which no
        object is there, while another save of the step holds a manifest: its bytes changed
        and still read as a record (a flipped character of the attempt), so which save it was
        written for is as unknown as for a ``COMMIT`` that is no record. (One naming a save
        that is gone with no other save of the step, as a clock-skewed gc leaves it, names the
        save it was written for.) Moving the save it names would copy nothing, and the one it
        was written for would go as a dead writer's. The save is looked for under the step
        the ``COMMIT`` was read under, whatever step its bytes say: in ``keys_in_step``, the
        names under that step's prefix a caller listed already, else in a listing of it."""
        if record.attempt == UNKNOWN_ATTEMPT:
            return False
        if keys_in_step is None:
            step_prefix = f"{step_dir_name(step)}/"
            listed = self.s3.client.list(step_prefix)
            keys_in_step = (info.key[len(step_prefix) :] for info in listed)
        another_save = False
        for key in keys_in_step:
            if key.startswith(f"{record.attempt}/"):
                return False
            another_save |= save_whose_manifest(key) is not None
        return another_save

    def set_aside(self, step: int, location: CheckpointLocation) -> CheckpointLocation | None:
        """Unpublish the step's save by moving its objects, none deleted before its copy is
        there, with the lease checked before anything is written and again after the copy
        (:class:`~distckpt.LeaseLost`): first a set-aside record naming its attempt (the
        cleanup completes the copy of a save a record names before it deletes the save's
        objects), then a copy of every object under ``damaged-step-N-<attempt>/`` inside the
        store, then the pointers move off the step, then its ``COMMIT`` goes, then the objects
        under ``step-N/<attempt>/``.

        Moved, because any version's cleanup (an older one's start, which knows no record)
        takes an uncommitted ``step-N/<attempt>/`` for a dead writer's and deletes it. A crash
        before ``COMMIT`` goes leaves the step committed (and skipped) as before, with the
        record and part of the copy there: the next restore sets it aside again, copying what
        is missing. So does a copy that ran out of :attr:`set_aside_budget`: it stops there,
        with a warning, and the step stays committed (returns None). A crash after leaves the
        copy whole and the originals uncommitted: this version's next start or gc deletes them
        (completing the copy first), and so does an older version's, which is then harmless."""
        self._refuse_if_read_only(f"set aside step {step}")
        self.check_lease()
        if location != self.s3.location(step):
            return None
        record = self.s3.read_commit_or_unknown(step)
        if record is None:
            return None  # deleted since the restore judged it
        if record.attempt == UNKNOWN_ATTEMPT or self._names_a_missing_save(step, record):
            logger.warning(
                "cannot set aside the damaged checkpoint %s: its COMMIT is not a commit record, "
                "or names a save of which nothing is there beside another save of the step, "
                "so which save it names is unknown; it stays committed, and saves of step %d "
                "and below are refused: delete it (manager.delete(%d), or distckpt delete) or "
                "save step %d with overwrite=True",
                location,
                step,
                step,
                step,
            )
            return None
        with self._unpublished_lock:  # its originals are this store's to delete, not a leftover
            self._unpublished_here.add((step, record.attempt))
        self.s3.write_set_aside_record(step, record.attempt)
        if not self._copy_set_aside_save(step, record.attempt, budget=self.set_aside_budget):
            logger.warning(
                "setting aside the damaged checkpoint %s: its copy to %s did not finish within "
                "%.0f s (half the manager's timeout, which the other ranks wait for); it stays "
                "committed, and saves of steps below %d are refused, until a later restore "
                "goes on with the copy (copying only what is missing)",
                location,
                self.s3.set_aside_location(step, record.attempt),
                self.set_aside_budget,
                step,
            )
            return None
        # Again after the copy, which may have outlasted the lease, and before the pointers:
        # a job that took the root meanwhile may have saved this step again and moved last
        # onto it, which moving the pointers off the step here would undo.
        self.check_lease()
        self._update_pointers(leaving=step)
        # Only the version read before that check: one written since is the new holder's.
        self._delete_commit(step, record.etag)
        self._delete_prefix(self.s3.attempt_prefix(step, record.attempt))
        return self.s3.set_aside_location(step, record.attempt)

    def _copy_set_aside_save(self, step: int, attempt: str, *, budget: float | None = None) -> bool:
        """Copy each object of the save ``attempt`` of ``step`` to its set-aside place, but
        those a set-aside that died already copied (a copy appears whole or not at all), as
        many at a time as the store's ``max_concurrency``. No copy starts once ``budget``
        seconds have passed (those in flight finish). Whether the copy is whole."""
        source = self.s3.attempt_prefix(step, attempt)
        target = self.s3.set_aside_prefix(step, attempt)
        copied = {info.key[len(target) :]: info.size for info in self.s3.client.list(target)}
        missing = [
            info
            for info in self.s3.client.list(source)
            if copied.get(info.key[len(source) :]) != info.size
        ]
        deadline = None if budget is None else time.monotonic() + budget
        client = self.s3.client

        def copy_one(info: ObjectInfo) -> bool:
            if deadline is not None and time.monotonic() >= deadline:
                return False  # left for the next set-aside, which copies what is missing
            client.copy(info.key, target + info.key[len(source) :], info.size)
            return True

        with ThreadPoolExecutor(client.max_concurrency) as pool:
            return all(list(pool.map(copy_one, missing)))

    def _complete_set_aside_copy(self, location: str) -> None:
        """Before the objects of an uncommitted save go: if a record says it was set aside
        (read after ``COMMIT``: a set-aside writes its record before it deletes ``COMMIT``),
        make sure its copy is whole, so that only the originals of a copied save are deleted
        (a set-aside deletes ``COMMIT`` only once its copy is whole; this covers a ``COMMIT``
        deleted otherwise)."""
        step, attempt = self.s3.parse_attempt_location(location)
        if self.s3.is_set_aside(step, attempt):
            self._copy_set_aside_save(step, attempt)
