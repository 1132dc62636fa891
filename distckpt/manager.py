"""CheckpointManager: the public face of distckpt, composing the pieces below it.

It holds no mechanism of its own: a save is :mod:`distckpt.saving`, over the protocol of
:mod:`distckpt.proposal` (propose) and :mod:`distckpt.protocol` (write → agree → commit), on
frozen values; whether to save, and what the schedule counts from, is :mod:`distckpt.decisions`;
everything done to the root is the :class:`~distckpt.storage.RootStore`, every collective goes
through the :class:`~distckpt.coord.Coordinator`, restores through :mod:`distckpt.reader`, and
deleting, pruning and collecting leftovers are :mod:`distckpt.upkeep`'s. What it owns is the
lifecycle: the process groups, the store, the signal handlers and the async save's background
thread. See ``docs/architecture.md``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping
from types import TracebackType
from typing import Any, Literal, TypeVar, Union

import torch.distributed as dist

from distckpt import closing, policy, proposal, reader, starting
from distckpt.arguments import check_wait
from distckpt.background import DEFAULT_BACKGROUND_NICE, BackgroundSaves, check_background_nice
from distckpt.coord import Coordinator
from distckpt.coord_health import check_timeout
from distckpt.decisions import SaveDecider, SignalFlag
from distckpt.errors import ManagerClosed
from distckpt.formats import ReadOptions, format_named
from distckpt.formats.base import check_optional_keys
from distckpt.fsutil import LinkMode
from distckpt.launcher import LauncherWatch, check_process_group
from distckpt.layout import RootLayout
from distckpt.queries import RootQueries
from distckpt.results import Checkpoint, CheckpointLocation, SaveResult
from distckpt.saving import Saver
from distckpt.snapshot import SnapshotBuffers
from distckpt.storage import ExtraFile, open_store
from distckpt.tidying import BackgroundTidy, close_wait_seconds
from distckpt.upkeep import RootUpkeep

Which = Union[Literal["last", "best"], int, str, "os.PathLike[str]"]
T = TypeVar("T")
__all__ = ["CheckpointManager", "ExtraFile", "Which"]


class CheckpointManager(RootQueries, RootUpkeep):
    """Saves and restores the checkpoints of a distributed job under one root: a directory, or
    an ``s3://BUCKET/PREFIX`` URL of an S3-compatible object store.

    Every rank of the group constructs the manager (the constructor is collective) and calls
    :meth:`save`, :meth:`restore`, :meth:`delete`, :meth:`prune` and :meth:`gc` together (they
    are collective), and :meth:`should_save` too when a time or signal schedule is set (see
    there); rank 0 alone commits. With no process group it runs as a single process, unless
    ``WORLD_SIZE`` > 1 says otherwise: it then raises :class:`~distckpt.CoordinationError`
    (call ``init_process_group()`` first), but for a ``read_only`` manager, which runs as one
    process of one rank (rank 0 of 1): it restores a one-rank or ``"dcp"`` checkpoint, and a
    ``"torch"`` checkpoint of several ranks raises :class:`~distckpt.WorldSizeMismatch` (a tool
    reading one rank's part in each process calls :func:`~distckpt.load_checkpoint` with
    ``rank=``).

    Args:
        root: the checkpoint root; created if missing. Must be one directory shared by all ranks
            (a shared filesystem on multi-node jobs), or an ``s3://BUCKET/PREFIX`` URL of an
            existing bucket (``docs/object-stores.md``; ``pip install distckpt[s3]``). Never
            inside another root under one of its own names (``last``, a step dir, ``.staging``):
            refused with :class:`~distckpt.InvalidArgument` before anything is written.
        storage_options: an ``s3://`` root's client options, fsspec-style (``endpoint_url``,
            ``key``, ``secret``, ``region``, ...: :class:`~distckpt.objstore.ObjectStore`);
            the rest from the ``AWS_*`` environment variables and config.
        keep_last: keep the newest N checkpoints (with the other ``keep_*`` rules, a checkpoint
            stays if any rule keeps it). None with no other ``keep_*`` keeps everything.
        keep_best: keep the best K by ``monitor``; ``monitor``/``mode`` also drive ``root/best``.
        monitor: a non-empty metric name (a key of :meth:`save`'s ``metrics``) ranking checkpoints
            for ``root/best`` (never removed) and ``keep_best``; one without a finite value is never
            best. None ranks nothing (``keep_best``, ``keep_unranked`` refused; ``root/best`` stays
            until it names no checkpoint). Not recorded in the root: give every job on it the same.
        mode: ``"min"`` (default: lowest best, as a loss) or ``"max"`` (as an accuracy); ties
            go to the earlier step; anything else is refused. Means nothing without ``monitor``.
        keep_every_n_steps: keep milestones: for each multiple of N from N on, the first
            checkpoint at or after it, plus step 0 (the save schedules' crossing rule: with
            saves every 3 steps and N=1000, step 1002 stands for 1000).
        keep_every_n_seconds: keep a sparse history: a checkpoint created at least S seconds
            after the last one kept this way (by the manifests' creation times).
        keep_unranked: with ``monitor``, keep checkpoints saved without a finite value of it
            (default: only the other rules keep them).
        every_n_steps, every_n_epochs, every_seconds, save_on_steps: save schedules, combined
            with "any"; with one set, :meth:`save` returns None when no schedule is due.
            ``every_seconds`` counts from the last save; at the start, from the root's newest
            checkpoint's manifest creation time by rank 0's clock (a later one counts as now;
            none: from the start), so a job killed more often than the interval still saves;
            due only at a step past the last one saved or restored (that step is saved).
        min_seconds_between_saves: skip (return None from) a scheduled or plain save while less
            than S seconds passed since the previous save began, or while an async save is in
            flight; forced and preemption saves are never skipped. Rank 0's clock decides.
        Every count and seconds option takes None for "off"; 0 is refused.
        save_on_signal: signals (e.g. ``signal.SIGTERM``) that request a preemption save at the
            next :meth:`should_save` / :meth:`save` at a new step; see :attr:`preempted`.
        async_save: :meth:`save` returns once this rank's state is copied into reusable CPU
            buffers; writing, agreement and commit run in a background thread on a process group
            of their own, and :meth:`wait` returns the committed result. At most one save is in
            flight; a failed one raises on every rank at the next call that waits for it.
        background_nice: with ``async_save``, how much to raise the background thread's nice
            value over that of the thread making the first async save (capped at 19; Linux):
            training steps win a core over the save's writing and checksums, which get the time
            training leaves idle. 0 or None leaves it alone; ignored where threads have no nice
            value of their own. Only scheduling changes, never what is saved.
        format: ``"torch"`` (one file per rank, fixed world size) or ``"dcp"`` (sharded,
            reshards on restore).
        link: ``"auto"`` (symlink, or a pointer file where symlinks are refused),
            ``"symlink"`` or ``"pointer"``. An ``s3://`` root always has pointer objects.
        fsync: make every commit durable against power loss (fsync files and dirs). Means
            nothing for an ``s3://`` root: a completed upload is durable.
        writer_threads: with ``format="torch"``, threads writing each rank's tensor bytes
            (``pwrite`` at offsets known beforehand, each checksumming its chunks; the same file
            byte for byte). 1 (the default) appends them in one thread: on the 2-core machine
            measured (docs/benchmark.md) more were no faster; try more on NVMe or a parallel
            filesystem. An int of at least 1; the "dcp" format refuses more than 1.
        direct_io: with ``format="torch"``, write an async save's rank files with ``O_DIRECT``
            where the filesystem accepts it, straight from the snapshot's page-aligned buffers:
            far less CPU for the background writer, and the page cache left to training. A sync
            save's rank file (torch's memory is not page-aligned), a file of small tensors only,
            files written by several ``writer_threads`` and an object-store root's files stay
            buffered; False buffers every write. Durability is the same (fsync when ``fsync``).
        group: the process group whose ranks checkpoint together (default: the world).
        timeout: seconds any collective or the commit lock may take before a hang becomes an
            error on every rank; from 0.1 (a shorter one leaves the ranks no time to connect)
            to below 10**7.
        space_margin: free space a save demands beyond its estimated size, as a fraction of
            that size and at least 1 MiB (0: no margin); a save that does not fit raises
            :class:`InsufficientSpace` before writing. Where the filesystem reports no size,
            free space is unknown and not checked (with a warning).
        read_only: never write to the root (a read-only mount, or a root another job owns):
            no writability probe, no lock file, no cleanup or link repair, no damaged checkpoint
            set aside (see :meth:`restore`). :meth:`restore` and the queries work; :meth:`save`,
            :meth:`delete`, :meth:`prune` and :meth:`gc` raise :class:`ReadOnlyRoot`. The root
            must exist.
        wait_for_root: seconds to wait for another job that holds the root to end; 0 (the
            default) raises :class:`~distckpt.RootInUse`, naming that job, on every rank at
            once. A start that waits says so once, at INFO on the ``distckpt`` logger, as it
            finds the root held (the root, the holder's :meth:`~distckpt.lease.LeaseHolder.describe`
            and ``wait_for_root``), and once more when it got the root (how long it waited).
            One writing job per root: rank 0 holds the root's lease
            (:mod:`distckpt.lease`) until :meth:`close` (or the process ends); a job that lost
            it fails every later save with :class:`~distckpt.LeaseLost`, and under torchrun a
            rank whose launcher died fails them with :class:`~distckpt.LauncherGone`.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        storage_options: Mapping[str, Any] | None = None,
        keep_last: int | None = None,
        keep_best: int | None = None,
        monitor: str | None = None,
        mode: policy.Mode = "min",
        keep_every_n_steps: int | None = None,
        keep_every_n_seconds: float | None = None,
        keep_unranked: bool = False,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        every_seconds: float | None = None,
        save_on_steps: Collection[int] = (),
        min_seconds_between_saves: float | None = None,
        save_on_signal: Collection[int] = (),
        async_save: bool = False,
        background_nice: int | None = DEFAULT_BACKGROUND_NICE,
        format: str = "torch",
        link: LinkMode = "auto",
        fsync: bool = True,
        writer_threads: int = 1,
        direct_io: bool = True,
        group: dist.ProcessGroup | None = None,
        timeout: float = 600.0,
        space_margin: float = proposal.SPACE_MARGIN_RATIO,
        read_only: bool = False,
        wait_for_root: float = 0.0,
    ) -> None:
        self._format = format_named(format, writer_threads=writer_threads, direct_io=direct_io)
        self.timeout = check_timeout(timeout)
        self.space_margin = proposal.check_space_margin(space_margin)
        wait_for_root = check_wait(wait_for_root)
        background_nice = check_background_nice(background_nice)
        check_process_group(read_only=read_only)  # before anything the ranks must do together
        # Made now, while the launcher that started this process is certainly its parent.
        self._launcher = LauncherWatch.for_this_process()
        self._signals = SignalFlag(save_on_signal)
        self.storage_options = dict(storage_options or {})
        self.retention = policy.RetentionPolicy(
            keep_last=keep_last,
            keep_best=keep_best,
            monitor=monitor,
            mode=mode,
            keep_every_n_steps=keep_every_n_steps,
            keep_every_n_seconds=keep_every_n_seconds,
            keep_unranked=keep_unranked,
        )
        self._store = open_store(
            root,
            retention=self.retention,
            link=link,
            fsync=fsync,
            lock_timeout=self.timeout / 2,
            read_only=read_only,
            storage_options=self.storage_options,
        )
        self._view = self._store.view  # readers share the store's client
        #: rank 0's removals after an outcome, in a thread of their own (no other rank waits)
        self._tidying = BackgroundTidy(self._store.tidy)
        #: the paths of a local root (None for an ``s3://`` root)
        self.layout: RootLayout | None = self._view.layout
        #: the root: an absolute path, or the ``s3://`` URL
        self.root: CheckpointLocation = self._view.root
        self.schedule = policy.SaveSchedule(
            every_n_steps=every_n_steps,
            every_n_epochs=every_n_epochs,
            every_seconds=every_seconds,
            save_on_steps=save_on_steps,
            min_seconds_between_saves=min_seconds_between_saves,
        )
        self.format, self.fsync, self.read_only = format, fsync, read_only
        self._closed = False
        #: whether close() let go of everything (False after an interrupted or failed close)
        self._released = False
        self._background: BackgroundSaves | None = None
        self._saver: Saver | None = None  # once the root is open
        self._coord = Coordinator(group, self.timeout)
        self.rank = self._coord.rank
        self._decider = SaveDecider(self.schedule, self._signals, self._coord)
        self.world_size = self._coord.world_size
        try:
            token = starting.open_root(
                self._coord, self._store, self._decider, wait_for_root=wait_for_root
            )
            self._view = self._store.view  # once open, spelled as the disk lists it (exFAT)
            self.layout, self.root = self._view.layout, self._view.root
            if async_save:
                # Its own group: background collectives never interleave with this thread's.
                self._background = BackgroundSaves(self._coord, nice=background_nice)
                self._background.owned_by(self)  # dropped unclosed, its idle thread ends
            self._saver = Saver(
                coord=self._coord,
                store=self._store,
                fmt=self._format,
                decider=self._decider,
                token=token,
                space_margin=self.space_margin,
                launcher=self._launcher,
                snapshot=SnapshotBuffers() if async_save else None,
                background=self._background,
                tidying=self._tidying,
            )
            self._signals.install()
        except BaseException:
            self.close()  # gives the groups back: ranks must take and return them alike
            raise
        self._tidy()  # dead writers' leftovers

    @property
    def preempted(self) -> bool:
        """True once a save requested by a signal (``save_on_signal``) has committed (or found
        its step committed already): the loop should exit so the job can be requeued and
        resume from ``last``."""
        return self._decider.preempted

    def should_save(self, step: int, *, epoch: int | None = None) -> bool:
        """Whether a schedule (or a preemption signal) says to save at ``step``. A schedule's
        or signal's trigger is held at a call at the previous call's step (mid accumulation).

        Collective cost: none when only step/epoch schedules are set (every rank computes the
        same answer from the same arguments); one small vote when ``every_seconds``,
        ``min_seconds_between_saves`` or ``save_on_signal`` is set (an all-gather at 2 ranks,
        a gather to rank 0 and a broadcast of its tally from 3 on; none in a job of one rank),
        and then every rank must call it. :meth:`save` reuses this decision for the same step
        instead of deciding again.
        """
        self._check_open("should_save")
        return self._decider.should_save(step, epoch, in_flight=self.save_in_flight)

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
        None on every rank when a schedule or the throttle says not to save (``force=True`` saves
        anyway). Any rank's failure raises on every rank and leaves the root as it was.

        Args:
            step: the training step, usually ``StepTracker.step``; steps only grow in a root.
            state: a nested dict/list of tensors, plain values and objects with
                ``state_dict()`` (saved through it).
            epoch, metrics, metadata: stored in the manifest; epoch None or a non-negative int,
                metrics as floats (tensors and NumPy scalars converted), metadata as plain
                JSON. Rank 0's values are stored.
            files: extra files stored in the checkpoint dir under the given names (content as
                bytes or a path to copy), written by rank 0. An async save reads each path into
                memory before it returns, so the checkpoint holds the file as it was then.
            force: save even if no schedule is due.
            overwrite: replace an already committed checkpoint of this step.
        """
        self._check_open("save")
        decision = self._decider.take(
            step, epoch, force=force, overwrite=overwrite, in_flight=self.save_in_flight
        )
        if not decision.save:
            return None
        self.wait()  # at most one save in flight; raises a failed one's error here
        request = proposal.SaveRequest(
            step, epoch, overwrite, decision.explicit, metrics, metadata, files
        )
        assert self._saver is not None  # made by the constructor, which raises otherwise
        return self._saver.save(request, state, decision)

    def wait(self) -> SaveResult | None:
        """Wait for the save in flight (``async_save=True``) to be committed and durable, and
        return its result, or raise its error — the same on every rank. None if no save is in
        flight. Every thread waiting meanwhile blocks and sees the same result or error.
        Not collective by itself, but every rank must call it (the background commit needs
        every rank)."""
        return None if self._saver is None else self._saver.wait()

    @property
    def save_in_flight(self) -> bool:
        """Whether an async save's background write and commit are still running on this rank
        (not collective; :meth:`wait` blocks until it is done and returns its result)."""
        return self._saver is not None and self._saver.in_flight

    @property
    def is_coordinator(self) -> bool:
        """Whether this process is rank 0 of the group, the one that commits."""
        return self._coord.is_coordinator

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
        fix_key_prefixes: bool = True,
        optional_keys: Collection[str] = (),
        optional_whole_keys: Collection[str] = (),
    ) -> Checkpoint | None:
        """Load a checkpoint on every rank; collective.

        ``which`` is ``"last"`` (the newest committed checkpoint), ``"best"``, a step, or a path.
        Rank 0 resolves it and every rank loads that same checkpoint. Passing ``state=`` (the
        same structure that was saved) loads it in place, in both formats: objects through
        ``load_state_dict``, tensors copied into, plain values replaced inside its dicts and
        lists; the result's ``.state`` holds the loaded values. With ``missing_ok=True``
        returns None on every rank when there is no checkpoint yet (the auto-resume case).
        Any rank's failure raises on every rank.

        ``strict=True`` refuses a key only in the checkpoint or only in ``state`` before loading
        anything; ``strict=False`` loads what matches and reports the rest in ``missing_keys`` /
        ``unexpected_keys``. ``optional_keys`` are dotted keys of ``state`` (``"extras.added"``)
        that the checkpoint may lack even so: keys a newer version of the state added, which a
        checkpoint saved before it has not. Those missing are reported in ``missing_keys`` and left
        as given, as is any key under one of them (``"extras"`` covers ``"extras.added"``, reported
        as ``"extras"`` in both formats), and a whole missing sub-dict whose every leaf is one
        (``["extras.added"]`` for a new ``{"extras": {"added": t}}``, reported as ``"extras"``); a
        list's items are not keys: a list longer than the saved one is refused whatever is optional;
        a key inside an object with ``state_dict()`` is optional only as the whole object
        (``"obj"``, not ``"obj.added"``), but for a :class:`~distckpt.ModelOptimizerState`, whose
        keys are compared one by one (``"app.model.3"``: it keeps its current values for them).
        ``optional_whole_keys`` may be missing only as a whole: a key under one of them is not
        optional (``"extras"`` missing is let through, ``"extras.added"`` alone is refused). Any
        other key on one side only is still refused, before anything is loaded; a plain string is
        refused (give ``["extras.added"]``). A tensor whose saved shape differs is refused with
        :class:`~distckpt.errors.ShapeMismatch` whatever ``strict`` is. No rank loads into ``state``
        before every rank read and checked its part, so a failure on any rank leaves every rank's
        ``state`` as it was; an object's own ``load_state_dict`` failing afterwards (what the check
        cannot foresee) raises on every rank too (one more small collective when ``state`` is given:
        give it on every rank or on none), with what came before it loaded on the ranks that loaded.
        ``allow_pickle=True`` unpickles arbitrary objects: only for checkpoints you trust.
        ``mmap=True`` maps tensor data from disk instead of reading it all. ``verify=True`` checks
        every file's checksum before loading (sizes are always checked) and, for
        ``"last"``/``"best"``, falls back past a corrupt checkpoint with a warning.
        ``fix_key_prefixes=True`` maps wrapper prefixes (``_orig_mod.``, ``module.``) away or on
        when that makes every key match, before strict.

        A checkpoint newer than the one loaded that ``"last"`` / ``"best"`` skipped because its
        content is damaged (see :class:`~distckpt.CorruptCheckpoint`'s ``damaged``) is set aside by
        rank 0 unless ``read_only`` (:meth:`RootStore.set_aside
        <distckpt.storage.RootStore.set_aside>`): kept whole under another name, with a warning
        saying where, so the job saves the steps after the one loaded again instead of having them
        refused as lower than the damaged one. One that could not be judged (an I/O error, an
        unknown checksum algorithm or format) is only skipped, as before.

        The save schedule counts from the step the first restore of this root before any save
        loads (the resume, possibly older than the root's newest); later restores only move it
        forward (an older ``"best"`` loaded into an eval model mid-run leaves it as it is); a
        path to another root's checkpoint (a pretrained model, a teacher) never moves it.
        """
        self._check_open("restore")
        self.wait()
        loaded = reader.restore_in_root(
            self._coord,
            self._store,
            which,
            retention=self.retention,
            state=state,
            options=ReadOptions(
                map_location,
                allow_pickle,
                mmap,
                fix_key_prefixes,
                check_optional_keys(optional_keys),
                check_optional_keys(optional_whole_keys, "optional_whole_keys"),
            ),
            strict=strict,
            missing_ok=missing_ok,
            verify=verify,
            storage_options=self.storage_options,
        )
        self._decider.count_restore(loaded, self._store.view)
        return loaded

    def agree_on(self, local: Callable[[], T], *, what: str) -> T:
        """Run ``local`` on every rank, each keeping its own value, and raise on every rank if
        it raised on any (naming the failing ranks); collective. For work a restore leaves to the
        caller (hooks loading restored state into other objects), where a rank failing alone
        would leave the others waiting for it in the training's next collective. ``what`` names
        the work in errors; only verdicts travel (:meth:`distckpt.coord.Coordinator.agree_on`)."""
        self._check_open("agree_on")
        return self._coord.agree_on(local, what=what)

    def close(self) -> None:
        """Finish a save in flight (raising its error, on every rank); on rank 0, wait for the
        removals running in the background for at most ``min(timeout, 10)`` seconds
        (:func:`~distckpt.tidying.close_wait_seconds`) and leave the rest to the next start or
        :meth:`gc`; then release the root's lease, restore signal handlers (outside the main
        thread, left installed with a warning, passing signals on:
        :meth:`~distckpt.decisions.SignalFlag.restore`) and release the manager's process groups.
        An async save's snapshot buffers (a copy of the state) go once its thread stopped, even
        if the close does not complete: nothing saves after a close.
        Each step runs even if one before failed or was interrupted (a Ctrl-C); a close that did not
        complete (its lease is kept while the save in flight runs; a save's outcome its interrupted
        wait missed is kept) is finished by calling close() again, which raises that save's error if
        it failed and no wait() raised it first; once complete, it does nothing."""
        if self._released:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            self._released = closing.release(  # not when a step failed: the next close retries
                self._background,
                self._store,
                self._signals,
                self._coord,
                tidying=self._tidying,
                tidy_wait=close_wait_seconds(self.timeout),
                saver=self._saver,
            )

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Close the manager; an exception leaving the block stays the one raised, with an
        error of the close added as a note (:func:`~distckpt.closing.close_keeping`)."""
        closing.close_keeping(self.close, exc)

    def _check_open(self, call: str) -> None:
        """Refuse a closed manager (:class:`~distckpt.ManagerClosed` naming ``call``); called
        first by every public call that may run collectives, so it also marks where the
        coordinator's next operation begins."""
        if self._closed:
            raise ManagerClosed(
                f"this CheckpointManager is closed: {call}() refused", call=call, rank=self.rank
            )
        self._coord.begin_operation()

    def __repr__(self) -> str:
        return (
            f"CheckpointManager({os.fspath(self.root)!r}, format={self.format!r}, "
            f"rank={self.rank}/{self.world_size})"
        )
