"""The save protocol, as four functions over frozen values, run on every rank of the group.

1. :func:`~distckpt.proposal.propose` (:mod:`distckpt.proposal`;
   :meth:`~distckpt.coord.Coordinator.all_reduce`: an all-gather at 2 ranks, a gather to rank 0
   and a broadcast from 3 on): every rank checks its arguments and estimates its bytes; rank 0
   also checks the step against the root, reads the free space and opens a staging area
   claimed by its live writer (for an async save in a thread beside the snapshot: that work
   needs no tensor). The verdict, a pure function of the proposals (same step everywhere,
   enough space), gives every rank the same :class:`SavePlan` — or the committed result when a
   scheduled save finds its step saved already. An async save copies its tensors while the
   proposals are gathered beside it, then reports the copy in a second, small collective
   (:meth:`~distckpt.coord.Coordinator.agree_on`).
2. :func:`write`: every rank writes its shard into the staging area (streamed, fsynced); rank 0
   first makes the staging area's creation durable, then adds the extra files.
3. Agreement (one gather to rank 0): every rank reports its files or its error to rank 0
   (an orphaned rank reports that its launcher is gone). If every rank wrote, rank 0 builds
   the :class:`Manifest` from the records (:func:`agree`).
4. :func:`commit` (rank 0, then one broadcast): the store publishes the staging area; every
   rank returns the same :class:`SaveResult` once the commit is durable, or raises the same
   error: the commit's, or any rank's from step 3 (then nothing was committed).

Step 1 lives in :mod:`distckpt.proposal`: the stage that runs in the caller's thread and makes
the :class:`SavePlan`. This module holds the plan, steps 2-4 (:func:`write_and_commit`, which an
async save runs in its background thread), the end of a plan's staging area
(:func:`release_staging`, also for a plan that never reaches step 2) and the helpers the
proposal uses as well
(:func:`check_launcher`, made again after writing; :func:`check_step_number`,
:func:`check_step_and_epoch`; :func:`mib`).
Each step is a phase of :mod:`distckpt.events` (``save.propose`` ... ``save.commit``).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from distckpt import events, faults
from distckpt.coord import Coordinator, Gathered, run_now
from distckpt.coord_outcomes import Outcome
from distckpt.errors import (
    CheckpointError,
    InsufficientSpace,
    InvalidStep,
    LeaseLost,
    StagingRemoved,
)
from distckpt.formats import CheckpointFormat, ShardContext
from distckpt.launcher import LauncherWatch
from distckpt.manifest import FileRecord, Manifest, check_epoch_number
from distckpt.results import CheckpointLocation, SaveResult
from distckpt.storage import ExtraFile, RootStore, StagingArea
from distckpt.tidying import BackgroundTidy
from distckpt.weights_only import RefusedValuesWarning

logger = logging.getLogger("distckpt")
T = TypeVar("T")


@dataclass(frozen=True)
class SavePlan:
    """One rank's view of an agreed save between the proposal and the commit."""

    step: int
    epoch: int | None
    overwrite: bool
    started: float
    #: the plain (async: snapshotted) state this rank writes
    state: Any
    #: the staging area every rank writes into, as the store names it
    #: (:attr:`~distckpt.storage.StagingArea.location`)
    location: str
    metrics: dict[str, float]
    #: the free space rank 0 saw in the proposal (None: unknown), quoted if the disk fills
    free_bytes: int | None = None
    #: where the checkpoint will be once committed, as rank 0 found it beside the staging
    #: (an async save's result names it before the commit, with no lookup in the caller's path;
    #: "" for a sync save, whose commit names it)
    destination: CheckpointLocation = ""
    #: rank 0 only: the claimed staging area, its metadata and extra files
    area: StagingArea | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    files: dict[str, ExtraFile] = field(default_factory=dict)
    #: whether the background coordinator's group must be renewed, in the caller's thread,
    #: before this save is handed to it (some rank's broke; the same on every rank)
    renew_twin: bool = False


