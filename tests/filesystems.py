"""Real filesystems for tests: loop-device images, FUSE mounts, sized tmpfs, a read-only mount.

:class:`MountFactory` makes each mount once per test session under a temporary directory and
undoes all of them at the end, whatever happened (unmount, lazily as a last resort, and detach
the loop devices it attached; what a session killed outright left, the next one sweeps:
:mod:`tests.leftover_mounts`). Mounting needs root; the Debian packages providing the tools are
installed with apt when missing (:mod:`tests.apt`). Where that cannot be done (no root, no apt,
no FUSE), a test asking for the mount is skipped with the exact reason, except under
``CI=true``, where every mount must work and a missing one fails the test.

What this machine's kind of kernel offers (a container's, as in CI): ext4, xfs and btrfs in the
kernel, and FUSE; no vfat, exfat or NFS driver and no ``modprobe``. So exFAT runs through
exfat-fuse (which wants a block device: a loop device is attached first) and FAT16/FAT32
through fusefat, a FUSE driver of its own.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest

from tests.apt import AptFailed, apt_unavailable_reason, install_missing_tools, missing_packages

#: the command each kind of mount needs, and the Debian package that provides it
TOOL_PACKAGES = {
    "mkfs.ext4": "e2fsprogs",
    "mkfs.xfs": "xfsprogs",
    "mkfs.btrfs": "btrfs-progs",
    "mkfs.exfat": "exfatprogs",
    "mount.exfat-fuse": "exfat-fuse",
    "mkfs.vfat": "dosfstools",
    "fusefat": "fusefat",
    "bindfs": "bindfs",
    "fuse2fs": "fuse2fs",
    "losetup": "mount",
}
#: the tools of :data:`TOOL_PACKAGES` that mount through FUSE, and so need ``/dev/fuse``
FUSE_TOOLS = frozenset({"mount.exfat-fuse", "fusefat", "bindfs", "fuse2fs"})


@dataclass(frozen=True)
class Mount:
    """One mounted filesystem. ``path`` is where tests write (for the read-only mount, where
    they read). ``writable_source`` is the same files through a writable name that is not
    this mount: the read-only mount's source, the directory under bindfs."""

    name: str
    path: Path
    symlinks: bool
    read_only: bool = False
    writable_source: Path | None = None


@dataclass(frozen=True)
class FilesystemKind:
    """How to make one kind of mount: the tools it needs and the commands that make it."""

    name: str
    tools: tuple[str, ...]
    symlinks: bool
    image_mib: int = 0
    read_only: bool = False


#: every filesystem of the matrix, in the order the docs list them
KINDS: dict[str, FilesystemKind] = {
    kind.name: kind
    for kind in (
        FilesystemKind("ext4", ("mkfs.ext4",), True, image_mib=512),  # room to fill
        FilesystemKind("xfs", ("mkfs.xfs",), True, image_mib=320),  # xfs's minimum is 300 MiB
        FilesystemKind("btrfs", ("mkfs.btrfs",), True, image_mib=160),
        FilesystemKind("tmpfs", (), True),
        FilesystemKind("exfat", ("mkfs.exfat", "mount.exfat-fuse", "losetup"), False, 96),
        FilesystemKind("fat16", ("mkfs.vfat", "fusefat"), False, image_mib=96),
        FilesystemKind("fat32", ("mkfs.vfat", "fusefat"), False, image_mib=96),
        FilesystemKind("bindfs", ("bindfs",), True),
        FilesystemKind("fuse2fs", ("mkfs.ext4", "fuse2fs"), True, image_mib=96),
        FilesystemKind("readonly", (), True, read_only=True),
    )
}


#: filesystems of the matrix that lose a directory's contents when renaming it (fusefat empties
#: it): no checkpoint ever commits there
LOSES_RENAMED_DIRS = frozenset({"fat16", "fat32"})


