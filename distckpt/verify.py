"""``verify``: is this checkpoint intact? A precise answer, per checkpoint and per file.

Checks, for each checkpoint (a dir, or the objects of an ``s3://`` checkpoint): that a dir is
a real dir (not a symlink), that ``manifest.json`` exists, is valid JSON in a format version
this library reads, matches its own checksum (when it records one: ``manifest_crc32``) and
names the checkpoint's step; that every listed file is present, a
regular file, of the listed size and checksum; that the format's required files (each rank's
file, DCP's ``.metadata``) are listed; and that no unlisted file lies in the checkpoint. For a
root it also checks that ``last`` / ``best`` name committed checkpoints inside the root, and
lists the checkpoints set aside as damaged (not committed: not checked, no problem of the root).
Nothing is unpickled and no tensor is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from distckpt.errors import (
    CheckpointError,
    CheckpointNotFound,
    ObjectNotFound,
    ObjectStoreError,
    PreconditionFailed,
)
from distckpt.inspection import inspect
from distckpt.layout import LINK_NAMES
from distckpt.resolve import VANISH_RETRIES, classify_path, link_problem
from distckpt.results import CheckpointLocation, location_name
from distckpt.storage.views import CheckpointSource, RootView


@dataclass(frozen=True)
class CheckpointReport:
    """The verdict on one checkpoint: ``problems`` is empty when it is intact."""

    path: CheckpointLocation
    step: int | None
    problems: tuple[str, ...] = ()
    size_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class VerifyReport:
    """The verdict on a root (every checkpoint in it, and its links) or on one checkpoint."""

    path: CheckpointLocation
    checkpoints: tuple[CheckpointReport, ...] = ()
    #: problems outside any one checkpoint: links that cannot be followed
    problems: tuple[str, ...] = field(default_factory=tuple)
    #: checkpoints of the root set aside as damaged: no longer committed, so not checked and
    #: no problem of the root (``ok`` ignores them); listed for people to look at or remove
    set_aside: tuple[CheckpointLocation, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.checkpoints)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``--json`` output."""
        return {
            "path": os.fspath(self.path),
            "ok": self.ok,
            "problems": list(self.problems),
            "set_aside": [os.fspath(where) for where in self.set_aside],
            "checkpoints": [
                {
                    "path": os.fspath(c.path),
                    "step": c.step,
                    "ok": c.ok,
                    "size_bytes": c.size_bytes,
                    "problems": list(c.problems),
                }
                for c in self.checkpoints
            ],
        }

    def __str__(self) -> str:
        lines = []
        for report in self.checkpoints:
            lines.append(f"{'ok    ' if report.ok else 'BROKEN'} {location_name(report.path)}")
            lines.extend(f"         {problem}" for problem in report.problems)
        lines.extend(f"BROKEN {problem}" for problem in self.problems)
        lines.extend(f"set aside as damaged (not checked): {where}" for where in self.set_aside)
        if not self.checkpoints and not self.problems:
            lines.append(f"no checkpoint in {self.path}")
        return "\n".join(lines)


def verify_checkpoint(
    source: CheckpointSource,
    *,
    checksums: bool = True,
    progress: Callable[[int], None] | None = None,
) -> CheckpointReport:
    """Check one checkpoint against its manifest (see the module doc): the problems a restore
    refuses it for (:func:`distckpt.inspection.inspect`), and unlisted files. A store that failed
    a read (unreachable, 5xx after its retries, access refused, any refusal but the object
    gone or replaced while read) raises its :class:`~distckpt.ObjectStoreError`, as a disk's
    I/O error raises its ``OSError``."""
    step = source.expected_step
    try:
        manifest, problems = inspect(source, checksums=checksums, progress=progress)
    except CheckpointError as exc:
        if _store_failed(exc):
            raise
        return CheckpointReport(source.location, step, (str(exc),))
    found = (*problems, *source.unlisted_files(manifest))
    return CheckpointReport(source.location, manifest.step, found, manifest.total_bytes)


def _store_failed(exc: CheckpointError) -> bool:
    """Whether ``exc`` is the store failing a request, which says nothing of the checkpoint;
    an object gone or replaced while read does."""
    return isinstance(exc, ObjectStoreError) and not isinstance(
        exc, (ObjectNotFound, PreconditionFailed)
    )


