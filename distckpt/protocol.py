"""The save protocol, as four functions over frozen values, run on every rank of the group.

1. :func:`propose` (:meth:`~distckpt.coord.Coordinator.all_reduce`: an all-gather at 2 ranks,
   a gather to rank 0 and a broadcast from 3 on): every rank checks its arguments and
   estimates its bytes; rank 0 also checks the step against the root, reads the free space and
   opens a staging area claimed by its live writer (for an async save in a thread beside the
   snapshot: that work needs no tensor). The verdict, a pure function of the proposals (same
   step everywhere, enough space), gives every rank the same :class:`SavePlan` — or the
   committed result when a scheduled save finds its step saved already. An async save copies
   its tensors while the proposals are gathered beside it, then reports the copy in a second,
   small collective (:meth:`~distckpt.coord.Coordinator.agree_on`).
2. :func:`write`: every rank writes its shard into the staging area (streamed, fsynced); rank 0
   first makes the staging area's creation durable, then adds the extra files.
3. Agreement (one gather to rank 0): every rank reports its files or its error to rank 0
   (an orphaned rank reports that its launcher is gone). If every rank wrote, rank 0 builds
   the :class:`Manifest` from the records (:func:`agree`).
4. :func:`commit` (rank 0, then one broadcast): the store publishes the staging area; every
   rank returns the same :class:`SaveResult` once the commit is durable, or raises the same
   error: the commit's, or any rank's from step 3 (then nothing was committed).

Each step is a phase of :mod:`distckpt.events` (``save.propose`` ... ``save.commit``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from distckpt import events, faults
from distckpt.coord import Coordinator, run_now
from distckpt.errors import InsufficientSpace, InvalidArgument, InvalidStep
from distckpt.formats import CheckpointFormat, ShardContext
from distckpt.layout import MANIFEST_NAME
from distckpt.lease import LauncherWatch
from distckpt.manifest import FileRecord, Manifest, check_json_metadata
from distckpt.metrics import normalize_metrics
from distckpt.results import CheckpointLocation, SaveResult
from distckpt.snapshot import SnapshotBuffers
from distckpt.state import to_plain
from distckpt.storage import ExtraFile, RootStore, StagingArea

logger = logging.getLogger("distckpt")
T = TypeVar("T")

#: Free space demanded beyond the estimated size, as a fraction of it (the default of
#: ``CheckpointManager(space_margin=)``), and never less than the floor: estimates miss
#: headers and metadata, and a full disk mid-write costs more than a refused save. Small
#: enough that a small volume or quota still takes a small checkpoint.
SPACE_MARGIN_RATIO = 0.05
SPACE_MARGIN_FLOOR_BYTES = 1 << 20


@dataclass(frozen=True)
class SaveRequest:
    """What the caller asked to save, as passed to ``save()`` on this rank."""

    step: int
    epoch: int | None
    overwrite: bool
    #: True unless a schedule, ``force`` or a signal asked (see ``SaveDecision.explicit``)
    explicit: bool
    metrics: Mapping[str, Any] | None = None
    metadata: Mapping[str, Any] | None = None
    files: Mapping[str, ExtraFile] | None = None


@dataclass(frozen=True)
class Proposal:
    """What each rank brings to a save; rank 0's also carries what it prepared in the root."""

    step: int
    estimated_bytes: int
    metrics: dict[str, float]
    location: str = ""
    #: None where the filesystem reports no size: free space unknown, not checked
    free_bytes: int | None = None
    existing: SaveResult | None = None
    #: where the checkpoint will be once committed (rank 0 looked it up in the root; async
    #: saves only, else "")
    destination: CheckpointLocation = ""


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


