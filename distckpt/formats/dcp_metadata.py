"""Reading a DCP ``.metadata`` that may come from an untrusted source.

DCP itself unpickles ``.metadata`` with ``pickle.load``, which runs whatever code a crafted file
asks for. :func:`read_metadata` instead uses a restricted unpickler that resolves only DCP's
metadata dataclasses, ``torch.Size``, torch dtypes and layouts, refuses persistent ids, and
allows setting attributes only on instances of those classes (never patching a class); the
result is then checked field by field against the manifest, so that every storage entry names
a ``.distcp`` file of the checkpoint, within its size, and each tensor's chunks lie within its
size and hold as many elements as it does. The limits of this protection are listed
in :mod:`distckpt.formats.dcp`'s module doc.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any, Callable, ClassVar, NoReturn

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from distckpt.checksums import CHECKSUM_ALGORITHM, bytes_checksum
from distckpt.errors import CorruptCheckpoint, UnsafeCheckpoint
from distckpt.manifest import Manifest

#: The file rank 0 writes that maps every chunk of every tensor to its bytes.
METADATA_NAME = ".metadata"
DATA_FILE_RE = re.compile(r"^__\d+_\d+\.distcp$")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    from torch.distributed.checkpoint import metadata as md

    classes: list[Any] = [
        md.Metadata,
        md.TensorStorageMetadata,
        md.BytesStorageMetadata,
        md.ChunkStorageMetadata,
        md.TensorProperties,
        md.MetadataIndex,
        md.StorageMeta,
        _StorageInfo,
        torch.Size,
    ]
    encoding = getattr(md, "_MEM_FORMAT_ENCODING", None)
    if encoding is not None:
        classes.append(encoding)
    allowed = {(cls.__module__, cls.__qualname__): cls for cls in classes}
    # torch.strided etc. pickle as a call of this lookup by name (it only reads a dict).
    get_layout = torch.serialization._get_layout
    allowed[(get_layout.__module__, get_layout.__name__)] = get_layout
    return allowed


_ALLOWED = _allowed_globals()


_ALLOWED_CLASSES = frozenset(value for value in _ALLOWED.values() if isinstance(value, type))


class _MetadataUnpickler(pickle._Unpickler):
    """Resolves only the globals a DCP ``.metadata`` needs; anything else is refused before it
    can be called. The pure-Python unpickler, for one more hook than the C one has: BUILD
    (which sets attributes) is allowed on instances of the allowed classes only, never on a
    class or function, so a crafted file cannot patch DCP's classes for the whole process."""

    dispatch: ClassVar[dict[int, Callable[..., Any]]] = dict(
        pickle._Unpickler.dispatch  # type: ignore[attr-defined]
    )

    def _load_build(self) -> None:
        target = self.stack[-2] if len(self.stack) >= 2 else None
        if type(target) not in _ALLOWED_CLASSES or isinstance(target, type):
            raise UnsafeCheckpoint(
                f"sets attributes on a {type(target).__name__}, which a DCP .metadata never does"
            )
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    dispatch[pickle.BUILD[0]] = _load_build

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is not None:
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpoint(f"refers to {module}.{name}, which a DCP .metadata never needs")

    def persistent_load(self, pid: Any) -> NoReturn:
        raise UnsafeCheckpoint("holds a persistent id, which a DCP .metadata never needs")


