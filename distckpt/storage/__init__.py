"""The storage seam: everything the committing rank does to a checkpoint root.

A :class:`RootStore` owns one root. Rank 0 calls it, under nothing but its own guarantees: the
store takes whatever lock its backend needs. The protocol above it (:mod:`distckpt.protocol`)
never touches the root directly, so a second backend plugs in here without changing it.

One implementation exists today, :class:`~distckpt.storage.posix.PosixRootStore`: a staging
directory per save, published by an atomic directory rename under the root's file lock, with
``last``/``best`` as relative links. An object-store backend would implement the same methods
with its own primitives: ``commit`` writes a commit-marker object with a conditional put
(if-none-match) instead of renaming, ``last``/``best`` become small pointer objects, and
retention deletes a checkpoint's marker first (so it stops being committed at once) and its
objects after. See ``docs/architecture.md`` for the contract, method by method.

Per-rank shard writes still go to a local path (``StagingArea.location``): the formats write
files. Nothing here imports torch.distributed.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from distckpt.fsutil import LinkMode
from distckpt.manifest import FileRecord, Manifest
from distckpt.policy import RetentionPolicy
from distckpt.results import SaveResult

#: An extra file stored in a checkpoint: its bytes, or the path of a file to copy.
ExtraFile = Union[str, "os.PathLike[str]", bytes]


@dataclass(frozen=True)
class StagingArea:
    """Where one save is written before it is committed. ``location`` is what every rank writes
    into; ``claim`` is the backend's proof that a live writer owns it (for POSIX, the held
    writer lock), released by :meth:`RootStore.discard_staging`."""

    step: int
    location: Path
    claim: object = None


@dataclass(frozen=True)
class OpenedRoot:
    """What :meth:`RootStore.open` found: the newest valid checkpoint (step, epoch), if any,
    and the leftovers of dead writers it removed."""

    newest: tuple[int, int | None] | None
    removed: tuple[Path, ...] = ()


class RootStore(abc.ABC):
    """One checkpoint root, as seen by the rank that commits (rank 0), plus the few checks
    every rank makes. Methods that change what is published serialise themselves against
    other processes sharing the root (other jobs, the ``distckpt`` CLI)."""

    #: where the root is, for messages and for the paths in results
    root: Path
    #: whether writes are made durable against power loss (the ranks' shard writes, too)
    fsync: bool

    @abc.abstractmethod
    def open(self, *, wait_for_root: float = 0.0) -> OpenedRoot:
        """Rank 0, once per manager: create the root if missing, prove it writable, settle how
        links are kept, take the root's writer lease (waiting up to ``wait_for_root`` seconds
        for another job to end, else :class:`~distckpt.RootInUse` naming it), remove leftovers
        of dead writers and repair the links. From here until :meth:`close`, every change to
        what is published first checks, under the root's lock, that this store still holds
        the lease (:class:`~distckpt.LeaseLost` otherwise, before anything changed). A store
        that was never opened (the ``distckpt`` CLI's) holds no lease and checks none.
        Read-only: only find the newest valid checkpoint of an existing root (no lease)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release what :meth:`open` took (the lease), so the next job may open the root; this
        store commits nothing after it. Idempotent; also done at interpreter exit."""

    @abc.abstractmethod
    def check_visible(self, rank: int) -> None:
        """Every rank: raise :class:`~distckpt.RootNotWritable` unless this rank sees the root
        and may write into it."""

    @abc.abstractmethod
    def free_bytes(self) -> int | None:
        """Bytes available for new checkpoints; None where the backend cannot tell (a
        filesystem that reports no size), and then saves are not checked against it."""

    @abc.abstractmethod
    def check_step(self, step: int, *, overwrite: bool, explicit: bool) -> SaveResult | None:
        """Rank 0: refuse a step lower than the newest committed one, or an already committed
        step when ``explicit`` and not ``overwrite`` (:class:`~distckpt.CheckpointExists`);
        return that checkpoint instead when not ``explicit`` (a scheduled or forced save)."""

    @abc.abstractmethod
    def begin_staging(self, step: int, token: str) -> StagingArea:
        """Rank 0: a fresh staging area for one save, claimed by this live writer (so cleanup
        by others never removes it). ``token`` makes it unique."""

    @abc.abstractmethod
    def discard_staging(self, area: StagingArea) -> None:
        """Rank 0: remove a staging area that was not committed and release its claim.
        Idempotent; a committed area's claim is just released."""

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
        committed and the links are redone at the next commit or open."""

    @abc.abstractmethod
    def delete(self, step: int) -> int | None:
        """Unpublish and remove the checkpoint of ``step``; repair the links. Returns the
        newest remaining step. :class:`~distckpt.CheckpointNotFound` if there is none."""

    @abc.abstractmethod
    def prune(self) -> list[int]:
        """Repair the links, then apply the retention rules; the steps removed."""

    @abc.abstractmethod
    def collect_leftovers(self) -> list[Path]:
        """Remove staging areas of dead writers and deleted checkpoints not yet gone; a live
        writer's staging area is never touched. What was removed, including what
        :meth:`open` removed (reported once)."""


def open_store(
    root: str | os.PathLike[str],
    *,
    retention: RetentionPolicy | None = None,
    link: LinkMode = "auto",
    fsync: bool = True,
    lock_timeout: float = 300.0,
    read_only: bool = False,
) -> RootStore:
    """The store for ``root``. Every root is a POSIX directory today; a URL scheme (such as
    ``s3://``) is where a second backend would be chosen. A ``read_only`` store never writes
    (no probe, no lock file, no cleanup or link repair when opened); its changes
    (``begin_staging``, ``delete``, ``prune``, ``collect_leftovers``) raise
    :class:`~distckpt.ReadOnlyRoot`."""
    from distckpt.storage.posix import PosixRootStore

    return PosixRootStore(
        root,
        retention=retention or RetentionPolicy(),
        link=link,
        fsync=fsync,
        lock_timeout=lock_timeout,
        read_only=read_only,
    )


__all__ = ["ExtraFile", "OpenedRoot", "RootStore", "StagingArea", "open_store"]
