"""Damaged and hostile checkpoint roots: the fresh root every case starts from, and the damages
done to it (``tests/hostile_case_table.py`` holds the table of cases, with what distckpt must
do with each).

:func:`make_root` makes a root with two committed checkpoints, steps 1 and 2, ``last`` -> step
2; each damage function changes such a root in one way, as a crash, a bad disk, another tool or
an attacker might.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import distckpt
from distckpt.manifest import MANIFEST_CHECKSUM_KEY, content_checksum

STEP1 = "step-00000001"
STEP2 = "step-00000002"
RANK0 = "rank-00000.pt"
MANIFEST = "manifest.json"
#: key of :attr:`Case.verify` for problems ``verify`` reports on the root itself (its links)
LINKS = "links"
#: the file the malicious pickle would create, beside the root
MARKER_NAME = "PWNED"
#: elements in the saved tensor
WIDTH = 64


# ---------------------------------------------------------------------------- the fresh root


def saved_state(step: int, tag: int = 0) -> dict[str, Any]:
    """The state saved at ``step``: its values tell which step (and which root) they are from."""
    return {"w": torch.full((WIDTH,), float(step + tag)), "step": step + tag}


def is_intact(state: Any, step: int) -> bool:
    """Whether a loaded state is exactly what :func:`make_root` saved at ``step`` in the root
    under test (not in another root, and not altered)."""
    expected = saved_state(step)
    return (
        isinstance(state, dict)
        and state.get("step") == expected["step"]
        and isinstance(state.get("w"), torch.Tensor)
        and torch.equal(state["w"], expected["w"])
    )


def make_root(path: Path, *, tag: int = 0, link: str = "auto") -> Path:
    """A root with steps 1 and 2 committed; ``tag`` shifts the saved values (another root's
    checkpoints must not be mistaken for this one's)."""
    with distckpt.CheckpointManager(path, fsync=False, link=link) as mgr:  # type: ignore[arg-type]
        for step in (1, 2):
            mgr.save(step, saved_state(step, tag))
    return path


def other_root(root: Path) -> Path:
    """A second, valid root beside ``root`` whose values differ from ``root``'s."""
    other = root.parent / "other"
    if not other.exists():
        make_root(other, tag=100)
    return other


# ---------------------------------------------------------------------------- damage helpers


def reseal_manifest(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a manifest's parsed JSON, changed) with the checksum of its content recorded
    again, as a writer of that content records it: an edit then stands for a manifest written
    so (by a newer version, another tool, a forger), not for damage its checksum would find."""
    data[MANIFEST_CHECKSUM_KEY] = content_checksum(data)
    return data


def edit_manifest(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Change ``directory``'s manifest as if it had been written so (resealed)."""
    path = directory / MANIFEST
    data = json.loads(path.read_bytes())
    change(data)
    path.write_text(json.dumps(reseal_manifest(data), indent=1))


def file_record(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"size": len(data), "checksum": f"{zlib.crc32(data):08x}", "rank": 0}


def reseal(directory: Path, name: str) -> None:
    """Rewrite the manifest's size and checksum of ``name``: a forgery that passes every
    check the manifest allows."""
    record = file_record(directory / name)
    edit_manifest(directory, lambda data: data["files"].__setitem__(name, record))


def replace_with_symlink(path: Path, target: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    os.symlink(target, path)


class Exploit:
    """Unpickling this creates a file: the stand-in for arbitrary code run by ``torch.load``."""

    def __init__(self, marker: Path) -> None:
        self.marker = os.fspath(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------------------- damages


def truncate_shard(root: Path) -> None:
    path = root / STEP2 / RANK0
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_tensor_byte(data: bytes, tensor: torch.Tensor) -> bytes:
    """``data`` (a checkpoint file's bytes) with one byte of ``tensor``'s stored elements
    changed, found by their values: the size stays and the file still loads, with one element
    of another value, which only a checksum can tell."""
    start = data.find(tensor.numpy().tobytes())
    assert start >= 0, "the tensor's bytes were not found in the file"
    damaged = bytearray(data)
    damaged[start + tensor.element_size() + 1] ^= 0xFF  # the second element's second byte
    return bytes(damaged)


def flip_byte(root: Path) -> None:
    path = root / STEP2 / RANK0
    # element 1 of the tensor of 2.0 becomes 2.0156...: same size, different value
    path.write_bytes(flip_tensor_byte(path.read_bytes(), torch.full((WIDTH,), 2.0)))


def remove_manifest(root: Path) -> None:
    (root / STEP2 / MANIFEST).unlink()


def manifest_not_json(root: Path) -> None:
    (root / STEP2 / MANIFEST).write_bytes(b'{"step": 2, "files": {"rank-0')  # a torn write


def manifest_future_version(root: Path) -> None:
    edit_manifest(root / STEP2, lambda data: data.update(format_version=999))


def manifest_flipped_bit(root: Path) -> None:
    """One bit of the manifest flipped, in place: ``"format_version": 2`` reads 3."""
    path = root / STEP2 / MANIFEST
    data = bytearray(path.read_bytes())
    digit = data.index(b'"format_version": 2') + len(b'"format_version": ')
    data[digit] ^= 0x01  # "2" (0x32) becomes "3" (0x33)
    path.write_bytes(bytes(data))


def remove_rank_file(root: Path) -> None:
    (root / STEP2 / RANK0).unlink()


def unlist_rank_file(root: Path) -> None:
    edit_manifest(root / STEP2, lambda data: data["files"].pop(RANK0))


def add_extra_file(root: Path) -> None:
    (root / STEP2 / "notes.txt").write_text("not written by distckpt\n")


def manifest_names_step_1(root: Path) -> None:
    edit_manifest(root / STEP2, lambda data: data.update(step=1))


def manifest_lists_parent(root: Path) -> None:
    outside = root / "x"
    outside.write_bytes(b"outside the checkpoint dir\n")
    reseal_as = file_record(outside)
    edit_manifest(root / STEP2, lambda data: data["files"].__setitem__("../x", reseal_as))


def manifest_lists_absolute(root: Path) -> None:
    outside = root.parent / "elsewhere.bin"
    outside.write_bytes(b"outside the checkpoint dir\n")
    record = file_record(outside)
    edit_manifest(root / STEP2, lambda data: data["files"].__setitem__(os.fspath(outside), record))


def manifest_lists_nul_name(root: Path) -> None:
    record = file_record(root / STEP2 / RANK0)
    edit_manifest(root / STEP2, lambda data: data["files"].__setitem__("rank\x00.pt", record))


def manifest_unknown_checksum(root: Path) -> None:
    edit_manifest(root / STEP2, lambda data: data.update(checksum_algorithm="md4"))


def manifest_unknown_format(root: Path) -> None:
    edit_manifest(root / STEP2, lambda data: data.update(format="pickle-jar"))


def manifest_extra_file_field(root: Path) -> None:
    """Every file's record gains a field this version does not know, as a newer writer may add
    one without raising the format version (it rises only for what would mislead a reader)."""

    def add_field(data: dict[str, Any]) -> None:
        for record in data["files"].values():
            record["mtime_ns"] = 123

    edit_manifest(root / STEP2, add_field)


def manifest_extra_top_level_field(root: Path) -> None:
    edit_manifest(root / STEP2, lambda data: data.update(compression=None))


def huge_garbage_manifest(root: Path) -> None:
    (root / STEP2 / MANIFEST).write_bytes(random.Random(0).randbytes(32 << 20))


def deeply_nested_manifest(root: Path) -> None:
    depth = 200_000
    (root / STEP2 / MANIFEST).write_bytes(b"[" * depth + b"]" * depth)


def last_absolute_symlink(root: Path) -> None:
    replace_with_symlink(root / "last", other_root(root) / STEP2)


def last_relative_escape(root: Path) -> None:
    other_root(root)
    replace_with_symlink(root / "last", Path("..", "other", STEP2))


def last_pointer_escape(root: Path) -> None:
    other_root(root)
    (root / "last").unlink()
    (root / "last").write_text(f"../other/{STEP2}\n")


def best_missing(root: Path) -> None:
    os.symlink("step-00000007", root / "best")


def shard_symlink(root: Path) -> None:
    copy = root.parent / "elsewhere" / RANK0
    copy.parent.mkdir()
    shutil.copyfile(root / STEP2 / RANK0, copy)  # the same bytes: size and checksum match
    replace_with_symlink(root / STEP2 / RANK0, copy)


def step_dir_symlink(root: Path) -> None:
    replace_with_symlink(root / STEP2, other_root(root) / STEP2)


def malicious_pickle(root: Path) -> None:
    state = {**saved_state(2), "evil": Exploit(root.parent / MARKER_NAME)}
    (root / STEP2 / RANK0).unlink()
    torch.save(state, root / STEP2 / RANK0)
    reseal(root / STEP2, RANK0)
