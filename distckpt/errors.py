"""Every exception distckpt raises.

All derive from :class:`CheckpointError`, so ``except distckpt.CheckpointError`` catches them
all; where a builtin exception means the same thing, the class also derives from it (a missing
checkpoint is a ``FileNotFoundError``, a bad argument a ``ValueError``), so code written against
the builtins keeps working. None derives from ``BaseException`` directly.
"""

from __future__ import annotations

from collections.abc import Mapping


class CheckpointError(Exception):
    """Base class of every error distckpt raises."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """The requested checkpoint (a step, ``last``, ``best`` or a path) does not exist."""


class CheckpointVanished(CheckpointNotFound):
    """A checkpoint was deleted (by retention in another process) while it was being read.
    ``restore("last")`` and ``load_checkpoint`` of a root or link retry on this by themselves."""


class CheckpointExists(CheckpointError, FileExistsError):
    """A step is already committed and ``overwrite=True`` was not given."""


class InvalidStep(CheckpointError, ValueError):
    """A step that is negative, not an int, lower than the newest committed, or not the same on
    every rank."""


class InvalidArgument(CheckpointError, ValueError):
    """An argument distckpt cannot act on (an unknown option value, a state it cannot save)."""


class RootNotWritable(CheckpointError, PermissionError):
    """The checkpoint root cannot be created or written."""


class InsufficientSpace(CheckpointError, OSError):
    """The filesystem holding the root has less free space than the save needs."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint directory fails its manifest check: missing or wrong-sized files, a bad
    checksum, a manifest that is not valid JSON or names another step."""


class UnsupportedVersion(CheckpointError):
    """A manifest written by a newer distckpt, in a format version this one cannot read."""


class WorldSizeMismatch(CheckpointError, ValueError):
    """A "torch"-format checkpoint restored with a different number of ranks than saved it."""


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint asks for something distckpt refuses to do without an explicit opt-in:
    unpickling arbitrary objects, or following a link or name that leaves the root."""


class CoordinationError(CheckpointError):
    """A collective among the ranks failed or timed out (a rank died, hung or disagreed)."""


class CoordinationTimeout(CoordinationError, TimeoutError):
    """A collective among the ranks or the root's file lock did not complete in time."""


class RankFailure(CheckpointError):
    """One or more ranks failed during a collective operation; raised on every rank.

    ``failures`` maps each failing rank to a one-line description of its error.
    """

    def __init__(self, what: str, failures: Mapping[int, str]) -> None:
        self.failures = dict(sorted(failures.items()))
        details = "; ".join(f"rank {rank}: {error}" for rank, error in self.failures.items())
        ranks = ", ".join(str(rank) for rank in self.failures)
        noun = "rank" if len(self.failures) == 1 else "ranks"
        super().__init__(f"{what} failed on {noun} {ranks}: {details}")


class InjectedFault(CheckpointError):
    """The error an armed ``raise`` fault point throws (see :mod:`distckpt.faults`); only ever
    raised in tests that arm one."""


class ObjectStoreError(CheckpointError, OSError):
    """An object store (an ``s3://`` root) refused or failed a request; the message names the
    operation, the object's ``s3://`` address and the endpoint."""


class ObjectNotFound(ObjectStoreError, FileNotFoundError):
    """The object (or its bucket) does not exist in the store."""


class ObjectExists(ObjectStoreError, FileExistsError):
    """A conditional create (``If-None-Match: *``) was refused: the object already exists, so
    another writer created it first."""


class PreconditionFailed(ObjectStoreError):
    """A compare-and-swap (``If-Match`` on an ETag) was refused: the object was replaced or
    removed since that ETag was read. Re-read it and decide again."""


class StoreAccessDenied(ObjectStoreError, PermissionError):
    """The store refused the credentials (unknown key, wrong secret, expired token, no
    permission), or none were found."""


class StoreUnavailable(ObjectStoreError, ConnectionError):
    """The store could not be reached or kept failing (connection refused or dropped, timeouts,
    5xx responses) after the client's retries with backoff."""


class LeaseLost(CheckpointError):
    """An object-store lease (the root's lock on an ``s3://`` root) expired or was taken over
    by another writer; what this writer was doing under it must not be published."""
