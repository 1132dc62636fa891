"""The timing of an ``s3://`` root's lease against a real S3-protocol server (moto,
tests/s3server.py), with tests/s3proxy.py making requests slow at exact moments: a slow
renewal does not cost the lease, a real takeover does, and neither closing nor the end of the
process waits on a stalled store."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt import LeaseLost, objlease
from distckpt.lease import this_process_host
from distckpt.objlease import LeaseRecord, ObjectLease
from distckpt.objstore import ObjectStore
from distckpt.storage import s3_lease
from distckpt.storage.s3_root import LEASE_NAME
from tests import job_servers
from tests.s3proxy import S3Proxy
from tests.s3server import S3Server
from tests.waiting import wait_until

pytest.importorskip("botocore")

#: a short lease so that its renewals come every 2 s (patched in: the real 30 s would make each
#: test wait minutes for an expiry); each lease request still gets the smallest timeout (1 s),
#: ample for a local server, and half the time between two renewals. The lower limits: that
#: 1 s must stay below a third of the lease (a lease over 3 s); a renewal given up is tried
#: again 2 s later (RENEWAL_RETRY_SECONDS, fixed: at 6 s equal to the time between two
#: renewals), and that retry must go out before the lease ends (a third of the lease + 1 s +
#: 2 s below the lease: over 4.5 s), or no renewal would ever take a lease back in time; and
#: test_the_next_renewal_is_timed_from_when_a_slow_one_was_sent holds a renewal 2 s, a third
#: of 6 s, so that the next one is due as it is answered.
SHORT_LEASE_SECONDS = 6.0


def _state(step: int) -> dict[str, Any]:
    return {"w": torch.arange(4.0) + step, "step": step}


@contextmanager
def _saved_through_proxy(
    s3_server: S3Server, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[S3Proxy, distckpt.CheckpointManager]]:
    """A manager of ``s3_url`` (short lease) that talks to the store through a proxy, with
    step 1 saved; the caller closes the manager (the proxy is closed on exit)."""
    monkeypatch.setattr(s3_lease, "LEASE_SECONDS", SHORT_LEASE_SECONDS)
    with S3Proxy(s3_server.port) as proxy:
        options = s3_server.storage_options(endpoint_url=proxy.endpoint)
        manager = distckpt.CheckpointManager(s3_url, storage_options=options)
        manager.save(1, _state(1))
        yield proxy, manager


def _committed_steps(url: str, options: dict[str, Any]) -> list[int]:
    with distckpt.CheckpointManager(url, storage_options=options, read_only=True) as reader:
        return reader.steps()


def _lease_of(manager: distckpt.CheckpointManager) -> ObjectLease:
    """The lease the manager's store renews: whether it counts itself held is not visible
    through the store (which keeps its record either way), only in the holder."""
    lease = manager._store._lease  # type: ignore[attr-defined]
    assert isinstance(lease, ObjectLease)
    return lease


def _renewals_given_up(caplog: pytest.LogCaptureFixture) -> int:
    return sum("could not renew the lease" in record.getMessage() for record in caplog.records)


def test_renewals_held_past_the_lease_end_do_not_cost_the_lease(
    s3_server: S3Server,
    s3_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Renewals go unanswered (the client gives up on each after 1 s and tries again 2 s later;
    # the store gets them only later): once two were given up, the holder's own time has run
    # out (6 s after the last renewal answered was sent), although nobody took the lease. The
    # next renewal, sent after that, must take it back, or every later save would fail. Each
    # step waits for its event, not for a time: a late wake-up changes nothing.
    with (
        caplog.at_level(logging.WARNING, "distckpt"),
        _saved_through_proxy(s3_server, s3_url, monkeypatch) as (proxy, manager),
        manager,
    ):
        lease = _lease_of(manager)
        unanswered = proxy.hold("PUT", f"/{LEASE_NAME}", times=1000)
        wait_until(
            lambda: _renewals_given_up(caplog) >= 2 and not lease.held,
            "two renewals given up, and the lease's time up",
            30,
        )
        unanswered.times = 0
        unanswered.release()  # the held renewals reach the store now, late
        wait_until(lambda: lease.held, "a renewal taking the lease back", 30)
        saved = manager.save(2, _state(2))
        assert saved is not None and saved.step == 2
    assert _committed_steps(s3_url, s3_server.storage_options()) == [1, 2]


def test_the_next_renewal_is_timed_from_when_a_slow_one_was_sent(
    s3_server: S3Server, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lease requests may take 3 s here; one renewal is answered after 2 s. The next is due a
    # third of the lease (2 s) after that slow one was sent, so at once; timed from its answer
    # it would come 4 s after, and a slow answer would push renewals toward the lease's end.
    monkeypatch.setattr(objlease, "MIN_REQUEST_SECONDS", 3.0)
    with _saved_through_proxy(s3_server, s3_url, monkeypatch) as (proxy, manager), manager:
        slow = proxy.hold("PUT", f"/{LEASE_NAME}")
        assert slow.arrived.wait(SHORT_LEASE_SECONDS)
        slow_sent = time.monotonic()
        time.sleep(2.0)
        following = proxy.hold("PUT", f"/{LEASE_NAME}")
        slow.release()
        assert following.arrived.wait(SHORT_LEASE_SECONDS)
        gap = time.monotonic() - slow_sent
        following.release()
    assert gap < SHORT_LEASE_SECONDS / 3 + 1, f"the next renewal came {gap:.1f} s after"


def test_a_lease_taken_over_after_it_expired_is_lost_and_nothing_more_is_committed(
    s3_server: S3Server,
    s3_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The holder whose renewal found the takeover is told who took the lease, at every later
    save ("a holder that lost the lease is told, in its LeaseLost, who took it")."""
    direct = s3_server.storage_options()
    taken = f"taken by a job without a job id on host {this_process_host()}, pid {os.getpid()},"
    with _saved_through_proxy(s3_server, s3_url, monkeypatch) as (proxy, manager), manager:
        stalled = proxy.hold("PUT", f"/{LEASE_NAME}", times=1000)  # no renewal gets through
        with ObjectStore(s3_url, direct) as store, caplog.at_level(logging.ERROR, "distckpt"):
            other = ObjectLease(store, LEASE_NAME, duration=60)
            other.acquire(timeout=SHORT_LEASE_SECONDS * 3)  # once the lease expired
            stalled.release()  # the held renewals now reach the store, and are refused
            stalled.times = 0
            wait_until(lambda: taken in caplog.text, "a renewal finding the takeover", 30)
            with pytest.raises(LeaseLost, match=re.escape(taken)):
                manager.save(2, _state(2))
            other.check()
            record = LeaseRecord.decode(store.get_bytes(LEASE_NAME))
            assert record is not None and record.owner == other.owner
            # for good: a later save fails the same way
            with pytest.raises(LeaseLost, match=re.escape(taken)):
                manager.save(3, _state(3))
            other.release()
    assert _committed_steps(s3_url, direct) == [1]


