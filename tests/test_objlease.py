"""distckpt.objlease against a real S3-protocol server (moto, tests/s3server.py)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from distckpt import CoordinationTimeout, LeaseLost, StoreUnavailable
from distckpt.lease import this_process_host
from distckpt.objlease import LeaseRecord, ObjectLease, lease_request_options
from distckpt.objstore import ObjectStore
from tests.ranks import run_ranks
from tests.s3proxy import S3Proxy
from tests.s3server import S3Server

pytest.importorskip("botocore")


def _contend(rank: int, world_size: int, url: str, options: dict) -> bool:
    import torch.distributed as dist

    with ObjectStore(url, options) as store:
        lease = ObjectLease(store, ".lock", duration=30)
        dist.barrier()  # both ranks ask at once
        try:
            lease.acquire(timeout=2)
        except CoordinationTimeout:
            dist.barrier()
            return False
        lease.check()
        dist.barrier()  # the loser has given up while the winner holds it
        return True


def test_one_of_two_processes_gets_the_lease(s3_server: S3Server, s3_url: str) -> None:
    results = run_ranks(_contend, 2, s3_url, s3_server.storage_options())
    assert sorted(result.unwrap() for result in results) == [False, True]


def test_an_unrenewed_lease_expires_and_its_holder_learns_it(
    s3_server: S3Server, s3_url: str
) -> None:
    with ObjectStore(s3_url, s3_server.storage_options()) as store:
        first = ObjectLease(store, ".lock", duration=1.5)
        first.acquire(timeout=1)
        assert first.held and 0 < first.remaining() <= 1.5
        second = ObjectLease(store, ".lock", duration=30)
        started = time.monotonic()
        second.acquire(timeout=20)  # waits for the holder's 1.5 s to pass unrenewed
        assert time.monotonic() - started >= 1.5
        record = LeaseRecord.decode(store.get_bytes(".lock"))
        assert record is not None and record.owner == second.owner
        assert not first.held
        with pytest.raises(LeaseLost):
            first.renew()
        with pytest.raises(LeaseLost):
            first.check()
        second.check()
        first.release()  # lost already: must not disturb the new holder
        second.check()


def test_a_release_by_a_holder_that_has_not_seen_the_takeover_leaves_the_new_holder(
    s3_server: S3Server, s3_url: str
) -> None:
    """Released "by compare-and-swap": a holder that lost its lease without learning it yet
    (no renewal or check since; a paused process) and then releases it at its close leaves
    the new holder's record as it is, and the new holder holds the lease."""
    with ObjectStore(s3_url, s3_server.storage_options()) as store:
        first = ObjectLease(store, ".lock", duration=30)
        first.acquire(timeout=1)
        second = ObjectLease(store, ".lock", duration=30)
        # taken over at once, as from a holder known dead: no wait for the lease to expire
        second.acquire(timeout=1, holder_gone=lambda record: True)
        first.release()
        record = LeaseRecord.decode(store.get_bytes(".lock"))
        assert record is not None and record.owner == second.owner and not record.released
        second.check()


def test_renewal_keeps_the_lease_and_release_hands_it_over(
    s3_server: S3Server, s3_url: str
) -> None:
    with ObjectStore(s3_url, s3_server.storage_options()) as store:
        holder = ObjectLease(store, ".lock", duration=3)  # renewed every 0.4 s: ample under load
        holder.acquire(timeout=1)
        stop = threading.Event()

        def keep_renewing() -> None:
            while not stop.wait(0.4):
                holder.renew()

        renewer = threading.Thread(target=keep_renewing)
        renewer.start()
        try:
            with pytest.raises(CoordinationTimeout, match="still held by"):
                ObjectLease(store, ".lock", duration=2).acquire(timeout=4, poll=0.2)
        finally:
            stop.set()
            renewer.join()
        holder.check()
        holder.release()
        started = time.monotonic()
        with ObjectLease(store, ".lock", duration=2) as successor:
            successor.acquire(timeout=5)
            assert time.monotonic() - started < 1.5  # released: no waiting for expiry
            with pytest.raises(LeaseLost):
                holder.check()


