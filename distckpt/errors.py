"""Every exception distckpt raises, but one kind: the functions that run in a plain process
(:func:`distckpt.load_checkpoint`, :func:`distckpt.verify`, :func:`distckpt.export`) raise an
``OSError`` reading a checkpoint's file, or writing ``export``'s output, as it is; a
:class:`~distckpt.CheckpointManager`'s calls raise it as a :class:`RankFailure` naming the rank,
unless they tell its cause (a full disk, a staging dir removed: :class:`InsufficientSpace`,
:class:`StagingRemoved`, :class:`LeaseLost`). All derive from :class:`CheckpointError` and the
same builtin (a missing checkpoint: ``FileNotFoundError``); their fields travel between ranks."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TypeVar

E = TypeVar("E", bound="CheckpointError")


class CheckpointError(Exception):
    """Base class of every error distckpt raises (but the ``OSError`` the functions that run
    in a plain process pass through: see the module doc). ``message``: what went wrong, for
    people; ``rank``: the rank (of the manager's group) where it happened, if known; ``path``,
    ``step``: the file or directory, and the step, it is about, if any."""

    rank: int | None = None
    path: str | None = None
    step: int | None = None

    def __init__(
        self,
        message: str = "",
        *,
        rank: int | None = None,
        path: str | os.PathLike[str] | None = None,
        step: int | None = None,
    ) -> None:
        super().__init__(message)
        self.rank = rank
        self.path = os.fspath(path) if path is not None else None
        self.step = step

    def fields(self) -> dict[str, Any]:
        """The structured fields as plain values (what crosses between ranks). Those that are
        None are kept: the error rebuilt from them must still have each attribute its class
        documents (``RootInUse.holder`` is None while the holder's record is unwritten)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    @classmethod
    def rebuild(cls: type[E], message: str, fields: Mapping[str, Any]) -> E:
        """An instance with ``message`` and ``fields``, as another rank raised it (without
        calling ``__init__``, whose arguments differ between subclasses)."""
        error = cls.__new__(cls, message)
        Exception.__init__(error, message)
        vars(error).update(fields)
        return error

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickle calls the class with ``self.args``, which misses the keyword-only fields
        # subclasses require: rebuilt as another rank's error is, it keeps message and fields.
        message = str(self.args[0]) if self.args else ""
        return (type(self).rebuild, (message, dict(vars(self))))


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """The requested checkpoint (a step, ``last``, ``best`` or a path) does not exist."""


class CheckpointVanished(CheckpointNotFound):
    """A checkpoint deleted (by another process's retention) while read: ``restore("last")``
    and ``load_checkpoint`` of a root or link retry by themselves."""


class CheckpointExists(CheckpointError, FileExistsError):
    """A step is already committed and ``overwrite=True`` was not given."""


class InvalidStep(CheckpointError, ValueError):
    """A step that is negative, not an int, below the newest committed, or differing by rank."""


class InvalidArgument(CheckpointError, ValueError):
    """An argument distckpt cannot act on (an unknown option value, a state it cannot save)."""


class ShapeMismatch(InvalidArgument):
    """A tensor of a restore's ``state=`` has another shape than the checkpoint's under its key:
    the restore is refused whatever ``strict`` is, before anything is loaded (in both formats).
    ``mismatches`` lists each as ``(key, saved_shape, current_shape)``, shapes as int tuples."""

    mismatches: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()

    def __init__(
        self,
        message: str,
        *,
        mismatches: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...],
        rank: int | None = None,
        path: str | os.PathLike[str] | None = None,
        step: int | None = None,
    ) -> None:
        super().__init__(message, rank=rank, path=path, step=step)
        self.mismatches = mismatches


class KeyMismatch(InvalidArgument):
    """A restore with ``strict=True`` whose checkpoint and ``state=`` differ in keys, refused
    before anything is loaded (both formats): ``missing_keys`` are the given state's dotted
    keys the checkpoint lacks, ``unexpected_keys`` the reverse, ``changed_keys`` the objects
    with ``state_dict()`` it holds with other top-level keys: (place, saved keys, expected
    keys). Also, whatever ``strict`` is, a ModelOptimizerState whose parameter groups differ
    from the saved ones in number or membership (torch loads groups by position), keyed
    ``<group>.params.<parameter name>``."""

    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()
    changed_keys: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = ()

    def __init__(
        self,
        message: str,
        *,
        missing_keys: tuple[str, ...],
        unexpected_keys: tuple[str, ...],
        changed_keys: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (),
        rank: int | None = None,
        path: str | os.PathLike[str] | None = None,
        step: int | None = None,
    ) -> None:
        super().__init__(message, rank=rank, path=path, step=step)
        self.missing_keys, self.unexpected_keys = missing_keys, unexpected_keys
        self.changed_keys = changed_keys


class UnrestorableKeys(InvalidArgument):
    """A dict saved with ``format="dcp"`` has keys a restore could not give back (DCP keeps
    keys as text, mapped back onto the given state's key of that text): keys of one dict that
    read the same (``1`` and ``"1"``), or of a type with no fixed text (anything but ``str``,
    ``int``, ``float``, ``bool`` and None), refused before anything is written. ``where`` is
    the dict's dotted place (``""`` at the top), ``keys`` the reprs of the refused keys."""

    where: str = ""
    keys: tuple[str, ...] = ()

    def __init__(
        self,
        message: str,
        *,
        where: str,
        keys: tuple[str, ...],
        rank: int | None = None,
        path: str | os.PathLike[str] | None = None,
        step: int | None = None,
    ) -> None:
        super().__init__(message, rank=rank, path=path, step=step)
        self.where, self.keys = where, keys


class UnsupportedTensors(InvalidArgument):
    """Tensors a format (or export's file) cannot hold, refused before anything is written: "dcp"
    a subclass but DTensor, a nested or sparse tensor, a ``bits*`` or sub-byte dtype; export a
    sub-byte dtype. ``keys`` are their dotted places, ``kinds`` each one's class's qualified
    name, or ``torch.Tensor (<layout or dtype>)``."""

    keys: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()

    def __init__(
        self,
        message: str,
        *,
        keys: tuple[str, ...],
        kinds: tuple[str, ...],
        rank: int | None = None,
        path: str | os.PathLike[str] | None = None,
        step: int | None = None,
    ) -> None:
        super().__init__(message, rank=rank, path=path, step=step)
        self.keys, self.kinds = keys, kinds


class UnloadableState(InvalidArgument):
    """A value to save that a restore could not load back: loaded as torch loads weights
    (tensors, numbers, strings and containers of them), it holds an object of another type
    (a numpy scalar). Raised at the save, before anything is written, since every resume
    from the checkpoint would fail. ``state_key`` names the value (a Lightning callback's
    ``state_key``, or ``"on_save_checkpoint"`` for the module's hook dict); ``refused`` is
    torch's reason."""

    state_key: str = ""
    refused: str = ""

    def __init__(self, message: str, *, state_key: str, refused: str) -> None:
        super().__init__(message)
        self.state_key, self.refused = state_key, refused


class GeneratorDeviceMismatch(InvalidArgument):
    """A ``torch.Generator`` of ``saved_device`` restored into one of ``given_device`` (``key``)."""

    def __init__(self, message: str, *, key: str, saved_device: str, given_device: str) -> None:
        super().__init__(message)
        self.key, self.saved_device, self.given_device = key, saved_device, given_device


class RootNotWritable(CheckpointError, PermissionError):
    """The checkpoint root cannot be created or written."""


class ReadOnlyRoot(RootNotWritable):
    """A change (save, delete, prune, gc) asked of a manager or store opened with
    ``read_only=True``, which never writes to its root."""


class InsufficientSpace(CheckpointError, OSError):
    """The root's filesystem has less free space than the save needs, or ran out of it during
    the save (the message names the file, the root and the free space seen at the start)."""


class CommitLost(CheckpointError, OSError):
    """The filesystem lost a checkpoint in the rename that commits it: the renamed directory
    lacks its manifest or a file, or a file has the wrong size (fusefat empties a
    directory it renames); on an object store, objects of the save went between the commit's
    check and its ``COMMIT``. Nothing was committed (an ``overwrite=True`` keeps the checkpoint
    it was to replace), unless the store's ``COMMIT`` could not be put back: the step is then
    committed damaged and a replaced checkpoint set aside. The message says which."""


class StagedFileMismatch(CheckpointError, OSError):
    """Rank 0, about to commit, found a file another rank staged missing, or of another size
    than that rank wrote: on a filesystem, the root is not one directory shared by every rank
    (or a client's cache of it is stale), or the whole staging dir was removed under the save
    (the message then says so); on an object store, the object is not there. Nothing
    was committed. Besides ``rank`` (whose file) and ``path``: ``written_bytes``, the size that
    rank wrote, and ``found_bytes``, the size rank 0 found (None: no such file)."""

    written_bytes: int | None = None
    found_bytes: int | None = None

    def __init__(
        self,
        message: str,
        *,
        rank: int,
        path: str | os.PathLike[str],
        written_bytes: int,
        found_bytes: int | None,
    ) -> None:
        super().__init__(message, rank=rank, path=path)
        self.written_bytes, self.found_bytes = written_bytes, found_bytes


class ConcurrentCommit(CheckpointExists):
    """Another writer committed the same step between this commit's check, under the root's
    lock, and its rename: that lock does not reach the other writer (two machines whose
    filesystem keeps locks per client, such as NFS mounted with local locks)."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint directory fails its manifest check: missing or wrong-sized files, a bad
    checksum, a manifest that is not valid JSON or names another step.

    ``damaged`` is True only when this version is sure the content is damaged: the manifest is
    missing, does not parse, fails its own checksum (:class:`ManifestChecksumMismatch`) or the
    schema (a key every version writes missing or mistyped; unknown keys are ignored), a file
    it lists is missing or of another size, or a checksum of a known algorithm does not match.
    It is False when the checkpoint could not be judged (a failed read other than a missing
    file, an unknown checksum algorithm or format, a symlink where a file belongs, a manifest
    too large): it may be whole, so nothing is done to it on that verdict (see
    ``CheckpointManager.restore``)."""

    damaged: bool = False

    def __init__(
        self,
        message: str = "",
        *,
        damaged: bool = False,
        rank: int | None = None,
        path: str | os.PathLike[str] | None = None,
        step: int | None = None,
    ) -> None:
        super().__init__(message, rank=rank, path=path, step=step)
        self.damaged = damaged


class ManifestChecksumMismatch(CorruptCheckpoint):
    """A manifest's own checksum (``manifest_crc32``, which it records of its content) does not
    match that content: its bytes changed after it was written, so nothing it says (the step,
    the epoch, the metrics, the files and their checksums) can be trusted. Always ``damaged``.
    ``recorded`` is the checksum the manifest holds, ``computed`` the one of its content."""

    recorded: str = ""
    computed: str = ""

    def __init__(
        self,
        message: str,
        *,
        recorded: str,
        computed: str,
        path: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(message, damaged=True, path=path)
        self.recorded, self.computed = recorded, computed


class UnsupportedVersion(CheckpointError):
    """A manifest written by a newer distckpt, in a format version this one cannot read."""


class WorldSizeMismatch(CheckpointError, ValueError):
    """A checkpoint restored by another number of ranks than saved it, where that cannot be
    done: any "torch" checkpoint, and a "dcp" one whose per-rank values the restore asks for.
    ``saved_world_size`` ranks saved it, ``world_size`` restore it; ``path``, ``step`` name it."""

    saved_world_size: int = 0
    world_size: int = 0

    def __init__(
        self,
        message: str,
        *,
        saved_world_size: int,
        world_size: int,
        rank: int | None = None,
        path: str | os.PathLike[str] | None = None,
        step: int | None = None,
    ) -> None:
        super().__init__(message, rank=rank, path=path, step=step)
        self.saved_world_size, self.world_size = saved_world_size, world_size


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint asks for something distckpt refuses to do: unpickling objects outside
    torch's weights-only allow-list (a rank file, a DCP value; the message names the refused
    type, or the pickle protocol it does not read; ``allow_pickle=True`` opts in; a pickle
    torch cannot parse is a :class:`CorruptCheckpoint`), a DCP ``.metadata`` asking for
    anything but DCP's own types, or reading a step dir that is a symlink, not a dir. (Links
    that leave the root are not followed: the reader falls back; ``verify`` reports them.)"""


class UnimportableClass(CheckpointError, ImportError):
    """A checkpoint loaded with ``allow_pickle=True`` names a class or function that cannot be
    imported here: its module is not installed or no longer defines it, and the checkpoint
    needs that code, or the name in the file is damaged (``distckpt verify`` tells which).
    ``reason`` is Python's (``No module named 'usermod'``); ``path`` is None for a value read
    from memory (a "dcp" value)."""

    reason: str = ""

    def __init__(self, message: str, *, reason: str, path: str | os.PathLike[str] | None) -> None:
        super().__init__(message, path=path)
        self.reason = reason


class CoordinationError(CheckpointError):
    """A collective among the ranks failed or timed out (a rank died, hung or disagreed).
    Also a writing manager made before ``init_process_group()`` where ``WORLD_SIZE`` > 1."""


class CoordinationTimeout(CoordinationError, TimeoutError):
    """A collective among the ranks or the root's file lock did not complete in time."""


