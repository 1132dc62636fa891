"""An exclusive, expiring lease held in one object: the object-store counterpart of a root's
file lock, for stores that have no ``flock`` and no process that the kernel could watch.

The lease object (JSON: owner, host, pid, the holder's declared ``duration``, a renewal count,
``released``; the holder's job id, start time (UTC) and generation, as a root directory's
lease record keeps them, folded into ``owner``, the keys older versions decode staying the
same) is created with a conditional create, renewed and released with a compare-and-swap on
its ETag, and taken over from a holder that stopped renewing. The generation is one more than
the previous record's (1 for a new object, or after a record of an older version, which keeps
none); renewals keep the job id, start time and generation.

Guarantees:

* At most one :class:`ObjectLease` holds it at a time, as seen through the store: every change
  is a conditional write on the ETag the writer last saw, so of two contenders one loses.
* Expiry needs no agreement between clocks: a contender times the lease on *its own* monotonic
  clock, from the moment it first sees an ETag, and takes the lease over only once that ETag
  has stayed unchanged for the holder's declared ``duration``. The holder counts its own
  remaining time from *before* it sent its last successful write, so it always believes it
  has lost the lease no later than any contender can take it — provided clocks run at the
  same rate.
* A holder learns it lost the lease (taken, released or deleted) at its next
  :meth:`~ObjectLease.renew` or :meth:`~ObjectLease.check`, which raise
  :class:`~distckpt.errors.LeaseLost`.

Renewing a lease whose time is up. A slow or failed renewal can leave the holder's own time
up although nobody took the lease. :meth:`~ObjectLease.renew` then still sends its conditional
write on the ETag it last wrote, and that is safe: a takeover is itself a write, so it changes
the ETag, and the renewal then fails its precondition (a permanent
:class:`~distckpt.errors.LeaseLost`). If the renewal succeeds, no contender had written since
our last write, and every contender restarts its timer at the new ETag, which it sees no
earlier than the moment the store applied it, itself no earlier than when we sent it — the
moment our new time is counted from. So a contender can again take over no earlier than the
holder's time ends. While its time is up, the holder believes nothing: :meth:`check` refuses
(a commit does not go out), and a renewal that failed in transport (timeout, store down)
leaves it so, to be tried again, not lost for good. A renewal refused because the object holds
another version that is still this lease's own record (a renewal the store applied whose
answer was lost) adopts that version and writes once more, by the same argument: only this
lease writes its owner; :meth:`check` meeting such a version refuses (the write is not seen
to have landed) but keeps the lease for that next renewal, and a read back that fails in
transport leaves the lease as a failed renewal does. A renewal the client gave up on may
still reach the store later; it too is a compare-and-swap on the version this lease last
wrote, so it lands only if nobody else wrote since, and the holder counts no time from it (it
errs toward believing less).

Limits: the holder must renew well within ``duration`` (every third of it is comfortable), each
renewal's requests giving up well before the lease would expire (:func:`lease_request_options`);
a holder paused for longer than ``duration`` (a stopped VM, swapping) may act once more between
losing the lease and noticing, so a commit also relies on its own conditional create (two
commits of one step cannot both succeed). A crashed holder blocks others for ``duration``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Callable, NoReturn
from urllib.parse import quote, unquote

from distckpt.errors import (
    CoordinationTimeout,
    InvalidArgument,
    LeaseLost,
    ObjectExists,
    ObjectNotFound,
    ObjectStoreError,
    PreconditionFailed,
)
from distckpt.lease import LeaseHolder, job_id_from_environment, now_utc, this_process_host
from distckpt.objoptions import one_attempt_options, seconds_option
from distckpt.objstore import ObjectStore
from distckpt.policy import parse_created_utc

#: what fraction of the lease's duration one request of its renewals or release may take at
#: most (connecting, and then each read): a renewal (a write, then on failure a read back)
#: ends well before the lease would expire, and closing never waits long on a stalled store
REQUEST_FRACTION = 1 / 15
#: a request is never given less than this many seconds, however short the lease
MIN_REQUEST_SECONDS = 1.0


def lease_request_options(options: Mapping[str, Any], duration: float) -> dict[str, Any]:
    """``storage_options`` for the client of a lease's renewals and release: what ``options``
    give, but one attempt per request, and connect/read timeouts of at most ``duration``
    times :data:`REQUEST_FRACTION` (at least :data:`MIN_REQUEST_SECONDS`). The caller's
    renewal loop retries, on its own schedule; the defaults of a data client (several attempts
    of 60 s each) would outlast the lease."""
    limit = max(MIN_REQUEST_SECONDS, duration * REQUEST_FRACTION)
    return {
        **one_attempt_options(options),
        "connect_timeout": min(seconds_option(options, "connect_timeout", limit), limit),
        "read_timeout": min(seconds_option(options, "read_timeout", limit), limit),
    }


#: the JSON keys of a lease object: those every version decodes (distckpt 0.1.0 and early
#: 0.2.0 builds decode with ``LeaseRecord(**fields)`` and read an object with any other key as
#: no lease, which never expires), so new facts are folded into existing keys, never added
_OBJECT_KEYS = ("owner", "host", "pid", "duration", "renewal", "released")
#: the holder's facts folded into the object's ``owner`` after this lease's token, each as
#: ``/<tag>:<value>`` (value percent-quoted): ``<token>/job:<J>/start:<T>/gen:<G>``. Older
#: versions only show ``owner``; its holder writes the same value at every renewal.
_OWNER_FACTS = {"job": "job_id", "start": "started_utc", "gen": "generation"}
_GENERATION = re.compile(r"[1-9][0-9]*")


def _unfold_owner(owner: str) -> tuple[str, dict[str, Any]]:
    """The token that starts a stored ``owner``, and the facts folded after it that this
    version knows and finds well formed (by :class:`LeaseRecord` field name)."""
    token, *folded = owner.split("/")
    facts: dict[str, Any] = {}
    for part in folded:
        tag, colon, quoted = part.partition(":")
        value = unquote(quoted)
        if not colon or tag not in _OWNER_FACTS or not value:
            continue
        if tag == "gen" and not _GENERATION.fullmatch(value):
            continue  # no whole number of at least 1: no generation
        if tag == "start" and parse_created_utc(value) is None:
            continue  # no ISO 8601 time
        facts[_OWNER_FACTS[tag]] = int(value) if tag == "gen" else value
    return token, facts


#: more than any lease record takes (a few hundred bytes): what :meth:`LeaseRecord.read` reads
LEASE_RECORD_MAX_BYTES = 64 << 10


@dataclass(frozen=True)
class LeaseRecord:
    """What the lease object holds. ``owner`` is the holder's token; ``job_id``,
    ``started_utc`` and ``generation`` are stored folded into the object's ``owner``
    (:meth:`encode`), and are None in a record of an older version, which keeps none of them,
    or where the stored one is malformed."""

    owner: str
    host: str
    pid: int
    duration: float
    renewal: int = 0  # counted so that every renewal changes the ETag
    released: bool = False
    job_id: str | None = None
    started_utc: str | None = None
    generation: int | None = None

    def encode(self) -> bytes:
        fields = {name: getattr(self, name) for name in _OBJECT_KEYS}
        facts = [(tag, getattr(self, name)) for tag, name in _OWNER_FACTS.items()]
        fields["owner"] = "/".join(
            [self.owner]
            + [f"{tag}:{quote(str(value), safe=':+')}" for tag, value in facts if value is not None]
        )
        return json.dumps(fields, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> LeaseRecord | None:
        """The record, or None for an object that is not one (then it never expires). Keys
        this version does not know are ignored, and so are facts folded into ``owner`` that
        it does not know or that are malformed (a generation that is not a whole number of at
        least 1, a start time that is no ISO 8601 time, an empty job id)."""
        try:
            fields = json.loads(data)
            if not isinstance(fields, dict):
                return None
            record = cls(**{name: value for name, value in fields.items() if name in _OBJECT_KEYS})
        except (ValueError, TypeError):
            return None
        if not isinstance(record.owner, str):
            return record
        token, facts = _unfold_owner(record.owner)
        return replace(record, owner=token, **facts)

    @classmethod
    def read(cls, store: ObjectStore, key: str) -> LeaseRecord | None:
        """The record the object ``key`` of ``store`` holds; None when it is missing, cannot
        be read, or is no lease record (another tool's ``.lease``, a save's file of that
        name). Only a record's worth of bytes is read: a larger object is none."""
        try:
            return cls.decode(store.get_bytes(key, end=LEASE_RECORD_MAX_BYTES))
        except ObjectStoreError:
            return None

    def next_generation(self) -> int:
        """The generation of the holder that takes over from this record's."""
        return (self.generation or 0) + 1

    def holder(self) -> LeaseHolder:
        """This record as a root directory's lease record is read (``alive`` unknown: a lease
        object's expiry is timed by a contender's own clock, not decidable from one look)."""
        return LeaseHolder(
            host=self.host,
            pid=self.pid,
            job_id=self.job_id,
            started_utc=self.started_utc,
            generation=self.generation,
            token=self.owner,
            # The lease object does not record when it was released; "unknown" still says it was.
            released_utc="unknown" if self.released else None,
            alive=False if self.released else None,
        )


