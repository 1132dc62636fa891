"""Step 1 of the save protocol (see :mod:`distckpt.protocol`): the proposal, which turns what
the caller asked for into the :class:`~distckpt.protocol.SavePlan` every rank agrees on.

:func:`propose` runs in the caller's thread on every rank (phase ``save.propose``): every rank
checks its arguments, reduces its state to plain data (an async save readies its snapshot's
buffers) and estimates its bytes; rank 0 also checks the step against the root, opens a staging
area and reads the free space. One :meth:`~distckpt.coord.Coordinator.all_reduce` of every
rank's :class:`Proposal` gives every rank the same verdict (:func:`_verdict`: one step
everywhere, enough free space with :func:`margin_bytes` to spare). An async save copies its
tensors while that collective runs beside the copy, then reports the copy in a second, small
collective (:func:`_agree_beside_copy`).

A module of its own because it is the stage that overlaps work in threads of its own (rank 0's
root work beside the snapshot, the proposals' collective beside the copy) and the only stage an
async save's caller waits for; the stages after it (write, agree, commit, in
:mod:`distckpt.protocol`) take the plan alone, and an async save runs them in its background
thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from distckpt import events, faults
from distckpt.coord import Coordinator, run_now
from distckpt.errors import CheckpointError, InsufficientSpace, InvalidArgument, InvalidStep
from distckpt.formats import CheckpointFormat
from distckpt.launcher import LauncherWatch
from distckpt.layout import (
    LEASE_LOCK_NAME,
    LEASE_RECORD_NAME,
    MANIFEST_NAME,
    is_lingering_lease_lock,
)
from distckpt.manifest import check_json_metadata
from distckpt.metrics import normalize_metrics
from distckpt.protocol import (
    SavePlan,
    check_launcher,
    check_step_and_epoch,
    discard_staging_area,
    mib,
    out_of_space,
    ran_out_of_space,
)
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
    #: True unless a schedule, the throttle, ``force`` or a signal asked (``SaveDecision``)
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
    #: whether this rank's background twin's group broke in the save before (see
    #: :meth:`~distckpt.coord.Coordinator.spawn`)
    twin_broken: bool = False
    #: in the verdict: whether any rank's did, so every rank renews it before the write
    renew_twin: bool = False


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
    twin_broken: bool = False,
) -> SavePlan | SaveResult:
    """Step 1 (see the module doc), in the caller's thread. Returns the plan, or the committed
    result when the step is saved already and may be returned. ``space_margin``: the free
    space demanded beyond the estimate, as a fraction of it (see :func:`margin_bytes`). An
    orphaned rank fails it on every rank (:func:`~distckpt.protocol.check_launcher`).

    An async save (``snapshot`` given) copies its tensors with the proposals' collective
    running beside the copy, then reports the copy's outcome in one more small collective
    (see :func:`_agree_beside_copy`).

    A failed proposal leaves nothing behind: no thread it started outlives it, and the staging
    area rank 0 opened is discarded (:func:`_abandon`); arguments that need no tensor are
    checked before rank 0's root work starts.

    ``twin_broken``: whether this rank's background coordinator's group broke; it travels in
    the proposals, and the plan's ``renew_twin`` says whether any rank's did, the same on every
    rank, with no collective of its own."""
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
            faults.hit("before_staging", coord.rank)
            prepared["area"] = _begin_staging(store, step, token, coord.rank)
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
        check_step_and_epoch(step, request.epoch)
        # Every argument that needs no tensor is checked before the root work starts, so that
        # a bad one fails the save with no thread started and no staging area opened. Every
        # rank checks its metrics (rank 0's are the ones stored): a rank's bad value fails the
        # save on every rank, as a bad state does.
        metrics = normalize_metrics(request.metrics)
        root_done: Callable[[], Proposal | SaveResult] | None = None
        if coord.is_coordinator:
            prepared["metadata"] = check_json_metadata(request.metadata)
            prepared["files"] = check_extra_files(request.files, fmt, read_now=snapshot is not None)
            # Only an async save copies tensors here; a sync save has nothing to overlap, so
            # it spends no thread on it. Kept in `prepared` so that a failed proposal waits
            # for it, wherever it fails (see :func:`_abandon`).
            root_done = (
                start_beside(prepare_root, name="distckpt-propose")
                if snapshot is not None
                else run_now(prepare_root)
            )
            prepared["root_done"] = root_done
        with events.phase("propose.snapshot", rank=coord.rank, step=step):
            plain = to_plain(state, mark_per_rank=fmt.marks_per_rank)
            fmt.check_state(plain)
            taken = snapshot.prepare(plain) if snapshot is not None else None
        prepared["state"] = plain if taken is None else taken.state
        prepared["snapshot"] = taken
        # From the buffers' sizes (an async snapshot's buffers are sized before they are
        # filled), so the estimate is ready before the copy.
        # Rank 0 writes the extra files too: they count in its part of the estimate.
        estimated = fmt.estimate_bytes(prepared["state"]) + extra_files_bytes(
            prepared.get("files", {})
        )

        def proposal() -> Proposal:
            root = root_done() if root_done is not None else None
            if isinstance(root, SaveResult):
                return Proposal(step, estimated, metrics, existing=root, twin_broken=twin_broken)
            if root is None:
                return Proposal(step, estimated, metrics, twin_broken=twin_broken)
            return replace(
                root, estimated_bytes=estimated, metrics=metrics, twin_broken=twin_broken
            )

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
        _abandon(prepared, store)
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
        renew_twin=chosen.renew_twin,
    )


def _begin_staging(store: RootStore, step: int, token: str, rank: int) -> StagingArea:
    """Rank ``rank``'s staging area for ``step``; a disk (or quota, or inode table) already
    full when the save begins fails it before any free-space check could, in creating the
    area or its writer lock: that is :class:`InsufficientSpace`, as the check's own refusal
    is (the store leaves nothing of an area it failed to open)."""
    try:
        return store.begin_staging(step, token)
    except (OSError, CheckpointError) as exc:
        full = out_of_space(exc)
        if full is None:
            raise
        raise ran_out_of_space(
            full, root=store.root, rank=rank, step=step, path=store.root
        ) from exc


def _abandon(prepared: dict[str, Any], store: RootStore) -> None:
    """Undo what a failed proposal prepared on this rank: wait for rank 0's root work first
    (a thread still running could open a staging area after this looked, and keep it, its
    writer lock and itself alive past the failed save), then discard the staging area it
    opened (a discard that fails is only logged). The root work's own error, if any, is the
    lesser news: the proposal's is raised."""
    root_done = prepared.get("root_done")
    if root_done is not None:
        with contextlib.suppress(Exception):
            root_done()
    if "area" in prepared:
        discard_staging_area(prepared["area"], store=store)


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
    # rank 0's: the only one that looked at the root
    chosen = replace(proposals[0], renew_twin=any(p.twin_broken for p in proposals))
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
        rule = (
            "space_margin=0: no margin"
            if space_margin == 0
            else f"the margin is space_margin={space_margin:g} of the estimate, at least "
            f"{mib(SPACE_MARGIN_FLOOR_BYTES)}"
        )
        raise InsufficientSpace(
            f"saving step {chosen.step} needs about {mib(needed)} (+{mib(margin)} margin) but "
            f"{root} has {mib(chosen.free_bytes)} free ({rule})",
            path=root,
            step=chosen.step,
        )
    return chosen


