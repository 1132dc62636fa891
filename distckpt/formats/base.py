"""The interface every on-disk format implements.

A format turns one rank's state into files inside a staging dir, and reads them back. It knows
nothing about committing, links, retention or agreement among ranks: the manager runs the same
protocol around every format. ``write`` and ``read`` are called on every rank at the same time,
so a format whose library runs its own collectives (DCP) may do so on ``ctx.group``; every check
a rank can make alone comes first (:meth:`CheckpointFormat.check_state` before a write,
:meth:`CheckpointFormat.prepare_read` before a read), and the caller agrees on its outcome, so
a rank failing alone never leaves the others waiting inside the format's collectives.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from distckpt.errors import CheckpointNotFound, InvalidArgument
from distckpt.load_report import LoadReport
from distckpt.manifest import FileRecord, Manifest


@dataclass(frozen=True)
class ShardContext:
    """Where this rank stands when it writes or reads its part of a checkpoint."""

    rank: int
    world_size: int
    fsync: bool
    #: the private gloo group the ranks share, for a format whose library runs its own
    #: collectives; None in a plain process (or a job of one rank without torch.distributed)
    group: dist.ProcessGroup | None = None
    #: whether files may be written with direct I/O (not where the store reads a shard back
    #: while it is written: :attr:`~distckpt.storage.RootStore.shards_read_back`)
    direct_io: bool = True


def check_rank_argument(rank: Any) -> int | None:
    """``rank`` as a caller names the rank whose part to read: None (the default) or an int
    from 0 (not a bool, which is an int to Python but no rank); else
    :class:`~distckpt.errors.InvalidArgument`. Whether the checkpoint has that rank is the
    format's to say."""
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise InvalidArgument(f"rank must be an int from 0, or None; not {rank!r}")
    return rank


def check_saved_rank(directory: Path, manifest: Manifest, rank: int, purpose: str = "") -> None:
    """Refuse, as :class:`~distckpt.errors.CheckpointNotFound`, a ``rank`` whose part
    ``manifest``'s checkpoint (in ``directory``) has none of, when a plain process reads one
    rank's part: the ranks that saved it were 0 to its world size less one, in either format
    (a "dcp" restore by more ranks than saved it reads no one rank's part). ``purpose``, if
    given, is appended to the message to say what the rank was needed for (as
    `` to read the per-rank values ... from; ...``)."""
    if not 0 <= rank < manifest.world_size:
        raise CheckpointNotFound(
            f"{directory} has ranks 0..{manifest.world_size - 1}; there is no rank {rank}{purpose}",
            path=directory,
            step=manifest.step,
        )


def check_optional_keys(optional_keys: Any, argument: str = "optional_keys") -> frozenset[str]:
    """``optional_keys`` as a restore takes them: a collection of dotted keys, as a frozenset.
    A plain string is refused with :class:`~distckpt.errors.InvalidArgument`, as is any item
    that is no string: a string would be taken as its characters, none of them a key. The
    error names ``argument``, the restore's argument they were passed as
    (``optional_whole_keys`` are checked here too)."""
    if isinstance(optional_keys, (str, bytes)):
        raise InvalidArgument(
            f"{argument} must be a collection of dotted keys, not the string {optional_keys!r}"
            f" (pass [{optional_keys!r}] for one key)"
        )
    keys = frozenset(optional_keys)
    not_keys = sorted(repr(key) for key in keys if not isinstance(key, str))
    if not_keys:
        raise InvalidArgument(f"{argument} must be strings; not {', '.join(not_keys)}")
    return keys


def check_map_location(map_location: Any) -> Any:
    """``map_location`` if it is one ``torch.load`` takes: None, a device name
    ``torch.device`` accepts, a ``torch.device``, a dict of such names (a saved location to
    the one it loads to), or a function; else :class:`~distckpt.errors.InvalidArgument`, so a
    wrong one is refused before anything is read instead of failing inside the read."""
    if map_location is None or callable(map_location) or isinstance(map_location, torch.device):
        return map_location
    if isinstance(map_location, str):
        _check_device_name(map_location, map_location)
        return map_location
    if isinstance(map_location, dict):
        for saved, loaded in map_location.items():
            _check_device_name(saved, map_location)
            _check_device_name(loaded, map_location)
        return map_location
    raise InvalidArgument(
        f"map_location must be None, a device name, a torch.device, a dict of device names or "
        f"a function; not {map_location!r}"
    )


def _check_device_name(name: Any, map_location: Any) -> None:
    """Refuse ``name`` (part of ``map_location``) unless ``torch.device`` takes it as a name."""
    if not isinstance(name, str):
        raise InvalidArgument(
            f"map_location {map_location!r}: {name!r} is not a device name (a str)"
        )
    try:
        torch.device(name)
    except RuntimeError as exc:
        raise InvalidArgument(f"map_location {map_location!r}: {exc}") from exc


