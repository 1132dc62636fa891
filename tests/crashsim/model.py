"""Inodes, the persistence model, and the crash states it allows.

Operations on paths are lowered to operations on inodes (a directory entry is a name in a
directory inode), so that a state in which a rename is lost while later operations on the
renamed directory's contents are kept is replayed the way a file system would show it: the
directory still under its old name, with those later changes inside.

The persistence model (stated in ``docs/faults.md``):

* **Data.** A file's bytes are durable up to its last fsync (or fdatasync). Bytes written
  since are lost, or cut short (half of them kept), independently for each file.
* **Directory entries.** Creating, linking, removing or renaming a name is durable once the
  directory holding the new name is fsynced afterwards (a rename: the *destination*
  directory; a rename is atomic, so it is either all there or not at all). Until then it may
  be missing from the state while later operations are present.
* **Order otherwise kept.** A state is a prefix of the operations, with some of the entry
  operations not yet durable dropped, and the unsynced data of each file lost or cut short.
  An operation that needs a dropped one (writing into a directory whose creation was lost
  is fine, the inode exists, but renaming a name that was never created is not) is dropped
  too.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.crashsim.syscalls import Op

ENTRY_KINDS = frozenset({"create", "mkdir", "symlink", "link", "unlink", "rmdir", "rename"})
DATA_MODES = ("lost", "torn", "kept")
ROOT_INODE = 0


@dataclass
class Inode:
    kind: str  # "file", "dir" or "symlink"
    data: bytes = b""
    entries: dict[str, int] = field(default_factory=dict)
    target: str = ""

    def copy(self) -> Inode:
        return Inode(self.kind, self.data, dict(self.entries), self.target)


@dataclass(frozen=True)
class Step:
    """One operation on inodes. Entry operations name ``dir``/``name`` (and, for renames and
    links, the destination ``dir2``/``name2``); ``ino2`` is the inode a rename replaces or, with
    ``exchange``, swaps with."""

    index: int
    kind: str
    ino: int = -1
    dir: int = -1
    name: str = ""
    dir2: int = -1
    name2: str = ""
    ino2: int = -1
    exchange: bool = False
    data: bytes = b""
    offset: int = 0
    size: int = 0
    target: str = ""
    marker: str = ""
    path: str = ""

    @property
    def is_entry(self) -> bool:
        return self.kind in ENTRY_KINDS

    @property
    def durable_in(self) -> int:
        """The directory whose fsync makes this entry operation durable."""
        return self.dir2 if self.kind in ("rename", "link") else self.dir


class Tree:
    """A file system as inodes; inode 0 is the traced base directory."""

    def __init__(self, inodes: dict[int, Inode]) -> None:
        self.inodes = inodes

    @classmethod
    def from_disk(cls, base: Path) -> Tree:
        inodes: dict[int, Inode] = {ROOT_INODE: Inode("dir")}

        def load(directory: Path, ino: int) -> None:
            for entry in sorted(os.scandir(directory), key=lambda e: e.name):
                child = len(inodes)
                if entry.is_symlink():
                    inodes[child] = Inode("symlink", target=os.readlink(entry.path))
                elif entry.is_dir():
                    inodes[child] = Inode("dir")
                    load(Path(entry.path), child)
                else:
                    inodes[child] = Inode("file", Path(entry.path).read_bytes())
                inodes[ino].entries[entry.name] = child

        load(base, ROOT_INODE)
        return cls(inodes)

    def copy(self) -> Tree:
        return Tree({ino: inode.copy() for ino, inode in self.inodes.items()})

    def lookup(self, parts: tuple[str, ...]) -> int | None:
        ino: int | None = ROOT_INODE
        for part in parts:
            if ino is None or self.inodes[ino].kind != "dir":
                return None
            ino = self.inodes[ino].entries.get(part)
        return ino

    def walk(self) -> Iterator[tuple[str, Inode]]:
        """(relative path, inode) of everything reachable from the base, parents first."""
        stack = [("", ROOT_INODE)]
        while stack:
            prefix, ino = stack.pop()
            for name, child in sorted(self.inodes[ino].entries.items()):
                path = f"{prefix}/{name}" if prefix else name
                inode = self.inodes[child]
                yield path, inode
                if inode.kind == "dir":
                    stack.append((path, child))

    def digest(self) -> str:
        hasher = hashlib.sha256()
        for path, inode in sorted(self.walk(), key=lambda item: item[0]):
            body = inode.data if inode.kind == "file" else inode.target.encode()
            hasher.update(f"{path}\0{inode.kind}\0".encode() + hashlib.sha256(body).digest())
        return hasher.hexdigest()

    def materialize(self, destination: Path) -> None:
        """Write the reachable tree into ``destination`` (which must not exist)."""
        destination.mkdir(parents=True)
        for path, inode in self.walk():
            target = destination / path
            if inode.kind == "dir":
                target.mkdir()
            elif inode.kind == "symlink":
                os.symlink(inode.target, target)
            else:
                target.write_bytes(inode.data)

    def apply(self, step: Step) -> bool:
        """Apply one operation; False (changing nothing) when it cannot apply here, because an
        operation it needs was dropped."""
        inodes = self.inodes
        kind = step.kind
        if kind in ("write", "truncate"):
            inode = inodes.setdefault(step.ino, Inode("file"))
            if kind == "truncate":
                inode.data = inode.data[: step.size].ljust(step.size, b"\0")
            else:
                head = inode.data[: step.offset].ljust(step.offset, b"\0")
                inode.data = head + step.data + inode.data[step.offset + len(step.data) :]
            return True
        if kind not in ENTRY_KINDS:
            return True
        directory = inodes.setdefault(step.dir, Inode("dir"))
        if kind in ("create", "mkdir", "symlink"):
            if step.name in directory.entries:
                return False
            new_kind = {"create": "file", "mkdir": "dir", "symlink": "symlink"}[kind]
            inodes.setdefault(step.ino, Inode(new_kind, target=step.target))
            directory.entries[step.name] = step.ino
            return True
        if kind in ("unlink", "rmdir"):
            if directory.entries.get(step.name) != step.ino:
                return False
            if kind == "rmdir" and inodes[step.ino].entries:
                return False
            del directory.entries[step.name]
            return True
        destination = inodes.setdefault(step.dir2, Inode("dir"))
        if kind == "link":
            if step.ino not in inodes or step.name2 in destination.entries:
                return False
            destination.entries[step.name2] = step.ino
            return True
        # rename
        if directory.entries.get(step.name) != step.ino:
            return False
        if step.exchange:
            if destination.entries.get(step.name2) != step.ino2:
                return False
            directory.entries[step.name], destination.entries[step.name2] = step.ino2, step.ino
            return True
        replaced = destination.entries.get(step.name2)
        if replaced is not None and replaced != step.ino2:
            return False
        if replaced is not None and inodes[replaced].entries:
            return False
        del directory.entries[step.name]
        destination.entries[step.name2] = step.ino
        return True


def lower(ops: list[Op], initial: Tree, base: Path) -> list[Step]:
    """Resolve every path operation against the tree as the workload saw it (each operation
    applied in turn), giving operations on inodes."""
    tree = initial.copy()
    next_ino = max(tree.inodes) + 1
    steps: list[Step] = []

    def split(path: str) -> tuple[str, ...]:
        relative = os.path.relpath(path, base)
        return () if relative == "." else tuple(relative.split(os.sep))

    def where(path: str) -> tuple[int, str]:
        parts = split(path)
        parent = tree.lookup(parts[:-1])
        if parent is None:
            raise ValueError(f"the trace names {path} inside a directory the model lacks")
        return parent, parts[-1]

    def add(**fields: object) -> None:
        fields["path"] = " -> ".join(
            os.path.relpath(p, base) for p in str(fields.get("path", "")).split(" -> ") if p
        )
        step = Step(index=len(steps), **fields)  # type: ignore[arg-type]
        if not tree.apply(step):
            raise ValueError(f"the trace's own order does not apply to the model: {step}")
        steps.append(step)

    for op in ops:
        if op.kind == "marker":
            steps.append(Step(index=len(steps), kind="marker", marker=op.path))
            continue
        if op.kind in ("open", "mkdir", "symlink"):
            parent, name = where(op.path)
            existing = tree.inodes[parent].entries.get(name)
            if existing is None and (op.kind != "open" or op.create):
                kind = "create" if op.kind == "open" else op.kind
                add(kind=kind, dir=parent, name=name, ino=next_ino, target=op.target, path=op.path)
                next_ino += 1
            elif op.kind == "open" and op.truncate and existing is not None:
                add(kind="truncate", ino=existing, size=0, path=op.path)
            continue
        if op.kind in ("write", "truncate", "fsync"):
            ino = tree.lookup(split(op.path))
            if ino is None:
                continue  # an fd of a file already unlinked: nothing reachable changes
            if op.kind == "write":
                add(kind="write", ino=ino, data=op.data, offset=op.offset, path=op.path)
            elif op.kind == "truncate":
                add(kind="truncate", ino=ino, size=op.size, path=op.path)
            else:
                steps.append(
                    Step(
                        index=len(steps), kind="fsync", ino=ino, path=os.path.relpath(op.path, base)
                    )
                )
            continue
        parent, name = where(op.path)
        ino = tree.inodes[parent].entries.get(name)
        if ino is None:
            raise ValueError(f"the trace {op.kind}s {op.path}, which the model lacks")
        if op.kind in ("unlink", "rmdir"):
            add(kind=op.kind, dir=parent, name=name, ino=ino, path=op.path)
            continue
        parent2, name2 = where(op.path2)
        replaced = tree.inodes[parent2].entries.get(name2, -1)
        add(
            kind=op.kind,
            dir=parent,
            name=name,
            ino=ino,
            dir2=parent2,
            name2=name2,
            ino2=replaced,
            exchange=op.exchange,
            path=f"{op.path} -> {op.path2}",
        )
    return steps


@dataclass(frozen=True)
class CrashState:
    """A power loss after the first ``prefix`` steps, with the entry operations ``dropped``
    (not yet durable) missing and unsynced file data treated per ``data``."""

    prefix: int
    data: str
    dropped: tuple[int, ...] = ()

    def describe(self, steps: list[Step]) -> str:
        last = steps[self.prefix - 1] if self.prefix else None
        where = (
            f"after step {self.prefix} ({last.kind} {last.path or last.marker})"
            if last
            else ("before any step")
        )
        text = f"{where}; unsynced data {self.data}"
        if self.dropped:
            lost = ", ".join(f"{steps[i].kind} {steps[i].path}" for i in self.dropped)
            text += f"; not durable, lost: {lost}"
        return text


def pending_entries(steps: list[Step], prefix: int) -> list[int]:
    """Entry operations among the first ``prefix`` that no later fsync of their directory has
    made durable."""
    synced_after: set[int] = set()
    pending: list[int] = []
    for step in reversed(steps[:prefix]):
        if step.kind == "fsync":
            synced_after.add(step.ino)
        elif step.is_entry and step.durable_in not in synced_after:
            pending.append(step.index)
    return sorted(pending)


def replay(initial: Tree, steps: list[Step], state: CrashState) -> Tree:
    """The tree a crash state leaves."""
    tree = initial.copy()
    synced = {ino: inode.data for ino, inode in tree.inodes.items() if inode.kind == "file"}
    dropped = set(state.dropped)
    for step in steps[: state.prefix]:
        if step.index in dropped:
            continue
        if step.kind == "fsync":
            if step.ino in tree.inodes:
                synced[step.ino] = tree.inodes[step.ino].data
            continue
        tree.apply(step)
    if state.data != "kept":
        for ino, inode in tree.inodes.items():
            if inode.kind != "file":
                continue
            durable = synced.get(ino, b"")
            if inode.data == durable:
                continue
            kept = durable
            if state.data == "torn" and inode.data.startswith(durable):
                kept = inode.data[: len(durable) + (len(inode.data) - len(durable)) // 2]
            inode.data = kept
    return tree


def crash_states(steps: list[Step]) -> Iterator[CrashState]:
    """Every crash state the model allows that this explorer tries, prefix by prefix: all
    operations there with unsynced data lost, cut short, or kept (a process kill); each entry
    operation not yet durable missing alone; and all of them missing."""
    for prefix in range(len(steps) + 1):
        if prefix and prefix < len(steps):
            previous, following = steps[prefix - 1], steps[prefix]
            if previous.kind == following.kind == "write" and previous.ino == following.ino:
                continue  # mid-way through one file's writes: the torn state covers it
        for data in DATA_MODES:
            yield CrashState(prefix, data)
        pending = pending_entries(steps, prefix)
        for index in pending:
            yield CrashState(prefix, "lost", (index,))
        if len(pending) > 1:
            yield CrashState(prefix, "lost", tuple(pending))


def markers_before(steps: list[Step], prefix: int) -> tuple[str, ...]:
    return tuple(step.marker for step in steps[:prefix] if step.kind == "marker")


def distinct_states(
    initial: Tree, steps: list[Step], *, max_states: int, seed: int
) -> tuple[list[tuple[CrashState, Tree, tuple[str, ...]]], int]:
    """The crash states that leave distinct (tree, what had returned) pairs, sampled down to
    ``max_states`` with ``seed`` when there are more; also returns how many there were."""
    seen: dict[tuple[str, tuple[str, ...]], tuple[CrashState, Tree, tuple[str, ...]]] = {}
    for state in crash_states(steps):
        tree = replay(initial, steps, state)
        markers = markers_before(steps, state.prefix)
        seen.setdefault((tree.digest(), markers), (state, tree, markers))
    found = list(seen.values())
    if len(found) <= max_states:
        return found, len(found)
    chosen = random.Random(seed).sample(range(len(found)), max_states)
    return [found[i] for i in sorted(chosen)], len(found)