def test_a_lease_write_applied_whose_answer_was_lost_is_held(
    s3_server: S3Server, s3_url: str
) -> None:
    # The client retries each write whose answer it lost; the store refuses the retry (the
    # first try changed the object), but the object holds this lease's own record.
    with S3Proxy(s3_server.port) as proxy:
        lost_create = proxy.drop("PUT", "/.lock")
        with ObjectStore(s3_url, s3_server.storage_options(endpoint_url=proxy.endpoint)) as store:
            lease = ObjectLease(store, ".lock", duration=30)
            lease.acquire(timeout=0)
            assert lost_create.arrived.is_set() and lease.held
            lease.check()
            lost_renewal = proxy.drop("PUT", "/.lock")
            lease.renew()
            assert lost_renewal.arrived.is_set()
            lease.check()
            record = LeaseRecord.decode(store.get_bytes(".lock"))
            assert record is not None and (record.owner, record.renewal) == (lease.owner, 2)


def test_a_record_with_fields_of_a_later_version_is_read_for_those_it_knows() -> None:
    record = LeaseRecord(owner="o", host="h", pid=7, duration=30.0, renewal=3)
    later = json.loads(record.encode()) | {"pid_namespace": 4026531836, "zone": "b"}
    assert LeaseRecord.decode(json.dumps(later).encode()) == record
    assert LeaseRecord.decode(b"[1, 2]") is None  # not a record: it never expires


def test_a_record_of_this_version_has_only_the_keys_older_versions_decode(
    s3_server: S3Server, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # older versions decode with LeaseRecord(**fields) and refuse any key they do not know;
    # new facts are folded into existing keys instead of new ones: where the pid means this
    # process into "host", the job id, start time and generation into "owner" (which older
    # versions only show)
    # The lease reads the job id from the environment a launcher sets; this test is the
    # launcher here.
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "run/7")
    older_keys = {"owner", "host", "pid", "duration", "renewal", "released"}
    with ObjectStore(s3_url, s3_server.storage_options()) as store:
        lease = ObjectLease(store, ".lock", duration=30.0)
        lease.acquire(0)
        lease.renew()
        fields = json.loads(store.get_bytes(".lock"))
        assert set(fields) == older_keys
        assert LeaseRecord(**fields).host == this_process_host()
        assert fields["owner"] == (
            f"{lease.owner}/job:run%2F7/start:{lease.started_utc}/gen:{lease.generation}"
        )
        assert LeaseRecord.decode(store.get_bytes(".lock")) == LeaseRecord(
            **fields | {"owner": lease.owner},
            job_id="run/7",
            started_utc=lease.started_utc,
            generation=1,
        )
        lease.release()
        assert set(json.loads(store.get_bytes(".lock"))) == older_keys


@contextmanager
def _lease_through_proxy(
    s3_server: S3Server, s3_url: str, *, retries: int
) -> Iterator[tuple[S3Proxy, ObjectStore, ObjectLease]]:
    """A lease (30 s) taken through a proxy by a client making ``retries`` tries a request."""
    options = s3_server.storage_options(retries=retries)
    with (
        S3Proxy(s3_server.port) as proxy,
        ObjectStore(s3_url, options | {"endpoint_url": proxy.endpoint}) as store,
    ):
        lease = ObjectLease(store, ".lock", duration=30)
        lease.acquire(timeout=0)
        yield proxy, store, lease


def test_a_renewal_applied_whose_every_answer_was_lost_is_held(
    s3_server: S3Server, s3_url: str
) -> None:
    # Both tries of one renewal reach the store and lose their answers (the second is refused
    # there): the client gives up unavailable, yet the object holds this renewal's record.
    with _lease_through_proxy(s3_server, s3_url, retries=2) as (proxy, store, lease):
        held = LeaseRecord.decode(store.get_bytes(".lock"))
        proxy.drop("PUT", "/.lock", times=2)
        lease.renew()  # read back: its own record, so it counts as done
        lease.renew()  # and the next renewal matches what is stored
        lease.check()
        record = LeaseRecord.decode(store.get_bytes(".lock"))
    assert held is not None and record is not None
    assert (record.owner, record.renewal) == (lease.owner, held.renewal + 2)