def test_close_does_not_wait_on_a_stalled_store(
    s3_server: S3Server, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every lease request hangs (each held until the proxy gives up on it after 30 s): a
    # renewal is in flight when close() begins, and the release cannot be answered. Closing
    # used to wait for that renewal with no limit and then release with every retry.
    with _saved_through_proxy(s3_server, s3_url, monkeypatch) as (proxy, manager):
        stalled = proxy.hold("PUT", f"/{LEASE_NAME}", times=1000)
        assert stalled.arrived.wait(SHORT_LEASE_SECONDS)  # a renewal is waiting on the store
        started = time.monotonic()
        manager.close()
        took = time.monotonic() - started
        stalled.release()
    assert took < 20, f"close() took {took:.1f} s on a stalled store"


def test_interpreter_exit_does_not_wait_on_a_stalled_store(
    s3_server: S3Server, s3_url: str, tmp_path: Path
) -> None:
    # A process that ends without closing its manager releases the lease at exit, by the same
    # bounded close(): on a store that answers no lease request it must still end promptly.
    # Run by a job server, which imported torch once: its run ends as an interpreter does
    # (threads joined, then the exit handlers), and the point is that end, not a fresh start.
    go = tmp_path / "go"
    with S3Proxy(s3_server.port) as proxy:
        options = s3_server.storage_options(endpoint_url=proxy.endpoint)
        script = tmp_path / "exits_unclosed.py"
        script.write_text(
            "import os, time, torch, distckpt\n"
            f"manager = distckpt.CheckpointManager({s3_url!r}, storage_options={options!r})\n"
            "manager.save(1, {'w': torch.ones(2)})\n"
            "print('saved', flush=True)\n"
            f"while not os.path.exists({str(go)!r}):  # until the test has stalled the store\n"
            "    time.sleep(0.01)\n"
        )
        log = tmp_path / "job.log"
        log.touch()  # read before the job has opened it
        job = job_servers.start_preloaded([str(script)], log)
        try:
            wait_until(
                lambda: "saved" in log.read_text() or job.poll() is not None, "the save", 120
            )
            assert job.poll() is None, log.read_text()
            stalled = proxy.hold("PUT", f"/{LEASE_NAME}", times=1000)
            started = time.monotonic()
            go.touch()
            assert job.wait(timeout=120) == 0, log.read_text()
            took = time.monotonic() - started
        finally:
            job.end()
        assert stalled.arrived.is_set()  # the release was sent, and left unanswered
        stalled.release()
    assert took < 20, f"the process took {took:.1f} s to end on a stalled store"


def _lease_writes(proxy: S3Proxy) -> int:
    return sum(1 for method, path, _ in proxy.log if method == "PUT" and f"/{LEASE_NAME}" in path)


@contextmanager
def _save_in_flight(
    s3_server: S3Server, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[S3Proxy, distckpt.CheckpointManager]]:
    """A manager (short lease, through a proxy) with step 2's save in flight: its uploads are
    held, so each renewal round also renews its claim. The caller closes the manager; the
    save then fails (the store is closed under it), once its uploads are let go on exit."""
    failures: list[BaseException] = []
    with _saved_through_proxy(s3_server, s3_url, monkeypatch) as (proxy, manager):
        uploads = proxy.hold("PUT", "step-00000002", times=1000)

        def save() -> None:
            try:
                manager.save(2, _state(2))
            except BaseException as exc:
                failures.append(exc)

        saving = threading.Thread(target=save, daemon=True)
        saving.start()
        assert uploads.arrived.wait(SHORT_LEASE_SECONDS)
        yield proxy, manager
        uploads.release()
        saving.join(60)
    assert len(failures) == 1 and not saving.is_alive()


def _claim_expiry(s3_url: str, options: dict[str, Any]) -> float:
    """The expiry written in the one claim of the root."""
    with ObjectStore(s3_url, options) as store:
        (name,) = [info.key for info in store.list(".writers/")]
        return float(json.loads(store.get_bytes(name))["expires_unix"])


def test_stalled_claim_writes_neither_stop_the_lease_renewals_nor_the_release(
    s3_server: S3Server, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every claim write stalls. The lease must still be renewed on its schedule, and close()
    # must release it, not give up waiting on a claim write.
    with _save_in_flight(s3_server, s3_url, monkeypatch) as (proxy, manager):
        claims = proxy.hold("PUT", "/.writers/", times=1000)
        assert claims.arrived.wait(SHORT_LEASE_SECONDS)  # a renewal round is writing a claim
        before = _lease_writes(proxy)
        # On schedule, two renewals come within 4 s (one every third of the lease); the bound
        # is the lease's length, past which the lease would lapse, and leaves a loaded machine
        # 2 s. Renewals waiting on the held claim writes would come when those are given up.
        wait_until(
            lambda: _lease_writes(proxy) - before >= 2,
            "two lease renewals while the claim writes stall",
            SHORT_LEASE_SECONDS,
        )
        manager.close()
        with ObjectStore(s3_url, s3_server.storage_options()) as store:
            record = LeaseRecord.decode(store.get_bytes(LEASE_NAME))
        claims.release()
    assert record is not None and record.released


def test_a_claim_renewal_that_landed_unanswered_does_not_stop_the_next(
    s3_server: S3Server, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A claim renewal reaches the store but its answer is lost: the claim's version is not the
    # one the renewer last saw, and its compare-and-swap must go on from what the store holds.
    direct = s3_server.storage_options()
    with _save_in_flight(s3_server, s3_url, monkeypatch) as (proxy, manager), manager:
        unanswered = proxy.drop("PUT", "/.writers/")
        assert unanswered.arrived.wait(SHORT_LEASE_SECONDS)
        time.sleep(1.0)  # the renewer gives up on it (after 1 s here)
        landed = _claim_expiry(s3_url, direct)
        time.sleep(SHORT_LEASE_SECONDS / 3 + 1)  # a retry, then a round
        assert _claim_expiry(s3_url, direct) > landed
