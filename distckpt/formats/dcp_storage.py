"""DCP's storage layer and load planner as the "dcp" format uses them: a writer whose files
checksum themselves as they are written, a reader handed metadata that was already read safely,
and a planner that unpickles nothing beyond tensors and plain values without an opt-in."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import (
    FileSystem,
    FileSystemReader,
    FileSystemWriter,
    _StorageInfo,
)
from torch.distributed.checkpoint.metadata import (
    STATE_DICT_TYPE,
    STORAGE_TYPES,
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from distckpt.checksums import ChecksumWriter
from distckpt.errors import CheckpointError, CorruptCheckpoint, describe_error
from distckpt.formats.base import ReadOptions
from distckpt.formats.dcp_text_keys import SavedPlaces
from distckpt.formats.torch_files import safe_torch_load
from distckpt.load_report import LoadReport, ShapeDifference
from distckpt.state import set_path


class ChecksumStream(ChecksumWriter):
    """A ChecksumWriter that DCP can use as its output stream (DCP asks for ``tell()`` to
    record where each item starts; files are only ever appended to)."""

    def tell(self) -> int:
        return self.size

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False


class RecordingFileSystem(FileSystem):
    """DCP's local filesystem, confined to one directory, remembering the size and checksum of
    every file it writes there."""

    def __init__(self, directory: Path, *, fsync: bool) -> None:
        super().__init__()
        self.directory = directory
        self.fsync = fsync
        #: relative name -> (size, checksum) of every file completely written
        self.written: dict[str, tuple[int, str]] = {}

    def _name(self, path: str | os.PathLike[str]) -> str:
        path = Path(path)
        if path.parent != self.directory or path.name in ("", ".", ".."):
            # DCP only ever addresses files directly inside its checkpoint dir.
            raise CheckpointError(f"DCP tried to write {path}, outside {self.directory}")
        return path.name

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[Any]:
        if "r" in mode and "+" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        name = self._name(path)
        # O_EXCL inside: a file of this name in a fresh staging dir means two writers collided.
        stream = ChecksumStream(self.directory / name, fsync=self.fsync)
        try:
            yield stream
        finally:
            stream.close()
        self.written[name] = (stream.size, stream.checksum)

    def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
        old, new = self._name(path), self._name(new_path)
        os.replace(self.directory / old, self.directory / new)
        # The staging dir itself is fsynced by the manager before it is renamed into place.
        if old in self.written:
            self.written[new] = self.written.pop(old)

    def rm_file(self, path: str | os.PathLike[str]) -> None:
        name = self._name(path)
        (self.directory / name).unlink()
        self.written.pop(name, None)

    def mkdir(self, path: str | os.PathLike[str]) -> None:
        if Path(path) != self.directory:
            raise CheckpointError(f"DCP tried to create {path}, outside {self.directory}")
        # The staging dir exists already: the manager made it.


class Writer(FileSystemWriter):
    """DCP's filesystem writer on a :class:`RecordingFileSystem`, one file per rank."""

    def __init__(self, directory: Path, *, fsync: bool) -> None:
        # sync_files=False: the streams fsync themselves on close (DCP would os.sync() the whole
        # machine for a stream without fileno()).
        super().__init__(directory, single_file_per_rank=True, sync_files=False, thread_count=1)
        self.recording = RecordingFileSystem(directory, fsync=fsync)
        self.fs = self.recording
        self.overwrite = False

    def storage_meta(self) -> StorageMeta | None:
        # No checkpoint_id: it would record the staging path, which is renamed away.
        return StorageMeta(checkpoint_id=None, save_id=self.save_id)