class ProcessGroupDestroyed(CoordinationError, RuntimeError):
    """``torch.distributed.destroy_process_group()`` destroyed the process groups while distckpt
    still had collectives to run (an async save's write and commit): wait for the save
    (``mgr.wait()``) or close the manager (``mgr.close()``) before destroying them."""


class RankFailure(CheckpointError):
    """One or more ranks failed during a collective operation; raised on every rank.

    ``failures`` maps each failing rank to a one-line description of its error; ``what`` names
    the collective operation that failed."""

    def __init__(self, what: str, failures: Mapping[int, str]) -> None:
        failures = dict(sorted(failures.items()))
        details = "; ".join(f"rank {rank}: {error}" for rank, error in failures.items())
        ranks = ", ".join(str(rank) for rank in failures)
        noun = "rank" if len(failures) == 1 else "ranks"
        super().__init__(f"{what} failed on {noun} {ranks}: {details}")
        self.what, self.failures = what, failures


class InjectedFault(CheckpointError):
    """The error an armed ``raise`` fault point throws (see :mod:`distckpt.faults`); only ever
    raised in tests that arm one."""


class RootInUse(CheckpointError, BlockingIOError):
    """Another live job, or a manager of this process not closed, holds the root's writer lease
    (see :mod:`distckpt.lease`). The message names the holder; ``holder`` is its
    :class:`~distckpt.lease.LeaseHolder`, or None when the lock is held but its record is not
    readable yet. ``waited``: the seconds waited for the root before this refusal (0: none),
    which the message gives after ``message`` and before ``advice``."""

    def __init__(
        self, message: str, holder: object = None, *, waited: float = 0.0, advice: str = ""
    ) -> None:
        said_waited = f" (waited {waited:g} s)" if waited > 0 else ""
        super().__init__(f"{message}{said_waited}{advice}")
        self.holder, self.waited = holder, waited
        # the parts of the message, to say it again with a longer wait (after_waiting)
        self.reason, self.advice = message, advice

    def after_waiting(self, seconds: float) -> RootInUse:
        """This refusal, said after ``seconds`` of waiting in all: a wait made of several tries
        (each try's refusal gives only its own part) ends with it. Itself when it says no
        wait (it was refused without waiting, or its message does not give the time)."""
        if self.waited <= 0:
            return self
        return RootInUse(self.reason, self.holder, waited=seconds, advice=self.advice)


