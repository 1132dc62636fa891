"""The "torch" format: one file per rank, ``rank-00000.pt`` ... (the layout of DeepSpeed-style
per-rank checkpoints).

Fastest to write and read; a checkpoint can only be restored by the same world size that saved
it (use "dcp" to reshard). Since manifest format version 2 each rank file holds its tensors'
raw bytes beside an index and the state's pickled skeleton
(:mod:`distckpt.formats.raw_rank_file`): written storage by storage straight from the tensors'
memory through a writer that checksums the bytes as they pass, read straight into new tensors
or mapped. Checkpoints of format version 1 hold one ``torch.save`` file per rank, and still
load. Either way nothing is unpickled beyond tensors and plain values
(``torch.load(weights_only=True)``) unless the caller opts in to unpickling arbitrary objects;
:func:`distckpt.export` turns a rank's state into one ``torch.save`` file.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import types
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import torch

from distckpt.errors import (
    CheckpointError,
    CorruptCheckpoint,
    InvalidArgument,
    UnimportableClass,
    UnsafeCheckpoint,
    WorldSizeMismatch,
)
from distckpt.formats.base import PreparedRead, ReadOptions, ShardContext, check_saved_rank
from distckpt.formats.raw_rank_file import estimate_file_bytes, write_rank_file
from distckpt.formats.raw_rank_reader import ZIP_MAGIC, load_rank_file
from distckpt.layout import parse_rank_file_name, rank_file_name
from distckpt.manifest import FileRecord, Manifest
from distckpt.state_sizes import byte_string_bytes, storage_sizes

#: The first manifest format version whose "torch" rank files are raw (version 1: torch.save).
RAW_RANK_FILES_SINCE = 2
# torch's weights-only refusal names the first type it would not unpickle like this.
_REFUSED_GLOBAL_RE = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
# Every message of torch's weights-only unpickler (torch/_weights_only_unpickler.py) that
# refuses a global the file names: not on the allow-list, of a blocked module, or of a module
# (torch.nested, torch.distributed.tensor) to import first. Any other failure of that
# unpickler ("Unsupported operand", a stack or memo out of range) is a damaged pickle.
_REFUSED_GLOBAL_MESSAGES = re.compile(
    r"Unsupported global: GLOBAL |Trying to load unsupported GLOBAL |must be imported to load "
)
# torch's refusal of a global of a module it never loads from a file (os, posix, subprocess:
# they run commands), which no allow-list entry lets through
_BLOCKED_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+) whose module ([\w.]+) is blocked")
# torch decorates its message with terminal escape codes (bold text).
_ESCAPE_CODE_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

TorchSource = Union[Path, io.BytesIO]


def unsafe_load_error(name: str, exc: pickle.UnpicklingError) -> UnsafeCheckpoint:
    """The error for torch's weights-only refusal of ``name``: which type(s) it refused, and
    the two ways to opt in (one, ``allow_pickle=True``, for a global of a module torch
    blocks, which no allow-list entry lets through)."""
    text = _ESCAPE_CODE_RE.sub("", str(exc))
    blocked = _BLOCKED_GLOBAL_RE.search(text)
    if blocked:
        return UnsafeCheckpoint(
            f"{name} holds {blocked[1]}, of the module {blocked[2]}, which torch's weights-only "
            "unpickler never loads (it can run commands), so it was not loaded. Only if you "
            "trust this checkpoint, pass allow_pickle=True"
        )
    refused = list(dict.fromkeys(_REFUSED_GLOBAL_RE.findall(text)))
    if refused:
        types = ", ".join(refused)
        what = f"an object of type {types}, which is not on torch's weights-only allow-list"
        allow = f"torch.serialization.add_safe_globals([{types}])"
    else:
        what = f"objects outside torch's weights-only allow-list ({_unpickler_reason(text)})"
        allow = "torch.serialization.add_safe_globals([...])"
    return UnsafeCheckpoint(
        f"{name} holds {what}, so it was not loaded. If you trust this checkpoint, pass "
        f"allow_pickle=True, or allow the type with {allow}"
    )


class _ImportNamingUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose class lookup turns a failed import into
    :class:`UnimportableClass`, so that failure alone is told apart from every other (a
    damaged pickle, an object's own code failing), which stays :class:`CorruptCheckpoint`."""

    #: what the pickle is read from, for errors (set by :func:`_import_naming_pickle_module`)
    source_name: str = "?"
    source_path: str | None = None

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError) as exc:
            raise UnimportableClass(
                f"{self.source_name} names {module}.{name}, which cannot be imported here "
                f"({exc}): the checkpoint needs the code it was saved with, or the file is "
                "damaged: run distckpt verify",
                reason=str(exc),
                path=self.source_path,
            ) from exc


