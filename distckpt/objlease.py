"""An exclusive, expiring lease held in one object: the object-store counterpart of a root's
file lock, for stores that have no ``flock`` and no process that the kernel could watch.

The lease object (JSON: owner, host, pid, the holder's declared ``duration``, a renewal count,
``released``) is created with a conditional create, renewed and released with a
compare-and-swap on its ETag, and taken over from a holder that stopped renewing.

Guarantees:

* At most one :class:`ObjectLease` holds it at a time, as seen through the store: every change
  is a conditional write on the ETag the writer last saw, so of two contenders one loses.
* Expiry needs no agreement between clocks: a contender times the lease on *its own* monotonic
  clock, from the moment it first sees an ETag, and takes the lease over only once that ETag
  has stayed unchanged for the holder's declared ``duration``. The holder counts its own
  remaining time from *before* it sent its last write, so it always believes it has lost the
  lease no later than any contender can take it — provided clocks run at the same rate.
* A holder learns it lost the lease (expired and taken) at its next :meth:`~ObjectLease.renew`
  or :meth:`~ObjectLease.check`, which raise :class:`~distckpt.errors.LeaseLost`.

Limits: the holder must renew well within ``duration`` (every third of it is comfortable); a
holder paused for longer than ``duration`` (a stopped VM, swapping) may act once more between
losing the lease and noticing, so a commit also relies on its own conditional create (two
commits of one step cannot both succeed). A crashed holder blocks others for ``duration``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields
from typing import Callable, NoReturn

from distckpt.errors import (
    CoordinationTimeout,
    InvalidArgument,
    LeaseLost,
    ObjectExists,
    ObjectNotFound,
    PreconditionFailed,
)
from distckpt.lease import this_process_host
from distckpt.objstore import ObjectStore


@dataclass(frozen=True)
class LeaseRecord:
    """What the lease object holds."""

    owner: str
    host: str
    pid: int
    duration: float
    renewal: int = 0  # counted so that every renewal changes the ETag
    released: bool = False

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> LeaseRecord | None:
        """The record, or None for an object that is not one (then it never expires). Fields
        this version does not know are ignored, so that a later version may add some without
        locking this one out of the roots it leased."""
        try:
            fields = json.loads(data)
            if not isinstance(fields, dict):
                return None
            known = {field.name for field in dataclass_fields(cls)}
            return cls(**{name: value for name, value in fields.items() if name in known})
        except (ValueError, TypeError):
            return None


class ObjectLease:
    """A lease on ``name`` in ``store``, valid for ``duration`` seconds after each write."""

    def __init__(self, store: ObjectStore, name: str, *, duration: float = 60.0) -> None:
        if duration <= 0:
            raise InvalidArgument(f"lease duration must be positive: {duration}")
        self.store = store
        self.name = name
        self.duration = duration
        self.owner = uuid.uuid4().hex
        self._etag: str | None = None
        self._renewal = 0
        self._valid_until = 0.0  # time.monotonic()

    @property
    def held(self) -> bool:
        """Whether this lease believes it holds the lock (its time is not yet up)."""
        return self._etag is not None and time.monotonic() < self._valid_until

    def remaining(self) -> float:
        """Seconds left before this lease must count itself expired (0 when not held)."""
        return max(0.0, self._valid_until - time.monotonic()) if self._etag is not None else 0.0

    def _record(self, *, released: bool = False) -> bytes:
        return LeaseRecord(
            self.owner, this_process_host(), os.getpid(), self.duration, self._renewal, released
        ).encode()

    def _write(self, *, if_absent: bool = False, if_match: str | None = None) -> None:
        sent = time.monotonic()  # before the write: the conservative start of our time
        self._renewal += 1
        # owner and renewal count make the record unique: a write applied whose answer was
        # lost is recognised as this lease's own (not a contender's) by reading it back
        self._etag = self.store.put_own_bytes(
            self.name, self._record(), if_absent=if_absent, if_match=if_match
        )
        self._valid_until = sent + self.duration

    def acquire(
        self,
        timeout: float,
        *,
        poll: float = 0.5,
        holder_gone: Callable[[LeaseRecord], bool] | None = None,
    ) -> None:
        """Take the lease, waiting up to ``timeout`` seconds for the holder to release it or
        for it to expire (:class:`~distckpt.errors.CoordinationTimeout` otherwise).
        ``holder_gone`` may tell from a record that its holder is certainly dead (a process
        of this machine that no longer runs): then the lease is taken over at once."""
        deadline = time.monotonic() + timeout
        seen: tuple[str, float] | None = None  # (ETag, when first seen)
        while True:
            try:
                self._write(if_absent=True)
                return
            except ObjectExists:
                pass
            try:
                info = self.store.head(self.name)
                record = LeaseRecord.decode(self.store.get_bytes(self.name, if_match=info.etag))
            except (ObjectNotFound, PreconditionFailed):
                continue  # released by deletion, or changed between the two reads: look again
            now = time.monotonic()
            if seen is None or seen[0] != info.etag:
                seen = (info.etag, now)
            expired = record is not None and (
                now - seen[1] >= record.duration
                or (holder_gone is not None and holder_gone(record))
            )
            if record is not None and (record.released or expired):
                try:
                    self._write(if_match=info.etag)
                    return
                except PreconditionFailed:
                    continue  # another contender was faster, or the holder renewed
            if now >= deadline:
                holder = f"{record.owner} (host {record.host}, pid {record.pid})" if record else "?"
                raise CoordinationTimeout(
                    f"lease {self.store.url}/{self.name} still held by {holder} after {timeout} s"
                )
            time.sleep(min(poll, max(0.0, deadline - now)))

    def renew(self) -> None:
        """Extend the lease by ``duration`` from now; :class:`~distckpt.errors.LeaseLost` if
        it expired or was taken."""
        if self._etag is None:
            raise LeaseLost(f"lease {self.store.url}/{self.name} is not held")
        if not self.held:
            self._lost("expired before it was renewed")
        try:
            self._write(if_match=self._etag)
        except PreconditionFailed:
            self._lost("taken by another writer")

    def check(self) -> None:
        """Fence: raise :class:`~distckpt.errors.LeaseLost` unless the lease is still ours (time
        left, and the store still has our version)."""
        if not self.held:
            self._lost("expired" if self._etag is not None else "not held")
        try:
            etag = self.store.head(self.name).etag
        except ObjectNotFound:
            self._lost("deleted")
        if etag != self._etag:
            self._lost("taken by another writer")

    def release(self) -> None:
        """Give the lease up so the next contender need not wait for it to expire; nothing
        happens if it was already lost."""
        if self._etag is None:
            return
        etag, self._etag = self._etag, None
        with contextlib.suppress(PreconditionFailed):  # taken over already: not ours to release
            self.store.put_bytes(self.name, self._record(released=True), if_match=etag)

    def _lost(self, why: str) -> NoReturn:
        self._etag = None
        raise LeaseLost(f"lease {self.store.url}/{self.name} lost: {why}")

    def __enter__(self) -> ObjectLease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
