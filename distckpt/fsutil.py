"""Filesystem primitives that make a checkpoint durable and its publication atomic.

Nothing here knows about ranks or process groups. The durable-commit order distckpt follows is
the POSIX one: fsync each file, fsync the directory that holds them, rename the directory to its
final name, fsync the parent; then swap a link by creating it under a temporary name, renaming
it over the old one and fsyncing the parent again. A crash at any instant therefore leaves
either the old or the new state under each final name, never a partial one.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Literal, Protocol

logger = logging.getLogger("distckpt")

LinkMode = Literal["auto", "symlink", "pointer"]
LINK_MODES: tuple[LinkMode, ...] = ("auto", "symlink", "pointer")
POINTER_MAX_BYTES = 4096

# errnos with which filesystems refuse to create a symlink (FUSE/cloud mounts, SMB, some NFS)
_SYMLINK_REFUSED = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EACCES}


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a directory's entries (creations, renames, deletions) durable; a failure (a disk
    that cannot store them: EIO) is raised named after the directory."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems (and all of Windows) cannot fsync a directory; the rename itself
        # is still atomic there, only its durability on power loss is up to the filesystem.
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise with_file_name(exc, Path(path)) from None
    finally:
        os.close(fd)


def fsync_file(fd: int, path: Path) -> None:
    """Make the open file ``fd``'s bytes durable; a failure (a disk that took every write may
    still fail to store them: thin-provisioned or network, ENOSPC, EDQUOT, EIO) is raised named
    after ``path``."""
    try:
        os.fsync(fd)
    except OSError as exc:
        raise with_file_name(exc, path) from None


class Writable(Protocol):
    """What :func:`atomic_write` hands its ``write``: a file open for writing, as far as
    ``torch.save`` and ``file.write`` need one."""

    def write(self, data: bytes | bytearray | memoryview, /) -> int: ...

    def flush(self) -> None: ...


class _WatchedFile:
    """The open file :func:`atomic_write` hands its ``write``. It keeps the first ``OSError`` a
    write raised: ``torch.save``'s zip writer replaces it with an error of its own that no
    longer says, say, "No space left on device". For a file that will be fsynced
    (``early_writeback``), its writes start the disk on every further :data:`WRITEBACK_BYTES`
    (:class:`EarlyWriteback`), a large write in stretches of that size."""

    def __init__(self, file: BinaryIO, *, early_writeback: bool) -> None:
        self._file = file
        # Flushed before each hint: it covers what the kernel holds, not Python's buffer.
        self._early = (
            EarlyWriteback(file.fileno(), before_hint=file.flush) if early_writeback else None
        )
        #: the first OSError a write raised, if any
        self.error: OSError | None = None

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        view = memoryview(data).cast("B")
        try:
            if self._early is None:
                self._file.write(view)
            else:
                self._early.write(view, self._file.write)
        except OSError as exc:
            self.error = self.error or exc
            raise
        return view.nbytes

    def flush(self) -> None:
        self._file.flush()


def atomic_write(path: Path, write: Callable[[Writable], object], *, fsync: bool) -> None:
    """Create or replace ``path`` with what ``write`` writes to the open file, so that readers
    see the old content or the new, never a mix: written to a temporary name beside it, fsynced,
    renamed over it. With ``fsync``, a large file starts the disk as it goes
    (:class:`EarlyWriteback`). A write that fails raises its ``OSError``, named after ``path``,
    even where ``write`` (``torch.save``) turned it into an error of its own."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    watched: _WatchedFile | None = None
    try:
        with open(tmp, "xb") as file:
            watched = _WatchedFile(file, early_writeback=fsync)
            write(watched)
            if fsync:
                file.flush()
                fsync_file(file.fileno(), path)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise with_file_name(exc, path) from None
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and watched is not None and watched.error is not None:
            raise with_file_name(watched.error, path) from None
        raise
    if fsync:
        fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, *, fsync: bool) -> None:
    """:func:`atomic_write` of ``data``."""
    atomic_write(path, lambda file: file.write(data), fsync=fsync)


