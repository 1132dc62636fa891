"""Which checkpoint a name means: ``"last"``, ``"best"``, a step or a path, resolved to a
committed dir and its checked manifest, with no process group and no tensor read.

The committed ``step-*`` dirs are the truth and the ``last`` / ``best`` links are derived from
them: a link is followed only when it names a committed dir inside the root that passes the
manifest check. ``"last"`` always means the newest committed checkpoint that passes, whatever
the link says (a crash between the rename and the link swap leaves the link one step behind);
a link that is broken, leaves the root or names a damaged dir is skipped with a warning naming
it and why, and the next commit or manager start repairs it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from distckpt import policy
from distckpt.errors import (
    CheckpointNotFound,
    CorruptCheckpoint,
    InvalidArgument,
    UnsafeCheckpoint,
    UnsupportedVersion,
)
from distckpt.formats import format_named
from distckpt.fsutil import read_link
from distckpt.layout import BEST, LAST, LINK_NAMES, MANIFEST_NAME, RootLayout, parse_step_dir_name
from distckpt.manifest import Manifest, find_problems, read_manifest
from distckpt.results import CheckpointInfo

logger = logging.getLogger("distckpt")

#: How often a read of "last"/"best"/a root resolves again after its checkpoint was deleted by
#: another process's retention mid-read. Readers retry rather than take a shared lock, so a
#: reader never delays a writer's rotation and needs no lock support from the filesystem; a
#: deleted dir is renamed into the trash first, so a reader sees a whole dir or none.
VANISH_RETRIES = 5

#: What a path given by a user stands for (see :func:`classify_path`).
PathKind = Literal["link", "step_dir", "root"]


# ---------------------------------------------------------------------------------- one dir


def inspect_dir(
    directory: Path,
    expected_step: int | None,
    *,
    checksums: bool = False,
    progress: Callable[[int], None] | None = None,
) -> tuple[Manifest, list[str]]:
    """The manifest of a committed dir and everything wrong with the dir against it (empty
    when it passes): its step, every listed file present with its size (and, with
    ``checksums=True``, its checksum), the format's required files listed. Raises
    :class:`UnsafeCheckpoint` for a dir that is a symlink, and the manifest's own errors
    (:class:`CorruptCheckpoint`, :class:`UnsupportedVersion`) when it cannot be read."""
    if directory.is_symlink():
        raise UnsafeCheckpoint(f"{directory}: is a symlink; a committed checkpoint is a real dir")
    manifest = read_manifest(directory)
    problems = find_problems(
        directory, manifest, expected_step=expected_step, checksums=checksums, progress=progress
    )
    problems += _format_problems(directory, manifest)
    return manifest, problems


def check_dir(directory: Path, expected_step: int | None, *, checksums: bool = False) -> Manifest:
    """The manifest of a committed dir that passes :func:`inspect_dir`; raises
    :class:`CorruptCheckpoint` naming every problem otherwise."""
    manifest, problems = inspect_dir(directory, expected_step, checksums=checksums)
    if problems:
        raise CorruptCheckpoint(f"{directory} fails its manifest check: " + "; ".join(problems))
    return manifest


def _format_problems(directory: Path, manifest: Manifest) -> list[str]:
    """The manifest's format is unknown, or a file it requires (each rank's file, DCP's
    ``.metadata``) is not listed: an unlisted file is unchecked and must not be loaded."""
    try:
        fmt = format_named(manifest.format)
    except InvalidArgument:
        return [f"{directory / MANIFEST_NAME}: unknown checkpoint format {manifest.format!r}"]
    return [
        f"{directory / name}: required by the {manifest.format!r} format but not in the manifest"
        for name in fmt.required_files(manifest)
        if name not in manifest.files
    ]


def record_of(manifest: Manifest) -> policy.CheckpointRecord:
    """What retention and ``best`` rank a checkpoint by, from its manifest."""
    return policy.CheckpointRecord.from_manifest(manifest)


# ---------------------------------------------------------------------------------- a root


def iter_valid(
    layout: RootLayout,
    *,
    newest_first: bool = True,
    checksums: bool = False,
    steps: Iterable[int] | None = None,
) -> Iterator[tuple[Path, Manifest]]:
    """Committed dirs that pass :func:`check_dir`, with their manifests; damaged ones are
    skipped with a warning, ones deleted meanwhile (by retention) silently. ``steps`` replaces
    the listing of the root."""
    listed = sorted(set(layout.committed_steps() if steps is None else steps))
    for step in reversed(listed) if newest_first else listed:
        directory = layout.step_dir(step)
        if not directory.exists():
            directory = _dir_for_step(layout, step)
        try:
            yield directory, check_dir(directory, step, checksums=checksums)
        except (CorruptCheckpoint, UnsafeCheckpoint, FileNotFoundError) as exc:
            if not directory.exists():
                logger.debug("%s was deleted while being listed", directory)
                continue
            logger.warning("skipping damaged checkpoint %s: %s", directory, exc)


def newest_valid(layout: RootLayout, *, checksums: bool = False) -> tuple[Path, Manifest] | None:
    """The newest committed checkpoint that passes its check.

    Another process's retention may delete dirs while they are listed and checked. So the
    target of ``last`` is a candidate too (it is swapped right after each commit, before
    retention deletes the one before, so it is the freshest name), and when no candidate
    survives but committed dirs exist, the root is listed again."""
    for _ in range(VANISH_RETRIES + 1):
        steps = layout.committed_steps()
        linked = read_link(layout.link_path(LAST))
        linked_step = parse_step_dir_name(linked) if linked else None
        if linked_step is not None:
            steps.append(linked_step)  # iter_valid orders them and drops duplicates
        found = next(iter_valid(layout, checksums=checksums, steps=steps), None)
        if found is not None or not layout.committed_steps():
            return found
    return None


def best_valid(
    layout: RootLayout, monitor: str | None, mode: policy.Mode, *, checksums: bool = False
) -> tuple[Path, Manifest] | None:
    """The best committed checkpoint by ``monitor`` among those that pass their check (None
    without a monitor or a ranked checkpoint), rebuilt from the manifests."""
    if monitor is None:
        return None
    valid = {m.step: (path, m) for path, m in iter_valid(layout, checksums=checksums)}
    best = policy.best_step([record_of(m) for _, m in valid.values()], monitor, mode)
    return valid[best] if best is not None else None


def list_checkpoints(layout: RootLayout) -> list[CheckpointInfo]:
    """Every committed checkpoint that passes its manifest check, oldest first."""
    return [
        CheckpointInfo.from_manifest(path, manifest)
        for path, manifest in iter_valid(layout, newest_first=False)
    ]


def _dir_for_step(layout: RootLayout, step: int) -> Path:
    """The committed dir of ``step`` whatever its zero padding (any width parses)."""
    for entry in os.scandir(layout.root):
        if parse_step_dir_name(entry.name) == step and entry.is_dir(follow_symlinks=False):
            return Path(entry.path)
    return layout.step_dir(step)


def committed_dir(layout: RootLayout, step: int) -> Path:
    """The committed dir of ``step`` (unchecked), or :class:`CheckpointNotFound` listing the
    committed steps."""
    directory = _dir_for_step(layout, step)
    if not directory.is_dir() or directory.is_symlink():
        steps = layout.committed_steps()
        listing = ", ".join(map(str, steps)) if steps else "none"
        raise CheckpointNotFound(
            f"no checkpoint for step {step} in {layout.root}; committed steps: {listing}"
        )
    return directory


# ---------------------------------------------------------------------------------- links


def link_present(link: Path) -> bool:
    """Whether a link (symlink, dangling or not, or pointer file) is there at all."""
    return link.is_symlink() or link.exists()


def link_problem(
    layout: RootLayout, name: str, *, checksums: bool = False
) -> tuple[Path | None, str | None]:
    """Where the link ``name`` points (a committed dir inside root that passes its check), or
    why it cannot be followed."""
    link = layout.link_path(name)
    target = read_link(link)
    if target is None:
        if link_present(link):
            return None, f"{link} is neither a symlink nor a pointer file"
        return None, f"{link} does not exist"
    if os.path.isabs(target) or os.sep in target or (os.altsep and os.altsep in target):
        return None, f"{link} points outside the root ({target!r})"
    step = parse_step_dir_name(target)
    if step is None:
        return None, f"{link} does not name a step dir ({target!r})"
    directory = layout.root / target
    if not directory.is_dir():
        return None, f"{link} is broken: {target} does not exist"
    try:
        check_dir(directory, step, checksums=checksums)
    except (CorruptCheckpoint, UnsafeCheckpoint) as exc:
        return None, f"{link} names a damaged checkpoint: {exc}"
    except UnsupportedVersion as exc:
        return None, f"{link} names a checkpoint this distckpt cannot read: {exc}"
    return directory, None


# ---------------------------------------------------------------------------------- names


def resolve_last(layout: RootLayout, *, checksums: bool = False) -> tuple[Path, Manifest]:
    """The newest committed checkpoint that passes, warning about a ``last`` link that says
    otherwise."""
    newest = newest_valid(layout, checksums=checksums)
    if newest is None:
        raise CheckpointNotFound(f"no committed checkpoint in {layout.root}")
    linked, problem = link_problem(layout, LAST, checksums=checksums)
    if linked is not None and linked.name != newest[0].name:
        logger.warning(
            "%s names %s but the newest committed checkpoint is %s; using %s "
            "(the link is repaired at the next commit or manager start)",
            layout.link_path(LAST),
            linked.name,
            newest[0].name,
            newest[0].name,
        )
    elif linked is None and problem and link_present(layout.link_path(LAST)):
        logger.warning("not following %s; using %s", problem, newest[0].name)
    return newest


def resolve_best(
    layout: RootLayout, *, monitor: str | None, mode: policy.Mode = "min", checksums: bool = False
) -> tuple[Path, Manifest]:
    """What the ``best`` link names, or, when it cannot be followed, the best checkpoint by
    ``monitor`` rebuilt from the manifests."""
    linked, problem = link_problem(layout, BEST, checksums=checksums)
    if linked is not None:
        return linked, read_manifest(linked)
    best = best_valid(layout, monitor, mode, checksums=checksums)
    if best is not None:
        if link_present(layout.link_path(BEST)):
            logger.warning("not following %s; using %s", problem, best[0].name)
        return best
    raise CheckpointNotFound(
        f"no best checkpoint in {layout.root}: {problem}"
        + ("" if monitor else " (a best checkpoint needs monitor=... when saving)")
    )


def resolve_step(
    layout: RootLayout, step: int, *, checksums: bool = False
) -> tuple[Path, Manifest]:
    """The committed dir of ``step`` and its checked manifest."""
    directory = committed_dir(layout, step)
    return directory, check_dir(directory, step, checksums=checksums)


def classify_path(path: str | os.PathLike[str]) -> tuple[PathKind, Path]:
    """What a user's path stands for, as an absolute path: a ``last`` / ``best`` link inside
    a root (symlink or pointer file; one that is missing still names its root's newest or best
    checkpoint), a step dir (it has a manifest, or a step dir's name), or a root (any other
    dir). Raises :class:`CheckpointNotFound` for anything else, and for a step dir that is
    not there."""
    target = Path(os.path.abspath(os.fspath(path)))
    is_link = target.is_symlink() or target.is_file() or not target.exists()
    if target.name in LINK_NAMES and is_link:
        if target.parent.is_dir():
            return "link", target
    elif (target / MANIFEST_NAME).exists() or parse_step_dir_name(target.name) is not None:
        if target.exists():
            return "step_dir", target
    elif target.is_dir():
        return "root", target
    raise CheckpointNotFound(f"no checkpoint or checkpoint root at {target}")


def resolve_path(
    path: str | os.PathLike[str],
    *,
    monitor: str | None = None,
    mode: policy.Mode = "min",
    checksums: bool = False,
) -> tuple[Path, Manifest]:
    """The checkpoint a path names (see :func:`classify_path`): a link's target, a step dir
    itself, a root's newest checkpoint."""
    kind, target = classify_path(path)
    if kind == "link":
        parent = RootLayout(target.parent)
        if target.name == LAST:
            return resolve_last(parent, checksums=checksums)
        return resolve_best(parent, monitor=monitor, mode=mode, checksums=checksums)
    if kind == "step_dir":
        return target, check_dir(target, parse_step_dir_name(target.name), checksums=checksums)
    return resolve_last(RootLayout(target), checksums=checksums)


def resolve(
    which: Any,
    *,
    layout: RootLayout | None,
    monitor: str | None = None,
    mode: policy.Mode = "min",
    checksums: bool = False,
) -> tuple[Path, Manifest]:
    """The checkpoint dir and manifest that ``which`` names: ``"last"``, ``"best"`` or a step
    (within ``layout``'s root), or a path — of a step dir, of a root (its newest checkpoint),
    or of a ``last`` / ``best`` link inside a root."""
    if isinstance(which, int) and not isinstance(which, bool):
        if layout is None:
            raise InvalidArgument("a step number needs a checkpoint root")
        return resolve_step(layout, which, checksums=checksums)
    if not isinstance(which, (str, os.PathLike)):
        raise InvalidArgument(f"which must be 'last', 'best', a step or a path, not {which!r}")
    if which in LINK_NAMES and layout is not None and isinstance(which, str):
        if which == LAST:
            return resolve_last(layout, checksums=checksums)
        return resolve_best(layout, monitor=monitor, mode=mode, checksums=checksums)
    return resolve_path(which, monitor=monitor, mode=mode, checksums=checksums)