def check_extra_files(
    files: Mapping[str, ExtraFile] | None, fmt: CheckpointFormat, *, read_now: bool = False
) -> dict[str, ExtraFile]:
    """The extra files to store, checked: plain names that clash with none of the
    checkpoint's own files, none of a root's lease files (``.lease``, ``.lease.json``) nor
    each other, existing sources. Names
    are compared ignoring case on every filesystem, so that a checkpoint stays whole when
    copied to one that ignores case (exFAT, FAT): there ``Manifest.json`` would replace
    ``manifest.json``. With
    ``read_now`` (an async save, which stores them in the background after save() returned),
    each source given as a path is read into memory here, in the caller's thread: the
    checkpoint holds the file as it was at save(), even if it is changed or removed right
    after."""
    seen: dict[str, str] = {}  # each name so far, by its casefold
    for name, content in (files or {}).items():
        if (
            not isinstance(name, str)
            or not name
            or "/" in name
            or "\\" in name
            or "\0" in name
            or name in (".", "..")
            or name.casefold().endswith(".lock")
        ):
            raise InvalidArgument(
                f"extra file name {name!r} is not allowed: use a plain file name that does not "
                "clash with the checkpoint's own files"
            )
        folded = name.casefold()
        if folded == MANIFEST_NAME or fmt.owns_file(name):
            raise InvalidArgument(
                f"extra file name {name!r} is not allowed: it names the checkpoint's own file "
                f"{folded!r} (compared ignoring case, as exFAT and FAT do)"
            )
        if folded in (LEASE_LOCK_NAME, LEASE_RECORD_NAME) or is_lingering_lease_lock(folded):
            # A save holding a root's lease file would be taken for a root of its own: a
            # ".lease" in a bucket's save made its gc take that save for one and keep it
            # forever. Other names of a root's (``last``, ``step-1``) fool nothing in a save.
            raise InvalidArgument(
                f"extra file name {name!r} is not allowed: it names a checkpoint root's own "
                f"entry {folded!r} (compared ignoring case, as exFAT and FAT do)"
            )
        if folded in seen:
            raise InvalidArgument(
                f"extra file names {seen[folded]!r} and {name!r} differ only in case: where "
                "case is ignored (exFAT, FAT) one would replace the other"
            )
        seen[folded] = name
        if not isinstance(content, bytes) and not Path(os.fspath(content)).is_file():
            raise InvalidArgument(f"extra file {name!r}: {content!r} is not a file")
    if not read_now:
        return dict(files or {})
    return {name: _read_extra_file(name, content) for name, content in (files or {}).items()}


def extra_files_bytes(files: Mapping[str, ExtraFile]) -> int:
    """The bytes the extra files ``files`` (checked by :func:`check_extra_files`) take: each
    one's length, or its source file's size."""
    return sum(
        len(content) if isinstance(content, bytes) else os.stat(os.fspath(content)).st_size
        for content in files.values()
    )


def _read_extra_file(name: str, content: ExtraFile) -> bytes:
    """``content``'s bytes: as given, or read from the path given."""
    if isinstance(content, bytes):
        return content
    try:
        return Path(os.fspath(content)).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"extra file {name!r}: {content!r} cannot be read: {exc}") from exc