def rename_dir(src: Path, dst: Path, *, fsync: bool) -> None:
    """Publish ``src`` under ``dst`` atomically. ``dst`` must not exist (``os.rename`` of a
    directory onto a non-empty one fails rather than merging)."""
    if fsync:
        fsync_dir(src)
    os.rename(src, dst)
    if fsync:
        fsync_dir(dst.parent)
        if src.parent != dst.parent:
            fsync_dir(src.parent)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def libc_function(name: str, argtypes: list[type]) -> Callable[..., int] | None:
    """The C library's function ``name`` (returning an int, setting errno) with ``argtypes``,
    or None where there is none: not Linux, not glibc, or a glibc too old to have it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function


# glibc 2.28 and later
_RENAMEAT2 = libc_function(
    "renameat2", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
)


#: A file that will be fsynced asks the kernel to start writing its bytes to the disk each time
#: this many more have been written (:class:`EarlyWriteback`), so the disk works while the rest
#: of the file is produced rather than only in the final fsync.
WRITEBACK_BYTES = 8 << 20
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h
# The errnos of sync_file_range that say the file's data is in trouble, as a write's would:
# raised. Any other (no such call, a file system or a sandbox that refuses it) only means the
# hint cannot be given, and an advice must never fail a save its fsync would complete.
_WRITEBACK_FAILURES = {errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EBADF}


_SYNC_FILE_RANGE = libc_function(
    "sync_file_range", [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
)


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Ask the kernel to start writing ``length`` bytes of the open file ``fd`` from ``offset``
    to the disk now, without waiting for that to complete (Linux's ``sync_file_range`` with
    ``SYNC_FILE_RANGE_WRITE``; it may still wait for room in the device's queue). Not a
    durability step: the file still needs its fsync, which then finds most of its bytes on
    their way. Without it the kernel holds a fresh file's pages until that fsync, so the disk
    idles while the bytes are produced and works alone afterwards.

    Returns False where the hint cannot be given (no such call on the platform, or the file
    system or a sandbox refuses it: the caller stops asking); raises the OSError of a failure
    of the file's data (EIO, ENOSPC, EDQUOT) or of a closed descriptor, as a write would."""
    if _SYNC_FILE_RANGE is None:
        return False
    if _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _WRITEBACK_FAILURES:
        raise OSError(code, os.strerror(code))
    return False


class EarlyWriteback:
    """The early writeback of one file being written that will be fsynced: the disk is asked
    (:func:`start_writeback`) to start on each further :data:`WRITEBACK_BYTES` appended through
    :meth:`write`, or on a range written out of turn (:meth:`start`); once the hint is declined,
    it is never asked again for this file. A file smaller than that is left to its fsync.
    ``before_hint`` runs before each hint of :meth:`write` (a buffered file's flush)."""

    def __init__(self, fd: int, *, before_hint: Callable[[], object] | None = None) -> None:
        self._fd = fd
        self._before_hint = before_hint
        self._enabled = True  # any thread may clear it; the answer is the same for every range
        self._written = 0  # the file's length so far
        self._started_up_to = 0  # the start of what no hint covered yet

    def write(self, view: memoryview, write_all: Callable[[memoryview], object]) -> None:
        """Append ``view`` with ``write_all`` (which writes all it is given), in stretches of
        :data:`WRITEBACK_BYTES`: one large write would otherwise be hinted only once all of it
        had been written. The disk is started on each stretch of that size written since the
        last hint."""
        for start in range(0, view.nbytes, WRITEBACK_BYTES):
            piece = view[start : start + WRITEBACK_BYTES]
            write_all(piece)
            self._written += piece.nbytes
            if self._enabled and self._written - self._started_up_to >= WRITEBACK_BYTES:
                if self._before_hint is not None:
                    self._before_hint()
                self.start(self._started_up_to, self._written - self._started_up_to)
                self._started_up_to = self._written

    def start(self, offset: int, length: int) -> None:
        """Start the disk on ``length`` bytes from ``offset`` (none if ``length`` is 0, which
        to the kernel would mean "to the end of the file")."""
        if self._enabled and length > 0:
            self._enabled = start_writeback(self._fd, offset, length)

    def skip_to(self, end: int) -> None:
        """The file is ``end`` bytes long, everything in it covered by :meth:`start`; later
        :meth:`write` calls append after it."""
        self._written = self._started_up_to = end