def propose(
    request: SaveRequest,
    state: Any,
    *,
    coord: Coordinator,
    store: RootStore,
    fmt: CheckpointFormat,
    snapshot: SnapshotBuffers | None,
    token: str,
    space_margin: float = SPACE_MARGIN_RATIO,
    launcher: LauncherWatch | None = None,
) -> SavePlan | SaveResult:
    """Step 1 (see the module doc), in the caller's thread. Returns the plan, or the committed
    result when the step is saved already and may be returned. ``space_margin``: the free
    space demanded beyond the estimate, as a fraction of it (see :func:`margin_bytes`). An
    orphaned rank fails it on every rank (:func:`check_launcher`).

    An async save (``snapshot`` given) copies its tensors with the proposals' collective
    running beside the copy, then reports the copy's outcome in one more small collective
    (see :func:`_agree_beside_copy`)."""
    step = request.step
    started = time.monotonic()
    prepared: dict[str, Any] = {}  # this rank's own results, kept out of the collective
    what = f"preparing the save of step {step}"

    def prepare_root() -> Proposal | SaveResult:
        # Rank 0's root work needs no tensor: for an async save it runs beside the snapshot,
        # in a thread of its own (see :func:`start_beside`), so the caller waits for the
        # longer of the two instead of their sum.
        with events.phase("propose.root", rank=coord.rank, step=step):
            existing = store.check_step(
                step, overwrite=request.overwrite, explicit=request.explicit
            )
            if existing is not None:
                return existing
            prepared["area"] = store.begin_staging(step, token)
            # The size and metrics are this rank's, filled in once the snapshot is taken. Only
            # an async save returns before its commit names the checkpoint: a sync save spends
            # no lookup of the root on it.
            destination = store.view.checkpoint(step).location if snapshot is not None else ""
            return Proposal(
                step,
                0,
                {},
                location=prepared["area"].location,
                free_bytes=store.free_bytes(),
                destination=destination,
            )

    def plan_locally() -> Callable[[], Proposal]:
        """This rank's checks, its plain state and (async) its snapshot's buffers, with rank
        0's root work started; returns what gives this rank's proposal (joining that work).
        Nothing here needs the tensors' values, so an async save copies them only afterwards
        (``prepared["snapshot"]``), beside the proposals' collective."""
        check_launcher(launcher, coord=coord, store=store)
        check_step_number(step)
        root_done: Callable[[], Proposal | SaveResult] | None = None
        if coord.is_coordinator:
            prepared["metadata"] = check_json_metadata(request.metadata)
            prepared["files"] = check_extra_files(request.files, fmt)
            # Only an async save copies tensors here; a sync save has nothing to overlap, so
            # it spends no thread on it.
            root_done = (
                start_beside(prepare_root, name="distckpt-propose")
                if snapshot is not None
                else run_now(prepare_root)
            )
        try:
            with events.phase("propose.snapshot", rank=coord.rank, step=step):
                plain = to_plain(state, mark_per_rank=fmt.marks_per_rank)
                fmt.check_state(plain)
                taken = snapshot.prepare(plain) if snapshot is not None else None
        except BaseException:
            # Joined before the snapshot's error is reported: a staging area the root work
            # opened is then in `prepared`, which the caller discards. Its own error, if any,
            # is the lesser news.
            if root_done is not None:
                with contextlib.suppress(Exception):
                    root_done()
            raise
        prepared["state"] = plain if taken is None else taken.state
        prepared["snapshot"] = taken
        # From the buffers' sizes (an async snapshot's buffers are sized before they are
        # filled), so the estimate is ready before the copy.
        estimated = fmt.estimate_bytes(prepared["state"])
        metrics = normalize_metrics(request.metrics)

        def proposal() -> Proposal:
            root = root_done() if root_done is not None else None
            if isinstance(root, SaveResult):
                return Proposal(step, estimated, metrics, existing=root)
            if root is None:
                return Proposal(step, estimated, metrics)
            return replace(root, estimated_bytes=estimated, metrics=metrics)

        return proposal

    def verdict(proposals: list[Proposal]) -> Proposal:
        return _verdict(proposals, store.root, space_margin)

    try:
        with events.phase("save.propose", rank=coord.rank, step=step):
            if snapshot is None:
                chosen = coord.all_reduce(lambda: plan_locally()(), verdict, what=what)
            else:
                chosen = _agree_beside_copy(
                    plan_locally, prepared, snapshot, verdict, coord=coord, step=step, what=what
                )
    except BaseException:
        if "area" in prepared:
            store.discard_staging(prepared["area"])
        raise
    if chosen.existing is not None:
        logger.info("step %d is already committed; not saving it again", step)
        return chosen.existing
    return SavePlan(
        step=step,
        epoch=request.epoch,
        overwrite=request.overwrite,
        started=started,
        state=prepared["state"],
        location=chosen.location,
        metrics=chosen.metrics,
        free_bytes=chosen.free_bytes,
        destination=chosen.destination,
        area=prepared.get("area"),
        metadata=prepared.get("metadata", {}),
        files=prepared.get("files", {}),
    )