@dataclass
class ExpiryWatch:
    """A contender's watch of a lease object: the version (ETag) it last saw and when, on its
    own monotonic clock, it first saw that version. One watch kept across the
    :meth:`ObjectLease.acquire` calls of one contender that waits in several tries (a manager
    start waits in pieces of half its timeout, each a collective's length) times the holder
    from the first try on; a watch made per try would start again at each, and a lease
    declared for longer than a try would never be seen to expire."""

    etag: str | None = None
    since: float = 0.0

    def unchanged_for(self, etag: str, now: float) -> float:
        """Seconds ``etag`` has stayed the version seen, as of ``now`` (0 for a new one)."""
        if etag != self.etag:
            self.etag, self.since = etag, now
        return now - self.since


class ObjectLease:
    """A lease on ``name`` in ``store``, valid for ``duration`` seconds after each write.

    ``renewals`` is the store that :meth:`renew` and :meth:`release` send through (``store``
    when not given): a client of the same root whose requests give up quickly
    (:func:`lease_request_options`), so that a stalled store fails a renewal in time to try
    again before the lease expires."""

    def __init__(
        self,
        store: ObjectStore,
        name: str,
        *,
        duration: float = 60.0,
        renewals: ObjectStore | None = None,
    ) -> None:
        if duration <= 0:
            raise InvalidArgument(f"lease duration must be positive: {duration}")
        self.store = store
        self.renewals = renewals if renewals is not None else store
        self.name = name
        self.duration = duration
        self.owner = uuid.uuid4().hex
        #: recorded with the lease, as a root directory's lease record has it
        self.job_id = job_id_from_environment()
        #: when this lease was taken (UTC) and its generation: set by :meth:`acquire`, kept
        #: by renewals
        self.started_utc: str | None = None
        self.generation: int | None = None
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
            self.owner,
            this_process_host(),
            os.getpid(),
            self.duration,
            self._renewal,
            released,
            job_id=self.job_id,
            started_utc=self.started_utc,
            generation=self.generation,
        ).encode()

    def _take(self, generation: int, **conditions: Any) -> None:
        """Write this lease's first record, of ``generation`` and started now, on
        ``conditions`` (those of :meth:`_write`); the start and generation stay unset if the
        store refuses it."""
        self.started_utc, self.generation = now_utc(), generation
        try:
            self._write(**conditions)
        except BaseException:
            self.started_utc = self.generation = None
            raise

    def renewal_due(self) -> float:
        """When (``time.monotonic()``) the next renewal is due: a third of ``duration`` after
        the last successful write was sent, however long that write took to be answered."""
        return self._valid_until - self.duration + self.duration / 3

    def _write(
        self,
        *,
        if_absent: bool = False,
        if_match: str | None = None,
        through: ObjectStore | None = None,
    ) -> None:
        sent = time.monotonic()  # before the write: the conservative start of our time
        self._renewal += 1
        # owner and renewal count make the record unique: a write applied whose answer was
        # lost is recognised as this lease's own (not a contender's) by reading it back
        self._etag = (through or self.store).put_own_bytes(
            self.name, self._record(), if_absent=if_absent, if_match=if_match
        )
        self._valid_until = sent + self.duration

    def acquire(
        self,
        timeout: float,
        *,
        poll: float = 0.5,
        holder_gone: Callable[[LeaseRecord], bool] | None = None,
        watch: ExpiryWatch | None = None,
        on_held: Callable[[LeaseRecord | None], None] | None = None,
    ) -> None:
        """Take the lease, waiting up to ``timeout`` seconds for the holder to release it or
        for it to expire (:class:`~distckpt.errors.CoordinationTimeout` otherwise);
        ``on_held`` is called once, with the holder's record, as the wait begins.
        ``holder_gone`` may tell from a record that its holder is certainly dead (a process
        of this machine that no longer runs): then the lease is taken over at once. ``watch``
        carries the holder's timing over from an earlier call of the same contender (see
        :class:`ExpiryWatch`); without one, it is timed from this call's first look."""
        deadline = time.monotonic() + timeout
        watch = watch if watch is not None else ExpiryWatch()
        while True:
            try:
                self._take(1, if_absent=True)
                return
            except ObjectExists:
                pass
            try:
                # one GET: the record and the ETag of the very version it was read from
                data, etag = self.store.get_versioned(self.name)
            except ObjectNotFound:
                continue  # released by deletion: look again
            record = LeaseRecord.decode(data)
            now = time.monotonic()
            unchanged = watch.unchanged_for(etag, now)
            expired = record is not None and (
                unchanged >= record.duration or (holder_gone is not None and holder_gone(record))
            )
            if record is not None and (record.released or expired):
                try:
                    self._take(record.next_generation(), if_match=etag)
                    return
                except PreconditionFailed:
                    continue  # another contender was faster, or the holder renewed
            if now >= deadline:
                holder = record.holder().describe() if record else "an unreadable record"
                raise CoordinationTimeout(
                    f"lease {self.store.url}/{self.name} still held by {holder} after {timeout:g} s"
                )
            if on_held is not None:
                on_held(record)
                on_held = None
            time.sleep(min(poll, max(0.0, deadline - now)))

    def renew(self) -> None:
        """Extend the lease by ``duration`` from now, also when this lease's own time is up
        (it is ours again if nobody wrote it meanwhile: see the module doc).
        :class:`~distckpt.errors.LeaseLost` if it was taken, released or deleted (for good);
        another :class:`~distckpt.errors.ObjectStoreError` if the store did not answer (the
        lease is then held only while its time lasts, and a later renewal may succeed)."""
        if self._etag is None:
            raise LeaseLost(f"lease {self.store.url}/{self.name} is not held")
        try:
            self._write(if_match=self._etag, through=self.renewals)
            return
        except PreconditionFailed:
            adopted = self._adopt_own_version()
        try:
            self._write(if_match=adopted, through=self.renewals)
        except PreconditionFailed:
            self._lost(self._why_taken_since())

    def _why_taken_since(self) -> str:
        """Why the lease is lost, once a write was refused after this lease found its own
        record in the store: what the store holds now, read once (best effort: the lease is
        lost either way, so a store that does not answer leaves the holder unnamed)."""
        try:
            data = self.renewals.get_bytes(self.name)
        except ObjectNotFound:
            return "deleted"
        except ObjectStoreError:
            return "taken by another writer"
        return self._why_lost(LeaseRecord.decode(data)) or "taken by another writer"

    def _why_lost(self, record: LeaseRecord | None) -> str | None:
        """Why the lease is lost when the store holds ``record``; None while that is still
        this lease's own unreleased record."""
        if record is None:
            return "replaced by an object that is no lease record"
        if record.owner != self.owner:
            now = "released since" if record.released else "it holds it now"
            return f"taken by {record.holder().describe()} ({now})"
        if record.released:
            return "released"
        return None

    def _adopt_own_version(self, through: ObjectStore | None = None) -> str:
        """The ETag of what the store holds when that is still this lease's own unreleased
        record (a renewal applied whose every answer was lost); else the lease is lost (taken,
        released or deleted): :class:`~distckpt.errors.LeaseLost`, naming the holder the
        store's record names. A store that does not answer raises its
        :class:`~distckpt.errors.ObjectStoreError`: nothing is known then, so the lease is
        neither given up nor counted renewed (held while the time of the last write known to
        have landed lasts)."""
        try:
            data, etag = (through or self.renewals).get_versioned(self.name)
        except ObjectNotFound:
            self._lost("deleted")
        why = self._why_lost(LeaseRecord.decode(data))
        if why is not None:
            self._lost(why)
        return etag

    def check(self) -> None:
        """Fence: raise :class:`~distckpt.errors.LeaseLost` unless the lease is still ours (time
        left, and the store still has our version). A lease whose time is up, or whose store
        holds another version that is still this lease's own record (a renewal applied whose
        answer was lost), is refused but not forgotten: its next :meth:`renew` may find it
        still ours. A store that does not answer raises its
        :class:`~distckpt.errors.ObjectStoreError`."""
        if self._etag is None:
            self._lost("not held")
        if not self.held:
            raise LeaseLost(
                f"lease {self.store.url}/{self.name} expired: not renewed within "
                f"{self.duration:g} s (a later renewal may take it back if nobody else did)"
            )
        try:
            etag = self.store.head(self.name).etag
        except ObjectNotFound:
            self._lost("deleted")
        if etag == self._etag:
            return
        self._adopt_own_version(through=self.store)
        # Our own renewal, applied with its answer lost: nobody else wrote, but this lease has
        # not seen its write land. Refused (not counted held), yet kept: the next renewal
        # adopts that version and holds the lease again.
        raise LeaseLost(
            f"lease {self.store.url}/{self.name} is not confirmed: the store holds a renewal "
            "of this lease whose answer was lost (the next renewal takes it back)"
        )

    def release(self) -> None:
        """Give the lease up (through ``renewals``) so the next contender need not wait for it
        to expire; nothing happens if it was already lost."""
        if self._etag is None:
            return
        etag, self._etag = self._etag, None
        with contextlib.suppress(PreconditionFailed):  # taken over already: not ours to release
            self.renewals.put_bytes(self.name, self._record(released=True), if_match=etag)

    def _lost(self, why: str) -> NoReturn:
        self._etag = None
        taken = "" if self.generation is None else f" (generation {self.generation})"
        raise LeaseLost(f"lease {self.store.url}/{self.name}{taken} lost: {why}")

    def __enter__(self) -> ObjectLease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
