"""Finding and reading committed checkpoints; needs no process group.

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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distckpt import policy
from distckpt.coord import Coordinator, current_rank
from distckpt.errors import (
    CheckpointNotFound,
    CheckpointVanished,
    CorruptCheckpoint,
    InvalidArgument,
    UnsafeCheckpoint,
    UnsupportedVersion,
    WorldSizeMismatch,
)
from distckpt.formats import ReadOptions, ShardContext, format_named
from distckpt.fsutil import read_link
from distckpt.layout import BEST, LAST, LINK_NAMES, MANIFEST_NAME, RootLayout, parse_step_dir_name
from distckpt.manifest import Manifest, find_problems, read_manifest
from distckpt.results import Checkpoint, CheckpointInfo
from distckpt.state import load_into, to_plain

logger = logging.getLogger("distckpt")

#: How often a read of "last"/"best"/a root resolves again after its checkpoint was deleted by
#: another process's retention mid-read. Readers retry rather than take a shared lock, so a
#: reader never delays a writer's rotation and needs no lock support from the filesystem; a
#: deleted dir is renamed into the trash first, so a reader sees a whole dir or none.
VANISH_RETRIES = 5


def check_dir(directory: Path, expected_step: int | None, *, checksums: bool = False) -> Manifest:
    """The manifest of a committed dir, after checking its step and that every listed file is
    present with its size (and, with ``checksums=True``, its checksum). Raises
    :class:`CorruptCheckpoint` naming what is wrong."""
    if directory.is_symlink():
        raise UnsafeCheckpoint(f"{directory} is a symlink; a committed checkpoint is a real dir")
    manifest = read_manifest(directory)
    problems = find_problems(directory, manifest, expected_step=expected_step, checksums=checksums)
    problems += missing_required_files(directory, manifest)
    if problems:
        raise CorruptCheckpoint(f"{directory} fails its manifest check: " + "; ".join(problems))
    return manifest


def missing_required_files(directory: Path, manifest: Manifest) -> list[str]:
    """Problems with the manifest's format: unknown, or a file it requires (each rank's file,
    DCP's ``.metadata``) not listed — an unlisted file is unchecked and must not be loaded."""
    try:
        fmt = format_named(manifest.format)
    except InvalidArgument:
        return [f"{directory / MANIFEST_NAME}: unknown checkpoint format {manifest.format!r}"]
    return [
        f"{directory / name}: required by the {manifest.format!r} format but not in the manifest"
        for name in fmt.required_files(manifest)
        if name not in manifest.files
    ]


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


def _dir_for_step(layout: RootLayout, step: int) -> Path:
    """The committed dir of ``step`` whatever its zero padding (any width parses)."""
    for entry in os.scandir(layout.root):
        if parse_step_dir_name(entry.name) == step and entry.is_dir(follow_symlinks=False):
            return Path(entry.path)
    return layout.step_dir(step)


def link_problem(
    layout: RootLayout, name: str, *, checksums: bool = False
) -> tuple[Path | None, str | None]:
    """Where the link ``name`` points (a committed dir inside root that passes its check), or
    why it cannot be followed."""
    link = layout.link_path(name)
    target = read_link(link)
    if target is None:
        if link.exists() or link.is_symlink():
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


def resolve_last(layout: RootLayout, *, checksums: bool = False) -> tuple[Path, Manifest]:
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
    elif linked is None and problem and _link_present(layout.link_path(LAST)):
        logger.warning("not following %s; using %s", problem, newest[0].name)
    return newest


def resolve_best(
    layout: RootLayout, *, monitor: str | None, mode: policy.Mode = "min", checksums: bool = False
) -> tuple[Path, Manifest]:
    linked, problem = link_problem(layout, BEST, checksums=checksums)
    if linked is not None:
        return linked, read_manifest(linked)
    if monitor is not None:
        valid = iter_valid(layout, checksums=checksums)
        records = {manifest.step: (path, manifest) for path, manifest in valid}
        best = policy.best_step(
            [policy.CheckpointRecord(s, m.epoch, m.metrics) for s, (_, m) in records.items()],
            monitor,
            mode,
        )
        if best is not None:
            if _link_present(layout.link_path(BEST)):
                logger.warning("not following %s; using %s", problem, records[best][0].name)
            return records[best]
    raise CheckpointNotFound(
        f"no best checkpoint in {layout.root}: {problem}"
        + ("" if monitor else " (a best checkpoint needs monitor=... when saving)")
    )


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


def _link_present(link: Path) -> bool:
    return link.is_symlink() or link.exists()


def resolve_step(
    layout: RootLayout, step: int, *, checksums: bool = False
) -> tuple[Path, Manifest]:
    directory = committed_dir(layout, step)
    return directory, check_dir(directory, step, checksums=checksums)


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
    return resolve_path(Path(os.fspath(which)), monitor=monitor, mode=mode, checksums=checksums)