def _agree_beside_copy(
    plan_locally: Callable[[], Callable[[], Proposal]],
    prepared: dict[str, Any],
    snapshot: SnapshotBuffers,
    verdict: Callable[[list[Proposal]], Proposal],
    *,
    coord: Coordinator,
    step: int,
    what: str,
) -> Proposal:
    """An async save's proposal: the collective of the proposals (on ``coord``, in a thread
    of its own) runs while the caller copies the tensors into the snapshot's buffers, so the
    caller waits for the longer of the two (the copy, normally) instead of their sum. Every
    error is raised on every rank, as by one collective after the copy."""

    def copy() -> None:
        taken = prepared.get("snapshot")
        if taken is None:  # this rank's plan failed: nothing to copy; the collective says so
            return
        # Copied now, so training may change its tensors as soon as save returns. Pinned
        # (device-to-host) copies are asynchronous: they must have landed, and their errors
        # surfaced, before this rank reports its copy.
        with events.phase("propose.copy", rank=coord.rank, step=step):
            taken.copy()
            snapshot.synchronize()

    proposal = run_now(plan_locally)  # a failure here is this rank's part of the collective
    # Its local part needs nothing from the copy: it only waits for rank 0's root work.
    gathered = start_beside(
        lambda: coord.all_reduce(lambda: proposal()(), verdict, what=what),
        name="distckpt-propose-gather",
    )
    try:
        copied = run_now(copy)
    except BaseException:  # interrupted: the collective beside must not outlive the save
        with contextlib.suppress(BaseException):
            gathered()
        raise
    chosen = gathered()  # every rank alike: a failed proposal, or a refused verdict
    # The copy's outcome needs a collective of its own, after the copy. It cannot ride in the
    # proposals: they are sent while the copy runs (that is the overlap). A collective on the
    # failure path only is impossible: a rank whose copy succeeded cannot know that a peer's
    # failed, so it would never join it. Reporting it in the background write's agreement
    # instead would let save() return on ranks whose peer has no snapshot, and raise only at
    # wait(). So every rank reports its copy here, verdicts only (the buffers never travel):
    # one small round trip, in which the ranks wait for the slowest copy, as the proposals'
    # collective after the copy used to. Ranks reach it alike: past `gathered()` only if no
    # rank raised.
    coord.agree_on(copied, what=what)
    return chosen


def start_beside(func: Callable[[], T], *, name: str) -> Callable[[], T]:
    """Start ``func`` in a thread of its own now; returns a function that waits for it and
    gives its value or raises its error (the counterpart of :func:`~distckpt.coord.run_now`
    for work that overlaps the caller's). For work that waits on the disk while the caller
    copies tensors (which releases the GIL)."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(func())
        except BaseException as exc:  # raised again in the caller's thread by the join
            failure.append(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()

    def join() -> T:
        thread.join()
        if failure:
            raise failure[0]
        return outcome[0]

    return join


def margin_bytes(needed: int, space_margin: float) -> int:
    """The free space a save of ``needed`` bytes demands beyond them: ``space_margin`` of it,
    at least :data:`SPACE_MARGIN_FLOOR_BYTES`; none when ``space_margin`` is 0."""
    if space_margin == 0:
        return 0
    return max(int(needed * space_margin), SPACE_MARGIN_FLOOR_BYTES)


def check_space_margin(space_margin: float) -> float:
    """A margin must be a non-negative fraction (0 disables the free-space check's margin)."""
    if isinstance(space_margin, bool) or not isinstance(space_margin, (int, float)):
        raise InvalidArgument(f"space_margin must be a number, not {space_margin!r}")
    if space_margin < 0:
        raise InvalidArgument(f"space_margin must not be negative, got {space_margin}")
    return float(space_margin)


def _verdict(proposals: list[Proposal], root: CheckpointLocation, space_margin: float) -> Proposal:
    """Rank 0's proposal, if the gathered ones allow the save; the same on every rank."""
    chosen = proposals[0]  # rank 0's: the only one that looked at the root
    steps = sorted({p.step for p in proposals})
    if len(steps) > 1:
        raise InvalidStep(
            f"the ranks passed different steps to save(): {steps}; every rank must save the "
            "same step"
        )
    if chosen.existing is not None:
        return chosen
    if chosen.free_bytes is None:  # unknown (the store warned): nothing to check against
        return chosen
    needed = sum(p.estimated_bytes for p in proposals)
    margin = margin_bytes(needed, space_margin)
    if needed + margin > chosen.free_bytes:
        raise InsufficientSpace(
            f"saving step {chosen.step} needs about {mib(needed)} (+{mib(margin)} margin) but "
            f"{root} has {mib(chosen.free_bytes)} free (the margin is space_margin="
            f"{space_margin:g} of the estimate, at least {mib(SPACE_MARGIN_FLOOR_BYTES)})",
            path=root,
            step=chosen.step,
        )
    return chosen


def write(
    plan: SavePlan, *, coord: Coordinator, store: RootStore, fmt: CheckpointFormat, fsync: bool
) -> dict[str, FileRecord]:
    """Step 2, this rank's part: its shard (and on rank 0 the extra files) in the staging area;
    the records of what it wrote. Rank 0 first makes the area's creation durable
    (:meth:`~distckpt.storage.RootStore.make_staging_durable`), which only the commit needs.
    The format writes into the local dir the store gives this rank
    (:meth:`~distckpt.storage.RootStore.open_shard`), then the store publishes it into the
    staging area."""
    ctx = ShardContext(coord.rank, coord.world_size, fsync, coord.group)
    try:
        if plan.area is not None:
            # Here, not when the area was opened (the proposal, which the caller waits for),
            # nor at the commit (after the agreement, where every rank waits for it): here it
            # overlaps the other ranks' writes, and an async save's write is in the background.
            # Before the shard, so the journal it flushes holds little else.
            store.make_staging_durable(plan.area)
        with store.open_shard(plan.location, coord.rank) as directory:
            written = fmt.write(plan.state, directory, ctx)
            records = store.publish_shard(plan.location, directory, written)
        if plan.files and plan.area is not None:
            records.update(store.write_extra_files(plan.area, plan.files))
    except Exception as exc:
        full = _out_of_space(exc)
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
        full = _out_of_space(exc)  # writing the manifest, as a shard write can
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
    launcher: LauncherWatch | None = None,
) -> SaveResult:
    """Steps 2-4, in the caller's thread or, for an async save, in the background thread with
    a ``coord`` of its own: every rank writes, the records (or errors) are gathered to rank 0
    (``save.agree``), which builds the manifest and commits, and the result or the error is
    broadcast to every rank (``save.commit``; :meth:`~distckpt.coord.Coordinator.gather` and
    :meth:`~distckpt.coord.Coordinator.conclude`). Rank 0 discards the staging area unless it
    was committed.

    With a ``launcher`` watch, every rank checks after writing, in what it reports for the
    agreement, that its launcher lives (:func:`check_launcher`)."""
    step, rank, fsync = plan.step, coord.rank, store.fsync

    def write_here() -> dict[str, FileRecord]:
        records = write(plan, coord=coord, store=store, fmt=fmt, fsync=fsync)
        check_launcher(launcher, coord=coord, store=store)
        return records

    try:
        with events.phase("save.write", rank=rank, step=step):
            records = run_now(write_here)
        faults.hit("before_agreement", rank)
        with events.phase("save.agree", rank=rank, step=step):
            gathered = coord.gather(records, what=f"writing step {step}")
        # Rank 0 has every rank's report here; another rank only knows its own is delivered.
        faults.hit("after_agreement", rank)

        def commit_written(written: list[dict[str, FileRecord]]) -> SaveResult:
            manifest = agree(plan, written, fmt_name=fmt.name, world_size=coord.world_size)
            return commit(plan, manifest, store=store, rank=rank)

        with events.phase("save.commit", rank=rank, step=step):
            return coord.conclude(gathered, commit_written, what=f"committing step {step}")
    finally:
        if plan.area is not None:
            store.discard_staging(plan.area)


