"""CheckpointManager: composes layout, formats, coordination, locks and policies into the
save / restore protocol. It owns no mechanism of its own.

The save protocol, on every rank of the group:

1. *Propose* (one all-gather): every rank checks its arguments and estimates its bytes; rank 0
   also checks the step against the disk, checks free space, and creates a fresh staging dir
   under ``root/.staging`` while holding its writer lock. Any problem is raised on every rank.
2. *Write*: every rank writes its shard into the staging dir (streamed, fsynced).
3. *Agree* (one all-gather): every rank reports its files or its error. If any rank failed,
   every rank raises, naming the failing ranks; rank 0 removes the staging dir.
4. *Commit* (rank 0, under the root's file lock): check every rank's files are visible, write
   the manifest, fsync, rename the staging dir to ``step-N``, fsync the root, swap ``last``
   (and ``best``), apply retention. One broadcast tells every rank the outcome, so every rank
   returns only once the commit is durable, with the same result.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Collection, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Literal, Union

import torch
import torch.distributed as dist

from distckpt import faults, policy, reader, resolve
from distckpt.coord import Coordinator, Outcome
from distckpt.errors import (
    CheckpointError,
    CheckpointExists,
    InsufficientSpace,
    InvalidArgument,
    InvalidStep,
    RootNotWritable,
)
from distckpt.formats import (
    FORMAT_NAMES,
    CheckpointFormat,
    ReadOptions,
    ShardContext,
    format_named,
)
from distckpt.fsutil import (
    LINK_MODES,
    ChecksumWriter,
    LinkMode,
    atomic_write_bytes,
    exchange_dirs,
    free_bytes,
    fsync_dir,
    move_to_trash,
    probe_writable,
    read_link,
    remove_link,
    remove_tree,
    rename_dir,
    swap_link,
)
from distckpt.layout import BEST, LAST, MANIFEST_NAME, RootLayout, parse_step_dir_name
from distckpt.lock import RootLock, WriterLock, find_leftovers
from distckpt.manifest import FileRecord, Manifest, check_json_metadata
from distckpt.results import Checkpoint, CheckpointInfo, SaveResult
from distckpt.snapshot import SnapshotBuffers
from distckpt.state import to_plain

logger = logging.getLogger("distckpt")

Which = Union[Literal["last", "best"], int, str, "os.PathLike[str]"]
ExtraFile = Union[str, "os.PathLike[str]", bytes]

#: Free space demanded beyond the estimated size: estimates miss headers, and a full disk
#: mid-write costs more than a refused save.
SPACE_MARGIN_RATIO = 0.05
SPACE_MARGIN_BYTES = 64 << 20


@dataclass(frozen=True)
class _Decision:
    """Whether to save at a step, taken identically on every rank."""

    step: int
    epoch: int | None
    save: bool
    by_schedule_or_force: bool = False
    preempt: bool = False


@dataclass
class _Plan:
    """One rank's view of a save between the proposal and the commit."""

    step: int
    epoch: int | None
    overwrite: bool
    started: float
    state: Any = None
    staging_dir: Path = Path()
    metrics: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    files: dict[str, ExtraFile] = field(default_factory=dict)
    #: rank 0 only: held for as long as the staging dir is being written
    writer_lock: WriterLock | None = None

    def discard_staging(self) -> None:
        """Rank 0: remove the staging dir unless it was committed, and release its lock."""
        if self.writer_lock is None:
            return
        staging = self.writer_lock.path.with_suffix("")
        if staging.exists():
            remove_tree(staging)
        self.writer_lock.release()
        self.writer_lock = None


@dataclass(frozen=True)
class _Proposal:
    """What each rank brings to a save; rank 0's also carries what it prepared on disk."""

    step: int
    estimated_bytes: int
    metrics: dict[str, float]
    staging_dir: str = ""
    free_bytes: int = 0
    existing: SaveResult | None = None


