"""What fences a writer of an ``s3://`` root against another (docs/object-stores.md): a
conditional write that loses a race, exactly timed by the proxy (tests/s3proxy.py) holding a
request while another writer changes the object. Two writers racing to create a step, and a
job whose lease was taken, are in ``tests/test_s3_failures.py``."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import distckpt
from distckpt.objstore import ObjectStore
from distckpt.storage.s3_root import CommitRecord
from tests.s3proxy import S3Proxy
from tests.s3server import S3Server
from tests.test_s3_store import _state

COMMIT = "step-00000002/COMMIT"

pytest.importorskip("botocore")


def test_a_writer_never_writes_over_what_another_wrote_meanwhile(
    s3_server: S3Server, s3_url: str
) -> None:
    """ "overwrite=True replaces COMMIT with If-Match on the ETag it read": a COMMIT another
    writer put between that read and the replacement stays, and the overwrite fails with
    ``ConcurrentCommit``. "last / best are pointer objects replaced by compare-and-swap on the
    ETag read": a writer that commits a newer step and points ``last`` at it while this job
    is moving ``last`` keeps it; this job's stale write is refused and not made again."""
    direct = s3_server.storage_options()

    def write(objects: dict[str, bytes]) -> Callable[[], None]:
        def put() -> None:  # another writer's, straight to the store
            with ObjectStore(s3_url, direct) as store:
                for name, data in objects.items():
                    store.put_bytes(name, data)

        return put

    def read(name: str) -> bytes:
        with ObjectStore(s3_url, direct) as store:
            return store.get_bytes(name)

    with S3Proxy(s3_server.port) as proxy:
        options = s3_server.storage_options(endpoint_url=proxy.endpoint)
        with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
            manager.save(2, _state(2))
            other = {COMMIT: CommitRecord.encode(2, "another-writer")}
            held = proxy.hold("PUT", COMMIT)
            with held.changed_meanwhile(write(other)), pytest.raises(distckpt.ConcurrentCommit):
                manager.save(2, _state(2), overwrite=True)
            assert read(COMMIT) == other[COMMIT]

            newer = {
                "step-00000004/COMMIT": CommitRecord.encode(4, "another-writer"),
                "last": b"step-00000004\n",
            }
            with proxy.hold("PUT", "/last").changed_meanwhile(write(newer)):
                manager.save(3, _state(3))
            assert read("last") == newer["last"]
