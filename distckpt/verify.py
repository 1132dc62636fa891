"""``verify``: is this checkpoint intact? A precise answer, per checkpoint and per file.

Checks, for each checkpoint dir: that it is a real dir (not a symlink), that ``manifest.json``
exists, is valid JSON in a format version this library reads and names the dir's step; that
every listed file is present, a regular file, of the listed size and checksum; that the format's
required files (each rank's file, DCP's ``.metadata``) are listed; and that no unlisted file
lies in the dir. For a root it also checks that ``last`` / ``best`` name committed dirs inside
the root. Nothing is unpickled and no tensor is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distckpt.errors import CheckpointError, CheckpointNotFound
from distckpt.fsutil import read_link
from distckpt.layout import LINK_NAMES, MANIFEST_NAME, RootLayout, parse_step_dir_name
from distckpt.manifest import Manifest
from distckpt.resolve import classify_path, inspect_dir, link_present, link_problem


@dataclass(frozen=True)
class CheckpointReport:
    """The verdict on one checkpoint dir: ``problems`` is empty when it is intact."""

    path: Path
    step: int | None
    problems: tuple[str, ...] = ()
    size_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class VerifyReport:
    """The verdict on a root (every checkpoint in it, and its links) or on one checkpoint."""

    path: Path
    checkpoints: tuple[CheckpointReport, ...] = ()
    #: problems outside any one checkpoint: links that cannot be followed
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.checkpoints)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``--json`` output."""
        return {
            "path": os.fspath(self.path),
            "ok": self.ok,
            "problems": list(self.problems),
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
            lines.append(f"{'ok    ' if report.ok else 'BROKEN'} {report.path.name}")
            lines.extend(f"         {problem}" for problem in report.problems)
        lines.extend(f"BROKEN {problem}" for problem in self.problems)
        if not self.checkpoints and not self.problems:
            lines.append(f"no checkpoint in {self.path}")
        return "\n".join(lines)


def verify_checkpoint(
    directory: Path,
    *,
    checksums: bool = True,
    progress: Callable[[int], None] | None = None,
) -> CheckpointReport:
    """Check one checkpoint dir against its manifest (see the module doc): the problems a
    restore refuses it for (:func:`distckpt.resolve.inspect_dir`), and unlisted files."""
    step = parse_step_dir_name(directory.name)
    try:
        manifest, problems = inspect_dir(directory, step, checksums=checksums, progress=progress)
    except CheckpointError as exc:
        return CheckpointReport(directory, step, (str(exc),))
    problems += _unlisted_problems(directory, manifest)
    return CheckpointReport(directory, manifest.step, tuple(problems), manifest.total_bytes)


def _unlisted_problems(directory: Path, manifest: Manifest) -> list[str]:
    problems = []
    for parent, dirs, files in os.walk(directory):
        for name in files + [d for d in dirs if Path(parent, d).is_symlink()]:
            relative = Path(parent, name).relative_to(directory).as_posix()
            if relative != MANIFEST_NAME and relative not in manifest.files:
                problems.append(f"{directory / relative}: unexpected file, not in the manifest")
    return problems


def verify(
    path: str | os.PathLike[str],
    *,
    checksums: bool = True,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Verify a checkpoint dir, a ``last``/``best`` link, or a whole root.

    ``checksums=False`` checks only sizes (fast: no file is read). ``progress`` is called with
    the number of bytes read at each step (for a progress bar). Raises
    :class:`CheckpointNotFound` if ``path`` is none of these."""
    kind, target = classify_path(path)
    if kind == "link":
        if not link_present(target):
            raise CheckpointNotFound(f"no checkpoint or checkpoint root at {target}")
        linked, problem = link_problem(RootLayout(target.parent), target.name)
        if linked is None:
            return VerifyReport(target, problems=(str(problem),))
        kind, target = "step_dir", linked
    if kind == "step_dir":
        report = verify_checkpoint(target, checksums=checksums, progress=progress)
        return VerifyReport(target, (report,))
    layout = RootLayout(target)
    reports = tuple(
        verify_checkpoint(Path(entry.path), checksums=checksums, progress=progress)
        for entry in sorted(os.scandir(target), key=lambda e: e.name)
        if parse_step_dir_name(entry.name) is not None
    )
    problems = []
    reported = {report.path.name for report in reports}
    for name in LINK_NAMES:
        link = layout.link_path(name)
        if not link_present(link) or read_link(link) in reported:
            continue  # absent, or names a checkpoint of the root: its own report says what
        linked, problem = link_problem(layout, name)
        if linked is None:
            problems.append(str(problem))
    return VerifyReport(target, reports, tuple(problems))
