"""What an ``s3://`` root's lease object says of its holder, against a real S3-protocol server
(moto, tests/s3server.py): the job id, start time (UTC) and generation a root directory's lease
record keeps, folded into the object's ``owner`` and carried into the same
:class:`~distckpt.lease.LeaseHolder`; renewals keep them; the generation counts holders across
a release and a takeover, and of two contenders at once only the winner takes the next one;
malformed facts count as none; a holder that lost the lease is told who took it; a lease object
of an older version (no such facts) is read, taken over and renewed, and an older version
reads this one's and takes the root over once it is released."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import threading
from pathlib import Path

import pytest

import distckpt
from distckpt import CoordinationTimeout, LeaseLost, RootInUse, StoreUnavailable
from distckpt.lease import LeaseHolder, local_process_gone, this_process_host
from distckpt.objlease import LeaseRecord, ObjectLease
from distckpt.objstore import ObjectStore
from tests.older_version import run_older_version
from tests.s3proxy import S3Proxy
from tests.s3server import S3Server
from tests.test_s3_holders import _exited_pid

pytest.importorskip("botocore")

#: the keys of a lease object as the older version of tests/older_version.py writes it
OLDER_KEYS = {"owner", "host", "pid", "duration", "renewal", "released"}


@pytest.fixture
def job_4242(monkeypatch: pytest.MonkeyPatch) -> None:
    """The job id a launcher gives: the lease reads it from the environment, and this test is
    the launcher here."""
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")


def _stored(store: ObjectStore, name: str = ".lock") -> LeaseRecord:
    record = LeaseRecord.decode(store.get_bytes(name))
    assert record is not None
    return record


def test_the_lease_object_records_job_start_and_generation_and_renewals_keep_them(
    s3_server: S3Server, s3_url: str, job_4242: None
) -> None:
    with (
        ObjectStore(s3_url, s3_server.storage_options()) as store,
        ObjectLease(store, ".lock", duration=30) as lease,
    ):
        lease.acquire(timeout=0)
        taken = _stored(store)
        assert (taken.job_id, taken.generation) == ("4242", 1)
        assert taken.started_utc is not None
        started = datetime.datetime.fromisoformat(taken.started_utc)
        assert started.utcoffset() == datetime.timedelta(0)
        lease.renew()
        lease.renew()
        renewed = _stored(store)
        assert renewed.renewal == taken.renewal + 2
        assert (renewed.job_id, renewed.started_utc, renewed.generation) == (
            "4242",
            taken.started_utc,
            1,
        )
        assert renewed.holder() == LeaseHolder(
            host=this_process_host(),
            pid=os.getpid(),
            job_id="4242",
            started_utc=taken.started_utc,
            generation=1,
            token=lease.owner,
        )


def test_the_generation_counts_holders_across_a_release_and_a_takeover(
    s3_server: S3Server, s3_url: str, job_4242: None
) -> None:
    with ObjectStore(s3_url, s3_server.storage_options()) as store:
        with ObjectLease(store, ".lock", duration=30) as first:
            first.acquire(timeout=0)
            assert first.generation == 1
        second = ObjectLease(store, ".lock", duration=1.0)
        second.acquire(timeout=0)  # released: at once
        assert second.generation == _stored(store).generation == 2
        with ObjectLease(store, ".lock", duration=30) as third:
            third.acquire(timeout=20)  # once the second's second has passed unrenewed
            taken = _stored(store)
            assert third.generation == taken.generation == 3
            # the holder that lost it is told who holds it now, as a root directory's is
            with pytest.raises(LeaseLost) as lost:
                second.renew()
            assert "(generation 2) lost: taken by " in str(lost.value)
            assert f"{taken.holder().describe()} (it holds it now)" in str(lost.value)
            assert f"job 4242 on host {this_process_host()}" in str(lost.value)


def test_a_second_job_is_refused_naming_the_holders_job_and_generation(
    s3_server: S3Server, s3_url: str, job_4242: None
) -> None:
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options):
        with pytest.raises(RootInUse) as refused:
            distckpt.CheckpointManager(s3_url, storage_options=options)
        holder = refused.value.holder
        assert isinstance(holder, LeaseHolder)
        assert (holder.pid, holder.job_id, holder.generation) == (os.getpid(), "4242", 1)
        assert holder.started_utc is not None
        assert holder.describe() in str(refused.value)


@pytest.mark.parametrize("generation", [None, 5], ids=["older-version", "generation-5"])
def test_a_dead_holders_lease_object_is_read_taken_over_and_renewed(
    s3_server: S3Server, s3_url: str, job_4242: None, generation: int | None
) -> None:
    """A lease object of a holder gone from this machine: an older version's (no job id, start
    time nor generation: the next holder's generation is 1) or this version's (the next
    holder's is one more)."""
    dead = _exited_pid()
    owner = "older"
    if generation is not None:
        owner += f"/job:41/start:2026-01-01T00:00:00+00:00/gen:{generation}"
    record = {"owner": owner, "host": this_process_host(), "pid": dead}
    record |= {"duration": 600.0, "renewal": 4, "released": False}
    with ObjectStore(s3_url, s3_server.storage_options()) as store:
        store.put_bytes(".lock", json.dumps(record).encode())
        found = _stored(store)
        assert found.generation == generation
        if generation is None:
            assert (found.job_id, found.started_utc) == (None, None)
            assert found.holder().describe() == f"a job on host {this_process_host()}, pid {dead}"
        else:
            assert found.holder().describe() == (
                f"job 41 on host {this_process_host()}, pid {dead}, "
                f"since 2026-01-01T00:00:00+00:00 (generation {generation})"
            )
        with ObjectLease(store, ".lock", duration=30) as lease:
            # its holder is gone from this machine: taken over at once, not after 600 s
            lease.acquire(
                timeout=0, holder_gone=lambda found: local_process_gone(found.host, found.pid)
            )
            expected = (generation or 0) + 1
            assert lease.generation == expected
            lease.renew()
            lease.check()
            renewed = _stored(store)
            assert (renewed.owner, renewed.job_id, renewed.generation) == (
                lease.owner,
                "4242",
                expected,
            )


_OLDER_VERSION_READS_AND_TAKES_OVER = """
import json
from distckpt.objlease import LeaseRecord
from distckpt.objstore import ObjectStore
url, options, held = json.loads(sys.argv[1])
record = LeaseRecord.decode(held.encode())
print(json.dumps([record.host, record.pid, record.released]))
with distckpt.CheckpointManager(url, storage_options=options):
    with ObjectStore(url, options) as store:
        print(json.dumps(sorted(json.loads(store.get_bytes(".lease")))))
"""


def test_an_older_version_reads_this_versions_lease_object_and_takes_the_root_after_it(
    s3_server: S3Server, s3_url: str, older_distckpt: Path, job_4242: None
) -> None:
    """The older version reads the holder of a lease object this version holds (its keys are
    the older version's own), takes the root over once this version released it, and this
    version takes it back from the older version's record (which keeps no generation)."""
    options = s3_server.storage_options()
    with (
        distckpt.CheckpointManager(s3_url, storage_options=options),
        ObjectStore(s3_url, options) as store,
    ):
        held = store.get_bytes(".lease").decode()
    assert set(json.loads(held)) == OLDER_KEYS  # the job id, start and generation folded
    read, keys = run_older_version(
        older_distckpt, _OLDER_VERSION_READS_AND_TAKES_OVER, s3_url, options, held
    ).splitlines()
    assert json.loads(read) == [this_process_host(), os.getpid(), False]
    assert set(json.loads(keys)) == OLDER_KEYS  # the older version's own record
    with (
        distckpt.CheckpointManager(s3_url, storage_options=options),
        ObjectStore(s3_url, options) as store,
    ):
        assert _stored(store, ".lease").generation == 1


@pytest.mark.parametrize("generation", ["0", "-3", "07", "2.5", "x", ""])
def test_a_generation_that_is_no_whole_number_from_1_counts_as_none(generation: str) -> None:
    record = {"owner": f"o/job:9/start:2026-01-01T00:00:00+00:00/gen:{generation}"}
    record |= {"host": "h", "pid": 7, "duration": 30.0}
    decoded = LeaseRecord.decode(json.dumps(record).encode())
    assert decoded is not None and decoded.generation is None
    assert (decoded.owner, decoded.job_id) == ("o", "9")
    assert decoded.next_generation() == 1
    assert decoded.holder().describe() == "job 9 on host h, pid 7, since 2026-01-01T00:00:00+00:00"


@pytest.mark.parametrize(
    ("folded", "described"),
    [
        ("/job:/start:yesterday/gen:3", "a job without a job id on host h, pid 7 (generation 3)"),
        ("/job:9/start:/gen:3/zone:b", "job 9 on host h, pid 7 (generation 3)"),
        ("/job:9/job", "job 9 on host h, pid 7"),
        (
            "/start:2026-01-01T00:00:00+00:00",
            "a job without a job id on host h, pid 7, since 2026-01-01T00:00:00+00:00",
        ),
        ("", "a job on host h, pid 7"),
    ],
)
def test_malformed_or_unknown_facts_folded_into_the_owner_are_ignored(
    folded: str, described: str
) -> None:
    record = {"owner": f"o{folded}", "host": "h", "pid": 7, "duration": 30.0}
    decoded = LeaseRecord.decode(json.dumps(record).encode())
    assert decoded is not None and decoded.owner == "o"
    assert decoded.holder().describe() == described


def test_a_holder_refused_after_finding_its_own_record_is_told_who_took_the_lease(
    s3_server: S3Server, s3_url: str
) -> None:
    """A renewal refused finds this lease's own record (a renewal the store applied whose
    answers were lost) and writes on it; a contender writes in between, so that write is
    refused too: the holder is told who holds the lease now, as on the read back's path."""
    taker = LeaseRecord(
        "taker",
        "node-b",
        7,
        30.0,
        job_id="77",
        generation=2,
        started_utc="2026-01-01T00:00:00+00:00",
    )
    lost: list[LeaseLost] = []
    with (
        S3Proxy(s3_server.port) as proxy,
        ObjectStore(
            s3_url, s3_server.storage_options(retries=1, endpoint_url=proxy.endpoint)
        ) as store,
        ObjectStore(s3_url, s3_server.storage_options()) as contender,
    ):
        lease = ObjectLease(store, ".lock", duration=30)
        lease.acquire(timeout=0)
        proxy.drop("PUT", "/.lock")  # applied, its answer lost
        proxy.drop("GET", "/.lock")  # and so is its read back's
        with pytest.raises(StoreUnavailable):
            lease.renew()
        # the next renewal: refused, its read back and adoption pass, its second write waits
        second_write = proxy.hold("PUT", "/.lock", skip=1)

        def renew() -> None:
            try:
                lease.renew()
            except LeaseLost as exc:
                lost.append(exc)

        renewing = threading.Thread(target=renew)
        renewing.start()
        try:
            assert second_write.arrived.wait(timeout=20)
            contender.put_bytes(".lock", taker.encode())
        finally:
            second_write.release()
            renewing.join()
    assert len(lost) == 1 and not lease.held
    assert str(lost[0]).endswith(
        "lost: taken by job 77 on host node-b, pid 7, since 2026-01-01T00:00:00+00:00 "
        "(generation 2) (it holds it now)"
    )


def _acquire_at_once(leases: list[ObjectLease]) -> list[bool]:
    """Whether each of ``leases`` took its lease, all asking at once (a thread each, let go
    together by a barrier), each giving up after 1.5 s."""
    barrier = threading.Barrier(len(leases))
    won = [False] * len(leases)

    def contend(index: int) -> None:
        barrier.wait()
        with contextlib.suppress(CoordinationTimeout):
            leases[index].acquire(timeout=1.5, poll=0.05)
            won[index] = True

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(len(leases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won


@pytest.mark.parametrize("released", [True, False], ids=["released", "expired"])
def test_of_two_contenders_taking_a_free_lease_at_once_one_wins_the_next_generation(
    s3_server: S3Server, s3_url: str, released: bool
) -> None:
    """Two contenders ask at once (a client each) for a lease whose holder of generation 5
    released it, or stopped renewing it: exactly one takes it, with generation 6; the other
    gives up with no generation. A few rounds, each on an object of its own."""
    duration = 600.0 if released else 0.3
    held = LeaseRecord("gone", "node-b", 7, duration, 3, released, job_id="9", generation=5)
    for round_ in range(2):
        name = f".lock-{round_}"
        with contextlib.ExitStack() as stack:
            stores = [
                stack.enter_context(ObjectStore(s3_url, s3_server.storage_options()))
                for _ in range(2)
            ]
            stores[0].put_bytes(name, held.encode())
            leases = [ObjectLease(store, name, duration=30) for store in stores]
            won = _acquire_at_once(leases)
            assert sorted(won) == [False, True]
            winner, loser = (leases[0], leases[1]) if won[0] else (leases[1], leases[0])
            stored = _stored(stores[0], name)
            assert (stored.owner, stored.generation) == (winner.owner, 6)
            assert winner.generation == 6 and winner.held
            assert (loser.generation, loser.started_utc, loser.held) == (None, None, False)
            winner.release()
