"""The "dcp" format: sharded checkpoints written by ``torch.distributed.checkpoint`` (DCP), which
can be restored by a different number of ranks than saved them (resharding).

Layout of a committed dir: one ``__<rank>_0.distcp`` file per rank (the rank's shards of every
DTensor, plus the replicated values DCP assigned to it) and a ``.metadata`` file written by rank
0 that says which bytes of which file hold which chunk of which tensor. Every file is listed in
``manifest.json`` with the size and crc32 that were computed while the bytes were written (the
files are never read back to checksum them).

Saving: ``write`` runs ``dcp.save`` on every rank at once over distckpt's private gloo group
(DCP's no-dist path without torch.distributed). DCP is given a storage writer whose files are
:class:`~distckpt.fsutil.ChecksumWriter` streams, fsynced on close when the manager fsyncs. The
only rename DCP does (``.metadata.tmp`` to ``.metadata``) stays inside the staging dir, and the
metadata records no absolute path (``checkpoint_id`` is left empty), so the committed dir does
not depend on where it was staged and can be moved.

What DCP saves, and its limits:

* The top-level state must be a dict. Nested dicts and lists are flattened into dotted keys.
* DTensors (FSDP2 ``fully_shard`` parameters, their optimizer state) are saved shard by shard.
* Everything else -- plain tensors and plain values -- is taken to be the *same on every rank*
  and is saved once, from one rank. A value that differs between ranks (a per-rank RNG state, a
  rank number) is silently reduced to one rank's copy: keep per-rank state out of a "dcp"
  checkpoint, or save it in a "torch" one.
* Optimizers must be saved FQN-keyed, through ``get_state_dict``: put
  ``{"app": ModelOptimizerState(model, optimizer)}`` in the state rather than the optimizer
  itself. A plain ``optimizer.state_dict()`` (keyed by parameter number) is refused with
  :class:`~distckpt.errors.InvalidArgument`: a fresh optimizer has no state tensors for DCP to
  load into, so its state would be dropped without a word on resume.

Restoring: DCP loads *in place*, so ``restore`` needs ``state=``: the same structure as saved,
whose tensors and DTensors (on the restoring ranks' meshes) receive the data; each rank reads
only the chunks its shards overlap. Keys the state asks for that the checkpoint lacks are left
out of the result, so :func:`distckpt.state.load_into` reports them as missing (and raises under
``strict=True``); keys only in the checkpoint are not loaded and only logged.
``map_location`` applies to non-tensor values only (tensors land where the given state's
tensors are) and ``mmap`` is ignored. Before DCP's collectives start, every rank checks the
given state and reads ``.metadata``, and the ranks agree on the outcome (one small
all-gather), so a rank that fails alone fails every rank instead of leaving them waiting.
:func:`load_consolidated` (used by :func:`distckpt.export`) reads a whole checkpoint
into full tensors in one plain process.

Untrusted checkpoints. DCP would unpickle ``.metadata`` with ``pickle.load`` and every
non-tensor value with ``torch.load(weights_only=False)``, either of which runs arbitrary code
from a crafted file. Here, unless ``allow_pickle=True``:

* ``.metadata`` is read by a restricted unpickler that resolves only DCP's metadata dataclasses,
  ``torch.Size``, torch dtypes and layouts; any other global (``os.system``, ``builtins.eval``,
  ...), a persistent id, or setting attributes on anything but an instance of those
  dataclasses (patching a class) is refused with :class:`~distckpt.errors.UnsafeCheckpoint`
  before anything is called. The result is then checked field by field (types, and that every
  storage entry names a ``.distcp`` file listed in the manifest, within its size), so a crafted
  file cannot make DCP read outside the checkpoint dir, and the full tensors it describes
  cannot exceed the bytes stored.
* Non-tensor values are loaded with ``torch.load(weights_only=True)``.
* Tensor data is loaded by DCP itself with ``torch.load(weights_only=True)``.

What this does not cover: the restricted unpickler still runs the pickle machine (Python's own,
slower than the C one but the file is small), so a crafted ``.metadata`` can make it allocate
memory or burn CPU (a denial of service, not code execution), and the allowed dataclasses'
constructors and ``__setstate__`` run on attacker-chosen arguments (they only assign fields,
and the result is type-checked afterwards). The chunk layout is checked for types and ranks,
not for overlaps or coverage: a crafted one can make a load fail or fill a tensor with the
wrong bytes of the checkpoint's own files (as any tampering with tensor data can). The
objects DCP exchanges between ranks through ``torch.distributed`` object collectives are
pickles too; they are built by the ranks of the job itself from the checked metadata, not read
from the checkpoint.
``allow_pickle=True`` switches all of this off and loads exactly as DCP does: only for
checkpoints from a trusted source.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, NoReturn, TypeVar

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import (
    FileSystem,
    FileSystemReader,
    FileSystemWriter,
)
from torch.distributed.checkpoint.metadata import (
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from distckpt.coord import Outcome, describe_error
from distckpt.errors import (
    CheckpointError,
    CorruptCheckpoint,
    InvalidArgument,
    RankFailure,
    UnsafeCheckpoint,
)
from distckpt.formats.base import ReadOptions, ShardContext
from distckpt.formats.dcp_metadata import DATA_FILE_RE, METADATA_NAME, read_metadata
from distckpt.fsutil import ChecksumWriter
from distckpt.manifest import FileRecord, Manifest
from distckpt.state import tensor_bytes

__all__ = [
    "DcpFormat",
    "ModelOptimizerState",
    "METADATA_NAME",
    "data_file_name",
    "load_consolidated",
    "read_metadata",
]

logger = logging.getLogger("distckpt")
T = TypeVar("T")

# The metadata pickle and the per-item headers around the tensor data.
_OVERHEAD_BYTES = 64 << 10
_NO_DIST_WARNING = r".*(torch\.distributed is|assuming the intent is to)"


def data_file_name(rank: int) -> str:
    """``__3_0.distcp``: the file DCP writes for ``rank`` (single file per rank, one thread)."""
    return f"__{rank}_0.distcp"


# ---------------------------------------------------------------------------------------------
# The helper users put in their state


class ModelOptimizerState:
    """A model and its optimizer(s) as one Stateful object whose state dict DCP can reshard.

    ``state_dict()`` is ``{"model": ..., "optim": ...}`` from
    ``torch.distributed.checkpoint.state_dict.get_state_dict``: FQN-keyed (the optimizer state
    is keyed by parameter name, not by parameter number), with the DTensors of an FSDP2 model
    and of its optimizer state left sharded. ``load_state_dict`` goes through
    ``set_state_dict``. Put it in the state given to ``save`` and ``restore`` on every rank::

        state = {"app": ModelOptimizerState(model, optimizer), "steps": tracker}
        mgr.restore("last", state=state, missing_ok=True)
        ...
        mgr.save(step, state)

    Without an optimizer the state dict is ``{"model": ...}`` only. ``options`` is passed to
    ``get_state_dict`` / ``set_state_dict`` unchanged (its ``strict`` decides whether missing or
    unexpected keys raise on load).

    Limits: ``get_state_dict`` on an optimizer that has never stepped creates its state by one
    step with zero gradients and a zero learning rate (so there are tensors to save or load
    into); a :class:`~distckpt.StepTracker` on that optimizer counts that step, and restoring a
    checkpoint then sets the tracker's count back to the saved one. Calling ``state_dict()``
    on an FSDP2 model is collective when ``options`` asks for full state dicts, so every rank
    must use it together (as ``save`` and ``restore`` do).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
        *,
        options: StateDictOptions | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise InvalidArgument(f"model must be a torch.nn.Module, not {type(model).__name__}")
        if optimizer is None:
            optimizers: tuple[torch.optim.Optimizer, ...] = ()
        elif isinstance(optimizer, torch.optim.Optimizer):
            optimizers = (optimizer,)
        else:
            optimizers = tuple(optimizer)
        for index, opt in enumerate(optimizers):
            if not isinstance(opt, torch.optim.Optimizer):
                raise InvalidArgument(
                    f"optimizer {index} must be a torch.optim.Optimizer, not {type(opt).__name__}"
                )
        self.model = model
        self.optimizers = optimizers
        self.options = options

    def state_dict(self) -> dict[str, Any]:
        if not self.optimizers:
            return {"model": get_model_state_dict(self.model, options=self.options)}
        model_state, optim_state = get_state_dict(self.model, self.optimizers, options=self.options)
        return {"model": model_state, "optim": optim_state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {"model", "optim"} if self.optimizers else {"model"}
        if not isinstance(state, Mapping) or set(state) != expected:
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise InvalidArgument(
                f"ModelOptimizerState expects a state dict with keys {sorted(expected)}, got "
                f"{got}: save and restore with the same model/optimizer arrangement"
            )
        try:
            if self.optimizers:
                set_state_dict(
                    self.model,
                    self.optimizers,
                    model_state_dict=state["model"],
                    optim_state_dict=state["optim"],
                    options=self.options,
                )
            else:
                set_model_state_dict(self.model, state["model"], options=self.options)
        except (RuntimeError, KeyError, ValueError) as exc:
            # torch reports missing/unexpected keys and shape mismatches this way.
            raise InvalidArgument(
                f"the checkpoint does not fit this model/optimizer: {describe_error(exc)}"
            ) from exc

    def __repr__(self) -> str:
        return (
            f"ModelOptimizerState({type(self.model).__name__}, {len(self.optimizers)} optimizer(s))"
        )


# ---------------------------------------------------------------------------------------------
# Writing: DCP's filesystem writer, with files that checksum themselves


class _ChecksumStream(ChecksumWriter):
    """A ChecksumWriter that DCP can use as its output stream (DCP asks for ``tell()`` to
    record where each item starts; files are only ever appended to)."""

    def tell(self) -> int:
        return self.size

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False


class _RecordingFileSystem(FileSystem):
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
        stream = _ChecksumStream(self.directory / name, fsync=self.fsync)
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


class _Writer(FileSystemWriter):
    """DCP's filesystem writer on a :class:`_RecordingFileSystem`, one file per rank."""

    def __init__(self, directory: Path, *, fsync: bool) -> None:
        # sync_files=False: the streams fsync themselves on close (DCP would os.sync() the whole
        # machine for a stream without fileno()).
        super().__init__(directory, single_file_per_rank=True, sync_files=False, thread_count=1)
        self.recording = _RecordingFileSystem(directory, fsync=fsync)
        self.fs = self.recording
        self.overwrite = False

    def storage_meta(self) -> StorageMeta | None:
        # No checkpoint_id: it would record the staging path, which is renamed away.
        return StorageMeta(checkpoint_id=None, save_id=self.save_id)


class _Reader(FileSystemReader):
    """DCP's filesystem reader serving metadata that was already read and checked."""

    def __init__(self, directory: Path, metadata: Metadata) -> None:
        super().__init__(directory)
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            # DCP asks for per-rank metadata only after the global read failed; ours did not.
            raise CorruptCheckpoint("distckpt's DCP checkpoints have no per-rank metadata")
        if self._metadata.storage_meta is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


class _Planner(DefaultLoadPlanner):
    """DCP's load planner, loading non-tensor values with ``weights_only=True`` and noting which
    requested keys the checkpoint lacks (instead of failing on the first)."""

    def __init__(self, options: ReadOptions, *, flatten: bool = True) -> None:
        super().__init__(flatten_state_dict=flatten, allow_partial_load=True)
        self.options = options
        self.missing: list[str] = []
        self.unexpected: list[str] = []

    def create_local_plan(self) -> LoadPlan:
        plan = super().create_local_plan()
        if self.metadata is None:  # set_up_planner always sets it; DCP calls that first
            raise CorruptCheckpoint("DCP planned a load without metadata")
        saved = self.metadata.state_dict_metadata
        self.missing = [key for key in self.state_dict if key not in saved]
        self.unexpected = sorted(key for key in saved if key not in self.state_dict)
        return plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        key = read_item.dest_index.fqn
        try:
            loaded = torch.load(
                value,
                map_location=self.options.map_location,
                weights_only=not self.options.allow_pickle,
            )
        except pickle.UnpicklingError as exc:
            if self.options.allow_pickle:
                raise CorruptCheckpoint(f"value {key!r} cannot be unpickled: {exc}") from exc
            raise UnsafeCheckpoint(
                f"value {key!r} holds objects outside torch's weights-only allow-list, so it "
                f"was not loaded ({describe_error(exc)}). If you trust this checkpoint, pass "
                "allow_pickle=True"
            ) from None
        except (RuntimeError, EOFError, ValueError) as exc:
            raise CorruptCheckpoint(f"value {key!r} is not a readable torch pickle: {exc}") from exc
        # Into the caller's dict: self.state_dict may be a flattened copy of it.
        _set_path(self.original_state_dict, self.path_of(key), loaded)

    def path_of(self, key: str) -> tuple[Any, ...]:
        return tuple(self.mappings[key]) if self.flatten_state_dict else (key,)


# ---------------------------------------------------------------------------------------------
# Nested state helpers


def _set_path(root: Any, path: Iterable[Any], value: Any) -> None:
    """Set ``value`` at ``path`` in nested dicts/lists, creating missing containers (a list
    where the next key is an int)."""
    path = list(path)
    node = root
    for key, next_key in zip(path, path[1:]):
        fresh: Any = [] if isinstance(next_key, int) else {}
        if isinstance(node, list):
            node.extend([None] * (key + 1 - len(node)))
            if node[key] is None:
                node[key] = fresh
        elif key not in node:
            node[key] = fresh
        node = node[key]
    last = path[-1]
    if isinstance(node, list):
        node.extend([None] * (last + 1 - len(node)))
    node[last] = value


def _copy_containers(value: Any) -> Any:
    """``value`` with fresh dicts and lists but the same tensors, so DCP's in-place filling
    never rearranges a container owned by the user's objects."""
    if isinstance(value, Mapping):
        return {key: _copy_containers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy_containers(item) for item in value]
    return value


def _remove_path(root: Any, path: tuple[Any, ...]) -> bool:
    node = root
    for key in path[:-1]:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return False
    if isinstance(node, dict) and path[-1] in node:
        del node[path[-1]]
        return True
    return False  # an item of a list or tuple cannot be dropped without shifting the rest


def _failures(exc: CheckpointException) -> list[tuple[int, BaseException]]:
    found = []
    for rank, failure in sorted(exc.failures.items()):
        error = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(error, BaseException):
            found.append((rank, error))
    return found


def _raise_from_dcp(
    exc: CheckpointException, action: str, default: type[CheckpointError]
) -> NoReturn:
    """Turn DCP's CheckpointException (a BaseException carrying every rank's error) into the
    distckpt error of the first failing rank, naming every failing rank."""
    failures = _failures(exc)
    if not failures:
        raise default(f"DCP failed while {action}: {exc}") from None
    ranks = ", ".join(str(rank) for rank, _ in failures)
    first = failures[0][1]
    details = "; ".join(f"rank {r}: {describe_error(e)}" for r, e in failures)
    message = f"DCP failed while {action} on rank {ranks}: {details}"
    if isinstance(first, CheckpointError) and not isinstance(first, RankFailure):
        raise type(first)(message) from first
    if isinstance(first, ValueError) and "mismatch" in str(first).lower():
        hint = "the given state does not match the checkpoint"
        raise InvalidArgument(f"{message}; {hint}") from first
    raise default(message) from first


def _run_dcp(func: Callable[[], Any], action: str, default: type[CheckpointError]) -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
        try:
            return func()
        except CheckpointException as exc:
            _raise_from_dcp(exc, action, default)


# ---------------------------------------------------------------------------------------------
# The format


def _find_id_keyed_optimizer(state: Any, path: str = "") -> str | None:
    """The key of a value that looks like ``optimizer.state_dict()`` (parameters numbered), if
    any: DCP would save it, but a fresh optimizer has no state tensors to load it back into."""
    if isinstance(state, Mapping):
        groups = state.get("param_groups")
        if (
            set(state) == {"state", "param_groups"}
            and isinstance(groups, list)
            and any(
                isinstance(group, Mapping)
                and any(isinstance(p, int) for p in group.get("params", ()))
                for group in groups
            )
        ):
            return path or "<top level>"
        for key, value in state.items():
            found = _find_id_keyed_optimizer(value, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    elif isinstance(state, (list, tuple)):
        for index, value in enumerate(state):
            found = _find_id_keyed_optimizer(value, f"{path}.{index}" if path else str(index))
            if found is not None:
                return found
    return None


def _check_saveable(state: Any) -> None:
    _check_keys(state, "saves")
    optimizer_key = _find_id_keyed_optimizer(state)
    if optimizer_key is not None:
        raise InvalidArgument(
            f"{optimizer_key!r} looks like optimizer.state_dict(), keyed by parameter number: "
            "the 'dcp' format needs the optimizer state keyed by parameter name, or a resume "
            "into a fresh optimizer would silently drop it. Save "
            "ModelOptimizerState(model, optimizer) (from distckpt.formats.dcp) instead of the "
            "model and the optimizer"
        )


def _agreed(ctx: ShardContext, func: Callable[[], T], what: str) -> T:
    """``func()``, with its failure on any rank raised on every rank. Run before DCP's own
    collectives, so that a rank failing alone (an unreadable file) does not leave the others
    waiting inside DCP for it."""
    outcome, cause = Outcome.of(func)
    if ctx.coordinator is None:
        if cause is not None:
            raise cause
        return outcome.value
    ctx.coordinator.agree(outcome, what=what, cause=cause)
    return outcome.value


def _check_keys(state: Any, what: str) -> None:
    if not isinstance(state, Mapping):
        raise InvalidArgument(
            f"the 'dcp' format {what} a dict at the top level, not a {type(state).__name__}"
        )
    bad = [key for key in state if not isinstance(key, str)]
    if bad:
        raise InvalidArgument(f"the 'dcp' format needs string top-level keys, got {bad!r}")


class DcpFormat:
    """Sharded checkpoints through ``torch.distributed.checkpoint``; restorable by any number of
    ranks. See the module doc for what it saves and its limits."""

    name = "dcp"
    fixed_world_size = False

    def required_files(self, manifest: Manifest) -> list[str]:
        """``.metadata`` and one ``.distcp`` file per saving rank (DCP writes one per rank even
        when the rank has nothing to save, since distckpt runs it with one writer thread)."""
        return [METADATA_NAME, *(data_file_name(rank) for rank in range(manifest.world_size))]

    def owns_file(self, name: str) -> bool:
        return name in (METADATA_NAME, METADATA_NAME + ".tmp") or bool(DATA_FILE_RE.match(name))

    def check_template(self, directory: Path, template: Any) -> None:
        if template is None:
            raise InvalidArgument(
                f"restoring {directory} (format 'dcp') needs state=: DCP loads in place into "
                "the tensors and DTensors of the state you pass, so pass the same structure "
                "that was saved (e.g. {'app': ModelOptimizerState(model, optimizer)}); to get "
                "the whole checkpoint as full tensors in one process, use "
                "distckpt.export() or distckpt.formats.dcp.load_consolidated()"
            )
        _check_keys(template, "restores into")

    def estimate_bytes(self, state: Any) -> int:
        # Checked here too: the manager calls this in its proposal round, where an error is
        # agreed by every rank, rather than inside DCP's collectives.
        _check_saveable(state)
        # Local shards only: replicated values are written by one rank, so this over-counts.
        return tensor_bytes(state) + _OVERHEAD_BYTES

    def write(self, state: Any, directory: Path, ctx: ShardContext) -> Mapping[str, FileRecord]:
        """Save this rank's part with ``dcp.save`` over ``ctx.group``; collective. Returns the
        files this rank wrote (its ``__<rank>_0.distcp``; rank 0 also ``.metadata``)."""
        _check_saveable(state)
        writer = _Writer(directory, fsync=ctx.fsync)
        _run_dcp(
            lambda: dcp.save(
                dict(state),
                storage_writer=writer,
                planner=DefaultSavePlanner(),
                process_group=ctx.group,
                no_dist=ctx.group is None,
            ),
            f"writing {directory.name}",
            CheckpointError,
        )
        return {
            name: FileRecord(size=size, checksum=checksum, rank=ctx.rank)
            for name, (size, checksum) in writer.recording.written.items()
        }

    def read(
        self,
        directory: Path,
        manifest: Manifest,
        ctx: ShardContext,
        template: Any,
        options: ReadOptions,
    ) -> Any:
        """Load into ``template``'s tensors and DTensors with ``dcp.load`` over ``ctx.group``
        (collective); returns the filled template, without the keys the checkpoint lacks."""
        self.check_template(directory, template)

        def prepare() -> Metadata:
            return read_metadata(directory, manifest, allow_pickle=options.allow_pickle)

        metadata = _agreed(ctx, prepare, f"reading {directory.name}'s DCP metadata")
        state = _copy_containers(template)
        planner = _Planner(options)
        _run_dcp(
            lambda: dcp.load(
                state,
                storage_reader=_Reader(directory, metadata),
                planner=planner,
                process_group=ctx.group,
                no_dist=ctx.group is None,
            ),
            f"reading {directory.name}",
            CorruptCheckpoint,
        )
        for key in planner.missing:
            _remove_path(state, planner.path_of(key))
        if planner.unexpected:
            shown = ", ".join(planner.unexpected[:8])
            more = f" and {len(planner.unexpected) - 8} more" if len(planner.unexpected) > 8 else ""
            logger.warning(
                "%s holds keys the given state does not ask for; not loaded: %s%s",
                directory,
                shown,
                more,
            )
        return state


def load_consolidated(
    directory: Path, manifest: Manifest, *, allow_pickle: bool = False
) -> dict[str, Any]:
    """The whole "dcp" checkpoint in ``directory`` as one nested state of full (unsharded)
    tensors on the CPU, read in this process alone (no process group, even if one exists):
    what the state looked like before sharding. Needs memory for every tensor at full size.
    Reads through the same safe path as restore (see the module doc)."""
    metadata = read_metadata(directory, manifest, allow_pickle=allow_pickle)
    tensors = {
        key: entry
        for key, entry in metadata.state_dict_metadata.items()
        if isinstance(entry, TensorStorageMetadata)
    }
    # Every element is stored once in the data files, so the full tensors cannot be larger:
    # a crafted .metadata must not make this process allocate without bound.
    full_bytes = sum(
        entry.size.numel() * torch.empty((), dtype=entry.properties.dtype).element_size()
        for entry in tensors.values()
    )
    stored_bytes = sum(r.size for n, r in manifest.files.items() if DATA_FILE_RE.match(n))
    if full_bytes > stored_bytes:
        raise CorruptCheckpoint(
            f"{directory / METADATA_NAME} describes {full_bytes} bytes of tensors but the data "
            f"files hold {stored_bytes}"
        )
    flat: dict[str, Any] = {
        key: torch.empty(tensors[key].size, dtype=tensors[key].properties.dtype)
        if key in tensors
        else None  # a placeholder DCP replaces with the unpickled value
        for key in metadata.state_dict_metadata
    }
    options = ReadOptions(map_location="cpu", allow_pickle=allow_pickle)
    _run_dcp(
        lambda: dcp.load(
            flat,
            storage_reader=_Reader(directory, metadata),
            planner=_Planner(options, flatten=False),
            no_dist=True,
        ),
        f"reading {directory.name}",
        CorruptCheckpoint,
    )
    paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    nested: dict[str, Any] = {}
    try:
        for key, value in flat.items():
            _set_path(nested, paths.get(key, (key,)), value)
    except (TypeError, KeyError, IndexError) as exc:
        # Key paths that contradict each other (one says list, another dict).
        raise CorruptCheckpoint(
            f"{directory / METADATA_NAME}: its key paths do not form one nested state: {exc!r}"
        ) from exc
    return nested