def read_metadata(directory: Path, manifest: Manifest, *, allow_pickle: bool = False) -> Metadata:
    """The DCP metadata of a committed "dcp" checkpoint, read safely (see the module doc) and
    checked against the manifest. Raises :class:`UnsafeCheckpoint` for a pickle that asks for
    anything but DCP's metadata types, :class:`CorruptCheckpoint` for one that is damaged or
    does not describe the files the manifest lists."""
    path = directory / METADATA_NAME
    if METADATA_NAME not in manifest.files:
        raise CorruptCheckpoint(f"{directory}: the manifest does not list {METADATA_NAME}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CorruptCheckpoint(f"cannot read {path}: {exc}") from exc
    record = manifest.files[METADATA_NAME]
    # A small file: check it fully, so damage reads as damage rather than as a bad pickle.
    if (
        manifest.checksum_algorithm == CHECKSUM_ALGORITHM
        and record.checksum
        and bytes_checksum(raw) != record.checksum
    ):
        raise CorruptCheckpoint(f"{path}: checksum mismatch with the manifest")
    unpickler = pickle.Unpickler if allow_pickle else _MetadataUnpickler
    try:
        metadata = unpickler(io.BytesIO(raw)).load()
    except UnsafeCheckpoint as exc:
        raise UnsafeCheckpoint(
            f"{path} {exc}; it was not loaded and none of its code ran. If you trust this "
            "checkpoint, pass allow_pickle=True"
        ) from None
    except Exception as exc:  # a damaged pickle fails in many ways
        raise CorruptCheckpoint(f"{path} is not a readable DCP metadata file: {exc!r}") from exc
    if not allow_pickle:
        problems = _metadata_problems(metadata, manifest)
        if problems:
            shown = "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else "")
            raise CorruptCheckpoint(f"{path} does not describe a valid checkpoint: {shown}")
    elif not isinstance(metadata, Metadata):
        raise CorruptCheckpoint(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


def _is_size(value: Any, length: int | None = None) -> bool:
    return (
        isinstance(value, torch.Size)
        and all(isinstance(d, int) and d >= 0 for d in value)
        and (length is None or len(value) == length)
    )


def _is_path_part(part: Any) -> bool:
    """A dict key or a list index."""
    if isinstance(part, str):
        return True
    return isinstance(part, int) and not isinstance(part, bool) and part >= 0


# DCP writes no entry for an empty dict, so a list's leading empty dicts leave no trace but the
# index of the item after them: nothing else in .metadata bounds how many there were. A crafted
# index would make the rebuilt state a list that long (8 bytes an item), one for each key path,
# so the list items no key path reaches are read up to this many in all, and refused beyond it:
# far more empty dicts in lists than a training state holds, 8 MiB of list at most.
MAX_UNNAMED_LIST_ITEMS = 1 << 20


def _list_items(paths: dict[str, tuple[Any, ...]]) -> int:
    """How many items of the lists rebuilt from ``paths`` no key path passes through."""
    lengths: dict[tuple[Any, ...], int] = {}
    named: set[tuple[Any, ...]] = set()
    for path in paths.values():
        for depth, part in enumerate(path):
            if isinstance(part, int):
                named.add(path[: depth + 1])
                lengths[path[:depth]] = max(lengths.get(path[:depth], 0), part + 1)
    return sum(lengths.values()) - len(named)


def _chunks_fill(entry: TensorStorageMetadata) -> bool:
    """Whether ``entry``'s chunks lie within its size and hold as many elements as it does, as
    every save writes each element once (uneven FSDP shards too): a tensor described larger
    than its chunks would be read partly, the rest left as the memory or the given tensor was."""
    within = all(
        offset + length <= extent
        for chunk in entry.chunks
        for offset, length, extent in zip(chunk.offsets, chunk.sizes, entry.size)
    )
    return within and sum(chunk.sizes.numel() for chunk in entry.chunks) == entry.size.numel()


def _metadata_problems(metadata: Any, manifest: Manifest) -> list[str]:
    """Everything in an unpickled ``.metadata`` that is not what distckpt's DCP writes."""
    if not isinstance(metadata, Metadata):
        return [f"it holds a {type(metadata).__name__}, not DCP metadata"]
    problems: list[str] = []
    entries = metadata.state_dict_metadata
    if not isinstance(entries, dict):
        return ["state_dict_metadata is not a dict"]
    for key, entry in entries.items():
        if not isinstance(key, str):
            problems.append(f"key {key!r} is not a string")
        elif isinstance(entry, TensorStorageMetadata):
            props = entry.properties
            if not (
                isinstance(props, TensorProperties)
                and isinstance(props.dtype, torch.dtype)
                and _is_size(entry.size)
                and isinstance(entry.chunks, list)
                and all(
                    isinstance(c, ChunkStorageMetadata)
                    and _is_size(c.offsets, len(entry.size))
                    and _is_size(c.sizes, len(entry.size))
                    for c in entry.chunks
                )
            ):
                problems.append(f"{key}: malformed tensor metadata")
            elif not _chunks_fill(entry):
                problems.append(f"{key}: its chunks do not fill its size {list(entry.size)}")
        elif not isinstance(entry, BytesStorageMetadata):
            problems.append(f"{key}: unknown entry type {type(entry).__name__}")
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        return [*problems, "storage_data is not a dict"]
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(index.fqn, str):
            problems.append(f"storage key {index!r} is not a MetadataIndex")
            continue
        if not isinstance(info, _StorageInfo):
            problems.append(f"{index.fqn}: storage entry is a {type(info).__name__}")
            continue
        name = info.relative_path
        record = manifest.files.get(name) if isinstance(name, str) else None
        if record is None or not DATA_FILE_RE.match(name):
            # Also what keeps a crafted file from pointing DCP outside the checkpoint dir.
            problems.append(f"{index.fqn}: names {name!r}, not a .distcp file of the manifest")
        elif not (
            isinstance(info.offset, int)
            and isinstance(info.length, int)
            and info.offset >= 0
            and info.length >= 0
            and info.offset + info.length <= record.size
        ):
            problems.append(f"{index.fqn}: byte range outside {name}")
        elif getattr(info, "transform_descriptors", None):
            problems.append(f"{index.fqn}: stream transforms, which distckpt never writes")
    if not isinstance(metadata.storage_meta, (StorageMeta, type(None))):
        problems.append(f"storage_meta is a {type(metadata.storage_meta).__name__}")
    if not isinstance(metadata.version, (str, type(None))):
        problems.append(f"version is a {type(metadata.version).__name__}")
    planner_data = metadata.planner_data
    if planner_data is not None and not (
        isinstance(planner_data, dict)
        and all(
            isinstance(key, str)
            and isinstance(path, tuple)
            and path
            and all(_is_path_part(part) for part in path)
            for key, path in planner_data.items()
        )
    ):
        problems.append("planner_data is not a map of keys to key paths")
    elif planner_data is not None and _list_items(planner_data) > MAX_UNNAMED_LIST_ITEMS:
        problems.append(
            f"planner_data describes lists with more than {MAX_UNNAMED_LIST_ITEMS} items no "
            "key names"
        )
    return problems
