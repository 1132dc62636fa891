"""Loading committed checkpoints: one function for every rank of a job at once
(:func:`restore_on_ranks`, behind ``CheckpointManager.restore``) and for one plain process
(:func:`load_checkpoint`, which needs no process group: a plain process is a job of one rank).

A load runs the same three steps everywhere: rank 0 resolves which checkpoint is meant (see
:mod:`distckpt.resolve`), every rank prepares what it can check alone (world size, rank,
``state=`` template, the format's own metadata), then every rank reads, which may be collective
(DCP), and checks that what it read loads into ``state=`` (keys and shapes), changing nothing.
The ranks agree on the outcome of each step (of prepare and read at once where the read is not
collective), so a rank failing alone fails every rank instead of leaving the others inside a
collective; only then does each rank load into ``state=``
(:func:`~distckpt.rank_read.apply_read`), so a failure on any rank leaves every rank's state as
it was (but for DCP's collective read itself, which fills the tensors in place). Where a rank
can read alone and nothing of the caller's changes ("torch", no ``state=``, no ``verify``), the
other ranks read what they guess rank 0 will resolve while it resolves, and one collective
carries rank 0's decision and every verdict (:func:`_restore_in_one_round`). A checkpoint
deleted by another process's retention mid-read (:class:`CheckpointVanished`) is resolved
again, unless it was named explicitly (a step, a step dir).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Callable, Collection, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from distckpt import policy
from distckpt.coord import Coordinator, current_rank
from distckpt.coord_outcomes import Outcome, raise_failures
from distckpt.damaged import set_aside_damaged_newer
from distckpt.errors import (
    CheckpointNotFound,
    CheckpointVanished,
    InvalidArgument,
)
from distckpt.formats import PreparedRead, ReadOptions, format_named
from distckpt.formats.base import check_map_location, check_optional_keys, check_rank_argument
from distckpt.layout import BEST, LAST, LINK_NAMES, parse_step_dir_name
from distckpt.manifest import Manifest
from distckpt.rank_read import apply_read, prepare_read, read_state, vanish_checked
from distckpt.resolve import VANISH_RETRIES, Found, Skipped, recording_skips, resolve
from distckpt.results import Checkpoint, CheckpointLocation
from distckpt.storage import RootStore, locate
from distckpt.storage.views import CheckpointSource, RootView

logger = logging.getLogger("distckpt")
T = TypeVar("T")


# ---------------------------------------------------------------------------------- agreement
# The agreement of a read after the first round (:func:`_restore_in_one_round` runs that
# round's collectives); with no coordinator (a plain process) it runs locally and raises its
# own error.


def _agreed(coordinator: Coordinator | None, func: Callable[[], T], what: str) -> T:
    """``func()`` on every rank, raising on every rank if it failed on any. Only the verdict
    travels: each rank keeps its own result (its state stays on the rank)."""
    if coordinator is None:
        return func()
    return coordinator.agree_on(func, what=what)


# ---------------------------------------------------------------------------------- the load


def restore_on_ranks(
    coordinator: Coordinator | None,
    which: Any,
    *,
    view: RootView | None,
    monitor: str | None = None,
    mode: policy.Mode = "min",
    state: Any = None,
    options: ReadOptions | None = None,
    strict: bool = True,
    missing_ok: bool = False,
    verify: bool = False,
    rank: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    after_resolving: Callable[[Found | None, list[Skipped]], None] | None = None,
) -> Checkpoint | None:
    """Load the checkpoint ``which`` names on every rank of ``coordinator`` (collective), or
    in this process alone when ``coordinator`` is None (as ``rank``, by default this process's
    rank in torch.distributed, else 0).

    ``which`` is ``"last"``, ``"best"`` or a step within ``layout``'s root (``monitor`` and
    ``mode`` rank ``"best"`` when its link cannot be followed), or a path (see
    :func:`distckpt.resolve.resolve`). Returns None on every rank when ``missing_ok`` and
    ``"last"``/``"best"`` names nothing yet. ``verify`` checks every checksum while
    resolving. ``storage_options`` configure the client of an ``s3://`` location. Every rank
    reads from a local copy of the checkpoint's files (for a local root, the dir itself). Any
    rank's failure is raised on every rank.

    ``after_resolving`` runs where ``which`` is resolved (rank 0, or this process), right after
    each resolution and before anything is read, with what was resolved and the checkpoints
    the resolution skipped (see :func:`~distckpt.resolve.recording_skips`); an error it raises
    is the resolution's, raised on every rank. It adds no collective: its outcome travels with
    rank 0's decision."""
    options = options if options is not None else ReadOptions()
    rank_named = coordinator is None and rank is not None
    if coordinator is not None:
        rank, world_size = coordinator.rank, coordinator.world_size
    else:
        rank, world_size = (current_rank() if rank is None else rank), None

    def find() -> Found | None:
        with recording_skips() as skipped:
            try:
                found = resolve(
                    which,
                    view=view,
                    monitor=monitor,
                    mode=mode,
                    checksums=verify,
                    storage_options=storage_options,
                )
            except CheckpointNotFound:
                if not (missing_ok and which in (LAST, BEST)):
                    raise
                found = None
        if after_resolving is not None:
            after_resolving(found, skipped)
        return found

    read = functools.partial(
        _read_on_ranks,
        rank=rank,
        rank_named=rank_named,
        world_size=world_size,
        state=state,
        options=options,
        strict=strict,
    )
    for attempt in range(VANISH_RETRIES + 1):
        tried: list[CheckpointLocation] = []
        try:
            if coordinator is None:
                found = find()
                if found is None:
                    return None
                tried.append(found[0].location)
                return read(None, *found)
            return _restore_in_one_round(
                coordinator,
                which,
                find,
                read,
                guess=functools.partial(_guess, which, view, storage_options),
                read_early=state is None and not verify,
                tried=tried,
            )
        except CheckpointVanished:
            if attempt == VANISH_RETRIES or not tried or _named_explicitly(which, tried[-1]):
                raise  # nothing else to fall back to
            named = os.fspath(which) if isinstance(which, os.PathLike) else which  # not its repr
            logger.warning("%s vanished while being read; resolving %r again", tried[-1], named)
    raise AssertionError("unreachable")