def test_a_lease_whose_time_ran_out_unrenewed_is_renewed_if_nobody_took_it(
    s3_server: S3Server, s3_url: str
) -> None:
    # Its own time up, the holder may not act (check refuses), but the store still has its
    # version: a renewal on that ETag makes the lease its own again.
    with (
        ObjectStore(s3_url, s3_server.storage_options()) as store,
        ObjectLease(store, ".lock", duration=1.0) as lease,  # released on exit
    ):
        lease.acquire(timeout=1)
        time.sleep(1.1)
        assert not lease.held
        with pytest.raises(LeaseLost, match="expired"):
            lease.check()
        sent = time.monotonic()
        lease.renew()
        assert lease.held and sent < lease.renewal_due() <= time.monotonic() + 1.0 / 3
        lease.check()


def test_lease_requests_give_up_within_a_fraction_of_the_lease() -> None:
    options = {"retries": 7, "read_timeout": 60, "config_kwargs": {"connect_timeout": 99}}
    quick = lease_request_options(options, 30.0)
    assert (quick["retries"], quick["read_timeout"], quick["connect_timeout"]) == (1, 2.0, 2.0)
    assert quick["config_kwargs"] == {}  # merged last: it must not undo the limits
    assert lease_request_options({"read_timeout": 0.5}, 30.0)["read_timeout"] == 0.5
    from_config = lease_request_options({"config_kwargs": {"read_timeout": 99}}, 30.0)
    assert (from_config["read_timeout"], from_config["config_kwargs"]) == (2.0, {})


@contextmanager
def _a_renewal_applied_unseen(
    s3_server: S3Server, s3_url: str, *, lost_reads: int = 1
) -> Iterator[ObjectLease]:
    """A lease one of whose renewals reached the store while neither its answer nor its read
    back came back (``lost_reads`` GETs of the lease lose their answers, the first being that
    read back). After the caller's block, the next renewal must hold the lease again."""
    with _lease_through_proxy(s3_server, s3_url, retries=1) as (proxy, store, lease):
        proxy.drop("PUT", "/.lock")
        proxy.drop("GET", "/.lock", times=lost_reads)
        with pytest.raises(StoreUnavailable):
            lease.renew()
        yield lease
        lease.renew()
        lease.check()
        record = LeaseRecord.decode(store.get_bytes(".lock"))
    assert record is not None and record.owner == lease.owner


def test_a_renewal_applied_unseen_is_adopted_by_the_next_renewal(
    s3_server: S3Server, s3_url: str
) -> None:
    # The holder keeps the version before the unseen renewal. The next renewal is refused for
    # that version, finds its own record in the store, and renews from there instead of
    # counting the lease lost.
    with _a_renewal_applied_unseen(s3_server, s3_url):
        pass


def test_a_fence_check_after_a_renewal_applied_unseen_refuses_but_keeps_the_lease(
    s3_server: S3Server, s3_url: str
) -> None:
    # A check before the next renewal may not count the lease held (the write is not seen to
    # have landed), but nobody took it, so the next renewal must hold it again.
    with (
        _a_renewal_applied_unseen(s3_server, s3_url) as lease,
        pytest.raises(LeaseLost, match="not confirmed"),
    ):
        lease.check()


def test_a_renewal_whose_read_back_fails_in_transport_is_tried_again_not_lost(
    s3_server: S3Server, s3_url: str
) -> None:
    # The next renewal is refused and its read backs of the store fail too (its own, then its
    # adoption's): nothing is known, so that is a transient failure, not a lost lease.
    with _a_renewal_applied_unseen(s3_server, s3_url, lost_reads=3) as lease:
        with pytest.raises(StoreUnavailable):
            lease.renew()
        assert lease.held  # the time of the last write known to land still runs
