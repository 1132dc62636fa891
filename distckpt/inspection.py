"""Whether one committed checkpoint is whole: its manifest read and every file it lists
checked against it (:func:`inspect`, :func:`check`), or the local copy a read is about to use
(:func:`check_local_copy`), over any backend's
:class:`~distckpt.storage.views.CheckpointSource`. :mod:`distckpt.resolve` uses these to tell
which checkpoint a name means; :mod:`distckpt.verify` reports what :func:`inspect` finds."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import replace
from pathlib import Path

from distckpt.errors import CorruptCheckpoint, InvalidArgument, UnsafeCheckpoint
from distckpt.formats import format_named
from distckpt.layout import MANIFEST_NAME
from distckpt.manifest import Manifest, find_problems
from distckpt.problems import Problem, damage, unjudged
from distckpt.storage.views import CheckpointSource


def inspect(
    source: CheckpointSource,
    *,
    checksums: bool = False,
    progress: Callable[[int], None] | None = None,
) -> tuple[Manifest, list[Problem]]:
    """The manifest of a committed checkpoint and everything wrong with it against that
    manifest (empty when it passes): its step, every listed file present with its size (and,
    with ``checksums=True``, its checksum), the format's required files listed. Raises
    :class:`UnsafeCheckpoint` for a dir that is a symlink, and the manifest's own errors
    (:class:`CorruptCheckpoint`, :class:`UnsupportedVersion`) when it cannot be read."""
    unsafe = source.unsafe()
    if unsafe is not None:
        raise UnsafeCheckpoint(unsafe)
    manifest = source.read_manifest()
    problems = source.file_problems(manifest, checksums=checksums, progress=progress)
    problems += _format_problems(source, manifest)
    return manifest, problems


def check(source: CheckpointSource, *, checksums: bool = False) -> Manifest:
    """The manifest of a committed checkpoint that passes :func:`inspect`; raises
    :class:`CorruptCheckpoint` naming every problem otherwise, ``damaged`` when one of them is
    damage this version is sure of."""
    manifest, problems = inspect(source, checksums=checksums)
    _refuse_problems(source, problems)
    return manifest


def check_local_copy(
    source: CheckpointSource, directory: Path, manifest: Manifest, names: Collection[str]
) -> None:
    """Raise :class:`CorruptCheckpoint`, as :func:`check` with ``checksums=True`` does, when a
    file ``names`` of ``directory`` (``source``'s :meth:`~CheckpointSource.local_copy`) is not
    of the size and checksum ``manifest`` lists: the bytes a read is about to use, checked
    where it reads them (for an object store, the download rather than the objects, which a
    second download would read again and which may change in between). Files are named as
    ``source`` names them (an object's key, not the temporary copy's path)."""
    listed = replace(manifest, files={name: manifest.files[name] for name in names})
    problems = find_problems(directory, listed, checksums=True, describe=source.describe)
    _refuse_problems(source, problems)


def _refuse_problems(source: CheckpointSource, problems: list[Problem]) -> None:
    """:class:`CorruptCheckpoint` naming every one of ``problems`` of ``source``, if any;
    ``damaged`` when one of them is damage this version is sure of."""
    if problems:
        raise CorruptCheckpoint(
            f"{source.location} fails its manifest check: " + "; ".join(problems),
            damaged=any(problem.damage for problem in problems),
        )


def _format_problems(source: CheckpointSource, manifest: Manifest) -> list[Problem]:
    """The manifest's format is unknown (a later version's, perhaps: not judged damage), or a
    file it requires (each rank's file, DCP's ``.metadata``) is not listed: an unlisted file is
    unchecked and must not be loaded."""
    try:
        fmt = format_named(manifest.format)
    except InvalidArgument:
        return [
            unjudged(
                f"{source.describe(MANIFEST_NAME)}: unknown checkpoint format {manifest.format!r}"
            )
        ]
    return [
        damage(
            f"{source.describe(name)}: required by the {manifest.format!r} format but not in "
            "the manifest"
        )
        for name in fmt.required_files(manifest)
        if name not in manifest.files
    ]
