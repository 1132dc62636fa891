"""The lease of an ``s3://`` root and the claims of its saves in flight: taking the root's
lease object ``.lease`` (:class:`~distckpt.objlease.ObjectLease`) when the store opens, the
daemon thread that renews it and the claims ``.writers/<attempt>`` every third of
:data:`LEASE_SECONDS`, the fence checked before every change to what is published, and
:meth:`~LeaseKeeping.close`, which releases the lease without waiting long on a stalled store.
A mixin of :class:`~distckpt.storage.s3.S3RootStore`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

from distckpt.errors import (
    CheckpointError,
    CoordinationTimeout,
    InvalidArgument,
    LeaseLost,
    ObjectNotFound,
    ObjectStoreError,
    PreconditionFailed,
    RootInUse,
)
from distckpt.lease import LeaseHolder, local_process_gone, this_process_host
from distckpt.lease_tokens import HeldCallback, held_here_phrase, holder_phrase, let_go, took
from distckpt.objlease import ExpiryWatch, LeaseRecord, ObjectLease, lease_request_options
from distckpt.objstore import ObjectStore
from distckpt.storage import RootStore
from distckpt.storage.s3_root import LEASE_NAME, S3Root
from distckpt.storage.shared import opened_no_more, release_at_exit

logger = logging.getLogger("distckpt")

#: How long the root's lease and a writer's claim last without renewal; both are renewed
#: every third of it. A job killed without releasing its lease blocks the root this long
#: (unless it ran on this machine, in the same PID namespace and boot: a dead local holder is
#: taken over at once).
LEASE_SECONDS = 30.0
#: how soon a renewal that failed in transport is tried again (each try gives up after at most
#: LEASE_SECONDS / 15 s: see lease_request_options)
RENEWAL_RETRY_SECONDS = 2.0
#: the longest close() waits for a renewal in flight to end before it releases the lease
CLOSE_WAIT_SECONDS = 3.0


class LeaseKeeping(RootStore):
    """The lease and the claims of an ``s3://`` store (a mixin: the store supplies ``s3`` and
    ``root``, and calls :meth:`_init_lease_keeping` from its ``__init__``)."""

    s3: S3Root
    root: str

    def _init_lease_keeping(self) -> None:
        """No lease yet: :meth:`_take_lease` takes it when the store opens."""
        self._lease: ObjectLease | None = None
        self._lease_error: LeaseLost | None = None
        # Guards the lease and the claims between the renewing thread and the store's users.
        self._lease_lock = threading.RLock()
        self._claims: set[str] = set()
        #: the ETag of each claim in ``_claims`` as this store last wrote it: renewals are
        #: compare-and-swap on it
        self._claim_etags: dict[str, str] = {}
        self._stop_renewing = threading.Event()
        self._renewer: threading.Thread | None = None
        #: the client of the lease's renewals and release, whose requests give up quickly
        self._renewals: ObjectStore | None = None
        self._opened_by_pid = 0
        #: the holder's lease object as this store's tries to take it saw it: a start waits
        #: in several tries (each one collective long), which time the holder as one wait
        self._holder_watch = ExpiryWatch()

    def _take_lease(self, wait: float, on_held: HeldCallback) -> None:
        """Take the root's lease, waiting up to ``wait`` seconds for its holder
        (:class:`~distckpt.RootInUse` after that; ``on_held`` as :meth:`RootStore.open` says),
        and start renewing it."""
        if self._lease is not None and self._lease.held:
            return  # opened already
        renewals = ObjectStore(
            self.root, lease_request_options(self.s3.storage_options, LEASE_SECONDS)
        )
        lease = ObjectLease(self.s3.client, LEASE_NAME, duration=LEASE_SECONDS, renewals=renewals)
        try:
            lease.acquire(
                wait,
                holder_gone=lambda record: local_process_gone(record.host, record.pid),
                watch=self._holder_watch,
                on_held=None if on_held is None else lambda record: on_held(_holder_of(record)),
            )
        except BaseException as exc:
            renewals.close()
            if not isinstance(exc, CoordinationTimeout):
                raise
            record = self._holder()
            holder = _holder_of(record)
            here = held_here_phrase(holder)
            if here is not None:
                raise RootInUse(
                    f"checkpoint root {self.root} is in use by {here}", holder, waited=wait
                ) from exc
            # The time waited is RootInUse's to say, as on a root directory: the manager waits
            # in pieces, and its refusal gives the whole wait (RootInUse.after_waiting).
            who = holder_phrase(holder)
            declared = record.duration if record is not None else LEASE_SECONDS
            raise RootInUse(
                f"checkpoint root {self.root} is in use by another job: lease "
                f"{self.root}/{LEASE_NAME} still held by {who}",
                holder,
                waited=wait,
                advice="; wait for it to end (wait_for_root=), or for its lease to expire "
                f"({declared:g} s after its last renewal) if it died",
            ) from exc
        took(lease.owner)
        with self._lease_lock:
            self._lease, self._lease_error, self._renewals = lease, None, renewals
        self._opened_by_pid = os.getpid()
        release_at_exit(self)
        self._stop_renewing.clear()
        self._renewer = threading.Thread(
            target=self._renew_until_closed, name="distckpt-s3-lease", daemon=True
        )
        self._renewer.start()
        logger.info("holding the lease of %s (generation %s)", self.root, lease.generation)

    def _holder(self) -> LeaseRecord | None:
        return LeaseRecord.read(self.s3.client, LEASE_NAME)

    def _renew_until_closed(self) -> None:
        """The renewing thread: the lease and the claims of saves in flight, until
        :meth:`close`, every request through the quick client of the renewals
        (:func:`~distckpt.objlease.lease_request_options`), so that no round outlasts the
        lease. A renewal is due a third of the lease after the last successful one was *sent*
        (not after it was answered, nor after the claims were written: neither may push the
        next renewal past the lease's end); one that failed in transport is tried again soon,
        also once the lease's time is up (see :mod:`distckpt.objlease`). A lost lease is kept
        for :meth:`check_lease`."""
        wait = LEASE_SECONDS / 3
        while not self._stop_renewing.wait(wait):
            due = self._renew_lease()
            if not self._renew_claims():
                due = min(due, time.monotonic() + RENEWAL_RETRY_SECONDS)
            wait = max(0.0, due - time.monotonic())  # after the claims: they took time too

    def _renew_lease(self) -> float:
        """Renew the lease once; when (``time.monotonic()``) the next round is due: by the
        lease's schedule (:meth:`~distckpt.objlease.ObjectLease.renewal_due`), or
        :data:`RENEWAL_RETRY_SECONDS` from now after a failure in transport."""
        with self._lease_lock:
            lease = self._lease if self._lease_error is None else None
            if lease is None:
                return time.monotonic() + LEASE_SECONDS / 3  # the claims are still renewed
            try:
                lease.renew()
            except LeaseLost as exc:
                logger.error("%s: %s", self.root, exc)
                self._lease_error = exc
                return time.monotonic() + LEASE_SECONDS / 3
            except ObjectStoreError as exc:  # transient: tried again soon
                logger.warning("could not renew the lease of %s: %s", self.root, exc)
                return time.monotonic() + RENEWAL_RETRY_SECONDS
            return lease.renewal_due()

    def _renew_claims(self) -> bool:
        """Renew the claim of every save in flight once, after the lease; whether every
        claim was written.

        Through the quick client, so that a stalled store delays neither the lease's next
        renewal nor :meth:`close` for long. A write that client gave up on may still land
        later, after :meth:`_drop_claim` deleted the claim: so each renewal is a
        compare-and-swap on the claim's version (:meth:`_renew_claim`), which the store
        refuses once the claim is gone, and the claim never outlives its save."""
        written = True
        with self._lease_lock:
            renewals = self._renewals
            for attempt in list(self._claims) if renewals is not None else []:
                try:
                    self._claim_etags[attempt] = self._renew_claim(attempt, renewals)
                except ObjectStoreError as exc:
                    logger.warning("could not renew the claim of %s: %s", attempt, exc)
                    written = False
        return written

    def close(self) -> None:
        # A forked child inherits the store, but the lease belongs to the process that took it.
        if self._opened_by_pid != os.getpid():
            return
        self._opened_by_pid = 0
        if self._lease is not None:
            let_go(self._lease.owner)
        self._stop_renewing.set()
        # Bounded waits and one quick release attempt: a stalled store must not hold up the
        # end of the job, and a lease not released expires by itself LEASE_SECONDS later.
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join(CLOSE_WAIT_SECONDS)
        if self._lease_lock.acquire(timeout=CLOSE_WAIT_SECONDS):
            try:
                lease, self._lease = self._lease, None
                renewals, self._renewals = self._renewals, None
                self._release(lease)
            finally:
                self._lease_lock.release()
            if renewals is not None:
                renewals.close()
        else:  # a renewal is still stuck in a request: it stops at its next wait
            logger.warning(
                "could not release the lease of %s (a renewal is still waiting on the store): "
                "it expires by itself %g s after its last renewal",
                self.root,
                LEASE_SECONDS,
            )
            # without the lock (the thread holds it): one assignment, and check_lease then
            # refuses every later commit as closed
            self._lease = None
            renewals, self._renewals = self._renewals, None
            if renewals is not None:  # its request in flight gives up within its timeout
                renewals.close()
        opened_no_more(self)

    def _release(self, lease: ObjectLease | None) -> None:
        """One quick attempt to release ``lease`` (see :func:`lease_request_options`)."""
        if lease is None:
            return
        try:
            lease.release()
        except ObjectStoreError as exc:
            logger.warning(
                "could not release the lease of %s: %s; it expires by itself %g s after its "
                "last renewal",
                self.root,
                exc,
                LEASE_SECONDS,
            )

    def check_lease(self) -> None:
        """Before a change is published: this store's job still owns the root
        (:class:`~distckpt.LeaseLost` if not). A store never opened holds no lease."""
        with self._lease_lock:
            if self._lease_error is not None:
                raise self._lease_error
            if self._lease is not None:
                self._lease.check()
            elif self._renewer is not None:  # opened, then closed
                raise LeaseLost(f"the store of {self.root} was closed: it commits nothing more")

    def _renew_claim(self, attempt: str, through: ObjectStore) -> str:
        """Renew the claim of ``attempt``, a save in flight, by compare-and-swap; its new ETag.
        Refused for the version last written, it is written on the version the store holds:
        while the save is in flight only this store writes its claim, so that version is an
        earlier renewal given up on that landed. A claim found gone (removed by a ``gc`` that
        took it for expired) is created again."""
        name = self.s3.claim_name(attempt)
        try:
            return self._write_claim(attempt, through=through, if_match=self._claim_etags[attempt])
        except (PreconditionFailed, ObjectNotFound):
            pass
        try:
            current = through.head(name).etag
        except ObjectNotFound:
            return self._write_claim(attempt, through=through, if_absent=True)
        return self._write_claim(attempt, through=through, if_match=current)

    def _write_claim(
        self,
        attempt: str,
        *,
        through: ObjectStore | None = None,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> str:
        """Write the claim of ``attempt`` (through the data client unless ``through``, with
        the conditions of :meth:`~distckpt.objstore.ObjectStore.put_bytes`); its ETag."""
        claim = {
            "attempt": attempt,
            "host": this_process_host(),  # see local_process_gone
            "pid": os.getpid(),
            "expires_unix": time.time() + LEASE_SECONDS,
        }
        client = through if through is not None else self.s3.client
        return client.put_bytes(
            self.s3.claim_name(attempt),
            json.dumps(claim).encode(),
            if_absent=if_absent,
            if_match=if_match,
        )

    def _drop_claim(self, attempt: str, one_attempt: bool) -> None:
        """Stop renewing the claim of ``attempt`` and delete it, as the last write to it: in
        one attempt if ``one_attempt`` (a failed save's, best effort), else with the retries.

        Both under the lock the renewing thread writes claims under: a renewal in flight
        holds that lock, so it has been answered or given up on before the delete goes out
        (one given up on that lands later is a compare-and-swap on a claim that is gone, and
        refused: see :meth:`_renew_claims`); and once the attempt is out of ``_claims`` no
        later renewal writes it again. Deleting first and forgetting after (or without the
        lock) lets a renewal that copied ``_claims`` before the delete land after it, and the
        claim outlives its save."""
        with self._lease_lock:
            self._claims.discard(attempt)
            self._claim_etags.pop(attempt, None)
            try:
                client = self.s3.client.one_attempt if one_attempt else self.s3.client
                client.delete([self.s3.claim_name(attempt)])
            except CheckpointError as exc:
                logger.warning("could not remove the claim of %s (left for gc): %s", attempt, exc)

    def break_lease(self) -> LeaseHolder | None:
        raise InvalidArgument(
            f"the lease of {self.root} is not broken by hand: it expires by itself "
            f"{LEASE_SECONDS:g} s after its holder stops renewing it (wait_for_root= waits)"
        )

    def lease_holder(self) -> LeaseHolder | None:
        record = self._holder()
        if record is None or record.released:
            return None  # nobody holds a released lease, as a local root's read_holder says
        return record.holder()


def _holder_of(record: LeaseRecord | None) -> LeaseHolder | None:
    return record.holder() if record is not None else None