def _import_naming_pickle_module(name: str, path: str | None) -> types.ModuleType:
    """A pickle module for ``torch.load(pickle_module=...)`` (torch uses its ``Unpickler`` and
    ``load``) whose unpickler names ``name`` in an :class:`UnimportableClass`."""
    unpickler = type(
        "_ImportNamingUnpickler",
        (_ImportNamingUnpickler,),
        {"source_name": name, "source_path": path},
    )
    module = types.ModuleType("distckpt_import_naming_pickle")
    module.Unpickler = unpickler  # type: ignore[attr-defined]
    module.load = lambda file, **kwargs: unpickler(file, **kwargs).load()  # type: ignore[attr-defined]
    return module


def safe_torch_load(
    source: TorchSource,
    options: ReadOptions,
    *,
    name: str | None = None,
    file_path: str | None = None,
) -> Any:
    """``torch.load`` that unpickles only tensors and plain values unless the caller opted in,
    and turns torch's refusal into an error naming the refused type and how to opt in.
    With ``allow_pickle``, a class or function the file names that cannot be imported is an
    :class:`UnimportableClass` (missing code, or a damaged name). Whatever else fails is a
    :class:`CorruptCheckpoint` chained to what was raised, an error of an object's own code
    (its ``__setstate__``) too: from inside the unpickler it cannot be told from damage.
    ``name`` says what ``source`` is in errors (a path names itself); ``file_path`` is the
    file bytes in memory were read from, the ``path`` of errors (a path is its own)."""
    path = None if isinstance(source, io.BytesIO) else os.fspath(source)
    name = name if name is not None else str(path)
    file_path = path if path is not None else file_path
    try:
        # torch maps only a zip archive: a legacy file (format version 1 may hold one) is read
        mmap = options.mmap and path is not None and _head(source) == ZIP_MAGIC
        pickle_module = (
            _import_naming_pickle_module(name, file_path) if options.allow_pickle else None
        )
        return torch.load(
            source if path is None else path,
            map_location=options.map_location,
            weights_only=not options.allow_pickle,
            mmap=mmap or None,
            pickle_module=pickle_module,
        )
    except pickle.UnpicklingError as exc:
        if not options.allow_pickle and _REFUSED_GLOBAL_MESSAGES.search(str(exc)):
            raise unsafe_load_error(name, exc) from None
        protocol = None if options.allow_pickle else _pickle_protocol(source)
        if protocol in _UNREAD_PROTOCOLS:
            raise UnsafeCheckpoint(
                f"{name} was pickled with protocol {protocol}, which torch's weights-only "
                "unpickler does not read, so it was not loaded. If you trust this checkpoint, "
                "pass allow_pickle=True"
            ) from None
        raise CorruptCheckpoint(
            f"{name}: cannot be unpickled: {_unpickler_reason(str(exc))}"
        ) from exc
    except (CheckpointError, OSError, MemoryError):
        raise  # named already; a failed read, or too little memory, is no damage of the file
    except Exception as exc:
        # A damaged pickle or archive fails inside torch as anything at all (IndexError from
        # an empty stack, KeyError from a memo, struct.error, a decoding error, ...).
        raise CorruptCheckpoint(f"{name}: not a readable torch file: {exc!r}") from exc


#: the pickle protocols (4: frames, and 5) torch's weights-only unpickler does not read; torch
#: writes 2 unless told otherwise, and one flipped bit of that protocol byte gives no 4 or 5
_UNREAD_PROTOCOLS = range(4, pickle.HIGHEST_PROTOCOL + 1)


def _pickle_protocol(source: TorchSource) -> int | None:
    """The protocol a ``torch.save`` file's pickle says it was written with (its first opcode):
    of the pickle in its archive, or of the file itself, which is its first pickle in the
    legacy (not zip) format. None when that cannot be told (unreadable, no such opcode)."""
    try:
        head = _head(source)
        if head == ZIP_MAGIC:
            head = bytes(_archive_pickle(source)[:2])
    except Exception:  # a damaged archive: whatever the reader raises
        return None
    return head[1] if len(head) >= 2 and head[0] == pickle.PROTO[0] else None