@dataclass(frozen=True)
class ReadOptions:
    """How to read a checkpoint back. Its ``map_location`` is checked when a read starts
    (:func:`check_map_location`, in the reader's agreement: a bad one on any rank is raised
    on every rank, before anything is read)."""

    map_location: Any = "cpu"
    #: unpickle arbitrary objects; only for checkpoints from a trusted source
    allow_pickle: bool = False
    #: memory-map tensor data instead of reading it all (where the format supports it)
    mmap: bool = False
    #: map keys that differ only by wrapper prefixes (``_orig_mod.``, ``module.``); see
    #: :mod:`distckpt.key_prefixes`
    fix_key_prefixes: bool = True
    #: dotted keys of the given state that the checkpoint may lack even when strict (the keys
    #: a newer version of a state added): reported in ``missing_keys``, not refused
    optional_keys: frozenset[str] = frozenset()
    #: dotted keys the checkpoint may lack only as a whole: optional as ``optional_keys``
    #: are, but a key under one of them is not (a state whose keys all came in one version)
    optional_whole_keys: frozenset[str] = frozenset()


def storage_placement(
    map_location: Any,
) -> Callable[[torch.UntypedStorage], torch.UntypedStorage] | None:
    """What moves a storage (on the CPU) where ``map_location`` puts what was saved on the CPU,
    read the way ``torch.load`` reads it (a device, a name, a dict of names, or a function);
    None when it stays where it is (no location, or the CPU: the usual case, which then costs
    no call per storage)."""
    if map_location is None:
        return None
    if callable(map_location):

        def moved_by_function(storage: torch.UntypedStorage) -> torch.UntypedStorage:
            moved = map_location(storage, "cpu")
            return storage if moved is None else moved

        return moved_by_function
    target = map_location.get("cpu", "cpu") if isinstance(map_location, dict) else map_location
    device = torch.device(target)
    if device.type == "cpu":
        return None

    def moved_to_device(storage: torch.UntypedStorage) -> torch.UntypedStorage:
        whole = torch.empty(0, dtype=torch.uint8).set_(storage)
        return whole.to(device).untyped_storage()

    return moved_to_device


@dataclass(frozen=True)
class PreparedRead:
    """A read one rank has checked it can do: what :meth:`CheckpointFormat.prepare_read`
    returns and :meth:`CheckpointFormat.read` consumes."""

    directory: Path
    manifest: Manifest
    ctx: ShardContext
    #: the user's ``state=`` reduced to plain data, or None
    template: Any
    options: ReadOptions
    #: what the format found while preparing and needs for the read (DCP: its metadata)
    detail: Any = None
    #: keys on one side only (template vs checkpoint) and tensors of another shape that the
    #: format found before reading, so they are refused before any collective read (keys with
    #: ``strict=True``, shapes always); None when only the read itself tells ("torch": a rank
    #: file is read whole)
    mismatch: LoadReport | None = None


class CheckpointFormat(Protocol):
    """How one rank's state becomes files, and back."""

    #: the name stored in the manifest and passed as ``CheckpointManager(format=...)``
    name: str
    #: whether the states this format writes and reads keep values that differ per rank
    #: marked (:class:`~distckpt.PerRank`, see :mod:`distckpt.per_rank`): a format that saves
    #: some values once for all ranks must tell those apart
    marks_per_rank: bool
    #: whether :meth:`read` runs collectives on ``ctx.group`` (then the ranks agree on
    #: :meth:`prepare_read` before any rank reads; otherwise one agreement after both suffices)
    collective_read: bool

    def required_files(self, manifest: Manifest) -> list[str]:
        """Files a complete checkpoint of this format must list in its manifest."""
        ...

    def owns_file(self, name: str) -> bool:
        """Whether ``name`` is, or could be, one of this format's own files in a checkpoint
        dir, in any case (extra files must not take such a name: on exFAT ``RANK-00000.PT``
        is ``rank-00000.pt``)."""
        ...

    def check_state(self, state: Any) -> None:
        """Refuse a state (already reduced to plain data) this format cannot save; run once
        per save on every rank, and agreed on, before :meth:`write`."""
        ...

    def estimate_bytes(self, state: Any) -> int:
        """Roughly how many bytes ``write`` will put on disk for this rank's ``state``."""
        ...

    def write(self, state: Any, directory: Path, ctx: ShardContext) -> Mapping[str, FileRecord]:
        """Write this rank's ``state`` (already reduced to plain data and tensors) into
        ``directory``; return the files this rank wrote, by name relative to ``directory``."""
        ...

    def prepare_read(
        self,
        directory: Path,
        manifest: Manifest,
        ctx: ShardContext,
        template: Any,
        options: ReadOptions,
    ) -> PreparedRead:
        """Everything this rank can check alone before a (possibly collective) read: the world
        size, the rank, the ``state=`` template (plain data, or None), the format's own
        metadata. Never collective; the caller agrees on its outcome before a collective
        :meth:`read`."""
        ...

    def read(self, prepared: PreparedRead) -> Any:
        """This rank's state from a committed checkpoint dir, as prepared. Formats that load
        in place (DCP) fill the template's tensors, others may ignore it."""
        ...

    def export(
        self,
        directory: Path,
        manifest: Manifest,
        *,
        rank: int | None,
        all_ranks: bool,
        allow_pickle: bool,
    ) -> Any:
        """The whole checkpoint as one state to ``torch.save``, read in this process alone
        (see :func:`distckpt.export` for ``rank`` and ``all_ranks``)."""
        ...
