"""What fences a writer of an ``s3://`` root against another (docs/object-stores.md): a
conditional write that loses a race, exactly timed by the proxy (tests/s3proxy.py) holding a
request while another writer changes the object. Two writers racing to create a step, and a
job whose lease was taken, are in ``tests/test_s3_failures.py``."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator

import pytest

import distckpt
from distckpt.objstore import ObjectStore
from tests.s3proxy import Rule, S3Proxy
from tests.s3server import S3Server
from tests.test_s3_store import _state

pytest.importorskip("botocore")

COMMIT = "step-00000002/COMMIT"
#: how long a held request may wait for the test's other writer (a bound, never reached)
HOLD_SECONDS = 30.0


@contextlib.contextmanager
def _written_while_held(held: Rule, write: Callable[[], None]) -> Iterator[None]:
    """Within the block, once the request ``held`` holds arrives, ``write`` runs (another
    writer, straight to the store), and the request goes on after it."""

    def write_meanwhile() -> None:
        try:
            assert held.arrived.wait(HOLD_SECONDS)
            write()
        finally:
            held.release()

    writer = threading.Thread(target=write_meanwhile)
    writer.start()
    try:
        yield
    finally:
        writer.join()


def _commit_record(step: int, attempt: str) -> bytes:
    return json.dumps({"attempt": attempt, "step": step}, sort_keys=True).encode()


def test_an_overwrite_whose_commit_another_writer_replaced_meanwhile_is_refused(
    s3_server: S3Server, s3_url: str
) -> None:
    """ "overwrite=True replaces COMMIT with If-Match on the ETag it read": a COMMIT another
    writer put between that read and the replacement stays, and the overwrite fails with
    ``ConcurrentCommit``."""
    direct = s3_server.storage_options()
    other = _commit_record(2, "another-writer")
    with S3Proxy(s3_server.port) as proxy:
        options = s3_server.storage_options(endpoint_url=proxy.endpoint)
        with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
            manager.save(2, _state(2))

            def replace_commit() -> None:
                with ObjectStore(s3_url, direct) as store:
                    store.put_bytes(COMMIT, other)

            with (
                _written_while_held(proxy.hold("PUT", COMMIT), replace_commit),
                pytest.raises(distckpt.ConcurrentCommit),
            ):
                manager.save(2, _state(200), overwrite=True)
    with ObjectStore(s3_url, direct) as store:
        assert store.get_bytes(COMMIT) == other


def test_last_moved_by_another_writer_meanwhile_is_not_moved_back(
    s3_server: S3Server, s3_url: str
) -> None:
    """ "last / best are pointer objects replaced by compare-and-swap on the ETag read": a
    writer that commits a newer step and points ``last`` at it while this job is moving
    ``last`` keeps it; this job's stale write is refused and not made again over it."""
    direct = s3_server.storage_options()
    with S3Proxy(s3_server.port) as proxy:
        options = s3_server.storage_options(endpoint_url=proxy.endpoint)
        with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
            manager.save(1, _state(1))

            def commit_step_3() -> None:
                with ObjectStore(s3_url, direct) as store:
                    store.put_bytes("step-00000003/COMMIT", _commit_record(3, "another-writer"))
                    store.put_bytes("last", b"step-00000003\n")

            with _written_while_held(proxy.hold("PUT", "/last"), commit_step_3):
                manager.save(2, _state(2))
    with ObjectStore(s3_url, direct) as store:
        assert store.get_bytes("last") == b"step-00000003\n"
