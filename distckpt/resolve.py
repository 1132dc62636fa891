"""Which checkpoint a name means: ``"last"``, ``"best"``, a step or a location, resolved to a
committed checkpoint (a :class:`~distckpt.storage.views.CheckpointSource`) and its checked
manifest, with no process group and no tensor read, over any backend's
:class:`~distckpt.storage.views.RootView`.

The committed steps are the truth and the ``last`` / ``best`` pointers (links, pointer files or
pointer objects) are derived from them: a pointer is followed only when it names a committed
checkpoint inside the root that passes the manifest check. ``"last"`` always means the newest
committed checkpoint that passes, whatever the pointer says (a crash between the commit and
the pointer's move leaves it one step behind); a pointer that is broken, leaves the root or
names a damaged checkpoint is skipped with a warning naming it and why, and the next commit or
manager start repairs it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from distckpt import policy
from distckpt.errors import (
    CheckpointNotFound,
    CorruptCheckpoint,
    InvalidArgument,
    UnsafeCheckpoint,
    UnsupportedVersion,
)
from distckpt.inspection import check
from distckpt.layout import BEST, LAST, LINK_NAMES, parse_step_dir_name
from distckpt.manifest import Manifest
from distckpt.results import CheckpointInfo, CheckpointLocation
from distckpt.storage import locate
from distckpt.storage.views import CheckpointSource, Located, PathKind, RootView

logger = logging.getLogger("distckpt")

#: How often a read of "last"/"best"/a root resolves again after its checkpoint was deleted by
#: another process's retention mid-read. Readers retry rather than take a shared lock, so a
#: reader never delays a writer's rotation and needs no lock support from the store; a
#: deleted checkpoint is unpublished first, so a reader sees a whole checkpoint or none.
VANISH_RETRIES = 5

__all__ = ["PathKind", "VANISH_RETRIES"]

#: A committed checkpoint and its checked manifest.
Found = tuple[CheckpointSource, Manifest]


# ---------------------------------------------------------------------------------- one checkpoint


def record_of(manifest: Manifest) -> policy.CheckpointRecord:
    """What retention and ``best`` rank a checkpoint by, from its manifest."""
    return policy.CheckpointRecord.from_manifest(manifest)


# ---------------------------------------------------------------------------------- a root


@dataclass(frozen=True)
class Skipped:
    """A committed checkpoint that a listing of valid ones skipped, and why."""

    step: int
    location: CheckpointLocation
    reason: str
    #: whether this version is sure its content is damaged (see
    #: :class:`~distckpt.CorruptCheckpoint`); False for one it could not judge
    damaged: bool


#: Where :func:`iter_valid` records what it skips, while :func:`recording_skips` runs.
_skip_record: ContextVar[list[Skipped] | None] = ContextVar("distckpt_skips", default=None)


@contextmanager
def recording_skips() -> Iterator[list[Skipped]]:
    """Within the block (in this thread or task), every checkpoint :func:`iter_valid` skips is
    appended to the list this yields, besides the warning: what a resolution of ``"last"``,
    ``"best"`` or a root passed over, for the caller to act on (a writing manager sets the
    damaged ones aside). A context variable rather than an argument of every resolving
    function: they pass it along unchanged, and the warning is where the verdict is made."""
    skipped: list[Skipped] = []
    token = _skip_record.set(skipped)
    try:
        yield skipped
    finally:
        _skip_record.reset(token)


def iter_valid(
    view: RootView,
    *,
    newest_first: bool = True,
    checksums: bool = False,
    steps: Iterable[int] | None = None,
    newer: list[int] | None = None,
    skip_failing: bool = True,
    sources: Mapping[int, CheckpointSource] | None = None,
    reported: dict[int, Hashable | None] | None = None,
) -> Iterator[Found]:
    """Committed checkpoints that pass :func:`check`, with their manifests; damaged ones are
    skipped with a warning (with ``skip_failing=False`` the first one that fails raises its
    error instead), ones deleted meanwhile (by retention) or not committed silently. ``steps``
    replaces the listing of the root. One of a newer format version raises
    :class:`~distckpt.errors.UnsupportedVersion`, or with ``newer`` given has its step appended
    there and is skipped. ``sources``: the checkpoints of some steps, checked instead of the
    view's (one whose commit record the caller knows). ``reported``: the steps a search
    already skipped (it may check them again when it lists the root again), each with the
    version its check read (:meth:`~distckpt.storage.views.CheckpointSource.committed_version`):
    skipped again quietly, so that a search warns and records each once; the ones skipped now
    are added, or their version updated."""
    listed = sorted(set(view.committed_steps() if steps is None else steps))
    known = sources or {}
    for step in reversed(listed) if newest_first else listed:
        source = known[step] if step in known else view.checkpoint(step)
        try:
            yield source, check(source, checksums=checksums)
        except UnsupportedVersion:
            if newer is None:
                raise
            newer.append(step)
        except (CorruptCheckpoint, UnsafeCheckpoint, FileNotFoundError) as exc:
            # CheckpointNotFound: the check found the step not committed (no COMMIT object):
            # asking again would cost a second request per uncommitted step
            if isinstance(exc, CheckpointNotFound) or not source.exists():
                logger.debug("%s was deleted while being listed", source.location)
                continue
            if not skip_failing:
                raise
            if reported is not None:
                skipped_before = step in reported
                reported[step] = source.committed_version()
                if skipped_before:
                    logger.debug("skipping %s again: %s", source.location, exc)
                    continue
            damaged = isinstance(exc, CorruptCheckpoint) and exc.damaged
            if damaged:
                logger.warning("skipping damaged checkpoint %s: %s", source.location, exc)
            else:
                logger.warning(
                    "skipping checkpoint %s, which fails its check (not known to be damaged): %s",
                    source.location,
                    exc,
                )
            record = _skip_record.get()
            if record is not None:
                record.append(Skipped(step, source.location, str(exc), damaged))


def newest_valid(
    view: RootView, *, checksums: bool = False, skip_failing: bool = True
) -> Found | None:
    """The newest committed checkpoint that passes its check; with ``skip_failing=False`` the
    newest committed checkpoint, whose failing check raises its error (see :func:`iter_valid`).

    Another process's retention may delete checkpoints while they are listed and checked. So
    the target of ``last`` is a candidate too (it is moved right after each commit, before
    retention deletes the one before, so it is the freshest name), and when no candidate
    survives but committed steps exist, the root is listed again (a step skipped before is
    checked again only when another version of it was committed since its check read it: it
    may have been replaced under its number while it was read; it is warned about once; the
    search ends when every committed step is one it skipped, unchanged). Newest first, it
    stops at the first that passes: older ones cost nothing (see
    ``RootView.candidate_steps``)."""
    return _newest_valid_and_last(view, checksums=checksums, skip_failing=skip_failing)[0]


def _newest_valid_and_last(
    view: RootView, *, checksums: bool, skip_failing: bool
) -> tuple[Found | None, str | None]:
    """:func:`newest_valid`, and the target ``last`` named when it was read there."""
    linked = None
    reported: dict[int, Hashable | None] = {}
    unchanged: set[int] = set()  # skipped, and still committed as the check read them
    for _ in range(VANISH_RETRIES + 1):
        steps = view.candidate_steps()
        linked = view.read_pointer(LAST)
        linked_step = parse_step_dir_name(linked) if linked else None
        if linked_step is not None:
            steps.append(linked_step)  # iter_valid orders them and drops duplicates
        found = next(
            iter_valid(
                view,
                checksums=checksums,
                steps=[step for step in steps if step not in unchanged],
                skip_failing=skip_failing,
                reported=reported,
            ),
            None,
        )
        if found is not None:
            return found, linked
        # Listed again while committed steps exist that were not judged as they are now: the
        # candidates may have been deleted meanwhile by another process's retention, or a
        # step replaced under its number (``overwrite=True``) while it was read, which reads
        # as damaged until read again.
        versions = view.committed_versions()
        unchanged = {
            step
            for step, version in versions.items()
            if version is not None and reported.get(step) == version
        }
        if unchanged >= versions.keys():
            return None, linked
    return None, linked


def best_valid(
    view: RootView, monitor: str | None, mode: policy.Mode, *, checksums: bool = False
) -> Found | None:
    """The best committed checkpoint by ``monitor`` among those that pass their check (None
    without a monitor or a ranked checkpoint), rebuilt from the manifests."""
    if monitor is None:
        return None
    valid = {m.step: (source, m) for source, m in iter_valid(view, checksums=checksums)}
    best = policy.best_step([record_of(m) for _, m in valid.values()], monitor, mode)
    return valid[best] if best is not None else None


def list_checkpoints(view: RootView) -> list[CheckpointInfo]:
    """Every committed checkpoint that passes its manifest check, oldest first."""
    return survey(view)[0]


def survey(
    view: RootView, *, newer: list[int] | None = None
) -> tuple[list[CheckpointInfo], list[int]]:
    """From one listing of the root: every committed checkpoint that passes its manifest
    check, oldest first, and the steps listed that fail it and are still there (one deleted
    meanwhile by another process's retention is neither; one committed after the listing is
    not in it). A checkpoint of a newer format version raises
    :class:`~distckpt.errors.UnsupportedVersion`, or with ``newer`` given is neither but has
    its step appended there (oldest first)."""
    listed = view.committed_steps()
    infos = [
        CheckpointInfo.from_manifest(source.location, manifest)
        for source, manifest in iter_valid(view, newest_first=False, steps=listed, newer=newer)
    ]
    judged = {info.step for info in infos} | set(newer or ())
    damaged = [s for s in listed if s not in judged and view.checkpoint(s).exists()]
    return infos, damaged


def committed_dir(view: RootView, step: int) -> CheckpointSource:
    """The committed checkpoint of ``step`` (unchecked), or :class:`CheckpointNotFound`
    listing the committed steps."""
    source = view.checkpoint(step)
    if source.unsafe() is not None or not source.exists():
        steps = view.committed_steps()
        listing = ", ".join(map(str, steps)) if steps else "none"
        raise CheckpointNotFound(
            f"no checkpoint for step {step} in {view.root}; committed steps: {listing}"
        )
    return source


# ---------------------------------------------------------------------------------- links


def link_problem(
    view: RootView, name: str, *, checksums: bool = False
) -> tuple[CheckpointSource | None, str | None]:
    """Where the pointer ``name`` points (a committed checkpoint inside the root that passes
    its check), or why it cannot be followed."""
    source, problem = _pointer_target(view, name)
    if source is None:
        return None, problem
    try:
        check(source, checksums=checksums)
    except (CorruptCheckpoint, UnsafeCheckpoint) as exc:
        return None, f"{view.pointer_location(name)} names a damaged checkpoint: {exc}"
    except UnsupportedVersion as exc:
        return (
            None,
            f"{view.pointer_location(name)} names a checkpoint this distckpt cannot read: {exc}",
        )
    return source, None


def _pointer_target(view: RootView, name: str) -> tuple[CheckpointSource, None] | tuple[None, str]:
    """The committed checkpoint the pointer ``name`` names, unchecked, or why it names none."""
    link = view.pointer_location(name)
    target = view.read_pointer(name)
    if target is None:
        if view.pointer_present(name):
            return None, f"{link} is neither a symlink nor a pointer file"
        return None, f"{link} does not exist"
    if (
        os.path.isabs(target)
        or "/" in target
        or os.sep in target
        or (os.altsep and os.altsep in target)
    ):
        return None, f"{link} points outside the root ({target!r})"
    step = parse_step_dir_name(target)
    if step is None:
        return None, f"{link} does not name a step dir ({target!r})"
    source = view.checkpoint(step)
    if source.name != target or not source.exists():
        return None, f"{link} is broken: {target} does not exist"
    return source, None


# ---------------------------------------------------------------------------------- names


def resolve_last(view: RootView, *, checksums: bool = False, skip_failing: bool = True) -> Found:
    """The newest committed checkpoint that passes, warning about a ``last`` pointer that says
    otherwise; with ``skip_failing=False``, the newest committed checkpoint or its check's
    error (:func:`newest_valid`)."""
    newest, linked_name = _newest_valid_and_last(
        view, checksums=checksums, skip_failing=skip_failing
    )
    if newest is None:
        if not view.exists():  # asked only now: a root with checkpoints costs no request
            raise CheckpointNotFound(f"no checkpoint or checkpoint root at {view.root}")
        raise CheckpointNotFound(f"no committed checkpoint in {view.root}")
    if linked_name == newest[0].name:
        return newest  # it named what was then found and checked: nothing to warn about
    linked, problem = link_problem(view, LAST, checksums=checksums)
    if linked is not None and linked.name != newest[0].name:
        logger.warning(
            "%s names %s but the newest committed checkpoint is %s; using %s "
            "(the link is repaired at the next commit or manager start)",
            view.pointer_location(LAST),
            linked.name,
            newest[0].name,
            newest[0].name,
        )
    elif linked is None and problem and view.pointer_present(LAST):
        logger.warning("not following %s; using %s", problem, newest[0].name)
    return newest


def resolve_best(
    view: RootView,
    *,
    monitor: str | None,
    mode: policy.Mode = "min",
    checksums: bool = False,
    skip_failing: bool = True,
) -> Found:
    """What the ``best`` pointer names, or, when it cannot be followed, the best checkpoint by
    ``monitor`` rebuilt from the manifests. With ``skip_failing=False``, a checkpoint the
    pointer names that fails its check raises its check's error, as :func:`resolve_last`'s
    newest does."""
    linked, problem = link_problem(view, BEST, checksums=checksums)
    if linked is not None:
        return linked, linked.read_manifest()
    if not skip_failing:
        # the pointer is read again only here: a restore skipping failures never needs it
        named, _ = _pointer_target(view, BEST)
        if named is not None:
            return named, check(named, checksums=checksums)  # it fails: its own error is raised
    best = best_valid(view, monitor, mode, checksums=checksums)
    # A pointer there, even one naming a deleted step dir, shows saving had a monitor.
    pointer_present = view.pointer_present(BEST)
    if best is not None:
        if pointer_present:
            logger.warning("not following %s; using %s", problem, best[0].name)
        return best
    raise CheckpointNotFound(
        f"no best checkpoint in {view.root}: {problem}"
        + (
            ""
            if monitor or pointer_present
            else " (a best checkpoint needs monitor=... when saving)"
        )
    )


def resolve_step(view: RootView, step: int, *, checksums: bool = False) -> Found:
    """The committed checkpoint of ``step`` and its checked manifest."""
    source = committed_dir(view, step)
    return source, check(source, checksums=checksums)


def classify_path(
    path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> Located:
    """What a user's location stands for: a ``last`` / ``best`` pointer inside a root (one
    that is missing still names its root's newest or best checkpoint), one checkpoint, or a
    root (see :func:`distckpt.storage.locate`). Raises :class:`CheckpointNotFound` when it
    names nothing."""
    return locate(path, storage_options=storage_options)


def resolve_located(
    located: Located,
    *,
    monitor: str | None = None,
    mode: policy.Mode = "min",
    checksums: bool = False,
    skip_failing: bool = True,
) -> Found:
    """The checkpoint a located path names: a pointer's target, a checkpoint itself, a root's
    newest checkpoint (one that passes; with ``skip_failing=False`` the newest, or ``best``'s
    target, refused by its check's error when it fails, as a checkpoint named itself is)."""
    if located.kind == "link":
        if located.pointer == LAST:
            return resolve_last(located.view, checksums=checksums, skip_failing=skip_failing)
        return resolve_best(
            located.view,
            monitor=monitor,
            mode=mode,
            checksums=checksums,
            skip_failing=skip_failing,
        )
    if located.source is not None:
        return located.source, check(located.source, checksums=checksums)
    return resolve_last(located.view, checksums=checksums, skip_failing=skip_failing)


def resolve_path(
    path: str | os.PathLike[str],
    *,
    monitor: str | None = None,
    mode: policy.Mode = "min",
    checksums: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    skip_failing: bool = True,
) -> Found:
    """The checkpoint a location names (see :func:`classify_path` and, for ``skip_failing``,
    :func:`resolve_located`): a pointer's target, a checkpoint itself, a root's newest
    checkpoint."""
    located = classify_path(path, storage_options=storage_options)
    return resolve_located(
        located, monitor=monitor, mode=mode, checksums=checksums, skip_failing=skip_failing
    )


def resolve(
    which: Any,
    *,
    view: RootView | None,
    monitor: str | None = None,
    mode: policy.Mode = "min",
    checksums: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Found:
    """The checkpoint and manifest that ``which`` names: ``"last"``, ``"best"`` or a step
    (within ``view``'s root), or a location — of a checkpoint, of a root (its newest
    checkpoint), or of a ``last`` / ``best`` pointer inside a root."""
    if isinstance(which, int) and not isinstance(which, bool):
        if view is None:
            raise InvalidArgument("a step number needs a checkpoint root")
        return resolve_step(view, which, checksums=checksums)
    if not isinstance(which, (str, os.PathLike)):
        raise InvalidArgument(f"which must be 'last', 'best', a step or a path, not {which!r}")
    if which in LINK_NAMES and view is not None and isinstance(which, str):
        if which == LAST:
            return resolve_last(view, checksums=checksums)
        return resolve_best(view, monitor=monitor, mode=mode, checksums=checksums)
    return resolve_path(
        which, monitor=monitor, mode=mode, checksums=checksums, storage_options=storage_options
    )