class Reader(FileSystemReader):
    """DCP's filesystem reader serving metadata that was already read and checked."""

    def __init__(self, directory: Path, metadata: Metadata) -> None:
        super().__init__(directory)
        self._metadata = metadata
        self._reading: _StorageInfo | None = None  # the bytes torch's read_data reads now

    def _slice_file(self, file: IO[bytes], sinfo: _StorageInfo) -> IO[bytes]:
        # torch's read_data calls this private hook once per item, just before reading it:
        # remembering it names the item a failure belongs to, without opening the file once per
        # item. tests/test_dcp.py fails if a torch release renames it; if one does anyway, a
        # failure still names the plan's data files (_failed_files).
        self._reading = sinfo
        return super()._slice_file(file, sinfo)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """DCP's read (each data file opened once), such that an item that cannot be read (a
        damaged data file: torch fails to unpickle it, or finds its bytes of another size) is
        reported as :class:`~distckpt.errors.CorruptCheckpoint` naming the data file (its
        ``path``), the value and its bytes in it; a distckpt error (a value refused as unsafe)
        keeps its class and fields, its message and ``path`` naming the data file. When torch
        did not say which item it was reading, the error names the data files of the plan
        (:meth:`_failed_files`). An ``OSError`` (a missing file, a disk's error) passes through
        as itself."""
        self._reading = None
        try:
            return super().read_data(plan, planner)
        except OSError:
            raise
        except Exception as exc:
            if self._reading is None:  # no item recorded: name the files the plan reads
                raise self._failed_files(plan, exc) from exc
            raise self._failed_item(plan, self._reading, exc) from exc

    def _failed_files(self, plan: LoadPlan, exc: Exception) -> CheckpointError:
        """The error to raise for ``exc`` when no item was recorded as being read (a failure
        before the first, or a torch whose ``read_data`` no longer calls ``_slice_file``): a
        :class:`~distckpt.errors.CorruptCheckpoint` naming the data files ``plan`` reads (its
        ``path`` the file, when there is one), or a distckpt error keeping its class, fields
        and ``path``, its message naming them too."""
        names = sorted({self.storage_data[item.storage_index].relative_path for item in plan.items})
        files = [Path(self.path) / name for name in names]
        where = files[0] if len(files) == 1 else Path(self.path)
        listed = ", ".join(str(file) for file in files) or str(where)
        if isinstance(exc, CheckpointError):
            fields = exc.fields()
            fields["path"] = exc.path if exc.path is not None else str(where)
            return type(exc).rebuild(f"reading {listed}: {exc}", fields)
        return CorruptCheckpoint(f"{listed} cannot be read: {describe_error(exc)}", path=where)

    def _failed_item(self, plan: LoadPlan, stored: _StorageInfo, exc: Exception) -> CheckpointError:
        """The error to raise for ``exc``, raised while reading the bytes ``stored``."""
        where = Path(self.path) / stored.relative_path
        if isinstance(exc, CheckpointError):
            fields = exc.fields()
            fields["path"] = exc.path if exc.path is not None else str(where)
            return type(exc).rebuild(f"{where}: {exc}", fields)
        # torch's unpickling fails in many ways on damaged bytes
        values = [
            item.dest_index.fqn
            for item in plan.items
            if self.storage_data[item.storage_index] is stored
        ]
        value = f"value {values[0]!r}" if values else "a value"
        return CorruptCheckpoint(
            f"{where}: {value} (bytes {stored.offset} to {stored.offset + stored.length}) "
            f"cannot be read: {describe_error(exc)}",
            path=where,
        )

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            # DCP asks for per-rank metadata only after the global read failed; ours did not.
            raise CorruptCheckpoint("distckpt's DCP checkpoints have no per-rank metadata")
        if self._metadata.storage_meta is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


