"""What the pointers' update of an ``s3://`` root reads of the steps it checks, before the
checks run (:func:`read_for_checks`): each step's manifest, a few steps at a time, and from
the listing of every object the update made, the sizes of its save's objects and, where the
ETag of its ``COMMIT`` tells it (:meth:`~distckpt.storage.s3_root.StepListing.commit_of`),
the record ``COMMIT`` holds; so that checking many steps (an open of a root keeping hundreds)
costs a request a step sent :data:`~distckpt.storage.s3_root.DOWNLOAD_CONCURRENCY` at a time,
not four one after another."""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum

from distckpt.errors import CorruptCheckpoint, UnsupportedVersion
from distckpt.storage.s3_checkpoint import S3Checkpoint
from distckpt.storage.s3_root import (
    DOWNLOAD_CONCURRENCY,
    CommitRecord,
    S3Root,
    StepListing,
)

logger = logging.getLogger("distckpt")


class _Unread(Enum):
    """Why a step to check got no checkpoint from :func:`read_for_checks`."""

    #: its ``COMMIT`` went since the listing: it is no longer to check
    UNCOMMITTED = "uncommitted"
    #: a read failed (a damaged or vanished step), or was not begun after another's store
    #: error: its check reads it again
    FAILED = "failed"


@dataclass(frozen=True)
class StepReads:
    """What :func:`read_for_checks` read of the steps to check."""

    #: the checkpoints read, their ``COMMIT``'s record known and their manifest read
    sources: dict[int, S3Checkpoint]
    #: the steps left to check: those asked for but those whose ``COMMIT`` went since
    steps: list[int]
    #: the steps whose ``COMMIT`` record was taken from the listing's ETag, not read: the
    #: listing may have passed it before another process replaced or deleted it
    #: (:func:`confirm_listed`)
    from_listing: set[int] = field(default_factory=set)


def read_for_checks(root: S3Root, steps: Collection[int], listing: StepListing) -> StepReads:
    """The checkpoints of the committed ``steps`` of ``listing``, their ``COMMIT`` and
    manifest read, each with the sizes of its save's objects as ``listing`` saw them, which
    its check reads instead of a listing of the save. A ``COMMIT`` version this process read
    or wrote already (a save's own, right after its commit), or whose record ``listing``
    tells, is not read (that record is kept as if read: the search for leftovers reuses it),
    nor a manifest once kept. Returns them with the steps left to check: ``steps`` but those
    whose ``COMMIT`` went since the listing. A step whose reads failed here as a damaged,
    newer or vanished step's do (a damaged ``COMMIT``, a missing manifest) gets no
    checkpoint: its check reads it again, and tells the failure as it would have without
    these reads. A store's error (:class:`~distckpt.errors.StoreUnavailable` after its
    retries) is raised, the reads not begun cancelled."""
    from_listing = {
        step: record
        for step in steps
        if root.known_commit(step, listing.commits.get(step)) is None
        and (record := listing.commit_of(step)) is not None
    }
    failed = threading.Event()

    def read_unless_failed(step: int) -> S3Checkpoint | _Unread:
        # The steps whose reads began once another's raised (a worker takes the next one
        # before the map's iterator cancels them) are left to their checks: none is raised.
        if failed.is_set():
            return _Unread.FAILED
        try:
            return _read(root, step, listing, from_listing)
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(DOWNLOAD_CONCURRENCY) as pool:
        read = dict(zip(steps, pool.map(read_unless_failed, steps)))
    sources = {step: source for step, source in read.items() if isinstance(source, S3Checkpoint)}
    left = [step for step, source in read.items() if source is not _Unread.UNCOMMITTED]
    return StepReads(sources, left, set(from_listing))


def confirm_listed(
    root: S3Root, chosen: Iterable[int | None], reads: StepReads, commits: dict[int, str]
) -> list[int]:
    """Of the ``chosen`` steps (``last``'s and ``best``'s), those whose ``COMMIT`` record
    ``reads`` took from the listing and whose ``COMMIT`` no longer has the ETag in
    ``commits`` (a ``HEAD`` each, one or two): replaced or deleted after the listing passed
    it. ``commits`` then holds each one's ETag now (a deleted one goes) and ``reads`` no
    longer counts it as taken from the listing. Returns those of them still committed: to be
    read and checked again before a pointer moves to one."""
    doubtful = {step for step in chosen if step in reads.from_listing}
    changed: list[int] = []
    for step in sorted(doubtful):
        etag = root.current_commit_etag(step)
        if etag == commits.get(step):
            continue
        reads.from_listing.discard(step)
        root.forget_commit(step)  # the record kept from the listing is of a version gone
        if etag is None:
            commits.pop(step, None)
        else:
            commits[step] = etag
            changed.append(step)
    return changed


def _read(
    root: S3Root, step: int, listing: StepListing, from_listing: Mapping[int, CommitRecord]
) -> S3Checkpoint | _Unread:
    """The checkpoint of ``step``, its ``COMMIT``'s record known and its manifest read; else
    why it was not read."""
    try:
        record = root.known_commit(step, listing.commits.get(step))
        if record is None and (record := from_listing.get(step)) is not None:
            root.remember_commit(step, record)  # as read: the search for leftovers reuses it
        record = record or root.read_commit(step)
        if record is None:
            return _Unread.UNCOMMITTED
        sizes = listing.save_sizes(step, record.attempt)
        source = S3Checkpoint(root, step, record.attempt, sizes)
        source.read_manifest()
    except (CorruptCheckpoint, UnsupportedVersion, FileNotFoundError) as exc:
        # what the check tells of a damaged, newer or vanished step when it reads it again; a
        # store's error (unavailable after its retries, access denied) is raised: each other
        # step's reads would fail alike, and the map's iterator cancels those not begun
        logger.debug("reading %s before its check: %s", root.location(step), exc)
        return _Unread.FAILED
    return source