class LeaseTakenMeanwhile(RootInUse):
    """``distckpt lease ROOT --break`` judged the holder ``judged`` dead, but by the time it
    held the lease's lock the record named someone else (a requeued job took the root over
    meanwhile) or no longer claimed the root: nothing was broken. ``holder`` is the record
    found then (None: no readable record)."""

    def __init__(self, message: str, holder: object, judged: object) -> None:
        super().__init__(message, holder)
        self.judged = judged


class ManagerClosed(CheckpointError, RuntimeError):
    """A call on a :class:`~distckpt.CheckpointManager` after its ``close()``, refused before it
    runs a collective or writes anything; ``call`` names the refused method, ``rank`` the rank."""

    call: str = ""

    def __init__(self, message: str, *, call: str, rank: int | None = None) -> None:
        super().__init__(message, rank=rank)
        self.call = call


class LeaseLost(CheckpointError, RuntimeError):
    """This job's writer lease on the root was taken over (broken by an operator, another job
    acquired it after this job's lease holder died, or an object-store lease expired): it may no
    longer commit, retain or relink, and what it was doing under the lease is not published."""


class StagingRemoved(CheckpointError, FileNotFoundError):
    """A save's staging dir vanished while it wrote: someone else removed it (a job's start or
    ``gc`` taking it for a dead writer's, where writer locks do not reach: NFS clients), and
    rank 0 did not find its lease lost after the writes (else: LeaseLost). ``path``: the dir."""


