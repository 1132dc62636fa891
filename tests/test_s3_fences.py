"""What fences a writer of an ``s3://`` root against another (docs/object-stores.md): a
conditional write that loses a race, exactly timed by the proxy (tests/s3proxy.py) holding a
request while another writer changes the object. Two writers racing to create a step, and a
job whose lease was taken, are in ``tests/test_s3_failures.py``."""

from __future__ import annotations

import json
import threading

import pytest

import distckpt
from distckpt.objstore import ObjectStore
from tests.s3proxy import S3Proxy
from tests.s3server import S3Server
from tests.test_s3_store import _state

pytest.importorskip("botocore")

COMMIT = "step-00000002/COMMIT"
#: how long a held request may wait for the test's other writer (a bound, never reached)
HOLD_SECONDS = 30.0


def test_an_overwrite_whose_commit_another_writer_replaced_meanwhile_is_refused(
    s3_server: S3Server, s3_url: str
) -> None:
    """ "overwrite=True replaces COMMIT with If-Match on the ETag it read": a COMMIT another
    writer put between that read and the replacement stays, and the overwrite fails with
    ``ConcurrentCommit``."""
    direct = s3_server.storage_options()
    other = json.dumps({"attempt": "another-writer", "step": 2}, sort_keys=True).encode()
    with S3Proxy(s3_server.port) as proxy:
        options = s3_server.storage_options(endpoint_url=proxy.endpoint)
        with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
            manager.save(2, _state(2))
            held = proxy.hold("PUT", COMMIT)

            def write_meanwhile() -> None:
                try:
                    assert held.arrived.wait(HOLD_SECONDS)
                    with ObjectStore(s3_url, direct) as store:
                        store.put_bytes(COMMIT, other)
                finally:
                    held.release()

            writer = threading.Thread(target=write_meanwhile)
            writer.start()
            try:
                with pytest.raises(distckpt.ConcurrentCommit):
                    manager.save(2, _state(200), overwrite=True)
            finally:
                writer.join()
    with ObjectStore(s3_url, direct) as store:
        assert store.get_bytes(COMMIT) == other