def exchange_dirs(a: Path, b: Path, *, fsync: bool) -> bool:
    """Swap two directories' names in one atomic step (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``), so that each name always holds one of them. Returns False, having
    changed nothing, where the platform or filesystem cannot (NFS, older kernels, not Linux)."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            return False
        raise OSError(code, os.strerror(code), os.fspath(a), None, os.fspath(b))
    if fsync:
        fsync_dir(a.parent)
        if b.parent != a.parent:
            fsync_dir(b.parent)
    return True


def make_dirs(path: Path, *, fsync: bool) -> None:
    """Create ``path`` and any missing parents (``mkdir -p``), each made durable: a new
    directory's name lives in its parent, so the parent is fsynced after each creation.
    Without that, a power loss can take away a root (and every checkpoint saved in it) that
    a plain ``mkdir(parents=True)`` made."""
    missing: list[Path] = []
    current = path
    while not os.path.lexists(current) and current.parent != current:
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)  # another process may have made it meanwhile
        if fsync:
            fsync_dir(directory.parent)


def fsync_ancestors(path: Path) -> None:
    """Make the name of ``path`` (an existing directory) and of each of its ancestors durable,
    up to the mount point of its filesystem: an fsync of each one's parent, whether or not
    this process created it. :func:`make_dirs` makes durable only what it creates, but a
    directory someone else made (the user's own ``os.makedirs``, a job killed before its
    fsync) may not be durable yet, and a power loss would take everything under it along.

    The ancestors are those of the real path (``os.path.realpath``): a root reached through a
    symlinked directory lives under the link's target, whose own ancestors are the ones that
    hold it; the name of each symlink on the way, and its ancestors, are made durable too.
    The mount point is where the device (``st_dev``) changes: a bind mount keeps the device,
    so the walk goes on past it, through the directories around the mount point instead of
    those above the bind mount's source, which are not made durable.

    An ancestor this process may not open (a directory it can only traverse, mode ``711``) is
    skipped, not an error: its name was made by someone else, whose durability this process
    cannot force, and it is the rare directory a power loss right after its creation would
    take (an administrator's, made once, long before)."""
    synced: set[Path] = set()
    _fsync_names_up_to_the_mount_point(Path(os.path.realpath(path)), synced)
    lexical = Path(os.path.abspath(path))
    for ancestor in (lexical, *lexical.parents):
        if ancestor.is_symlink():  # a power loss that drops it loses the way to the root
            link = Path(os.path.realpath(ancestor.parent)) / ancestor.name
            _fsync_names_up_to_the_mount_point(link, synced)


def _fsync_names_up_to_the_mount_point(path: Path, synced: set[Path]) -> None:
    """The walk of :func:`fsync_ancestors` from ``path`` (itself not followed if a symlink),
    skipping the directories in ``synced`` and adding those it fsyncs."""
    current = path
    device = os.lstat(current).st_dev
    while current.parent != current:
        parent = current.parent
        if os.lstat(parent).st_dev != device:
            break  # ``current`` is the mount point: its name lives on another filesystem
        if parent not in synced:
            try:
                fsync_dir(parent)
            except PermissionError:
                logger.debug("cannot open %s to make %s durable: skipped", parent, current.name)
            synced.add(parent)
        current = parent


def move_to_trash(path: Path, trash_root: Path, *, fsync: bool) -> Path | None:
    """Make a directory vanish from its name at once by renaming it into ``trash_root`` (same
    filesystem), where it can be deleted later. Returns its new path, None if it was gone.

    Durable before it returns: the trash itself, and the rename, whose new name lives in the
    trash (an fsync of the old parent alone does not make a rename durable everywhere). The
    contents are deleted only after that, so a power loss cannot bring the directory back
    under its old name with part of its files gone."""
    make_dirs(trash_root, fsync=fsync)
    doomed = trash_root / f"{path.name}.{uuid.uuid4().hex}"
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return None
    if fsync:
        fsync_dir(trash_root)
        fsync_dir(path.parent)
    return doomed


def discard_dir(path: Path, trash_root: Path, *, fsync: bool) -> None:
    """Remove a directory so that it vanishes from its name at once (:func:`move_to_trash`),
    then delete it. A crash mid-delete leaves debris in the trash, never a half-deleted
    directory under its real name."""
    doomed = move_to_trash(path, trash_root, fsync=fsync)
    if doomed is not None:
        remove_tree(doomed)


def remove_tree(path: Path) -> None:
    """Delete a file or directory tree; what is already gone is not an error."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink()
            return
    except FileNotFoundError:
        return

    def _ignore_vanished(func: object, name: str, exc: BaseException) -> None:
        if not isinstance(exc, FileNotFoundError):
            raise exc

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=_ignore_vanished)
    else:
        shutil.rmtree(path, onerror=lambda func, name, info: _ignore_vanished(func, name, info[1]))


def swap_link(
    link: Path,
    target_name: str,
    *,
    mode: LinkMode,
    trash_root: Path,
    fsync: bool,
) -> Literal["symlink", "pointer"]:
    """Point ``link`` at ``target_name`` (a name in the same directory) atomically.

    The new link is made under a temporary name and renamed over the old one, so readers see the
    old target or the new one and never no link (the remove-then-create window other libraries
    have). The link is relative (``target_name`` only), so it stays valid whatever the working
    directory and wherever the whole root is moved. ``mode="pointer"`` writes a small text file
    naming the target instead of a symlink; ``"auto"`` does so only where the filesystem refuses
    symlinks. Whatever sat at ``link`` before (a file, a link, or a directory left by another
    tool, which is moved into ``trash_root`` first) is replaced.

    Returns which kind of link was written.
    """
    if os.sep in target_name or target_name in ("", ".", ".."):
        raise ValueError(f"link target must be a plain name in the same directory: {target_name!r}")
    parent = link.parent
    tmp = parent / f".{link.name}.{uuid.uuid4().hex}.tmp"
    kind: Literal["symlink", "pointer"] = "pointer"
    if mode in ("auto", "symlink"):
        try:
            os.symlink(target_name, tmp, target_is_directory=True)
            kind = "symlink"
        except OSError as exc:
            if mode == "symlink" or exc.errno not in _SYMLINK_REFUSED:
                raise
            logger.warning(
                "the filesystem at %s refuses symlinks (%s); writing %s as a pointer file",
                parent,
                exc.strerror,
                link.name,
            )
    try:
        # Inside the try: a write that fails (a full disk) must not leave the tmp file behind.
        if kind == "pointer":
            with open(tmp, "x", encoding="utf-8") as file:
                file.write(target_name + "\n")
                if fsync:
                    file.flush()
                    fsync_file(file.fileno(), link)
        if link.is_dir() and not link.is_symlink():
            # os.replace cannot put a file over a directory: move the directory aside first.
            discard_dir(link, trash_root, fsync=fsync)
        os.replace(tmp, link)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # the pointer file's write, named as atomic_write's
            raise with_file_name(exc, link) from None
        raise
    if fsync:
        fsync_dir(parent)
    return kind


def read_link(link: Path) -> str | None:
    """The target name a link holds — a symlink's text or a pointer file's one line — or None
    when there is no link (nothing at that name, a directory, or a file that is not a
    pointer)."""
    try:
        if link.is_symlink():
            return os.readlink(link)
        if not link.is_file() or link.stat().st_size > POINTER_MAX_BYTES:
            return None
        text = link.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return None
    lines = text.splitlines()
    return lines[0].strip() if len(lines) == 1 and lines[0].strip() else None


def remove_link(link: Path, *, fsync: bool) -> None:
    """Remove a link (symlink or pointer file) if present."""
    try:
        if link.is_symlink() or link.is_file():
            link.unlink()
    except FileNotFoundError:
        return
    if fsync:
        fsync_dir(link.parent)


def free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path``, or None
    when the filesystem reports no size at all (0 blocks in ``statvfs``: fusefat's FAT32, some
    FUSE and network mounts), where free space is unknown rather than zero."""
    usage = shutil.disk_usage(path)
    return None if usage.total == 0 else usage.free


def with_file_name(exc: OSError, path: Path) -> OSError:
    """``exc`` with ``path`` as its file name when it has none, so that an error such as
    "No space left on device" says which file was being written (``OSError(errno, ...)``
    builds the errno's own subclass, so callers catching ``PermissionError`` still do)."""
    if exc.filename is not None or exc.errno is None:
        return exc
    return OSError(exc.errno, exc.strerror, os.fspath(path))


def probe_writable(directory: Path) -> None:
    """Create, write and remove a small file in ``directory``; raises OSError if any step
    fails (read-only mount, missing permission, quota)."""
    probe = directory / f".probe-{uuid.uuid4().hex}"
    try:
        with open(probe, "xb") as file:
            file.write(b"distckpt write probe\n")
            # Removed while still open, as :meth:`distckpt.lock.WriterLock.release` does its
            # lock file: on a FUSE mount a file removed just after its close can be left
            # behind as ``.fuse_hidden*`` for good.
            probe.unlink()
    finally:
        probe.unlink(missing_ok=True)