class LauncherGone(CheckpointError, RuntimeError):
    """The launcher that started this process (the torchrun agent) is gone: the process is an
    orphan and must not commit, or it would race the job that replaces it."""


class ObjectStoreError(CheckpointError, OSError):
    """An object store (an ``s3://`` root) refused or failed a request; the message names the
    operation, the object's ``s3://`` address and the endpoint."""


class ObjectNotFound(ObjectStoreError, FileNotFoundError):
    """The object (or its bucket) does not exist in the store."""


class ObjectExists(ObjectStoreError, FileExistsError):
    """A conditional create (``If-None-Match: *``) was refused: another writer created it first."""


class PreconditionFailed(ObjectStoreError):
    """A compare-and-swap (``If-Match`` on an ETag) was refused: the object was replaced or
    removed since that ETag was read. Re-read it and decide again."""


class StoreAccessDenied(ObjectStoreError, PermissionError):
    """The store refused the credentials (unknown, wrong, expired, not allowed) or found none."""


class StoreUnavailable(ObjectStoreError, ConnectionError):
    """The store could not be reached or kept failing (connection refused or dropped, timeouts,
    5xx responses) after the client's retries with backoff."""


def describe_error(exc: BaseException) -> str:
    """One line naming an exception, ``TypeName: first line of the message`` (or the type's
    name alone): how distckpt quotes an error in its own messages and between ranks."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class LightningInternalMissing(CheckpointError, AttributeError):
    """A private attribute of Lightning that :class:`distckpt.lightning.DistckptCallback`
    relies on (no public way exists) is missing: that Lightning version is not supported.
    ``attribute`` names it as ``Class.name`` (``module.name`` for a module's);
    ``lightning_version`` is the installed version."""

    def __init__(self, attribute: str, lightning_version: str) -> None:
        super().__init__(
            f"Lightning {lightning_version} has no {attribute}, which distckpt's Lightning "
            "callback relies on: this Lightning version is not supported"
        )
        self.attribute, self.lightning_version = attribute, lightning_version