def verify(
    path: str | os.PathLike[str],
    *,
    checksums: bool = True,
    progress: Callable[[int], None] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> VerifyReport:
    """Verify a checkpoint dir, a ``last``/``best`` link, or a whole root; or the same as an
    ``s3://`` URL, with ``storage_options`` for its client.

    A checkpoint of a root deleted while it is checked (by a live job's retention) is left
    out, not reported damaged. ``checksums=False`` checks sizes, and each manifest's own checksum
    (:data:`~distckpt.manifest.MANIFEST_CHECKSUM_KEY`), but not the files' (fast: no file
    but the manifests is read).
    ``progress`` is called with the number of bytes read at each step (for a progress bar).
    Raises
    :class:`CheckpointNotFound` if ``path`` is none of these (a directory that is not there;
    an ``s3://`` prefix holding no checkpoint and no root either, an empty one or one of roots:
    :meth:`~distckpt.storage.views.RootView.certainly_no_root`; a local directory holding no
    checkpoint is an empty root, as a crash may leave one before its lease), and a failed read
    of a file (a disk's I/O error) as that ``OSError`` (:mod:`distckpt.errors`); so too an
    ``s3://`` store's failure, any :class:`~distckpt.ObjectStoreError` (an ``OSError``:
    :class:`~distckpt.StoreUnavailable` after the client's retries,
    :class:`~distckpt.StoreAccessDenied`, a request the store does not implement, another
    refusal) but :class:`~distckpt.ObjectNotFound` and :class:`~distckpt.PreconditionFailed`
    (a file gone, or replaced while read), which are the checkpoint's damage."""
    located = classify_path(path, storage_options=storage_options)
    view, where = located.view, os.fspath(path)
    if located.kind == "link":
        assert located.pointer is not None
        if not view.pointer_present(located.pointer):
            raise CheckpointNotFound(f"no checkpoint or checkpoint root at {where}")
        linked, problem = link_problem(view, located.pointer)
        if linked is None:
            return VerifyReport(view.pointer_location(located.pointer), problems=(str(problem),))
        report = verify_checkpoint(linked, checksums=checksums, progress=progress)
        return VerifyReport(linked.location, (report,))
    if located.source is not None:
        report = verify_checkpoint(located.source, checksums=checksums, progress=progress)
        return VerifyReport(located.source.location, (report,))
    reports = _verify_every_checkpoint(view, checksums=checksums, progress=progress)
    problems = []
    reported = {location_name(report.path) for report in reports}
    for name in LINK_NAMES:
        if not view.pointer_present(name) or view.read_pointer(name) in reported:
            continue  # absent, or names a checkpoint of the root: its own report says what
        linked, problem = link_problem(view, name)
        if linked is None:
            problems.append(str(problem))
    set_aside = tuple(view.set_aside_checkpoints())
    if not (reports or problems or set_aside) and view.certainly_no_root():
        # Asked only of a root holding no checkpoint: one with checkpoints costs no request.
        # A location that is not there, or a prefix holding no root (a folder of roots), is
        # no empty root; a local directory that is there may be one whose lease a crash lost.
        raise CheckpointNotFound(
            f"no checkpoint in {where}, and it is no checkpoint root "
            "(it holds no lease, committed checkpoint or last/best link to one)"
        )
    return VerifyReport(view.root, reports, tuple(problems), set_aside)


def _verify_every_checkpoint(
    view: RootView, *, checksums: bool, progress: Callable[[int], None] | None
) -> tuple[CheckpointReport, ...]:
    """The report on every checkpoint of ``view``'s root, in the listing's order, without the
    damaged ones that are no longer in the root: another process's retention may delete a
    listed checkpoint while it is checked, and its files vanishing is no damage. When one
    vanished, the root is listed again and what was committed meanwhile is checked too (the
    checkpoint that took its place, so a root a live job keeps one checkpoint in is not
    reported empty), up to :data:`~distckpt.resolve.VANISH_RETRIES` times. The listing is by
    entry, so an entry that is no checkpoint at all (a file of a step dir's name) stays."""
    reports: dict[CheckpointLocation, CheckpointReport] = {}
    listing = view.every_checkpoint()
    for _ in range(VANISH_RETRIES + 1):
        for source in listing:
            if source.location not in reports:
                reports[source.location] = verify_checkpoint(
                    source, checksums=checksums, progress=progress
                )
        if all(report.ok for report in reports.values()):
            break
        listing = view.every_checkpoint()
        present = {source.location for source in listing}
        vanished = [
            where for where, report in reports.items() if not report.ok and where not in present
        ]
        if not vanished:
            break
        for where in vanished:
            del reports[where]
    return tuple(sorted(reports.values(), key=lambda report: location_name(report.path)))