def _head(source: TorchSource) -> bytes:
    """The first bytes of ``source``, as many as :data:`ZIP_MAGIC` has: a zip archive's magic,
    or a pickle's first opcodes (its protocol in the first two)."""
    if isinstance(source, io.BytesIO):
        return source.getvalue()[: len(ZIP_MAGIC)]
    with open(source, "rb") as file:
        return file.read(len(ZIP_MAGIC))


def _archive_pickle(source: TorchSource) -> bytes:
    """The pickle (``data.pkl``) of a ``torch.save`` archive; raises whatever torch's reader
    raises when ``source`` is no such archive."""
    if isinstance(source, io.BytesIO):
        source.seek(0)
        return torch._C.PyTorchFileReader(source).get_record("data.pkl")
    return torch._C.PyTorchFileReader(os.fspath(source)).get_record("data.pkl")


def _unpickler_reason(text: str) -> str:
    """What torch's weights-only unpickler says failed (``Unsupported operand 80``), without
    the advice around it (to file an issue, to pass weights_only=False, to read the docs);
    the whole of ``text``, torch's advice included, when it holds no such reason."""
    text = _ESCAPE_CODE_RE.sub("", text)
    _, marker, after = text.partition("Unpickler error:")
    reason = " ".join(after.split("Check the documentation")[0].split())
    return reason if marker and reason else " ".join(text.split()) or "?"


def read_rank_file(path: Path, manifest: Manifest, options: ReadOptions) -> Any:
    """The state in one rank file of a checkpoint with ``manifest``. Format version 1 wrote
    ``torch.save`` files; later versions write raw rank files, and a ``torch.save`` file in
    their place (one a person rewrote and resealed) is read as one, by its first bytes."""
    if manifest.format_version >= RAW_RANK_FILES_SINCE:
        return load_rank_file(
            path, options, load_skeleton, otherwise=lambda: safe_torch_load(path, options)
        )
    return safe_torch_load(path, options)


