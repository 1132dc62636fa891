"""A store that refuses If-Match on DELETE (501 NotImplemented or 400 InvalidArgument, as some
S3-compatible stores answer a header they do not know) still deletes and applies retention:
the COMMIT's version is checked by a HEAD before an unconditional DELETE instead."""

from __future__ import annotations

import logging

import pytest

import distckpt
from distckpt.errors import PreconditionFailed
from distckpt.objstore import ObjectStore
from distckpt.storage import open_store
from tests.s3proxy import S3Proxy
from tests.s3server import S3Server
from tests.test_s3_store import _state

#: as many conditional DELETEs as the test could send: the proxy refuses every one of them
EVERY_REQUEST = 1000


@pytest.mark.parametrize("status", [501, 400])
def test_a_store_refusing_if_match_on_delete_still_deletes_and_keeps_last(
    s3_server: S3Server, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    retention_url = f"s3://{s3_server.create_bucket()}/ckpt"
    delete_url = f"s3://{s3_server.create_bucket()}/ckpt"
    with S3Proxy(s3_server.port) as proxy:
        refusal = proxy.fail("DELETE", status=status, headers=("If-Match",), times=EVERY_REQUEST)
        options = s3_server.storage_options(endpoint_url=proxy.endpoint)
        with caplog.at_level(logging.WARNING, logger="distckpt"):
            with distckpt.CheckpointManager(
                retention_url, storage_options=options, keep_last=1
            ) as manager:
                manager.save(1, _state(1))
                manager.save(2, _state(2))
                manager.save(3, _state(3))
                assert manager.steps() == [3]
            with distckpt.CheckpointManager(delete_url, storage_options=options) as manager:
                manager.save(1, _state(1))
                manager.save(2, _state(2))
            store = open_store(delete_url, storage_options=options, lock_timeout=60)
            store.open()
            try:
                assert store.delete(2) == 1
                assert store.view.committed_steps() == [1]
            finally:
                store.close()
        refused = [entry for entry in proxy.log if entry[0] == "DELETE" and entry[2] == status]
    assert refusal.arrived.is_set() and refused  # the condition was tried, and refused
    with ObjectStore(delete_url, s3_server.storage_options()) as direct:
        assert direct.get_bytes("last") == b"step-00000001\n"
    warnings = [r for r in caplog.records if "If-Match on DELETE" in r.getMessage()]
    assert len(warnings) == 2  # once for each store, not once for each delete


def test_without_if_match_on_delete_another_version_is_left_and_refused(
    s3_server: S3Server, s3_url: str
) -> None:
    with S3Proxy(s3_server.port) as proxy:
        proxy.fail("DELETE", status=501, headers=("If-Match",), times=EVERY_REQUEST)
        with ObjectStore(s3_url, s3_server.storage_options(endpoint_url=proxy.endpoint)) as store:
            first = store.put_bytes("COMMIT", b"one")
            second = store.put_bytes("COMMIT", b"two")
            with pytest.raises(PreconditionFailed, match="checked by HEAD"):
                store.delete_one("COMMIT", if_match=first)
            assert store.get_bytes("COMMIT") == b"two"
            store.delete_one("COMMIT", if_match=second)
            store.delete_one("COMMIT", if_match=second)  # gone: not an error
            assert list(store.list()) == []