def resolve_path(
    path: Path,
    *,
    monitor: str | None = None,
    mode: policy.Mode = "min",
    checksums: bool = False,
) -> tuple[Path, Manifest]:
    path = Path(os.path.abspath(path))
    if path.name in LINK_NAMES and (path.is_symlink() or path.is_file() or not path.exists()):
        parent = RootLayout(path.parent)
        if path.name == LAST:
            return resolve_last(parent, checksums=checksums)
        return resolve_best(parent, monitor=monitor, mode=mode, checksums=checksums)
    if (path / MANIFEST_NAME).exists() or parse_step_dir_name(path.name) is not None:
        if not path.exists():
            raise CheckpointNotFound(f"no checkpoint at {path}")
        return path, check_dir(path, parse_step_dir_name(path.name), checksums=checksums)
    if path.is_dir():
        return resolve_last(RootLayout(path), checksums=checksums)
    raise CheckpointNotFound(f"no checkpoint at {path}")


@dataclass(frozen=True)
class PreparedRead:
    """A checked plan to read one rank's state: everything that can fail without touching
    the other ranks, done before the format's read (which may be collective)."""

    directory: Path
    manifest: Manifest
    rank: int
    world_size: int
    plain_template: Any


def prepare_read(
    directory: Path, manifest: Manifest, *, rank: int, world_size: int | None, template: Any
) -> PreparedRead:
    """Check that this rank can read ``directory`` and reduce ``template`` to plain data.

    ``world_size`` is the number of ranks restoring, or None when a plain process reads one
    rank's part (then only that the rank exists is checked). A manager agrees on this step's
    outcome before any rank starts the read, so a rank failing here alone never leaves the
    others inside a collective read."""
    fmt = format_named(manifest.format)
    if fmt.fixed_world_size:
        if world_size is not None and world_size != manifest.world_size:
            raise WorldSizeMismatch(
                f"{directory} was saved by {manifest.world_size} ranks in the "
                f"{manifest.format!r} format and cannot be restored by {world_size} ranks; "
                f"restore with {manifest.world_size} ranks, or save with format='dcp' to "
                "reshard on restore"
            )
        if not 0 <= rank < manifest.world_size:
            raise CheckpointNotFound(
                f"{directory} has ranks 0..{manifest.world_size - 1}; there is no rank {rank}"
            )
    plain_template = to_plain(template) if template is not None else None
    fmt.check_template(directory, plain_template)
    return PreparedRead(
        directory, manifest, rank, world_size or manifest.world_size, plain_template
    )


def read_state(
    prepared: PreparedRead,
    *,
    template: Any,
    options: ReadOptions,
    strict: bool,
    coordinator: Coordinator | None = None,
) -> Checkpoint:
    """Read one rank's state as :func:`prepare_read` planned, and load it into ``template``."""
    directory, manifest = prepared.directory, prepared.manifest
    ctx = ShardContext(
        rank=prepared.rank, world_size=prepared.world_size, fsync=False, coordinator=coordinator
    )
    fmt = format_named(manifest.format)
    try:
        loaded = fmt.read(directory, manifest, ctx, prepared.plain_template, options)
    except FileNotFoundError as exc:
        if not directory.exists():
            raise CheckpointVanished(f"{directory} was deleted while it was being read") from exc
        raise CorruptCheckpoint(f"{directory}: a file is missing: {exc}") from exc
    report = load_into(template, loaded, strict=strict) if template is not None else None
    return Checkpoint(
        state=loaded,
        step=manifest.step,
        epoch=manifest.epoch,
        metrics=dict(manifest.metrics),
        metadata=dict(manifest.metadata),
        path=directory,
        manifest=manifest,
        missing_keys=tuple(report.missing_keys) if report else (),
        unexpected_keys=tuple(report.unexpected_keys) if report else (),
    )


def list_checkpoints(layout: RootLayout) -> list[CheckpointInfo]:
    """Every committed checkpoint that passes its manifest check, oldest first."""
    return [
        CheckpointInfo.from_manifest(path, manifest)
        for path, manifest in iter_valid(layout, newest_first=False)
    ]


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
) -> Checkpoint:
    """Load one rank's part of a committed checkpoint in any process; no process group needed.

    ``path`` is a step dir, a root (its newest checkpoint), or a ``last`` / ``best`` link
    (symlink or pointer file), whatever the working directory. ``rank`` defaults to this
    process's rank when torch.distributed is initialised, else 0. ``state=`` loads in place as
    in :meth:`CheckpointManager.restore`; ``verify=True`` checks every file's checksum first.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgument(f"path must be a path, not {path!r}")
    if rank is None:
        rank = current_rank()
    options = ReadOptions(map_location=map_location, allow_pickle=allow_pickle, mmap=mmap)
    for attempt in range(VANISH_RETRIES + 1):
        directory, manifest = resolve_path(Path(os.fspath(path)), checksums=verify)
        try:
            prepared = prepare_read(directory, manifest, rank=rank, world_size=None, template=state)
            return read_state(prepared, template=state, options=options, strict=strict)
        except CheckpointVanished:
            if attempt == VANISH_RETRIES or directory == Path(os.path.abspath(path)):
                raise  # an explicitly named dir that is gone: nothing else to fall back to
            logger.warning("%s vanished while being read; resolving %s again", directory, path)
    raise AssertionError("unreachable")