class _PlainValuesUnpickler(pickle.Unpickler):
    """Unpickles plain values only: dicts (``OrderedDict`` too, with the attributes pickled with
    it: a module's ``state_dict()`` and its ``_metadata``), lists, tuples, strings, numbers,
    booleans and None. Every other class or function a pickle names, and every persistent id
    (a tensor's storage), is refused, so no code can run (the "restricting globals" recipe of
    Python's ``pickle`` documentation, allowing what torch's weights-only unpickler allows of
    them): stricter than that unpickler, and C code instead of its opcode loop in Python."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise pickle.UnpicklingError(f"global {module}.{name} is not a plain value")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("a persistent id is not a plain value")


def plain_values_of(source: io.BytesIO) -> Any:
    """The value a ``torch.save`` archive holds when it holds plain values only; raises
    whatever the archive or its pickle raise otherwise."""
    return _PlainValuesUnpickler(io.BytesIO(_archive_pickle(source))).load()


def load_skeleton(source: io.BytesIO, options: ReadOptions, name: str) -> Any:
    """A raw rank file's skeleton, unpickled as safely as a whole ``torch.save`` file.

    A skeleton usually holds plain values only (its tensors are in the file's data), and
    ``torch.load``'s weights-only unpickler, an opcode loop in Python, costs a restore of a
    small state more than reading its tensors: plain values are unpickled by
    :class:`_PlainValuesUnpickler`. Anything else (a class, a tensor kept in the skeleton, a
    damaged archive) is left to :func:`safe_torch_load`, which loads or refuses it as it
    refuses a whole file."""
    try:
        return plain_values_of(source)
    except Exception:  # not plain values, or unreadable: torch.load decides and explains
        source.seek(0)
    return safe_torch_load(source, options, name=name, file_path=name)


def check_writer_threads(writer_threads: object) -> int:
    """``writer_threads`` as a count, refused unless an int of at least 1, and more than 1
    only where the system has ``os.pwritev`` (the parallel writers write at offsets with it:
    Linux and most Unix systems, not Windows)."""
    if (
        isinstance(writer_threads, bool)
        or not isinstance(writer_threads, int)
        or writer_threads < 1
    ):
        raise InvalidArgument(
            f"writer_threads must be an int of at least 1, not {writer_threads!r}"
        )
    if writer_threads > 1 and not hasattr(os, "pwritev"):
        raise InvalidArgument(
            f"writer_threads={writer_threads} needs os.pwritev, which this system lacks: use 1"
        )
    return writer_threads


def check_direct_io(direct_io: object) -> bool:
    """``direct_io`` as a bool, refused unless True or False."""
    if not isinstance(direct_io, bool):
        raise InvalidArgument(f"direct_io must be True or False, not {direct_io!r}")
    return direct_io


class TorchFilesFormat:
    """One file per rank (raw tensor bytes since format version 2, ``torch.save`` before);
    restorable only by the world size that saved it."""

    name = "torch"
    marks_per_rank = False  # every rank saves its whole state: every value is per rank
    collective_read = False  # each rank reads its own file

    def __init__(self, writer_threads: int = 1, direct_io: bool = True) -> None:
        #: threads that write a rank file's tensor bytes (:func:`write_rank_file`)
        self.writer_threads = check_writer_threads(writer_threads)
        #: whether a rank file may be written with direct I/O (:func:`write_rank_file`)
        self.direct_io = check_direct_io(direct_io)

    def required_files(self, manifest: Manifest) -> list[str]:
        return [rank_file_name(rank) for rank in range(manifest.world_size)]

    def owns_file(self, name: str) -> bool:
        return parse_rank_file_name(name.casefold()) is not None

    def check_state(self, state: Any) -> None:
        pass  # torch.save writes anything; an unpicklable value fails the write itself

    def estimate_bytes(self, state: Any) -> int:
        # The rank file holds each storage once, as torch.save does: a view's whole storage
        # from a sync save, only the bytes it reaches from an async snapshot's buffers.
        return estimate_file_bytes(storage_sizes(state)) + byte_string_bytes(state)

    def write(self, state: Any, directory: Path, ctx: ShardContext) -> Mapping[str, FileRecord]:
        name = rank_file_name(ctx.rank)
        writer = write_rank_file(
            state,
            directory / name,
            fsync=ctx.fsync,
            writer_threads=self.writer_threads,
            direct=self.direct_io and ctx.direct_io,
        )
        return {name: FileRecord(size=writer.size, checksum=writer.checksum, rank=ctx.rank)}

    def prepare_read(
        self,
        directory: Path,
        manifest: Manifest,
        ctx: ShardContext,
        template: Any,
        options: ReadOptions,
    ) -> PreparedRead:
        """Refuses a different world size (each rank reads the file its rank wrote), and a
        rank that wrote none (a plain process's past the saved ranks); any template (or none)
        will do, as a rank file is read whole."""
        if ctx.world_size != manifest.world_size:
            raise WorldSizeMismatch(
                f"{directory} was saved by {manifest.world_size} ranks in the {self.name!r} "
                f"format and cannot be restored by {ctx.world_size} ranks; restore with "
                f"{manifest.world_size} ranks, or save with format='dcp' to reshard on restore",
                saved_world_size=manifest.world_size,
                world_size=ctx.world_size,
                path=directory,
                step=manifest.step,
            )
        check_saved_rank(directory, manifest, ctx.rank)
        return PreparedRead(directory, manifest, ctx, template, options)

    def read(self, prepared: PreparedRead) -> Any:
        path = prepared.directory / rank_file_name(prepared.ctx.rank)
        return read_rank_file(path, prepared.manifest, prepared.options)

    def export(
        self,
        directory: Path,
        manifest: Manifest,
        *,
        rank: int | None,
        all_ranks: bool,
        allow_pickle: bool,
    ) -> Any:
        """One rank's state (rank 0 unless ``rank`` says otherwise), or with ``all_ranks``
        ``{rank: state}`` of every rank."""
        if all_ranks and rank is not None:
            raise InvalidArgument("pass rank= or all_ranks=True, not both")
        options = ReadOptions(map_location="cpu", allow_pickle=allow_pickle)
        if all_ranks:
            return {
                r: read_rank_file(directory / rank_file_name(r), manifest, options)
                for r in range(manifest.world_size)
            }
        chosen = 0 if rank is None else rank
        check_saved_rank(directory, manifest, chosen)
        return read_rank_file(directory / rank_file_name(chosen), manifest, options)