class Planner(DefaultLoadPlanner):
    """DCP's load planner, loading non-tensor values with ``weights_only=True`` and noting which
    requested keys the checkpoint lacks (instead of failing on the first)."""

    def __init__(self, options: ReadOptions, *, flatten: bool = True) -> None:
        # No rewrite of nested ShardedTensors (distckpt shards with DTensors): DCP's rebuilds the
        # state without its empty dicts, which turns a list holding one (``[1.5, {}]``) into a
        # single value where the save flattened it item by item, so the read would miss it.
        super().__init__(
            flatten_state_dict=flatten, flatten_sharded_tensors=False, allow_partial_load=True
        )
        self.options = options
        self.missing: list[str] = []
        self._places: SavedPlaces | None = None

    def create_local_plan(self) -> LoadPlan:
        plan = super().create_local_plan()
        if self.metadata is None:  # set_up_planner always sets it; DCP calls that first
            raise CorruptCheckpoint("DCP planned a load without metadata")
        self.missing = key_mismatch(self.state_dict, self.metadata).missing_keys
        return plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        key = read_item.dest_index.fqn
        loaded = safe_torch_load(value, self.options, name=f"value {key!r}")
        # Into the caller's dict: self.state_dict may be a flattened copy of it.
        set_path(self.original_state_dict, self.path_of(key), loaded)

    def path_of(self, key: str) -> tuple[Any, ...]:
        """The place of the flat ``key`` in the state being loaded, with that state's own dict
        keys: DCP's place holds them as text (``0`` as ``"0"``), which would land beside the
        key it stands for (:mod:`distckpt.formats.dcp_text_keys`)."""
        if not self.flatten_state_dict:
            return (key,)
        if self._places is None:
            self._places = SavedPlaces(self.original_state_dict)
        return self._places.place(tuple(self.mappings[key]))


#: a value's place in a nested state: its dicts' keys and its lists' indices
Path_ = tuple[Any, ...]


def dotted(path: Iterable[Any]) -> str:
    """The flat key DCP gives the value at ``path`` (``("a", 0, "x")``: ``a.0.x``)."""
    return ".".join(str(part) for part in path)


def placeholder(entry: STORAGE_TYPES) -> torch.Tensor | None:
    """Something DCP can load a saved value into: an empty tensor of its saved size and dtype,
    or None for a plain value (which DCP replaces with the unpickled one)."""
    if isinstance(entry, TensorStorageMetadata):
        return torch.empty(entry.size, dtype=entry.properties.dtype)
    return None


def saved_paths(metadata: Metadata) -> list[Path_]:
    """Every key the checkpoint holds, as its place in the nested state (in the order of
    ``metadata.state_dict_metadata``)."""
    paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    return [tuple(paths.get(key, (key,))) for key in metadata.state_dict_metadata]


def flat_state(state: STATE_DICT_TYPE) -> dict[str, Any]:
    """The values of a nested ``state`` under the keys DCP gives them (``model.layer.weight``,
    ``a.0``)."""
    # DCP's own flattening (private, but what its planners name keys with): the one source of
    # truth, where a copy of its rules could drift from it between torch versions.
    flat, _ = flatten_state_dict(state)
    return dict(flat)


def flat_paths(state: STATE_DICT_TYPE) -> dict[str, tuple[Any, ...]]:
    """Each of DCP's flat keys of a nested ``state`` (:func:`flat_state`) with its place in
    it (``"a.0"``: ``("a", 0)``)."""
    _, paths = flatten_state_dict(state)
    return {key: tuple(path) for key, path in paths.items()}


def key_mismatch(asked: Iterable[str], metadata: Metadata) -> LoadReport:
    """The flat keys of a load on one side only: those ``asked`` for that the checkpoint lacks,
    and the checkpoint's that nothing asks for, in the order the checkpoint lists them (a
    state's own order, as "torch" reports them, when one process saved it)."""
    asked = list(asked)
    saved = metadata.state_dict_metadata
    wanted = set(asked)
    return LoadReport(
        missing_keys=[key for key in asked if key not in saved],
        unexpected_keys=[key for key in saved if key not in wanted],
    )


def shape_mismatches(asked: Mapping[str, Any], metadata: Metadata) -> list[ShapeDifference]:
    """The tensors of a flat load (:func:`flat_state`) whose shape differs from the one the
    checkpoint saved under the same key (a DTensor: its global shape), as (key, saved shape,
    given shape): what DCP's planner would refuse in its collective read, found before it."""
    saved = metadata.state_dict_metadata
    found: list[ShapeDifference] = []
    for key, value in asked.items():
        entry = saved.get(key)
        if (
            isinstance(value, torch.Tensor)
            and isinstance(entry, TensorStorageMetadata)
            and tuple(entry.size) != tuple(value.shape)
        ):
            found.append((key, tuple(entry.size), tuple(value.shape)))
    return found
