"""The renewing thread of an ``s3://`` root's lease when the store misbehaves
(docs/object-stores.md): a renewal that failed is tried again ``RENEWAL_RETRY_SECONDS`` later,
not at once; a closed store commits nothing more, even after a ``close()`` that could not take
the lease lock from a stalled renewal. Through the proxy (tests/s3proxy.py), against a real
S3-protocol server."""

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


def test_a_renewal_that_failed_is_tried_again_once_within_the_retry_delay(
    s3_server: S3Server, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A lease of 3 s: the first renewal is due 1 s after the start, not 10 s (the schedule is
    # shortened, not the retry delay under test); the renewals are real.
    monkeypatch.setattr(s3_lease, "LEASE_SECONDS", 3.0)
    with S3Proxy(s3_server.port) as proxy:
        options = s3_server.storage_options(endpoint_url=proxy.endpoint)
        store = open_store(s3_url, storage_options=options)
        store.open()
        try:
            refused = proxy.fail("PUT", LEASE_NAME, times=1000)
            assert refused.arrived.wait(10)
            time.sleep(s3_lease.RENEWAL_RETRY_SECONDS * 0.75)
            tries = 1000 - refused.times
            refused.times = 0
        finally:
            store.close()
    # A busy machine may let the retry come a little early; a tight loop sends dozens.
    assert tries <= 2


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