#: Which checkpoint a rank read, or guessed, in the first round of a restore: its location and
#: a digest of its manifest, so ranks compare what they read without sending the manifest.
Fingerprint = tuple[str, bytes]


@dataclass(frozen=True)
class _Candidate:
    """The checkpoint one rank reads, or would read, in the first round of a restore."""

    found: Found
    fingerprint: Fingerprint
    #: whether its read needs collectives (DCP): then no rank reads before the ranks agree
    collective: bool


@dataclass(frozen=True)
class _FirstRound:
    """What one rank reports in the first (often only) collective of a restore."""

    #: rank 0's: the fingerprint of the checkpoint it resolved (None: nothing, with
    #: ``missing_ok``), or its error; None on the other ranks
    decision: Outcome | None
    #: the checkpoint this rank guessed (rank 0: resolved), if any
    fingerprint: Fingerprint | None
    #: the outcome of this rank's read of it, without the state (None: it read nothing yet)
    read: Outcome | None


def restore_in_root(
    coordinator: Coordinator,
    store: RootStore,
    which: Any,
    *,
    retention: policy.RetentionPolicy,
    state: Any,
    options: ReadOptions,
    strict: bool,
    missing_ok: bool,
    verify: bool,
    storage_options: Mapping[str, Any],
) -> Checkpoint | None:
    """:func:`restore_on_ranks` within ``store``'s root, as ``CheckpointManager.restore`` runs
    it: ``"best"`` ranked by ``retention``'s monitor, and a damaged checkpoint newer than the
    one loaded set aside by rank 0 unless the store is read-only
    (:func:`~distckpt.damaged.set_aside_damaged_newer`)."""
    return restore_on_ranks(
        coordinator,
        which,
        view=store.view,
        monitor=retention.monitor,
        mode=retention.mode,
        state=state,
        options=options,
        strict=strict,
        missing_ok=missing_ok,
        verify=verify,
        storage_options=storage_options,
        after_resolving=None
        if store.read_only
        else functools.partial(set_aside_damaged_newer, store),
    )


def _candidate(found: Found) -> _Candidate:
    source, manifest = found
    # The repr of equal manifests read from the same file is the same (the dicts keep the
    # file's order); unlike ``to_json``, it copies nothing (asdict) and formats no JSON.
    fingerprint = (str(source.location), hashlib.sha256(repr(manifest).encode()).digest())
    return _Candidate(found, fingerprint, format_named(manifest.format).collective_read)


def _guess(
    which: Any, view: RootView | None, storage_options: Mapping[str, Any] | None
) -> _Candidate | None:
    """The checkpoint a rank other than 0 expects rank 0 to resolve ``which`` to, found as
    cheaply as reading its manifest, the way :func:`distckpt.resolve.resolve` reads ``which``:
    a step's checkpoint, a checkpoint's location, or where a ``last``/``best`` pointer leads
    (a root's: ``last``). Rank 0 checks the checkpoint and may pick another (a pointer left
    behind, a damaged checkpoint skipped). None when nothing is found. Never raises: it runs
    before a collective that every rank must reach."""
    try:
        if isinstance(which, int) and not isinstance(which, bool):
            source = view.checkpoint(which) if view is not None else None
        elif isinstance(which, str) and which in LINK_NAMES and view is not None:
            source = _pointed_at(view, which)
        else:
            located = locate(which, storage_options=storage_options)
            source = located.source or _pointed_at(located.view, located.pointer or LAST)
        return _candidate((source, source.read_manifest())) if source is not None else None
    except Exception:  # a guess that fails is no guess: rank 0's resolution says what is wrong
        return None