#: mounts some tests need beyond the matrix
EXTRA_KINDS: dict[str, FilesystemKind] = {
    kind.name: kind
    for kind in (
        # the disk-full case: small enough to fill quickly
        FilesystemKind("small-ext4", ("mkfs.ext4",), True, image_mib=24),
        # a file system without direct I/O (it refuses O_DIRECT): the page cache is all it has
        FilesystemKind("ramfs", (), True),
        # a filesystem that runs out of inodes long before it runs out of space
        FilesystemKind("tmpfs-16-inodes", (), True),
    )
}


def _run(*command: str | os.PathLike[str]) -> None:
    done = subprocess.run(
        [os.fspath(part) for part in command], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(os.fspath, command))} failed ({done.returncode}): "
            f"{(done.stderr or done.stdout).strip()}"
        )


def _output(*command: str | os.PathLike[str]) -> str:
    return subprocess.run(
        [os.fspath(part) for part in command], capture_output=True, text=True, check=True
    ).stdout.strip()


def not_mountable_reason(tools: tuple[str, ...]) -> str | None:
    """Why mounts cannot be made here, or None when they can (the tools are installed first)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return f"mounting needs root (running as uid {os.getuid()})"
    if FUSE_TOOLS.intersection(tools) and not Path("/dev/fuse").exists():
        return "no /dev/fuse: FUSE is not available here"
    needed = {tool: TOOL_PACKAGES[tool] for tool in tools}
    missing = missing_packages(needed)
    if not missing:
        return None
    if shutil.which("apt-get") is None:
        return f"missing packages {', '.join(missing)} and no apt-get to install them"
    try:
        install_missing_tools(needed)
    except AptFailed as exc:
        return f"could not install {', '.join(missing)}: {exc}"
    still_missing = [tool for tool in tools if shutil.which(tool) is None]
    if still_missing:
        return f"installed {', '.join(missing)} but {', '.join(still_missing)} is still missing"
    return None


def tool_missing_reason(tool: str, package: str) -> str | None:
    """Why ``tool`` cannot be run here, or None once it can (``package`` is installed with
    apt-get first where it is missing and apt-get exists)."""
    if shutil.which(tool) is not None:
        return None
    reason = apt_unavailable_reason()
    if reason is not None:
        return f"{tool} is missing and {reason}"
    try:
        install_missing_tools({tool: package})
    except AptFailed as exc:
        return f"could not install {package}: {exc}"
    return None if shutil.which(tool) is not None else f"installed {package} but no {tool}"


def skip_or_fail(reason: str) -> NoReturn:
    """Skip a test that needs a mount or a tool this machine cannot provide; in CI that is a
    failure."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run every test, but: {reason}")
    pytest.skip(reason)


@contextlib.contextmanager
def immutable(path: Path, *, may_move_under: Path | None = None) -> Iterator[Path]:
    """Make ``path`` immutable for the block (``chattr +i``: not even root may rename, delete or
    add to it); skipped (failed in CI) where chattr, root or the filesystem's support is
    missing. On leaving, the flag is cleared where ``path`` is then: at ``path``, or, where
    the code under test moved it, at every entry of its name under ``may_move_under``."""
    chattr = shutil.which("chattr")
    if chattr is None:
        skip_or_fail("needs chattr(1) to make a file or dir immutable")
    made = subprocess.run([chattr, "+i", path], capture_output=True, text=True)
    if made.returncode != 0:
        skip_or_fail(f"chattr +i {path}: {made.stderr.strip()}")
    try:
        yield path
    finally:
        if os.path.lexists(path):
            held = [path]
        else:
            held = sorted(may_move_under.rglob(path.name)) if may_move_under is not None else []
        for moved in held:
            subprocess.run([chattr, "-i", moved], check=True)


def require_direct_io(directory: Path) -> None:
    """Skip (in CI: fail) where the file system under ``directory`` refuses ``O_DIRECT``."""
    probe = directory / ".direct-probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError as exc:
        skip_or_fail(f"the file system of the test's temporary directory refuses O_DIRECT: {exc}")
    finally:
        probe.unlink(missing_ok=True)


