"""The renewing thread of an ``s3://`` root's lease when the store misbehaves
(docs/object-stores.md): a renewal that failed is tried again ``RENEWAL_RETRY_SECONDS``
later, neither at once nor on the lease's schedule; a closed store commits nothing more,
even after a ``close()`` that could not take the lease lock from a stalled renewal. Through
the proxy (tests/s3proxy.py), against a real S3-protocol server."""

from __future__ import annotations

import time

import pytest

import distckpt
import distckpt.storage.s3_lease as s3_lease
from distckpt.storage import open_store
from distckpt.storage.s3_root import LEASE_NAME
from tests.s3proxy import S3Proxy
from tests.s3server import S3Server

pytest.importorskip("botocore")


def test_a_renewal_that_failed_is_tried_again_after_the_retry_delay(
    s3_server: S3Server, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert s3_lease.RENEWAL_RETRY_SECONDS == 2.0  # as docs/object-stores.md says
    # A lease of 1.5 s (renewals due every 0.5 s) and a retry delay of 0.8 s, not 30 s and 2 s:
    # the test is short, and a retry on the lease's schedule instead (0.5 s) comes too soon.
    # The renewals and their refusals are real.
    monkeypatch.setattr(s3_lease, "LEASE_SECONDS", 1.5)
    monkeypatch.setattr(s3_lease, "RENEWAL_RETRY_SECONDS", 0.8)
    with S3Proxy(s3_server.port) as proxy:
        options = s3_server.storage_options(endpoint_url=proxy.endpoint)
        store = open_store(s3_url, storage_options=options)
        store.open()
        try:
            refused = proxy.fail("PUT", LEASE_NAME, times=1000)
            deadline = time.monotonic() + 10  # generous: how soon is not what is tested
            while len(refused.arrival_times) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            refused.times = 0
        finally:
            store.close()
    assert len(refused.arrival_times) >= 2, "the failed renewal was never tried again"
    first, second = refused.arrival_times[:2]
    # A lower bound only, which a slow machine cannot break: the retry waits at least the
    # delay after the refusal was answered, which was after it arrived.
    assert second - first >= 0.8


def test_a_close_that_could_not_take_the_lease_lock_commits_nothing_more(
    s3_server: S3Server, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A lease of 3 s (first renewal after 1 s) and close waits of 0.2 s, not 3 s each: the
    # waits are shortened, what close leaves behind is real.
    monkeypatch.setattr(s3_lease, "LEASE_SECONDS", 3.0)
    monkeypatch.setattr(s3_lease, "CLOSE_WAIT_SECONDS", 0.2)
    with S3Proxy(s3_server.port) as proxy:
        options = s3_server.storage_options(endpoint_url=proxy.endpoint)
        store = open_store(s3_url, storage_options=options)
        store.open()
        held = proxy.hold("PUT", LEASE_NAME)
        assert held.arrived.wait(10)
        store.close()  # the renewing thread holds the lease lock, stuck in its request
        held.release()
        with pytest.raises(distckpt.LeaseLost):
            store.prune()


def test_a_closed_s3_store_commits_nothing_more(s3_server: S3Server, s3_url: str) -> None:
    store = open_store(s3_url, storage_options=s3_server.storage_options())
    store.open()
    store.close()
    with pytest.raises(distckpt.LeaseLost, match="was closed"):
        store.prune()
