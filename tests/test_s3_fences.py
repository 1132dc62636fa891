"""What fences a writer of an ``s3://`` root against another (docs/object-stores.md): a
conditional write that loses a race, exactly timed by the proxy (tests/s3proxy.py) holding a
request while another writer changes the object. Two writers racing to create a step, and a
job whose lease was taken, are in ``tests/test_s3_failures.py``."""

from __future__ import annotations

import json

import pytest

import distckpt
from distckpt.objstore import ObjectStore
from tests.s3proxy import S3Proxy
from tests.s3server import S3Server
from tests.test_s3_store import _state

pytest.importorskip("botocore")

COMMIT = "step-00000002/COMMIT"


def _save_while_another_writer_writes(
    s3_server: S3Server,
    s3_url: str,
    *,
    first_step: int,
    held: str,
    written: dict[str, bytes],
    step: int,
    overwrite: bool = False,
) -> None:
    """A job saves ``first_step``, then ``step`` (with ``overwrite``), through the proxy,
    which holds the second save's first ``PUT`` whose path holds ``held`` until another
    writer has put the objects ``written`` straight to the store."""
    direct = s3_server.storage_options()
    with S3Proxy(s3_server.port) as proxy:
        options = s3_server.storage_options(endpoint_url=proxy.endpoint)
        with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
            manager.save(first_step, _state(first_step))

            def write() -> None:
                with ObjectStore(s3_url, direct) as store:
                    for name, data in written.items():
                        store.put_bytes(name, data)

            with proxy.hold("PUT", held).changed_meanwhile(write):
                manager.save(step, _state(step), overwrite=overwrite)


def _commit_record(step: int, attempt: str) -> bytes:
    return json.dumps({"attempt": attempt, "step": step}, sort_keys=True).encode()


def _object(s3_server: S3Server, s3_url: str, name: str) -> bytes:
    with ObjectStore(s3_url, s3_server.storage_options()) as store:
        return store.get_bytes(name)


def test_an_overwrite_whose_commit_another_writer_replaced_meanwhile_is_refused(
    s3_server: S3Server, s3_url: str
) -> None:
    """ "overwrite=True replaces COMMIT with If-Match on the ETag it read": a COMMIT another
    writer put between that read and the replacement stays, and the overwrite fails with
    ``ConcurrentCommit``."""
    other = _commit_record(2, "another-writer")
    with pytest.raises(distckpt.ConcurrentCommit):
        _save_while_another_writer_writes(
            s3_server,
            s3_url,
            first_step=2,
            held=COMMIT,
            written={COMMIT: other},
            step=2,
            overwrite=True,
        )
    assert _object(s3_server, s3_url, COMMIT) == other


def test_last_moved_by_another_writer_meanwhile_is_not_moved_back(
    s3_server: S3Server, s3_url: str
) -> None:
    """ "last / best are pointer objects replaced by compare-and-swap on the ETag read": a
    writer that commits a newer step and points ``last`` at it while this job is moving
    ``last`` keeps it; this job's stale write is refused and not made again over it."""
    newer = {
        "step-00000003/COMMIT": _commit_record(3, "another-writer"),
        "last": b"step-00000003\n",
    }
    _save_while_another_writer_writes(
        s3_server, s3_url, first_step=1, held="/last", written=newer, step=2
    )
    assert _object(s3_server, s3_url, "last") == b"step-00000003\n"