def write(
    plan: SavePlan,
    *,
    coord: Coordinator,
    store: RootStore,
    fmt: CheckpointFormat,
    fsync: bool,
    refused_values: RefusedValuesWarning | None = None,
) -> dict[str, FileRecord]:
    """Step 2, this rank's part: its shard (and on rank 0 the extra files) in the staging area;
    the records of what it wrote. With ``refused_values``, the state is first looked at for
    values a default restore would refuse (one warning per distinct kind): here, where both
    formats pickle it, and in the background thread for an async save, off the time ``save``
    blocks. Rank 0 first makes the area's creation durable
    (:meth:`~distckpt.storage.RootStore.make_staging_durable`), which only the commit needs.
    The format writes into the local dir the store gives this rank
    (:meth:`~distckpt.storage.RootStore.open_shard`), then the store publishes it into the
    staging area. A write that failed for a missing dir inside the staging area (even wrapped
    by the format: DCP's) raises :class:`~distckpt.StagingRemoved` instead
    (:meth:`~distckpt.storage.RootStore.staging_removed`): someone else removed the area;
    rank 0 makes it :class:`~distckpt.LeaseLost` where its lease is lost
    (:func:`blame_a_lost_lease`)."""
    ctx = ShardContext(
        coord.rank, coord.world_size, fsync, coord.group, direct_io=not store.shards_read_back
    )
    try:
        if plan.area is not None:
            # Here, not when the area was opened (the proposal, which the caller waits for),
            # nor at the commit (after the agreement, where every rank waits for it): here it
            # overlaps the other ranks' writes, and an async save's write is in the background.
            # Before the shard, so the journal it flushes holds little else.
            store.make_staging_durable(plan.area)
        if refused_values is not None:
            refused_values.check(plan.state)
        faults.hit("before_shard_write", coord.rank)
        with store.open_shard(plan.location, coord.rank) as directory:
            written = fmt.write(plan.state, directory, ctx)
            records = store.publish_shard(plan.location, directory, written)
        if plan.files and plan.area is not None:
            records.update(store.write_extra_files(plan.area, plan.files))
    except Exception as exc:
        missing = missing_dir(exc)
        if missing is not None:
            removed = store.staging_removed(plan.location, missing, step=plan.step, rank=coord.rank)
            if removed is not None:
                raise removed from exc
        full = out_of_space(exc)
        if full is None:
            raise
        raise _ran_out_of_space(plan, full, root=store.root, rank=coord.rank) from exc
    faults.hit("after_shard_write", coord.rank)
    return records


def agree(
    plan: SavePlan, written: list[dict[str, FileRecord]], *, fmt_name: str, world_size: int
) -> Manifest:
    """Step 3's result: the manifest of what every rank wrote (gathered by rank)."""
    return Manifest(
        step=plan.step,
        world_size=world_size,
        format=fmt_name,
        files={name: r for records in written for name, r in records.items()},
        epoch=plan.epoch,
        metrics=plan.metrics,
        metadata=plan.metadata,
        torch_version=torch.__version__,
    )


def commit(plan: SavePlan, manifest: Manifest, *, store: RootStore, rank: int) -> SaveResult:
    """Step 4, rank 0's part: the store publishes the staging area under ``manifest``
    (:func:`write_and_commit` broadcasts the result or the error to every rank)."""
    assert plan.area is not None  # rank 0 always holds the staging area it proposed
    try:
        result = store.commit(plan.area, manifest, overwrite=plan.overwrite)
    except Exception as exc:
        full = out_of_space(exc)  # writing the manifest, as a shard write can
        if full is None:
            raise
        raise _ran_out_of_space(plan, full, root=store.root, rank=rank) from exc
    elapsed = time.monotonic() - plan.started
    logger.info(
        "committed %s: %s in %.2f s (%s/s)",
        result.path,
        mib(manifest.total_bytes),
        elapsed,
        mib(manifest.total_bytes / elapsed if elapsed > 0 else 0),
    )
    return result