def _pointed_at(view: RootView, pointer: str) -> CheckpointSource | None:
    """The checkpoint the pointer ``pointer`` of ``view``'s root names, unchecked."""
    target = view.read_pointer(pointer)
    step = parse_step_dir_name(target) if target else None
    return view.checkpoint(step) if step is not None else None


def _restore_in_one_round(
    coordinator: Coordinator,
    which: Any,
    find: Callable[[], Found | None],
    read: Callable[[Coordinator | None, CheckpointSource, Manifest], Checkpoint],
    *,
    guess: Callable[[], _Candidate | None],
    read_early: bool,
    tried: list[CheckpointLocation],
) -> Checkpoint | None:
    """Rank 0 resolves ``which`` while every other rank reads what it guesses rank 0 will
    resolve (:func:`_guess`), and one collective carries rank 0's decision and every rank's
    verdict: a restore of a "torch" checkpoint pays one collective, not a broadcast of what to
    read and then an agreement on the read.

    Nothing a rank loaded counts unless it is what rank 0 decided. Rank 0's error is raised on
    every rank alike, whatever the others read. When a rank guessed another checkpoint or
    nothing, or no rank may read before the ranks agree (``read_early`` is False: a ``state=``
    to load into, which a wrong guess would leave loaded, or ``verify``, which checks every
    checksum before anything is loaded; or a read with collectives), rank 0's decision is
    broadcast where needed and read as before, its outcome agreed on (:func:`_read_on_ranks`).
    A rank reads only its own part of a checkpoint, as it would after a broadcast."""
    rank = coordinator.rank
    decided: Outcome | None = None
    decided_cause: Exception | None = None
    candidate: _Candidate | None = None
    if coordinator.is_coordinator:
        decided, decided_cause = Outcome.of(lambda: _resolved(find), rank=rank)
        candidate = decided.value
        decided = replace(decided, value=candidate.fingerprint if candidate else None)
    else:
        candidate = guess()
    if candidate is not None:
        tried.append(candidate.found[0].location)
    loaded: Checkpoint | None = None
    read_outcome: Outcome | None = None
    read_cause: Exception | None = None
    if candidate is not None and read_early and not candidate.collective:
        found = candidate.found
        # Read alone (no coordinator): the verdict travels in the collective below.
        read_outcome, read_cause = Outcome.of(lambda: read(None, *found), rank=rank)
        loaded, read_outcome = read_outcome.value, replace(read_outcome, value=None)
    report = _FirstRound(decided, candidate.fingerprint if candidate else None, read_outcome)
    reports = coordinator.all_gather(lambda: report, what=f"restoring checkpoint {which!r}")
    decision = reports[0].decision
    assert decision is not None  # rank 0 always reports its decision
    if decision.error is not None:
        loaded = None  # dropped now: the error's traceback keeps this frame alive
    chosen = decision.unwrap(what=f"finding checkpoint {which!r}", cause=decided_cause)
    if chosen is None:
        return None  # nothing committed yet, and missing_ok
    reads = [r.read for r in reports if r.fingerprint == chosen and r.read is not None]
    if len(reads) == len(reports):
        assert candidate is not None  # this rank read what rank 0 chose
        if any(r.error is not None for r in reads):
            loaded = None  # dropped now: the error's traceback keeps this frame alive
        raise_failures(reads, what=f"restoring {candidate.found[0].name}", cause=read_cause)
        return loaded
    loaded = None  # another checkpoint's state, if any: its memory goes back before the read
    if all(r.fingerprint == chosen for r in reports):
        assert candidate is not None  # every rank holds rank 0's checkpoint and manifest
        found = candidate.found
    else:
        found = coordinator.decide(
            lambda: candidate.found if candidate else None, what=f"finding checkpoint {which!r}"
        )
        assert found is not None  # rank 0 chose one
        tried.append(found[0].location)
    return read(coordinator, *found)


def _resolved(find: Callable[[], Found | None]) -> _Candidate | None:
    """Rank 0's resolution, as the candidate it reads."""
    found = find()
    return _candidate(found) if found is not None else None