class CheckpointManager:
    """Saves and restores the checkpoints of a distributed job under one root directory.

    Every rank of the group constructs the manager and calls :meth:`save`, :meth:`restore` and
    :meth:`delete` together (they are collective); rank 0 alone commits. Works with no process
    group too (a single process).

    Args:
        root: the checkpoint root; created if missing. Must be one directory shared by all ranks
            (a shared filesystem on multi-node jobs).
        keep_last: keep the newest N checkpoints (with the other ``keep_*`` rules, a checkpoint
            stays if any rule keeps it). None with no other ``keep_*`` keeps everything.
        keep_best: keep the best K by ``monitor``; ``monitor``/``mode`` also drive ``root/best``.
        keep_every_n_steps: keep every checkpoint whose step is a multiple of N (milestones).
        every_n_steps, every_n_epochs, every_seconds: save schedules, combined with "any";
            with one set, :meth:`save` returns None when no schedule is due.
        save_on_signal: signals (e.g. ``signal.SIGTERM``) that request a preemption save at the
            next :meth:`should_save` / :meth:`save`; see :attr:`preempted`.
        async_save: :meth:`save` returns once this rank's state is copied into reusable CPU
            buffers; writing, agreement and commit run in a background thread on a process
            group of their own. :meth:`wait` returns the committed result. At most one save is
            in flight; a failed one raises on every rank at the next :meth:`wait`,
            :meth:`save` or :meth:`close`.
        format: ``"torch"`` (one file per rank, fixed world size) or ``"dcp"`` (sharded,
            reshards on restore).
        link: ``"auto"`` (symlink, or a pointer file where symlinks are refused),
            ``"symlink"`` or ``"pointer"``.
        fsync: make every commit durable against power loss (fsync files and dirs).
        group: the process group whose ranks checkpoint together (default: the world).
        timeout: seconds any collective or the commit lock may take before a hang becomes an
            error on every rank.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        monitor: str | None = None,
        mode: policy.Mode = "min",
        keep_every_n_steps: int | None = None,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        every_seconds: float | None = None,
        save_on_signal: Collection[int] = (),
        async_save: bool = False,
        format: str = "torch",
        link: LinkMode = "auto",
        fsync: bool = True,
        group: dist.ProcessGroup | None = None,
        timeout: float = 600.0,
    ) -> None:
        if format not in FORMAT_NAMES:
            raise InvalidArgument(f"format must be one of {FORMAT_NAMES}, not {format!r}")
        if link not in LINK_MODES:
            raise InvalidArgument(f"link must be one of {LINK_MODES}, not {link!r}")
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not 0 < timeout < 10**7
        ):
            raise InvalidArgument(f"timeout must be a positive number of seconds, not {timeout!r}")
        signals = _checked_signals(save_on_signal)
        self.layout = RootLayout.at(root)
        self.retention = policy.RetentionPolicy(
            keep_last=keep_last,
            keep_best=keep_best,
            monitor=monitor,
            mode=mode,
            keep_every_n_steps=keep_every_n_steps,
        )
        self.schedule = policy.SaveSchedule(
            every_n_steps=every_n_steps,
            every_n_epochs=every_n_epochs,
            every_seconds=every_seconds,
        )
        self.format = format
        self._format = format_named(format)
        self.fsync = fsync
        self.timeout = float(timeout)
        self._link_mode: LinkMode = link
        self._signals = signals
        self._previous_handlers: dict[int, Any] = {}
        self._signalled = threading.Event()
        self._pending: _Decision | None = None
        self._warned_missing_monitor = False
        self._closed = False
        self._save_count = 0
        self.preempted = False
        """True once a save requested by a signal (``save_on_signal``) has committed: the
        loop should exit so the job can be requeued and resume from ``last``."""

        self._buffers = SnapshotBuffers() if async_save else None
        self._background: ThreadPoolExecutor | None = None
        self._inflight: Future[SaveResult] | None = None
        self._before_inflight: tuple[int | None, int | None, float] = (None, None, 0.0)
        self._coord = Coordinator(group, self.timeout)
        self._background_coord = self._coord
        self._lock = RootLock(self.layout.lock_path, timeout=self.timeout / 2)
        self.rank = self._coord.rank
        self.world_size = self._coord.world_size
        self._removed_at_open: list[Path] = []
        self._last_time = time.monotonic()
        try:
            self._last_step, self._last_epoch, self._token = self._coord.decide(
                self._open_root, what="opening the checkpoint root"
            )
            outcome, cause = Outcome.of(self._check_root_visible)
            self._coord.agree(outcome, what="checking the root from every rank", cause=cause)
            if async_save:
                # Its own group: background collectives never interleave with this thread's.
                self._background_coord = self._coord.spawn()
                self._background = ThreadPoolExecutor(1, thread_name_prefix="distckpt-commit")
                atexit.register(self._finish_at_exit)
            self._install_signal_handlers()
        except BaseException:
            self.close()  # gives the groups back: ranks must take and return them alike
            raise

    # ------------------------------------------------------------------ start-up

    def _open_root(self) -> tuple[int | None, int | None, str]:
        """Rank 0: create the root, prove it writable, and repair what a crash left."""
        root = self.layout.root
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RootNotWritable(f"cannot create checkpoint root {root}: {exc}") from exc
        if not root.is_dir():
            raise RootNotWritable(f"checkpoint root {root} exists and is not a directory")
        try:
            probe_writable(root)
        except OSError as exc:
            raise RootNotWritable(f"checkpoint root {root} is not writable: {exc}") from exc
        self._settle_link_mode()
        with self._lock:
            self._removed_at_open = self._remove_leftovers()
            try:
                self._update_links()
            except (OSError, CheckpointError) as exc:  # derived state: never block a start
                logger.error("could not repair the links of %s: %s", root, exc)
        newest = reader.newest_valid(self.layout)
        # Rank 0 names this manager's staging dirs after the token: unique to this manager.
        if newest is None:
            return None, None, uuid.uuid4().hex[:12]
        return newest[1].step, newest[1].epoch, uuid.uuid4().hex[:12]

    def _settle_link_mode(self) -> None:
        """Rank 0: find out now whether the root takes symlinks, so that a link swap never
        fails after a checkpoint was renamed into place."""
        if self._link_mode == "pointer":
            return
        probe = self.layout.root / f".probe-link-{uuid.uuid4().hex}"
        try:
            os.symlink(self.layout.root.name, probe, target_is_directory=True)
        except OSError as exc:
            if self._link_mode == "symlink":
                raise RootNotWritable(
                    f"the filesystem of {self.layout.root} refuses symlinks ({exc.strerror}); "
                    "use link='auto' or link='pointer'"
                ) from exc
            logger.warning(
                "the filesystem of %s refuses symlinks (%s): last/best are pointer files",
                self.layout.root,
                exc.strerror,
            )
            self._link_mode = "pointer"
        else:
            probe.unlink()

    def _check_root_visible(self) -> None:
        if not self.layout.root.is_dir():
            raise RootNotWritable(
                f"checkpoint root {self.layout.root} does not exist on rank {self.rank}: the root "
                "must be a directory shared by every rank (a shared filesystem across nodes)"
            )
        if not os.access(self.layout.root, os.W_OK | os.X_OK):
            raise RootNotWritable(f"checkpoint root {self.layout.root} is not writable here")

    def _remove_leftovers(self) -> list[Path]:
        """Under the lock: staging dirs whose writer is dead, orphaned lock files, and the
        trash. A live writer's staging is never touched. Returns what it removed."""
        removed: list[Path] = []
        for leftover in find_leftovers(self.layout):
            if leftover.writer_alive:
                logger.info("leaving %s alone: its writer is alive", leftover.path)
            elif leftover.kind == "lock":
                leftover.path.unlink(missing_ok=True)
            else:
                if leftover.kind == "staging":
                    logger.info("removing %s, left by a writer that died", leftover.path)
                if self._remove_quietly(leftover.path):
                    if leftover.kind == "staging":
                        WriterLock(leftover.path).release()  # removes its lock file
                    removed.append(leftover.path)
        return removed

    def _remove_quietly(self, leftover: Path) -> bool:
        """Remove a leftover; one that cannot be removed is reported, not raised, so it can
        never stop a job from starting (the next start tries again)."""
        try:
            faults.hit("during_staging_cleanup", self.rank)
            remove_tree(leftover)
        except Exception as exc:
            logger.warning(
                "could not remove leftover %s (tried again at next start): %s", leftover, exc
            )
            return False
        return True

    # ------------------------------------------------------------------ links

    def _swap(self, name: str, target: Path) -> None:
        if read_link(self.layout.link_path(name)) == target.name:
            return
        kind = swap_link(
            self.layout.link_path(name),
            target.name,
            mode=self._link_mode,
            trash_root=self.layout.trash_root,
            fsync=self.fsync,
        )
        if kind == "pointer":
            self._link_mode = "pointer"  # settle "auto" once, instead of failing every time

    def _update_links(self) -> list[policy.CheckpointRecord]:
        """Under the lock: point ``last`` at the newest committed checkpoint and ``best`` at the
        best, or remove a link with nothing to point at. Returns the records it read."""
        valid = list(reader.iter_valid(self.layout, newest_first=False))
        records = [policy.CheckpointRecord(m.step, m.epoch, m.metrics) for _, m in valid]
        paths = {m.step: path for path, m in valid}
        faults.hit("during_link_swap", self.rank)
        if valid:
            self._swap(LAST, valid[-1][0])
        else:
            self._remove_link_if_stale(LAST)
        best = policy.best_step(records, self.retention.monitor, self.retention.mode)
        if best is not None:
            self._swap(BEST, paths[best])
        else:
            self._remove_link_if_stale(BEST)
        return records

    def _remove_link_if_stale(self, name: str) -> None:
        link = self.layout.link_path(name)
        target, _ = reader.link_problem(self.layout, name)
        if (link.is_symlink() or link.is_file()) and target is None:
            logger.info("removing %s: it names no committed checkpoint", link)
            remove_link(link, fsync=self.fsync)

    # ------------------------------------------------------------------ schedules

    def should_save(self, step: int, *, epoch: int | None = None) -> bool:
        """Whether a schedule (or a preemption signal) says to save at ``step``.

        Collective cost: none when only step/epoch schedules are set (every rank computes the
        same answer from the same arguments); one small all-gather when ``every_seconds`` or
        ``save_on_signal`` is set, and then every rank must call it. :meth:`save` reuses this
        decision for the same step instead of deciding again.
        """
        self._check_open()
        self._pending = self._decide(step, epoch, force=False)
        return self._pending.save

    def _decide(self, step: int, epoch: int | None, *, force: bool) -> _Decision:
        """Whether to save now, the same on every rank. A save is *explicit* when no schedule
        is set and neither ``force`` nor a signal asked for it: only then does saving an
        already committed step raise instead of returning that checkpoint."""
        pending, self._pending = self._pending, None
        if pending is not None and pending.step == step and pending.epoch == epoch:
            return replace(
                pending,
                save=pending.save or force,
                by_schedule_or_force=pending.by_schedule_or_force or force,
            )
        if not self.schedule.is_set and not self._signals:
            return _Decision(step, epoch, save=True, by_schedule_or_force=force)
        due = not self.schedule.is_set or self.schedule.due_by_counters(
            step, epoch, last_step=self._last_step, last_epoch=self._last_epoch
        )
        preempt = False
        if self.schedule.needs_agreement or self._signals:
            time_due = self.schedule.every_seconds is not None and self.schedule.due_by_time(
                time.monotonic(), last_time=self._last_time
            )
            votes = self._coord.all_gather(
                (time_due, self._signalled.is_set()), what="deciding whether to save"
            )
            # Rank 0's clock decides time-based saves (clocks differ between nodes); any
            # signalled rank decides preemption (the signal may reach only some).
            due = due or votes[0][0]
            preempt = any(signalled for _, signalled in votes)
        return _Decision(
            step,
            epoch,
            save=due or force or preempt,
            by_schedule_or_force=self.schedule.is_set or force or preempt,
            preempt=preempt,
        )

    # ------------------------------------------------------------------ save

    def save(
        self,
        step: int,
        state: Any,
        *,
        epoch: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        files: Mapping[str, ExtraFile] | None = None,
        force: bool = False,
        overwrite: bool = False,
    ) -> SaveResult | None:
        """Save this rank's ``state`` as part of the checkpoint for ``step``; collective.

        Returns the same :class:`SaveResult` on every rank once the checkpoint is durable, or
        None on every rank when a schedule is set and says not to save (``force=True`` saves
        anyway). Any rank's failure raises on every rank and leaves the root as it was.

        Args:
            step: the training step, usually ``StepTracker.step``; steps only grow in a root.
            state: a nested dict/list of tensors, plain values and objects with
                ``state_dict()`` (saved through it).
            epoch, metrics, metadata: stored in the manifest; metrics as floats (tensors and
                NumPy scalars converted), metadata as plain JSON. Rank 0's values are stored.
            files: extra files stored in the checkpoint dir under the given names (content as
                bytes or a path to copy), written by rank 0.
            force: save even if no schedule is due.
            overwrite: replace an already committed checkpoint of this step.
        """
        self._check_open()
        decision = self._decide(step, epoch, force=force)
        if not decision.save:
            return None
        self.wait()  # at most one save in flight; raises a failed one's error here
        self._save_count += 1
        plan = self._propose(decision, state, metrics, metadata, files, overwrite)
        if isinstance(plan, SaveResult):  # committed already: the schedule counts from it
            self._saved(plan.step, plan.epoch)
            return plan
        if self._background is None:
            result = self._write_and_commit(plan, self._coord)
            self._saved(plan.step, plan.epoch)
        else:
            # Counted at once, so the next steps do not save again while this one is in
            # flight; wait() restores the previous counters if it fails.
            self._before_inflight = (self._last_step, self._last_epoch, self._last_time)
            self._saved(plan.step, plan.epoch)
            self._inflight = self._background.submit(
                self._write_and_commit, plan, self._background_coord
            )
            result = SaveResult(
                plan.step, self.layout.step_dir(plan.step), plan.epoch, plan.metrics, done=False
            )
            if decision.preempt:
                result = self.wait() or result  # a preemption save must be durable first
        if decision.preempt:
            self._signalled.clear()
            self.preempted = True
            if self.is_coordinator:
                logger.warning("preemption save of step %d committed; stop and requeue", step)
        return result

    def _saved(self, step: int, epoch: int | None) -> None:
        """The schedule counts from a save that committed (or is in flight)."""
        self._last_step, self._last_epoch = step, epoch
        self._last_time = time.monotonic()

    def _propose(
        self,
        decision: _Decision,
        state: Any,
        metrics: Mapping[str, Any] | None,
        metadata: Mapping[str, Any] | None,
        files: Mapping[str, ExtraFile] | None,
        overwrite: bool,
    ) -> _Plan | SaveResult:
        """Steps 1 of the protocol, in the caller's thread: check everything that can be checked
        before writing, on every rank alike, and have rank 0 prepare the staging dir. Returns
        the plan, or the committed result when the step is already saved (and may be)."""
        step = decision.step
        plan = _Plan(step=step, epoch=decision.epoch, overwrite=overwrite, started=time.monotonic())

        def propose() -> _Proposal:
            _check_step(step)
            plain = to_plain(state)
            self._format.check_state(plain)
            # Async: copy now, so training may change its tensors as soon as save returns.
            plan.state = self._buffers.snapshot(plain) if self._buffers is not None else plain
            proposal = _Proposal(
                step=step,
                estimated_bytes=self._format.estimate_bytes(plan.state),
                metrics=policy.normalize_metrics(metrics),
            )
            if not self.is_coordinator:
                return proposal
            plan.metadata = check_json_metadata(metadata)
            plan.files = _check_extra_files(files, self._format)
            existing = self._check_step_on_disk(step, overwrite, decision)
            if existing is not None:
                return replace(proposal, existing=existing)
            staging = self.layout.staging_dir(step, f"{self._token}-{self._save_count}")
            # Under the root lock, so that a cleanup (another job's start, `distckpt gc`) never
            # sees the lock file before it is locked, or the dir before its lock exists.
            with self._lock:
                self.layout.staging_root.mkdir(exist_ok=True)
                plan.writer_lock = WriterLock(staging)
                plan.writer_lock.acquire()
                staging.mkdir()
            return replace(
                proposal, staging_dir=os.fspath(staging), free_bytes=free_bytes(self.layout.root)
            )

        try:
            outcome, cause = Outcome.of(propose)
            proposals: list[_Proposal] = self._coord.agree(
                outcome, what=f"preparing the save of step {step}", cause=cause
            )
            chosen = proposals[0]  # rank 0's: the only one that looked at the disk
            steps = sorted({p.step for p in proposals})
            if len(steps) > 1:
                raise InvalidStep(
                    f"the ranks passed different steps to save(): {steps}; every rank must "
                    "save the same step"
                )
            if chosen.existing is not None:
                logger.info("step %d is already committed; not saving it again", step)
                return chosen.existing
            # Every rank computes this from the same gathered numbers, so all agree.
            needed = sum(p.estimated_bytes for p in proposals)
            margin = int(needed * SPACE_MARGIN_RATIO) + SPACE_MARGIN_BYTES
            if needed + margin > chosen.free_bytes:
                raise InsufficientSpace(
                    f"saving step {step} needs about {_mib(needed)} (+{_mib(margin)} margin) but "
                    f"{self.layout.root} has {_mib(chosen.free_bytes)} free"
                )
        except BaseException:
            plan.discard_staging()
            raise
        plan.staging_dir = Path(chosen.staging_dir)
        plan.metrics = chosen.metrics
        if self._buffers is not None:
            # Device-to-host copies into pinned buffers are asynchronous: they must land before
            # save returns and training changes the tensors. Here, on the caller's device.
            self._buffers.synchronize()
        return plan

    def _write_and_commit(self, plan: _Plan, coord: Coordinator) -> SaveResult:
        """Steps 2-4 of the protocol: write, agree, commit. Runs in the caller's thread, or in
        the background thread with its own ``coord`` for an async save."""
        step = plan.step
        try:

            def write() -> dict[str, FileRecord]:
                ctx = ShardContext(coord.rank, coord.world_size, self.fsync, coord.group)
                records = dict(self._format.write(plan.state, plan.staging_dir, ctx))
                if plan.files:
                    records.update(
                        _write_extra_files(plan.staging_dir, plan.files, fsync=self.fsync)
                    )
                faults.hit("after_shard_write", coord.rank)
                return records

            outcome, cause = Outcome.of(write)
            plan.state = None  # the snapshot's job is done; let its memory go
            faults.hit("before_agreement", coord.rank)
            written = coord.agree(outcome, what=f"writing step {step}", cause=cause)
            faults.hit("after_agreement", coord.rank)

            def commit() -> SaveResult:
                manifest = Manifest(
                    step=step,
                    world_size=coord.world_size,
                    format=self.format,
                    files={name: r for records in written for name, r in records.items()},
                    epoch=plan.epoch,
                    metrics=plan.metrics,
                    metadata=plan.metadata,
                    torch_version=torch.__version__,
                )
                result = self._commit(plan.staging_dir, manifest, plan.overwrite)
                elapsed = time.monotonic() - plan.started
                logger.info(
                    "committed %s: %s in %.2f s (%s/s)",
                    result.path.name,
                    _mib(manifest.total_bytes),
                    elapsed,
                    _mib(manifest.total_bytes / elapsed if elapsed > 0 else 0),
                )
                return result

            return coord.decide(commit, what=f"committing step {step}")
        finally:
            plan.discard_staging()

    def wait(self) -> SaveResult | None:
        """Wait for the save in flight (``async_save=True``) to be committed and durable, and
        return its result, or raise its error — the same on every rank. None if no save is in
        flight. Not collective by itself, but every rank must call it (the background commit
        needs every rank)."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return None
        try:
            return inflight.result()
        except BaseException:
            self._last_step, self._last_epoch, self._last_time = self._before_inflight
            raise

    @property
    def save_in_flight(self) -> bool:
        """Whether an async save's background write and commit are still running on this rank
        (not collective; :meth:`wait` blocks until it is done and returns its result)."""
        return self._inflight is not None and not self._inflight.done()

    @property
    def is_coordinator(self) -> bool:
        """Whether this process is rank 0 of the group, the one that commits."""
        return self._coord.is_coordinator

    def _check_step_on_disk(
        self, step: int, overwrite: bool, decision: _Decision
    ) -> SaveResult | None:
        """Rank 0: refuse a step that would break monotonic order; a forced or scheduled save
        of an already committed step returns that checkpoint instead of saving again."""
        committed = self.layout.committed_steps()
        if step in committed and not overwrite:
            if decision.by_schedule_or_force:
                directory, manifest = reader.resolve_step(self.layout, step)
                return SaveResult(step, directory, manifest.epoch, dict(manifest.metrics))
            raise CheckpointExists(
                f"step {step} is already committed at {self.layout.step_dir(step)}; pass "
                "overwrite=True to replace it"
            )
        if committed and step < committed[-1]:
            raise InvalidStep(
                f"step {step} is lower than the newest committed step {committed[-1]} in "
                f"{self.layout.root}; steps only grow within a root: delete the newer "
                "checkpoints (manager.delete(step)) or save into a new root"
            )
        return None

    def _commit(self, staging: Path, manifest: Manifest, overwrite: bool) -> SaveResult:
        """Rank 0: publish the staging dir as ``step-N`` and update links and retention."""
        final = self.layout.step_dir(manifest.step)
        with self._lock:
            for name, record in manifest.files.items():
                try:
                    size = (staging / name).stat().st_size
                except FileNotFoundError:
                    raise CheckpointError(
                        f"rank {record.rank}'s file {name} is not visible from rank 0 in "
                        f"{staging}: the root must be on a filesystem shared by every rank"
                    ) from None
                if size != record.size:
                    raise CheckpointError(
                        f"{staging / name} has {size} bytes on rank 0 but rank {record.rank} "
                        f"wrote {record.size}"
                    )
            # Re-checked under the lock: another job may have committed since the proposal.
            self._check_step_on_disk(
                manifest.step, overwrite, _Decision(manifest.step, manifest.epoch, True)
            )
            faults.hit("before_manifest", self.rank)
            atomic_write_bytes(staging / MANIFEST_NAME, manifest.to_json(), fsync=self.fsync)
            faults.hit("after_manifest", self.rank)
            faults.hit("before_rename", self.rank)
            if final.exists() and overwrite:
                self._replace_committed(staging, final)
            else:
                rename_dir(staging, final, fsync=self.fsync)
            # Committed: the dir is the truth from here on. A failure to update the derived
            # links or to apply retention must not report the save as failed; both are redone
            # at the next commit or manager start.
            try:
                faults.hit("after_rename", self.rank)
                self._apply_retention(self._update_links())
            except Exception as exc:
                logger.error(
                    "committed %s, but updating links or retention failed (redone at the next "
                    "commit or start): %s",
                    final.name,
                    exc,
                )
        self._empty_trash()
        missing = policy.missing_monitor(manifest.metrics, self.retention.monitor)
        if missing and not self._warned_missing_monitor:
            logger.warning(
                "metrics %s lack the monitored %r: such checkpoints are never best",
                sorted(manifest.metrics),
                self.retention.monitor,
            )
            self._warned_missing_monitor = True
        return SaveResult(manifest.step, final, manifest.epoch, dict(manifest.metrics))

    def _replace_committed(self, staging: Path, final: Path) -> None:
        """``overwrite=True``: put the new checkpoint under ``final`` in place of the old one.
        Where the filesystem can swap two names atomically, ``final`` always holds a whole
        checkpoint, old or new; elsewhere there is a window between two renames in which it
        holds neither (a crash there leaves the old one in the trash)."""
        if self.fsync:
            fsync_dir(staging)
        if exchange_dirs(staging, final, fsync=self.fsync):
            return  # the old one is now the staging dir, removed after the commit as usual
        move_to_trash(final, self.layout.trash_root, fsync=self.fsync)
        rename_dir(staging, final, fsync=self.fsync)

    def _apply_retention(self, records: list[policy.CheckpointRecord]) -> list[int]:
        """Under the lock: remove what the retention rules do not keep; returns those steps."""
        if self.retention.keeps_everything:
            return []
        protected = {
            step
            for name in (LAST, BEST)
            if (target := read_link(self.layout.link_path(name))) is not None
            and (step := parse_step_dir_name(target)) is not None
        }
        doomed = policy.steps_to_remove(records, self.retention, protected=protected)
        for step in doomed:
            faults.hit("during_retention", self.rank)
            logger.info("retention: removing %s", self.layout.step_dir(step).name)
            # Only renamed here, under the lock; the bytes are deleted after it is released
            # (_empty_trash), so a large delete never holds up other writers.
            move_to_trash(
                reader.committed_dir(self.layout, step), self.layout.trash_root, fsync=self.fsync
            )
        return doomed

    def _empty_trash(self) -> None:
        """Delete what retention and deletes moved into the trash; outside the lock."""
        if self.layout.trash_root.is_dir():
            for entry in self.layout.trash_root.iterdir():
                self._remove_quietly(entry)

    # ------------------------------------------------------------------ restore

    def restore(
        self,
        which: Which = "last",
        *,
        state: Any = None,
        map_location: Any = "cpu",
        missing_ok: bool = False,
        strict: bool = True,
        allow_pickle: bool = False,
        mmap: bool = False,
        verify: bool = False,
    ) -> Checkpoint | None:
        """Load a checkpoint on every rank; collective.

        ``which`` is ``"last"`` (the newest committed checkpoint), ``"best"``, a step, or a path.
        Rank 0 resolves it and every rank loads that same checkpoint. Passing ``state=`` (the
        same structure that was saved) loads it in place; the result's ``.state`` holds the
        loaded values. With ``missing_ok=True`` returns None on every rank when there is no
        checkpoint yet (the auto-resume case). Any rank's failure raises on every rank.

        ``strict=False`` loads what matches ``state`` and reports the rest in
        ``missing_keys`` / ``unexpected_keys``. ``allow_pickle=True`` unpickles arbitrary
        objects: only for checkpoints you trust. ``mmap=True`` maps tensor data from disk
        instead of reading it all. ``verify=True`` checks every file's checksum before
        loading (sizes are always checked) and, for ``"last"``/``"best"``, falls back past a
        corrupt checkpoint with a warning.
        """
        self._check_open()
        self.wait()
        loaded = reader.restore_on_ranks(
            self._coord,
            which,
            layout=self.layout,
            monitor=self.retention.monitor,
            mode=self.retention.mode,
            state=state,
            options=ReadOptions(map_location=map_location, allow_pickle=allow_pickle, mmap=mmap),
            strict=strict,
            missing_ok=missing_ok,
            verify=verify,
        )
        if loaded is not None:
            self._last_step, self._last_epoch = loaded.step, loaded.epoch
            self._last_time = time.monotonic()
        return loaded

    # ------------------------------------------------------------------ queries

    def steps(self) -> list[int]:
        """Committed steps, ascending, read fresh from disk (not collective)."""
        return self.layout.committed_steps()

    def latest_step(self) -> int | None:
        """The newest committed step that passes its manifest check: the one
        ``restore("last")`` loads (not collective)."""
        newest = resolve.newest_valid(self.layout)
        return newest[1].step if newest else None

    def best_step(self) -> int | None:
        """The best committed step by ``monitor`` (None without one); not collective."""
        best = resolve.best_valid(self.layout, self.retention.monitor, self.retention.mode)
        return best[1].step if best else None

    def checkpoints(self) -> list[CheckpointInfo]:
        """Every committed checkpoint, oldest first, from manifests only (not collective)."""
        return resolve.list_checkpoints(self.layout)

    # ------------------------------------------------------------------ delete / close

    def delete(self, step: int) -> None:
        """Delete the checkpoint of ``step``; collective. Links that pointed at it are moved to
        what remains (or removed). Raises :class:`CheckpointNotFound` if it does not exist."""
        self._check_open()
        _check_step(step)
        self.wait()

        def remove() -> int | None:
            with self._lock:
                directory = reader.committed_dir(self.layout, step)
                move_to_trash(directory, self.layout.trash_root, fsync=self.fsync)
                records = self._update_links()
            self._empty_trash()
            return records[-1].step if records else None

        latest = self._coord.decide(remove, what=f"deleting step {step}")
        if self._last_step == step:
            self._last_step = latest  # rank 0's view, so every rank's schedule agrees

    def prune(self) -> list[int]:
        """Apply the retention rules now (as after every commit), under the lock; collective.
        Returns the steps removed. Links are repaired first, so their targets stay."""
        self._check_open()
        self.wait()

        def apply() -> list[int]:
            with self._lock:
                removed = self._apply_retention(self._update_links())
            self._empty_trash()
            return removed

        return self._coord.decide(apply, what="pruning")

    def gc(self) -> list[Path]:
        """Remove leftovers of dead writers (staging dirs whose writer lock is free) and the
        trash, under the lock; collective. A live writer's staging is never touched. Returns
        what was removed. (A new manager does this on start, too.)"""
        self._check_open()
        self.wait()

        def collect() -> list[Path]:
            with self._lock:
                removed = self._removed_at_open + self._remove_leftovers()
            self._removed_at_open = []  # reported once
            return removed

        return self._coord.decide(collect, what="collecting leftovers")

    def close(self) -> None:
        """Finish a save in flight (raising its error, on every rank), restore signal
        handlers and release the manager's process groups. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            try:
                if self._background is not None:
                    self._background.shutdown(wait=True)
                    atexit.unregister(self._finish_at_exit)
                    self._background_coord.close()
                for signum, handler in self._previous_handlers.items():
                    signal.signal(signum, handler)
                self._previous_handlers.clear()
            finally:
                self._coord.close()

    def _finish_at_exit(self) -> None:
        """At interpreter exit with a save in flight: finish it, or say loudly that it failed
        (the background collectives' timeout bounds the wait)."""
        try:
            result = self.wait()
            if result is not None:
                logger.info("finished the save of step %d in flight at exit", result.step)
        except Exception as exc:
            logger.error("the checkpoint save in flight at exit failed: %s", exc)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError("this CheckpointManager is closed")

    def _install_signal_handlers(self) -> None:
        if not self._signals:
            return

        def on_signal(signum: int, frame: FrameType | None) -> None:
            # Only a flag: the save itself must happen at a point where all ranks take part.
            self._signalled.set()

        for signum in self._signals:
            self._previous_handlers[signum] = signal.signal(signum, on_signal)

    def __repr__(self) -> str:
        return (
            f"CheckpointManager({os.fspath(self.layout.root)!r}, format={self.format!r}, "
            f"rank={self.rank}/{self.world_size})"
        )


