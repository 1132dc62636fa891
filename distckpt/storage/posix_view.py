"""The read side of a POSIX root (see :mod:`distckpt.storage.views`): committed ``step-*`` dirs,
``last``/``best`` as symlinks or pointer files, and checkpoints read where they lie."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Collection, Hashable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from distckpt.errors import CheckpointNotFound
from distckpt.fsutil import read_link
from distckpt.layout import (
    LINK_NAMES,
    MANIFEST_NAME,
    RootLayout,
    holds_a_root,
    parse_step_dir_name,
)
from distckpt.manifest import Manifest, find_problems, read_manifest, read_manifest_bytes
from distckpt.problems import Problem
from distckpt.results import CheckpointLocation
from distckpt.storage.views import CheckpointSource, Located, RootView, nested_root_refusal


class ManifestMemo:
    """The manifests parsed before, by checkpoint dir: a ``manifest.json`` holding the same
    bytes as when it was parsed (the same digest) is not parsed and checksummed again. A
    commit checks every committed checkpoint to point the links and apply retention, and
    parsing each manifest at every save made a save's cost grow with the steps kept (1 s a
    save at 5,000). It holds each kept checkpoint's parsed manifest and a 16-byte digest of
    its bytes, not the bytes: a long job keeping every step keeps them all. Its manifests are
    shared between calls, so they must never reach a user, who may change their dicts."""

    def __init__(self) -> None:
        self._parsed: dict[Path, tuple[bytes, Manifest]] = {}

    def parse(self, directory: Path, raw: bytes) -> Manifest:
        """The manifest ``raw`` (the bytes of ``directory``'s ``manifest.json``) holds."""
        digest = hashlib.blake2b(raw, digest_size=16).digest()
        known = self._parsed.get(directory)
        if known is not None and known[0] == digest:
            return known[1]
        manifest = Manifest.from_json(raw, source=os.fspath(directory / MANIFEST_NAME))
        self._parsed[directory] = (digest, manifest)
        return manifest

    def keep_only(self, directories: Collection[Path]) -> None:
        """Forget the manifests of every dir but ``directories`` (the committed ones that pass
        their checks), so that a long job does not keep every manifest it ever parsed."""
        kept = set(directories)
        self._parsed = {d: known for d, known in self._parsed.items() if d in kept}


class PosixCheckpoint(CheckpointSource):
    """A checkpoint dir; its manifest parsed through ``memo`` when one is given."""

    def __init__(
        self, directory: Path, expected_step: int | None, memo: ManifestMemo | None = None
    ) -> None:
        self.location: Path = directory
        self.expected_step = expected_step
        self._memo = memo
        self._version: tuple[int, ...] | None = None

    def describe(self, name: str) -> str:
        return os.fspath(self.location / name)

    def unsafe(self) -> str | None:
        if self.location.is_symlink():
            return f"{self.location}: is a symlink; a committed checkpoint is a real dir"
        return None

    def exists(self) -> bool:
        return self.location.is_dir()

    def read_manifest(self) -> Manifest:
        # before the read: a checkpoint replaced while it is read has another version
        self._version = directory_version(self.location)
        if self._memo is None:
            return read_manifest(self.location)
        return self._memo.parse(self.location, read_manifest_bytes(self.location))

    def committed_version(self) -> tuple[int, ...] | None:
        return self._version

    def file_problems(
        self,
        manifest: Manifest,
        *,
        checksums: bool,
        progress: Callable[[int], None] | None = None,
    ) -> list[Problem]:
        return find_problems(
            self.location,
            manifest,
            expected_step=self.expected_step,
            checksums=checksums,
            progress=progress,
        )

    def unlisted_files(self, manifest: Manifest) -> list[str]:
        problems = []
        for parent, dirs, files in os.walk(self.location):
            for name in files + [d for d in dirs if Path(parent, d).is_symlink()]:
                relative = Path(parent, name).relative_to(self.location).as_posix()
                if relative != MANIFEST_NAME and relative not in manifest.files:
                    problems.append(
                        f"{self.location / relative}: unexpected file, not in the manifest"
                    )
        return problems

    def local_copy(self, names: Collection[str]) -> AbstractContextManager[Path]:
        return _read_in_place(self.location)


@contextmanager
def _read_in_place(directory: Path) -> Iterator[Path]:
    yield directory


class PosixRootView(RootView):
    """A root directory; with ``memo``, its checkpoints' manifests are parsed through it."""

    def __init__(self, root: str | os.PathLike[str], *, memo: ManifestMemo | None = None) -> None:
        self.layout: RootLayout = RootLayout.at(root)
        self.root: Path = self.layout.root
        self.memo = memo

    def exists(self) -> bool:
        return self.root.is_dir()

    def holds_a_root(self) -> bool:
        return holds_a_root(self.root)

    def certainly_no_root(self) -> bool:
        return not self.exists()

    def committed_steps(self) -> list[int]:
        return self.layout.committed_steps()

    def committed_versions(self) -> dict[int, Hashable | None]:
        return {
            step: directory_version(_dir_for_step(self.layout, step))
            for step in self.committed_steps()
        }

    def checkpoint(self, step: int) -> PosixCheckpoint:
        return PosixCheckpoint(_dir_for_step(self.layout, step), step, self.memo)

    def holds_checkpoint(self, location: CheckpointLocation, step: int) -> bool:
        # A path through a symlink to this root names this root's checkpoint all the same.
        own = self.checkpoint(step).location
        return location == own or os.path.realpath(location) == os.path.realpath(own)

    def every_checkpoint(self) -> list[CheckpointSource]:
        """Every entry with a step dir's name (a symlink or a file included: verify reports
        why it is not a checkpoint)."""
        return [
            PosixCheckpoint(Path(entry.path), step)
            for entry in sorted(os.scandir(self.root), key=lambda e: e.name)
            if (step := parse_step_dir_name(entry.name)) is not None
        ]

    def set_aside_checkpoints(self) -> list[CheckpointLocation]:
        return list(self.layout.set_aside_dirs())

    def read_pointer(self, name: str) -> str | None:
        return read_link(self.layout.link_path(name))

    def pointer_present(self, name: str) -> bool:
        link = self.layout.link_path(name)
        return link.is_symlink() or link.exists()

    def pointer_location(self, name: str) -> str:
        return os.fspath(self.layout.link_path(name))


def directory_version(directory: Path) -> tuple[int, ...] | None:
    """What identifies the checkpoint now at ``directory``: the dir's device and inode, and its
    manifest's inode, modification time and size (an overwrite renames another dir in, with
    another manifest); the dir's alone without a manifest; None if the dir cannot be read."""
    try:
        found = os.stat(directory)
    except OSError:
        return None
    try:
        manifest = os.stat(directory / MANIFEST_NAME)
    except OSError:
        return found.st_dev, found.st_ino
    return found.st_dev, found.st_ino, manifest.st_ino, manifest.st_mtime_ns, manifest.st_size


def _dir_for_step(layout: RootLayout, step: int) -> Path:
    """The committed dir of ``step`` whatever its zero padding (any width parses): the one
    named as distckpt names it when that is a dir, without listing the root; else the first
    such dir in name order, so that every call picks the same one."""
    canonical = layout.step_dir(step)
    try:
        if stat.S_ISDIR(os.lstat(canonical).st_mode):
            return canonical
    except (FileNotFoundError, NotADirectoryError):
        pass
    try:
        entries = list(os.scandir(layout.root))
    except FileNotFoundError:
        entries = []
    for entry in sorted(entries, key=lambda entry: entry.name):
        if parse_step_dir_name(entry.name) == step and entry.is_dir(follow_symlinks=False):
            return Path(entry.path)
    return layout.step_dir(step)


def locate_path(path: str | os.PathLike[str]) -> Located:
    """What a user's path stands for: a ``last`` / ``best`` link inside a root (symlink or
    pointer file; one that is missing still names its root's newest or best checkpoint), a
    step dir (it has a manifest, or a step dir's name and holds no root: a damaged one, for
    verify to report), or a root (any other dir, a sweep's ``step-1`` holding a root's
    entries, :func:`~distckpt.layout.holds_a_root`, included; a symlink named
    ``last``/``best`` to one too when it is no pointer of its parent's:
    :meth:`~distckpt.storage.views.RootView.owns_pointer`). Raises
    :class:`CheckpointNotFound` for anything else, and for a step dir that is not there;
    :class:`InvalidArgument` for a root named like a step dir inside another root (which
    would list it as a damaged checkpoint of its own)."""
    target = Path(os.path.abspath(os.fspath(path)))
    is_link = target.is_symlink() or target.is_file() or not target.exists()
    if target.name in LINK_NAMES and is_link:
        if target.parent.is_dir():
            parent = PosixRootView(target.parent)
            if target.is_dir() and not parent.owns_pointer(target.name):
                return Located("root", PosixRootView(target))
            return Located("link", parent, pointer=target.name)
    elif (target / MANIFEST_NAME).exists() or (
        parse_step_dir_name(target.name) is not None
        and target.exists()
        and not holds_a_root(target)
    ):
        source = PosixCheckpoint(target, parse_step_dir_name(target.name))
        return Located("step_dir", PosixRootView(target.parent), source=source)
    elif target.is_dir():
        if parse_step_dir_name(target.name) is not None and holds_a_root(target.parent):
            raise nested_root_refusal(target, str(target.parent), target.name)
        return Located("root", PosixRootView(target))
    if target.exists():  # a plain file (or a device, a socket): there, but no directory
        raise CheckpointNotFound(
            f"{target} is a file, not a checkpoint or checkpoint root (a directory)"
        )
    raise CheckpointNotFound(f"no checkpoint or checkpoint root at {target}")