def take_every_free_block(volume: Path, hog: Path) -> None:
    """Allocate to ``hog`` every block ``volume`` has left, root's reserve included (the
    ranks run as root, which may write into it)."""
    stat = os.statvfs(volume)
    chunk, offset = stat.f_bfree * stat.f_frsize, 0
    with open(hog, "wb") as file:
        while chunk >= stat.f_frsize:
            try:
                os.posix_fallocate(file.fileno(), offset, chunk)
                offset += chunk
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                chunk //= 2


def require_mounting() -> None:
    """Skip (in CI: fail) the calling test where this process cannot mount (no root)."""
    reason = not_mountable_reason(())
    if reason is not None:
        skip_or_fail(reason)


def statvfs_free_bytes(path: Path) -> int:
    """The bytes an unprivileged writer may still use on ``path``'s filesystem, as statvfs
    says (measured here on its own, to hold distckpt's measure against)."""
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


@contextlib.contextmanager
def leaving_free(volume: Path, free: int, *, filler_name: str = "filler") -> Iterator[Path]:
    """Fill ``volume`` with one file of its own, ``filler_name``, allocated at once until
    ``free`` bytes are left free (0: full); the file is removed at the end."""
    filler = volume / filler_name
    now = statvfs_free_bytes(volume)
    assert now > free, f"{volume} has {now} bytes free, not more than {free}"
    try:
        with open(filler, "wb") as file:
            os.posix_fallocate(file.fileno(), 0, now - free)
        yield filler
    finally:
        filler.unlink(missing_ok=True)


