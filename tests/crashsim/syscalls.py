"""Parsing an ``strace -f -y -xx`` trace into file-system operations on paths.

Only what happens under one base directory is kept (the tracer sees the whole process tree:
Python's imports, torch's caches). A workload marks the moments the checker needs (a save
returned, a delete began) by creating an empty file in a separate markers directory; those
creations become :class:`Op` of kind ``"marker"``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

_LINE = re.compile(r"^(\d+) +(\w+)\((.*)\) += (.*)$")
_UNFINISHED = " <unfinished ...>"
_RESUMED = re.compile(r"^(\d+) +<\.\.\. (\w+) resumed>(.*)$")
_FD = re.compile(r"^(-?\d+|AT_FDCWD)<(.*)>$")
_DELETED = " (deleted)"


def whole_calls(lines: Iterable[str]) -> Iterator[str]:
    """The lines of an ``strace -f`` log with each call strace split in two (its start
    ``<unfinished ...>``, then ``<... NAME resumed>`` once another process's or thread's line
    came between) put back together on one line, in the place of its end (when it returned)."""
    pending: dict[str, str] = {}
    for raw in lines:
        line = raw.rstrip("\n")
        resumed = _RESUMED.match(line)
        if resumed is not None:
            head = pending.pop(resumed.group(1), None)
            if head is not None:
                yield head + resumed.group(3)
        elif line.endswith(_UNFINISHED):
            pending[line.split(" ", 1)[0]] = line[: -len(_UNFINISHED)]
        else:
            yield line


@dataclass(frozen=True)
class Op:
    """One operation on paths. ``kind`` is one of: ``open`` (``create``/``truncate`` flags),
    ``write`` (``data`` at ``offset``), ``truncate`` (to ``size``), ``fsync``, ``mkdir``,
    ``rename`` (``path`` to ``path2``, ``exchange`` for RENAME_EXCHANGE), ``unlink``, ``rmdir``,
    ``symlink`` (``path`` holding ``target``), ``link`` (``path`` to ``path2``), ``marker``."""

    kind: str
    path: str
    path2: str = ""
    data: bytes = b""
    offset: int = 0
    size: int = 0
    create: bool = False
    truncate: bool = False
    exchange: bool = False
    target: str = ""


def _hex(text: str) -> bytes:
    return bytes.fromhex(text.replace("\\x", ""))


def _decode_string(arg: str) -> str:
    if not (arg.startswith('"') and arg.endswith('"')):
        raise ValueError(f"not a string argument: {arg[:80]}")
    return os.fsdecode(_hex(arg[1:-1]))


def _split_args(args: str) -> list[str]:
    """Top-level comma-separated arguments (strings, fd annotations, arrays kept whole)."""
    parts: list[str] = []
    depth, quoted, start = 0, False, 0
    for index, char in enumerate(args):
        if quoted:
            quoted = char != '"'
        elif char == '"':
            quoted = True
        elif char in "<[{":
            depth += 1
        elif char in ">]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(args[start:index].strip())
            start = index + 1
    parts.append(args[start:].strip())
    return parts


def _fd_path(arg: str) -> str | None:
    match = _FD.match(arg)
    if match is None:
        return None
    path = os.fsdecode(_hex(match.group(2)))
    return path[: -len(_DELETED)] if path.endswith(_DELETED) else path


class TraceParser:
    """Turns trace lines into :class:`Op` on paths under ``base``, in the order they ran."""

    def __init__(self, base: Path, markers: Path, cwd: Path) -> None:
        self.base = os.path.normpath(base)
        self.markers = os.path.normpath(markers)
        self.cwd = os.path.normpath(cwd)
        self.ops: list[Op] = []
        self._positions: dict[tuple[int, str], int] = {}

    def _under(self, path: str, top: str) -> bool:
        return path == top or path.startswith(top + os.sep)

    def _path(self, arg: str, dirfd: str | None = None) -> str:
        path = _decode_string(arg)
        if not os.path.isabs(path):
            directory = _fd_path(dirfd) if dirfd is not None else None
            path = os.path.join(directory or self.cwd, path)
        return os.path.normpath(path)

    def _emit(self, op: Op) -> None:
        inside = [self._under(p, self.base) for p in (op.path, op.path2) if p]
        if all(inside):
            self.ops.append(op)
        elif any(inside):
            raise ValueError(f"an operation crosses the traced tree's boundary: {op}")

    def feed(self, line: str) -> None:
        """One whole call's line (see :func:`whole_calls`)."""
        match = _LINE.match(line)
        if match is None:
            return
        _, name, raw_args, result = match.groups()
        if result.startswith("-1 ") or result.startswith("?"):
            return  # failed calls change nothing
        self._call(name, _split_args(raw_args), result)

    def _call(self, name: str, args: list[str], result: str) -> None:
        returned = result.split(" ", 1)[0]
        if name in ("openat", "open", "creat"):
            self._open(name, args, returned)
        elif name in ("write", "pwrite64", "writev", "pwritev", "pwritev2"):
            self._write(name, args, int(returned.split("<", 1)[0]))
        elif name == "lseek":
            key = self._key(args[0])
            if key is not None:
                self._positions[key] = int(returned)
        elif name == "close":
            key = self._key(args[0])
            if key is not None:
                self._positions.pop(key, None)
        elif name == "ftruncate":
            path = _fd_path(args[0])
            if path is not None:
                self._emit(Op("truncate", path, size=int(args[1])))
        elif name == "truncate":
            self._emit(Op("truncate", self._path(args[0]), size=int(args[1])))
        elif name in ("fsync", "fdatasync"):
            path = _fd_path(args[0])
            if path is not None:
                self._emit(Op("fsync", path))
        elif name == "mkdir":
            self._emit(Op("mkdir", self._path(args[0])))
        elif name == "mkdirat":
            self._emit(Op("mkdir", self._path(args[1], args[0])))
        elif name == "rename":
            self._emit(Op("rename", self._path(args[0]), self._path(args[1])))
        elif name in ("renameat", "renameat2"):
            flags = args[4] if len(args) > 4 else ""
            self._emit(
                Op(
                    "rename",
                    self._path(args[1], args[0]),
                    self._path(args[3], args[2]),
                    exchange="RENAME_EXCHANGE" in flags,
                )
            )
        elif name == "unlink":
            self._emit(Op("unlink", self._path(args[0])))
        elif name == "unlinkat":
            kind = "rmdir" if "AT_REMOVEDIR" in args[2] else "unlink"
            self._emit(Op(kind, self._path(args[1], args[0])))
        elif name == "rmdir":
            self._emit(Op("rmdir", self._path(args[0])))
        elif name == "symlink":
            self._emit(Op("symlink", self._path(args[1]), target=_decode_string(args[0])))
        elif name == "symlinkat":
            self._emit(Op("symlink", self._path(args[2], args[1]), target=_decode_string(args[0])))
        elif name == "link":
            self._emit(Op("link", self._path(args[0]), self._path(args[1])))
        elif name == "linkat":
            self._emit(Op("link", self._path(args[1], args[0]), self._path(args[3], args[2])))

    def _key(self, fd_arg: str) -> tuple[int, str] | None:
        path = _fd_path(fd_arg)
        match = _FD.match(fd_arg)
        if path is None or match is None or match.group(1) == "AT_FDCWD":
            return None
        return int(match.group(1)), path

    def _open(self, name: str, args: list[str], returned: str) -> None:
        if name == "openat":
            path, flags = self._path(args[1], args[0]), args[2]
        elif name == "open":
            path, flags = self._path(args[0]), args[1]
        else:
            path, flags = self._path(args[0]), "O_CREAT|O_TRUNC"
        opened = _fd_path(returned)
        if opened is not None:
            self._positions[(int(returned.split("<", 1)[0]), opened)] = 0
        create = "O_CREAT" in flags
        if create and self._under(path, self.markers):
            self.ops.append(Op("marker", os.path.basename(path)))
            return
        if create or "O_TRUNC" in flags:
            self._emit(Op("open", path, create=create, truncate="O_TRUNC" in flags))

    def _write(self, name: str, args: list[str], written: int) -> None:
        key = self._key(args[0])
        if key is None:
            return
        if name in ("writev", "pwritev", "pwritev2"):
            data = b"".join(_hex(s) for s in re.findall(r'iov_base="([^"]*)"', args[1]))
        else:
            data = _hex(args[1][1:-1])
        data = data[:written]
        if name == "write" or name == "writev":
            offset = self._positions.get(key, 0)
            self._positions[key] = offset + written
        else:
            offset = int(args[3])
        self._emit(Op("write", key[1], data=data, offset=offset))


def parse_trace(text: str, *, base: Path, markers: Path, cwd: Path) -> list[Op]:
    """The operations under ``base`` (and the markers) a trace records, in order."""
    parser = TraceParser(base, markers, cwd)
    for line in whole_calls(text.splitlines()):
        parser.feed(line)
    return parser.ops