def _read_on_ranks(
    coordinator: Coordinator | None,
    source: CheckpointSource,
    manifest: Manifest,
    *,
    rank: int,
    rank_named: bool,
    world_size: int | None,
    state: Any,
    options: ReadOptions,
    strict: bool,
) -> Checkpoint:
    """Prepare and read ``source`` on every rank, each from its local copy of the files,
    agreeing on the outcome of each step; with no ``coordinator``, read it here alone (a
    format's collectives, if any, run on no group: DCP's single-process read) as ``rank``,
    which ``rank_named`` says the caller chose (:func:`~distckpt.rank_read.prepare_read`)."""
    collective = format_named(manifest.format).collective_read
    group = coordinator.group if coordinator is not None else None
    # A read without collectives reads only what this rank wrote (its rank file); one with
    # collectives (DCP) may read any file of the checkpoint.
    needed = [name for name, record in manifest.files.items() if collective or record.rank == rank]
    with ExitStack() as held:

        def prepare() -> PreparedRead:
            # Checked here, inside the agreement, not when the options were made: a bad one on
            # one rank is then raised on every rank instead of leaving the others waiting.
            check_map_location(options.map_location)
            # The local copy is made inside the first agreement, so fetching costs none.
            directory = vanish_checked(
                source, lambda: held.enter_context(source.local_copy(needed))
            )
            return prepare_read(
                source,
                directory,
                manifest,
                rank=rank,
                rank_named=rank_named,
                world_size=world_size,
                template=state,
                options=options,
                strict=strict,
                group=group,
            )

        if not collective:
            # No rank waits inside the read for another: one agreement after both steps.
            checkpoint = _agreed(
                coordinator,
                lambda: read_state(source, prepare(), template=state, strict=strict),
                f"restoring {source.name}",
            )
        else:
            prepared = _agreed(coordinator, prepare, f"preparing to restore {source.name}")
            checkpoint = _agreed(
                coordinator,
                functools.partial(read_state, source, prepared, template=state, strict=strict),
                f"restoring {source.name}",
            )
        # Only now that every rank read and checked its part: a rank failing alone has left
        # every rank's state as it was.
        if state is None:
            return checkpoint
        # Loading into the caller's objects runs their own load_state_dict, which the check
        # cannot foresee (an optimizer given parameter groups of other sizes): its outcome is
        # agreed too, so such a failure is raised on every rank, not on its own alone while
        # the others train on. One more small collective, for a restore into state= only.
        return _agreed(
            coordinator,
            lambda: apply_read(checkpoint, state, options, strict=strict),
            f"loading {source.name} into the given state",
        )


def _named_explicitly(which: Any, location: CheckpointLocation) -> bool:
    """Whether ``which`` names the checkpoint at ``location`` itself (a step, or its location)
    rather than a name that may resolve to another checkpoint once it is gone."""
    if isinstance(which, int):
        return True
    if isinstance(location, str):
        return isinstance(which, str) and which.rstrip("/") == location
    return isinstance(which, (str, os.PathLike)) and Path(os.path.abspath(which)) == location


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    rank: int | None = None,
    state: Any = None,
    map_location: Any = "cpu",
    strict: bool = True,
    allow_pickle: bool = False,
    mmap: bool = False,
    verify: bool = False,
    fix_key_prefixes: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    optional_keys: Collection[str] = (),
) -> Checkpoint:
    """Load one rank's part of a committed checkpoint in any process, by itself: no process
    group is needed, and none is used even where one exists (so a "dcp" checkpoint is read
    through DCP's single-process path).

    ``path`` is a step dir, a root (its newest checkpoint), or a ``last`` / ``best`` link
    (symlink or pointer file), whatever the working directory; or the same as an ``s3://``
    URL (``s3://BUCKET/PREFIX``, ``.../last``, ``.../best``, ``.../step-00000010``), with
    ``storage_options`` for its client (else the AWS environment variables apply). ``rank``
    defaults to this process's rank when torch.distributed is initialised, else 0; a ``rank=``
    that did not save the checkpoint is :class:`~distckpt.CheckpointNotFound` in either format.
    A default rank past the saved ones is too for a "torch" checkpoint, and for a "dcp" one
    only when ``state=`` asks for per-rank values it holds (the rest is the same for every
    rank, so an evaluation job of more ranks loads it). ``state=``
    loads in place as in :meth:`CheckpointManager.restore`; ``verify=True`` checks every file's
    checksum first; ``fix_key_prefixes`` and ``optional_keys`` as in
    :meth:`CheckpointManager.restore`.

    A failed read of one of the checkpoint's files (a disk's I/O error) is raised as that
    ``OSError``, not as a :class:`~distckpt.CheckpointError` (:mod:`distckpt.errors`).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgument(f"path must be a path, not {path!r}")
    check_rank_argument(rank)
    options = ReadOptions(
        map_location=map_location,
        allow_pickle=allow_pickle,
        mmap=mmap,
        fix_key_prefixes=fix_key_prefixes,
        optional_keys=check_optional_keys(optional_keys),
    )
    loaded = restore_on_ranks(
        None,
        path,
        view=None,
        state=state,
        options=options,
        strict=strict,
        verify=verify,
        rank=rank,
        storage_options=storage_options,
    )
    assert loaded is not None  # only missing_ok returns None
    return loaded