@dataclass
class MountFactory:
    """Makes mounts under ``base`` on first request, each once; :meth:`cleanup` undoes all.
    ``min_size_mib``: make every image and tmpfs at least this large (a benchmark writing more
    than a kind's own size holds); None keeps each kind's own size."""

    base: Path
    min_size_mib: int | None = None
    _mounts: dict[str, Mount] = field(default_factory=dict)
    _failures: dict[str, str] = field(default_factory=dict)
    _mounted: list[Path] = field(default_factory=list)
    _loop_devices: list[str] = field(default_factory=list)

    def get(self, name: str) -> Mount:
        """The mount named ``name`` (a key of :data:`KINDS`, or one of :data:`EXTRA_KINDS`),
        made now if needed; skips (or, in CI, fails) the calling test when it cannot be made."""
        try:
            return self.mount(name)
        except RuntimeError as exc:
            skip_or_fail(f"{name}: {exc}")

    def mount(self, name: str) -> Mount:
        """:meth:`get` outside a test: the mount named ``name``, made now if needed; raises
        :class:`RuntimeError` saying why when it cannot be made (each later request too)."""
        if name not in self._mounts and name not in self._failures:
            try:
                self._mounts[name] = self._make(name)
            except RuntimeError as exc:
                self._failures[name] = str(exc)
        if name in self._failures:
            raise RuntimeError(self._failures[name])
        return self._mounts[name]

    def _size_mib(self, own_mib: int) -> int:
        """An image's or tmpfs's size: the kind's own, or :attr:`min_size_mib` if larger."""
        return max(own_mib, self.min_size_mib or 0)

    def _make(self, name: str) -> Mount:
        kind = EXTRA_KINDS[name] if name in EXTRA_KINDS else KINDS[name]
        reason = not_mountable_reason(kind.tools)
        if reason is not None:
            raise RuntimeError(reason)
        target = self.base / name
        target.mkdir(parents=True)
        image = self.base / f"{name}.img"
        if kind.image_mib:
            _run("truncate", "-s", f"{self._size_mib(kind.image_mib)}M", image)
        makers: dict[str, Callable[[Path, Path], None]] = {
            "ext4": self._loop("ext4"),
            "small-ext4": self._loop("ext4"),
            "xfs": self._loop("xfs"),
            "btrfs": self._loop("btrfs"),
            "tmpfs": lambda image, target: self._mount(
                "mount", "-t", "tmpfs", "-o", f"size={self._size_mib(TMPFS_MIB)}m", "tmpfs", target
            ),
            "exfat": self._exfat,
            "fat16": self._fusefat(16),
            "fat32": self._fusefat(32),
            "bindfs": self._bindfs,
            "fuse2fs": self._fuse2fs,
            "readonly": self._read_only,
            "ramfs": lambda image, target: self._mount("mount", "-t", "ramfs", "ramfs", target),
            "tmpfs-16-inodes": lambda image, target: self._mount(
                "mount", "-t", "tmpfs", "-o", "size=32m,nr_inodes=16", "tmpfs", target
            ),
        }
        makers[name](image, target)
        source = self.base / f"{name}-source" if name in ("readonly", "bindfs") else None
        return Mount(name, target, kind.symlinks, kind.read_only, source)

    def _mount(self, *command: str | os.PathLike[str]) -> None:
        _run(*command)
        self._mounted.append(Path(command[-1]))

    def _loop(self, fstype: str) -> Callable[[Path, Path], None]:
        def make(image: Path, target: Path) -> None:
            _run(f"mkfs.{fstype}", *_MKFS_QUIET[fstype], image)
            self._mount("mount", "-o", "loop", image, target)  # autoclear detaches the loop

        return make

    def _exfat(self, image: Path, target: Path) -> None:
        _run("mkfs.exfat", image)
        device = _output("losetup", "--find", "--show", image)  # exfat-fuse wants a block device
        self._loop_devices.append(device)
        self._mount("mount.exfat-fuse", device, target)

    def _fusefat(self, bits: int) -> Callable[[Path, Path], None]:
        def make(image: Path, target: Path) -> None:
            _run("mkfs.vfat", "-F", str(bits), image)
            self._mount("fusefat", "-o", "rw+", image, target)

        return make

    def _bindfs(self, image: Path, target: Path) -> None:
        source = self.base / "bindfs-source"
        source.mkdir()
        self._mount("bindfs", source, target)

    def _fuse2fs(self, image: Path, target: Path) -> None:
        _run("mkfs.ext4", "-q", "-F", image)
        self._mount("fuse2fs", "-o", "fakeroot", image, target)

    def _read_only(self, image: Path, target: Path) -> None:
        source = self.base / "readonly-source"
        source.mkdir()
        self._mount("mount", "--bind", source, target)
        _run("mount", "-o", "remount,bind,ro", target)

    def cleanup(self) -> list[str]:
        """Unmount everything (lazily when a plain unmount fails) and detach the loop devices
        attached here; returns what could not be undone."""
        problems: list[str] = []
        for target in reversed(self._mounted):
            if unmount(target):
                continue
            problems.append(f"could not unmount {target}")
        for device in self._loop_devices:
            try:
                _run("losetup", "-d", device)
            except RuntimeError as exc:
                problems.append(str(exc))
        self._mounted.clear()
        self._loop_devices.clear()
        return problems


TMPFS_MIB = 96
_MKFS_QUIET = {"ext4": ("-q", "-F"), "xfs": ("-q", "-f"), "btrfs": ("-q", "-f")}


def unmount(target: Path) -> bool:
    """Unmount ``target``: plainly, as FUSE does, or lazily as a last resort; False, with a
    warning (a mount left behind outlives the session), if none worked."""
    for command in (("umount", target), ("fusermount", "-u", target), ("umount", "-l", target)):
        if shutil.which(command[0]) is None:
            continue
        try:
            _run(*command)
            return True
        except RuntimeError:
            continue
    warnings.warn(f"could not unmount {target}: it stays mounted", stacklevel=2)
    return False


def tree_snapshot(root: Path) -> dict[str, tuple[int, int, str | None]]:
    """``root`` and every entry under it, by its path relative to ``root``: its size, its
    modification time in ns and, for a link, its target (a link is not followed)."""
    snapshot: dict[str, tuple[int, int, str | None]] = {}
    for entry in [root, *root.rglob("*")]:  # rglob does not descend into linked directories
        stat = entry.lstat()
        target = os.readlink(entry) if entry.is_symlink() else None
        snapshot[os.fspath(entry.relative_to(root))] = (stat.st_size, stat.st_mtime_ns, target)
    return snapshot