def write_and_commit(
    plan: SavePlan,
    *,
    coord: Coordinator,
    store: RootStore,
    fmt: CheckpointFormat,
    tidying: BackgroundTidy,
    launcher: LauncherWatch | None = None,
    refused_values: RefusedValuesWarning | None = None,
) -> SaveResult:
    """Steps 2-4, in the caller's thread or, for an async save, in the background thread with
    a ``coord`` of its own: every rank writes, the records (or errors) are gathered to rank 0
    (``save.agree``), which builds the manifest and commits, and the result or the error is
    broadcast to every rank (``save.commit``; :meth:`~distckpt.coord.Coordinator.gather` and
    :meth:`~distckpt.coord.Coordinator.conclude`). Rank 0 discards the staging area unless it
    was committed; after a commit it then has ``tidying`` tidy the root in the background
    (:meth:`~distckpt.storage.RootStore.tidy`: the bytes of what retention removed), once
    every rank has the outcome, so neither the save's result (an async save's too) nor the
    next call's collectives wait for the removal.

    With a ``launcher`` watch, every rank checks after writing, in what it reports for the
    agreement, that its launcher lives (:func:`check_launcher`). ``refused_values``: see
    :func:`write`."""
    step, rank, fsync = plan.step, coord.rank, store.fsync

    def write_here() -> dict[str, FileRecord]:
        # The phase inside what run_now runs: run_now keeps the error for the agreement, so
        # around it the phase would end without one and report a failed write as ok.
        with events.phase("save.write", rank=rank, step=step):
            records = write(
                plan, coord=coord, store=store, fmt=fmt, fsync=fsync, refused_values=refused_values
            )
            check_launcher(launcher, coord=coord, store=store)
        return records

    committed: list[SaveResult] = []  # rank 0's commit, even if telling the others failed
    try:
        records = run_now(write_here)
        faults.hit("before_agreement", rank)
        with events.phase("save.agree", rank=rank, step=step):
            gathered = coord.gather(records, what=f"writing step {step}")
            gathered = blame_a_lost_lease(gathered, store=store)
        # Rank 0 has every rank's report here; another rank only knows its own is delivered.
        faults.hit("after_agreement", rank)

        def commit_written(written: list[dict[str, FileRecord]]) -> SaveResult:
            manifest = agree(plan, written, fmt_name=fmt.name, world_size=coord.world_size)
            committed.append(commit(plan, manifest, store=store, rank=rank))
            return committed[-1]

        with events.phase("save.commit", rank=rank, step=step):
            return coord.conclude(gathered, commit_written, what=f"committing step {step}")
    finally:
        release_staging(plan, store=store)
        if committed:
            # After the outcome's broadcast, and in a thread of its own: the other ranks go on
            # to their next call at once, and a slow removal must not run inside its timeout,
            # nor fail a save that committed. Only after a commit: a failed save leaves the root
            # as it was.
            tidying.request()


def blame_a_lost_lease(gathered: Gathered[T], *, store: RootStore) -> Gathered[T]:
    """Rank 0, once every rank reported its write: where some rank found the staging dir
    removed (:class:`~distckpt.StagingRemoved`) and this store's lease is lost, the job that
    took the lease over removed it (its start took the dir for a dead writer's), so each such
    report becomes that :class:`~distckpt.LeaseLost`, which every rank then raises. Decided
    here because only rank 0 holds the lease, and whether or not its own write failed: the
    dir may vanish after rank 0 wrote its shard and before another rank wrote. Where the lease
    is not found lost, the reports stay. Other ranks (no outcomes) get ``gathered`` as is."""
    outcomes = gathered.outcomes
    if outcomes is None or all(o.error_type != StagingRemoved.__name__ for o in outcomes):
        return gathered
    try:
        store.check_lease()
    except LeaseLost as exc:
        lost = exc
    except Exception:  # the record unreadable: raised here, the others would wait for rank 0
        logger.warning("could not check the lease after a staging dir vanished", exc_info=True)
        return gathered
    else:
        return gathered
    return replace(gathered, outcomes=tuple(_lost_instead(o, lost) for o in outcomes))


def _lost_instead(outcome: Outcome, lost: LeaseLost) -> Outcome:
    """``outcome``, or the :class:`~distckpt.LeaseLost` it means if it reports a staging dir
    removed (same text for every such rank, so the ranks raise one message)."""
    if outcome.error_type != StagingRemoved.__name__:
        return outcome
    removed = StagingRemoved.rebuild(outcome.error or "", outcome.fields)
    why = f"the staging dir {removed.path} of step {removed.step}'s save was removed meanwhile"
    return Outcome.failure(
        LeaseLost(f"{lost} ({why})", rank=removed.rank, path=removed.path, step=removed.step)
    )


def release_staging(plan: SavePlan, *, store: RootStore) -> None:
    """Rank 0: discard ``plan``'s staging area unless it was committed (a committed area's
    claim is just released); nothing on the other ranks, which hold none. Idempotent. Every
    plan ends here once proposed: in :func:`write_and_commit`, whatever its outcome, and in an
    async save whose hand-off to the background thread failed before that thread took it
    (:class:`~distckpt.saving.Saver`; never both: the plan has one owner at a time, see
    :meth:`~distckpt.background.BackgroundSaves.submit`), so a failed save leaves no staging
    area behind for the next start's cleanup (a discard that fails is only logged: see
    :func:`discard_staging_area`)."""
    if plan.area is not None:
        discard_staging_area(plan.area, store=store)


