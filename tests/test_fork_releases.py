"""A forked child of a writer (a data loader worker, a pool) that releases what it inherited
releases nothing of its parent's: a writer lock keeps its file and stays held, a root's lease
record keeps naming the parent, and an ``s3://`` store's lease object stays the parent's. Each
child calls the release itself, as code run in it may (a ``finally`` block, an exit hook), then
ends with ``os._exit`` so that nothing of the test process runs in it.

A child that merely exits keeps nothing of its parent's either: ``tests/test_lease_forks.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

import distckpt
from distckpt.lease import RootLease, read_holder
from distckpt.lock import WriterLock
from distckpt.objlease import LeaseRecord
from distckpt.objstore import ObjectStore
from distckpt.storage import open_store
from distckpt.storage.s3_root import LEASE_NAME
from tests.s3server import S3Server


def _in_a_forked_child(release: Callable[[], None]) -> None:
    """Run ``release`` in a forked child of this process; its failure fails the test."""
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try:
            release()
        except BaseException:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child's release raised"


def test_a_forked_child_releasing_a_writer_lock_leaves_the_parents_held(tmp_path: Path) -> None:
    staging = tmp_path / "step-00000001.feedface"
    writer = WriterLock(staging)
    writer.acquire()
    try:
        _in_a_forked_child(writer.release)
        assert writer.path.exists()
        assert WriterLock.writer_is_alive(staging)  # a cleanup keeps the parent's staging dir
    finally:
        writer.release()
    assert not writer.path.exists() and not WriterLock.writer_is_alive(staging)


def test_a_forked_child_releasing_a_roots_lease_leaves_the_parent_its_holder(
    tmp_path: Path,
) -> None:
    with RootLease.acquire(tmp_path) as lease:
        _in_a_forked_child(lease.release)
        lease.check_current()  # still the root's current lease: the record is not released
        holder = read_holder(tmp_path)
        assert holder is not None and holder.pid == os.getpid() and holder.alive


def test_a_forked_child_closing_an_s3_store_leaves_the_parent_its_lease(
    s3_server: S3Server, s3_url: str
) -> None:
    pytest.importorskip("botocore")
    options = s3_server.storage_options()
    store = open_store(s3_url, storage_options=options)
    store.open()
    try:
        _in_a_forked_child(store.close)
        with ObjectStore(s3_url, options) as direct:
            record = LeaseRecord.decode(direct.get_bytes(LEASE_NAME))
        assert record is not None and record.pid == os.getpid() and not record.released
        assert store.prune() == []  # the lease's check passes: still the parent's
    finally:
        store.close()
    with pytest.raises(distckpt.LeaseLost):  # closed in this process: it commits nothing more
        store.prune()