def _checked_signals(signals: object) -> tuple[int, ...]:
    """``save_on_signal`` as signal numbers, refused before anything is set up."""
    if isinstance(signals, int) or not isinstance(signals, Collection):
        raise InvalidArgument(f"save_on_signal must be a tuple of signals, not {signals!r}")
    checked = []
    for signum in signals:
        try:
            checked.append(int(signal.Signals(signum)))
        except (ValueError, TypeError):
            raise InvalidArgument(f"save_on_signal: {signum!r} is not a signal") from None
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            raise InvalidArgument(f"save_on_signal: {signal.Signals(signum).name} cannot be caught")
    if checked and threading.current_thread() is not threading.main_thread():
        raise InvalidArgument("save_on_signal needs the manager created in the main thread")
    return tuple(checked)


def _check_step(step: object) -> None:
    if isinstance(step, bool) or not isinstance(step, int):
        raise InvalidStep(f"step must be an int, not {type(step).__name__} ({step!r})")
    if step < 0:
        raise InvalidStep(f"step must not be negative, got {step}")


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _check_extra_files(
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


def _write_extra_files(
    directory: Path, files: Mapping[str, ExtraFile], *, fsync: bool
) -> dict[str, FileRecord]:
    records = {}
    for name, content in files.items():
        with ChecksumWriter(directory / name, fsync=fsync) as writer:
            if isinstance(content, bytes):
                writer.write(content)
            else:
                with open(content, "rb") as source:
                    while chunk := source.read(8 << 20):
                        writer.write(chunk)
        records[name] = FileRecord(size=writer.size, checksum=writer.checksum, rank=0)
    return records