def discard_staging_area(area: StagingArea, *, store: RootStore) -> None:
    """Rank 0: discard ``area`` (:meth:`~distckpt.storage.RootStore.discard_staging`) once
    its save's outcome is known (committed, failed, or never made). A discard that fails (the
    filesystem turned read-only under the save) is logged as a warning naming the area, never
    raised: the save's own outcome, the one every rank gets, stays what its caller sees, and
    the next start or ``distckpt gc`` removes what is left. Any other error (a bug, such as a
    ``TypeError``) and a KeyboardInterrupt go through."""
    try:
        store.discard_staging(area)
    except (OSError, CheckpointError) as exc:
        logger.warning(
            "could not discard the staging area %s (the next start or 'distckpt gc' removes "
            "it): %s",
            area.location,
            exc,
        )


def _ran_out_of_space(plan: SavePlan, full: OSError, *, root: Path, rank: int) -> InsufficientSpace:
    """:func:`ran_out_of_space` writing a file of ``plan``'s save, with the free space the
    preflight saw."""
    seen = "unknown" if plan.free_bytes is None else mib(plan.free_bytes)
    return ran_out_of_space(
        full,
        root=root,
        rank=rank,
        step=plan.step,
        path=plan.location,
        seen=f"free space when the save began: {seen}; ",
    )


def ran_out_of_space(
    full: OSError, *, root: Path, rank: int, step: int, path: object, seen: str = ""
) -> InsufficientSpace:
    """The error for ``full`` (no space or no inode left, or quota exceeded) met by ``rank``
    writing for ``step``'s save: it names the root and the file (``full``'s, else ``path``),
    and ``seen`` (what the preflight saw, if it ran) before saying what ran out. Space and
    inodes are not told apart: either may have run out, by this save or another process."""
    where = full.filename or path
    return InsufficientSpace(
        f"the filesystem of {root} ran out of space while rank {rank} wrote {where} for step "
        f"{step}: {full.strerror} ({seen}the space or the filesystem's free inodes ran out)",
        rank=rank,
        path=where,
        step=step,
    )


def out_of_space(exc: BaseException) -> OSError | None:
    """The "no space" (or "quota exceeded") OSError behind ``exc``, if it is one or was raised
    from one (a format may wrap it in an error of its own)."""
    found = _behind(
        exc, lambda e: isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    )
    return found if isinstance(found, OSError) else None


def missing_dir(exc: BaseException) -> str | None:
    """The path a file could not be created at for a missing dir, if ``exc`` is that
    ``FileNotFoundError`` or was raised from one (DCP wraps it in an error of its own)."""
    found = _behind(exc, lambda e: isinstance(e, FileNotFoundError) and e.filename is not None)
    return os.fsdecode(found.filename) if isinstance(found, FileNotFoundError) else None


def _behind(exc: BaseException, matches: Callable[[BaseException], bool]) -> BaseException | None:
    """The first of ``exc`` and the errors it was raised from, or raised while handling, that
    ``matches``."""
    seen: BaseException | None = exc
    while seen is not None:
        if matches(seen):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def check_launcher(launcher: LauncherWatch | None, *, coord: Coordinator, store: RootStore) -> None:
    """Raise :class:`~distckpt.LauncherGone` if this rank's launcher is gone; inside a verb's
    local part, so an orphaned rank fails the save on every rank. An orphaned rank 0 first
    closes the store: it gives up the root's lease, so the job replacing this one may open it
    while the orphans can commit nothing more."""
    if launcher is None or not launcher.launcher_gone():
        return
    if coord.is_coordinator:
        store.close()
    launcher.check()


def check_step_number(step: object) -> None:
    """A step must be a non-negative int (bools are refused, too)."""
    if isinstance(step, bool) or not isinstance(step, int):
        raise InvalidStep(f"step must be an int, not {type(step).__name__} ({step!r})")
    if step < 0:
        raise InvalidStep(f"step must not be negative, got {step}", step=step)


def check_step_and_epoch(step: object, epoch: object) -> None:
    """The step and epoch a caller passes to ``should_save``/``save``, checked before any
    schedule reads them: a schedule would otherwise compare a str or float step and answer
    (or fail with a ``TypeError``) instead of naming the bad argument."""
    check_step_number(step)
    check_epoch_number(epoch)


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"
