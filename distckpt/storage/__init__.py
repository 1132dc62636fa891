"""The storage seam: everything the committing rank does to a checkpoint root.

A :class:`RootStore` owns one root. Rank 0 calls it, under nothing but its own guarantees: the
store takes whatever lock its backend needs. The protocol above it (:mod:`distckpt.proposal`
and :mod:`distckpt.protocol`) never touches the root directly, so a second backend plugs in here
without changing it.

Two implementations exist: :class:`~distckpt.storage.posix.PosixRootStore` (a staging
directory per save, published by an atomic directory rename under the root's file lock, with
``last``/``best`` as relative links) and :class:`~distckpt.storage.s3.S3RootStore` for
``s3://`` roots (every object of a save under a prefix of its own, published by creating one
commit object with a conditional put, ``If-None-Match: *``; ``last``/``best`` are pointer
objects replaced by compare-and-swap; retention deletes a checkpoint's commit object first, so
it stops being committed at once, and its objects after). See ``docs/architecture.md`` for the
contract, method by method.

The formats write and read files: every rank writes its shard into the local directory
:meth:`RootStore.open_shard` gives it (POSIX: the shared staging dir itself; an object store:
a spool dir of this rank) and hands what it wrote to :meth:`RootStore.publish_shard`. Readers
see a root through a :class:`~distckpt.storage.views.RootView` (:func:`open_view`). Nothing
here imports torch.distributed, and botocore only for an ``s3://`` root.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Union

from distckpt.errors import InvalidArgument, StagingRemoved
from distckpt.fsutil import LinkMode
from distckpt.layout import LINK_NAMES, RootLayout
from distckpt.lease import LeaseHolder
from distckpt.lease_tokens import HeldCallback
from distckpt.lock import Leftover
from distckpt.manifest import FileRecord, Manifest
from distckpt.objurl import checked_root, is_s3_url
from distckpt.policy import RetentionPolicy
from distckpt.results import CheckpointLocation, SaveResult
from distckpt.storage.views import Located, RootView

#: An extra file stored in a checkpoint: its bytes, or the path of a file to copy.
ExtraFile = Union[str, "os.PathLike[str]", bytes]


@dataclass(frozen=True)
class StagingArea:
    """Where one save is written before it is committed. ``location`` names it for every rank
    (POSIX: the staging dir's path; an object store: the ``s3://`` URL of the save's own
    prefix), passed to :meth:`RootStore.open_shard`; ``claim`` is the backend's proof that a
    live writer owns it (POSIX: the held writer lock; an object store: the writer's claim
    object), released by :meth:`RootStore.discard_staging`."""

    step: int
    location: str
    claim: object = None


@dataclass(frozen=True)
class OpenedRoot:
    """What :meth:`RootStore.open` found: the newest valid checkpoint (step, epoch), if any,
    the leftovers of dead writers it removed (none where :meth:`RootStore.tidy` removes them,
    after the open, in the background), and when that checkpoint was created (seconds since
    the epoch, from its manifest; None when unknown)."""

    newest: tuple[int, int | None] | None
    removed: tuple[CheckpointLocation, ...] = ()
    newest_created: float | None = None


class RootStore(abc.ABC):
    """One checkpoint root, as seen by the rank that commits (rank 0), plus the few checks
    every rank makes. Methods that change what is published serialise themselves against
    other processes sharing the root (other jobs, the ``distckpt`` CLI): POSIX under the
    root's file lock, an object store by conditional writes (exclusive create, compare-and-swap
    on ETags)."""

    #: where the root is, for messages and for the locations in results
    root: CheckpointLocation
    #: what readers see of the root (the store reads it through this view, too)
    view: RootView
    #: whether writes are made durable against power loss (the ranks' shard writes, too)
    fsync: bool
    #: whether a shard's files are read back while they are written (an object store's spool,
    #: streamed into objects): a format then keeps them in the page cache (no direct I/O)
    shards_read_back: bool = False

    @abc.abstractmethod
    def open(self, *, wait_for_root: float = 0.0, on_held: HeldCallback = None) -> OpenedRoot:
        """Rank 0, once per manager: refuse (:class:`~distckpt.InvalidArgument`, naming both
        roots) a root under another root's own names, before anything is written, writing or
        read-only (:func:`~distckpt.storage.nesting.refuse_a_nested_root`); create the root if
        missing, prove it writable, settle how links are kept, take the root's writer lease
        (waiting up to ``wait_for_root`` seconds for another job to end, else
        :class:`~distckpt.RootInUse` naming it; ``on_held`` is called once, with the holder's
        record, None if none could be read, as the root is found held and the wait begins),
        remove leftovers of dead writers (or leave them to :meth:`tidy`) and repair the links.
        From here until :meth:`close`, every change to what is published first checks (POSIX:
        under the root's lock) that this store still holds the lease
        (:class:`~distckpt.LeaseLost` otherwise, before anything changed). A store that was
        never opened (the ``distckpt`` CLI's) holds no lease and checks none.
        Read-only: refuse a nested root as above, then only find the newest valid checkpoint
        of an existing root (no lease)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release what :meth:`open` took (the lease), so the next job may open the root; this
        store commits nothing after it. Idempotent; also done at interpreter exit."""

    @abc.abstractmethod
    def check_visible(self, rank: int) -> None:
        """Every rank: raise unless this rank sees the root and may write into it
        (:class:`~distckpt.RootNotWritable`; for an object store, the
        :class:`~distckpt.ObjectStoreError` its request got)."""

    @abc.abstractmethod
    def free_bytes(self) -> int | None:
        """Bytes available for new checkpoints; None where the backend cannot tell (a
        filesystem that reports no size), and then saves are not checked against it."""

    @abc.abstractmethod
    def check_step(self, step: int, *, overwrite: bool, explicit: bool) -> SaveResult | None:
        """Rank 0: refuse a step lower than the newest committed one
        (:class:`~distckpt.InvalidStep`, naming each newer checkpoint that is not plainly
        intact and what to do about it), or an already committed step when ``explicit`` and
        not ``overwrite`` (:class:`~distckpt.CheckpointExists`); return that checkpoint instead
        when not ``explicit`` (a scheduled, throttled or forced save)."""

    @abc.abstractmethod
    def begin_staging(self, step: int, token: str) -> StagingArea:
        """Rank 0: a fresh staging area for one save, claimed by this live writer (so cleanup
        by others never removes it). ``token`` makes it unique."""

    @abc.abstractmethod
    def make_staging_durable(self, area: StagingArea) -> None:
        """Rank 0, in its write phase (so before any commit of ``area``): make the creation
        of the staging area durable where the commit's publication depends on it (POSIX: an
        fsync of ``.staging``, as a rename of a dir whose creation a power loss drops is lost
        with it; an object store: nothing). Not part of :meth:`begin_staging`, which runs on
        the caller's critical path while the save is proposed, because nothing written into
        the area needs it: only the commit does."""

    @abc.abstractmethod
    def discard_staging(self, area: StagingArea) -> None:
        """Rank 0: remove a staging area that was not committed and release its claim, also
        when the removal fails (its error raised, or logged by an object store). Idempotent; a
        committed area's claim is just released."""

    def open_shard(self, location: str, rank: int) -> AbstractContextManager[Path]:
        """Every rank: the local directory its format writes this save's shard into, for as
        long as the ``with`` block lasts (then removed where it is private to the rank).
        POSIX: the shared staging dir itself."""
        return _as_is(Path(location))

    def staging_removed(
        self, location: str, missing: str, *, step: int, rank: int
    ) -> StagingRemoved | None:
        """Every rank, when a file of ``step``'s save could not be created for a missing dir
        (``missing``: its path): :class:`~distckpt.StagingRemoved` when that path is in the
        staging area ``location``, which the save made, so someone else removed it (another
        job's start or ``distckpt gc`` taking it for a dead writer's, where the writer lock does
        not reach: NFS clients with local locks), else None. Told by the path alone: whether
        the job that removed it took the lease first, rank 0 decides once every rank reported
        (:func:`distckpt.protocol.write_and_commit`). An object store's area (a prefix) never
        vanishes under a write: None."""
        return None

    @abc.abstractmethod
    def check_lease(self) -> None:
        """Rank 0: raise :class:`~distckpt.LeaseLost` unless this store still holds the root's
        lease, read now (what every change to what is published checks first). A store never
        opened (the CLI's) holds none, and passes."""

    def publish_shard(
        self, location: str, directory: Path, records: Mapping[str, FileRecord]
    ) -> dict[str, FileRecord]:
        """Every rank, after its format wrote ``records`` into ``directory`` (from
        :meth:`open_shard`): make them part of the staging area ``location``; the records as
        stored. POSIX: they are there already."""
        return dict(records)

    @abc.abstractmethod
    def write_extra_files(
        self, area: StagingArea, files: Mapping[str, ExtraFile]
    ) -> dict[str, FileRecord]:
        """Rank 0: store the user's extra files in the staging area; their records."""

    @abc.abstractmethod
    def check_staged(self, area: StagingArea, files: Mapping[str, FileRecord]) -> None:
        """Rank 0: every file the ranks wrote is present with the size its rank reported."""

    @abc.abstractmethod
    def commit(self, area: StagingArea, manifest: Manifest, *, overwrite: bool) -> SaveResult:
        """Rank 0: publish the staging area as the checkpoint of ``manifest.step``, atomically
        (all or nothing, durable when it returns), then move ``last``/``best`` and apply
        retention. A failure after publication is logged, never raised: the checkpoint is
        committed, the links are redone at the next commit or open, retention at the next
        commit or :meth:`prune` (an open never removes a checkpoint)."""

    @abc.abstractmethod
    def delete(self, step: int) -> int | None:
        """Unpublish and remove the checkpoint of ``step``; repair the links. Returns the
        newest remaining step. :class:`~distckpt.CheckpointNotFound` if there is none."""

    @abc.abstractmethod
    def set_aside(self, step: int, location: CheckpointLocation) -> CheckpointLocation | None:
        """Rank 0: take the committed checkpoint of ``step``, found damaged at ``location`` by
        a restore (:class:`~distckpt.CorruptCheckpoint` with ``damaged``), out of the committed
        steps without deleting or changing any of its bytes: afterwards no listing, ``last`` /
        ``best``, retention, step rule or cleanup counts it, and a person still finds it
        (:meth:`RootView.set_aside_checkpoints`; ``distckpt ls`` and ``verify`` show it) to
        inspect or delete. ``last`` / ``best`` are moved off it first. Checks the lease like
        every change (:class:`~distckpt.LeaseLost`); :class:`~distckpt.ReadOnlyRoot` when
        read-only. Returns where it now is, or None when nothing is done: the step is no longer
        committed at ``location`` (deleted since the restore judged it; on S3 also a ``COMMIT``
        that cannot be read, naming no save to set aside, or a copy that did not finish within
        its budget: logged, the step stays committed and the next restore goes on with it).
        Whether the step was replaced by another save of it since it was judged is not
        checked: only the lease holder saves, and it is the caller, in a restore that first
        waits for its own pending saves."""

    @abc.abstractmethod
    def prune(self) -> list[int]:
        """Repair the links, then apply the retention rules; the steps removed."""

    @abc.abstractmethod
    def leftovers(self, *, force: bool = False) -> list[Leftover]:
        """What :meth:`collect_leftovers` would look at (staging areas, with whether their
        writer is alive, the trash, strays), without removing anything; for ``distckpt ls``
        and ``gc``. ``force`` judges them as :meth:`collect_leftovers` with ``force`` does: no
        :attr:`Leftover.kept_because`."""

    @abc.abstractmethod
    def lease_holder(self) -> LeaseHolder | None:
        """The job holding the root's writer lease (one that died holding it included), or
        None when nobody holds it (no lease yet, or one released or broken); read only."""

    @abc.abstractmethod
    def break_lease(self) -> LeaseHolder | None:
        """Mark the lease of a holder known to be dead (on another machine) as broken, so the
        next job may take the root; the record as broken, or None when nobody held it."""

    @abc.abstractmethod
    def collect_leftovers(self, *, force: bool = False) -> list[CheckpointLocation]:
        """Remove staging areas of dead writers and deleted checkpoints not yet gone; a live
        writer's staging area is never touched. What was removed, including what
        :meth:`open` removed (reported once). On a POSIX root whose locks are local to each
        machine, the staging areas a lease holder on another machine may be writing are left
        too (:attr:`Leftover.kept_because`), unless ``force`` (only when no job runs on the
        root); an ``s3://`` root judges its writers by their claims, which ``force`` does not
        change."""

    def tidy(self) -> None:
        """Rank 0, once the outcome of :meth:`open`, :meth:`commit`, :meth:`delete` or
        :meth:`prune` reached every rank: remove what they left to remove (POSIX: the trash's
        bytes; an object store: the objects of the saves whose ``COMMIT`` they deleted or
        replaced; both: after :meth:`open`, the leftovers of dead writers). Apart from them
        because a removal may be slow (a large checkpoint on a shared filesystem, thousands of
        objects to list and delete), and the other ranks, which go on to their next call at
        once, would wait for it in that call's collectives.

        A manager runs it in a thread of its own (:class:`~distckpt.tidying.BackgroundTidy`),
        one call at a time per store, while its other threads go on calling this store
        (:meth:`commit` from an async save's thread, :meth:`begin_staging`, :meth:`delete`,
        :meth:`set_aside`, ...; only its ``gc`` waits for the tidy to end before calling
        :meth:`collect_leftovers`): an implementation must be safe against those running at
        the same time, removing only what none of them may still use or bring back (POSIX:
        trash entries and dead writers' leftovers listed under the root lock; an object store:
        saves already unpublished, and dead writers' saves, under its own tidy lock). It may
        also be cut short, at any point, by the end of the process (the manager's ``close``
        waits for it only a while): what it did not remove must stay findable by the next
        :meth:`open` or :meth:`collect_leftovers`, which remove it. Raises no error (a
        ``KeyboardInterrupt`` goes through): what it cannot remove is logged and removed by a
        later call, start or gc. By default nothing is left to remove."""
        return


class ChecksummingWriter(Protocol):
    """A file-like that counts and checksums what goes through it (a
    :class:`~distckpt.checksums.ChecksumWriter`, an :class:`~distckpt.objstreams.ObjectWriter`)."""

    size: int

    @property
    def checksum(self) -> str: ...

    def write(self, data: bytes) -> int: ...


#: How much of a file is copied at once into a store.
COPY_CHUNK_BYTES = 8 << 20


def store_files(
    files: Mapping[str, ExtraFile],
    open_writer: Callable[[str], AbstractContextManager[ChecksummingWriter]],
    *,
    rank: int = 0,
) -> dict[str, FileRecord]:
    """Write each of ``files`` (bytes, or the path of a file to copy) through the writer
    ``open_writer(name)`` opens; the records of what was written, as ``rank``'s files."""
    records = {}
    for name, content in files.items():
        with open_writer(name) as writer:
            if isinstance(content, bytes):
                writer.write(content)
            else:
                with open(content, "rb") as source:
                    while chunk := source.read(COPY_CHUNK_BYTES):
                        writer.write(chunk)
        records[name] = FileRecord(size=writer.size, checksum=writer.checksum, rank=rank)
    return records


@contextmanager
def _as_is(directory: Path) -> Iterator[Path]:
    yield directory


def open_store(
    root: str | os.PathLike[str],
    *,
    retention: RetentionPolicy | None = None,
    link: LinkMode = "auto",
    fsync: bool = True,
    lock_timeout: float = 300.0,
    read_only: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> RootStore:
    """The store for ``root``: an ``s3://`` URL is an object-store root (``storage_options``
    configure its client, see :class:`~distckpt.objstore.ObjectStore`; ``link`` and ``fsync``
    mean nothing there), anything else a POSIX directory. A ``read_only`` store never writes
    (no probe, no lock file, no cleanup or link repair when opened); its changes
    (``begin_staging``, ``delete``, ``prune``, ``collect_leftovers``) raise
    :class:`~distckpt.ReadOnlyRoot`. ``lock_timeout`` is, on an ``s3://`` root, how long a
    set-aside may copy (:meth:`RootStore.set_aside`). ``root`` is checked first
    (:func:`~distckpt.objurl.checked_root`)."""
    root = checked_root(root)
    if is_s3_url(root):
        from distckpt.storage.s3 import S3RootStore

        return S3RootStore(
            str(root),
            storage_options=storage_options,
            retention=retention or RetentionPolicy(),
            read_only=read_only,
            # Rank 0 copies a set-aside save inside the restore's collective: the lock's
            # budget (half the manager's timeout) keeps the other ranks' wait under it.
            set_aside_budget=lock_timeout,
        )
    _refuse_options_for_a_directory(root, storage_options)
    from distckpt.storage.posix import PosixRootStore

    return PosixRootStore(
        root,
        retention=retention or RetentionPolicy(),
        link=link,
        fsync=fsync,
        lock_timeout=lock_timeout,
        read_only=read_only,
    )


def open_view(
    root: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> RootView:
    """What readers see of ``root`` (an ``s3://`` URL or a directory, checked by
    :func:`~distckpt.objurl.checked_root`); reads only."""
    root = checked_root(root)
    if is_s3_url(root):
        from distckpt.storage.s3_view import S3RootView

        return S3RootView(str(root), storage_options)
    _refuse_options_for_a_directory(root, storage_options)
    from distckpt.storage.posix_view import PosixRootView

    return PosixRootView(root)


def link_mode_in_use(root: str | os.PathLike[str]) -> LinkMode:
    """The ``link`` that keeps the kind of links ``root`` has: ``"pointer"`` when its ``last``
    or ``best`` is a pointer file (written by a job with ``link="pointer"``, or on a filesystem
    that refuses symlinks), else ``"auto"``. A tool that changes a root it did not create (the
    CLI) opens its store with it, so that it never turns a job's pointer files into symlinks.
    Links mean nothing in an object store: ``"auto"``."""
    if is_s3_url(root):
        return "auto"
    layout = RootLayout.at(root)
    for name in LINK_NAMES:
        link = layout.link_path(name)
        if link.is_file() and not link.is_symlink():
            return "pointer"
    return "auto"


def _refuse_options_for_a_directory(
    root: str | os.PathLike[str], storage_options: Mapping[str, Any] | None
) -> None:
    """``storage_options`` configure an object store's client: given with a directory, they
    are a mistake (a URL without its ``s3://``?), not something to ignore."""
    if storage_options:
        raise InvalidArgument(
            f"storage_options apply to s3:// roots only, not to the directory {root!r}"
        )


def locate(
    path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> Located:
    """What a location given by a user stands for (see :data:`~distckpt.storage.views.PathKind`):
    an ``s3://`` URL or a local path. Raises :class:`~distckpt.CheckpointNotFound` when it
    names nothing; :class:`~distckpt.InvalidArgument` for a location no store takes
    (:func:`~distckpt.objurl.checked_root`)."""
    path = checked_root(path)
    if is_s3_url(path):
        from distckpt.storage.s3_locate import locate_url

        return locate_url(str(path), storage_options)
    from distckpt.storage.posix_view import locate_path

    return locate_path(path)


__all__ = [
    "Located",
    "ExtraFile",
    "OpenedRoot",
    "RootStore",
    "RootView",
    "StagingArea",
    "link_mode_in_use",
    "locate",
    "open_store",
    "open_view",
]