def _ran_out_of_space(plan: SavePlan, full: OSError, *, root: Path, rank: int) -> InsufficientSpace:
    """The error for ``full`` (no space, or quota exceeded) met by ``rank`` while writing a file
    of ``plan``'s save: it names the root, the file and the free space the preflight saw."""
    seen = "unknown" if plan.free_bytes is None else mib(plan.free_bytes)
    return InsufficientSpace(
        f"the filesystem of {root} ran out of space while rank {rank} wrote "
        f"{full.filename or plan.location} for step {plan.step}: {full.strerror} (free "
        f"space when the save began: {seen}; another process may have filled it since)",
        rank=rank,
        path=full.filename or plan.location,
        step=plan.step,
    )


def _out_of_space(exc: BaseException) -> OSError | None:
    """The "no space" (or "quota exceeded") OSError behind ``exc``, if it is one or was raised
    from one (a format may wrap it in an error of its own)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
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


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def check_extra_files(
    files: Mapping[str, ExtraFile] | None, fmt: CheckpointFormat
) -> dict[str, ExtraFile]:
    """The extra files to store, checked: plain names that clash with none of the
    checkpoint's own files, existing sources."""
    for name, content in (files or {}).items():
        if (
            not isinstance(name, str)
            or not name
            or "/" in name
            or "\\" in name
            or "\0" in name
            or name in (".", "..", MANIFEST_NAME)
            or name.endswith(".lock")
            or fmt.owns_file(name)
        ):
            raise InvalidArgument(
                f"extra file name {name!r} is not allowed: use a plain file name that does not "
                "clash with the checkpoint's own files"
            )
        if not isinstance(content, bytes) and not Path(os.fspath(content)).is_file():
            raise InvalidArgument(f"extra file {name!r}: {content!r} is not a file")
    return dict(files or {})
