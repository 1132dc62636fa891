"""What fences a writer of an ``s3://`` root against another (docs/object-stores.md): a
conditional write that loses a race, exactly timed by the proxy (tests/s3proxy.py) holding a
request while another writer changes the object. Two writers racing to create a step, and a
job whose lease was taken, are in ``tests/test_s3_failures.py``; a set-aside by one is here."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

import distckpt
from distckpt.objstore import ObjectStore
from distckpt.storage import open_store
from distckpt.storage.s3_root import LEASE_NAME, CommitRecord
from tests.s3proxy import S3Proxy
from tests.s3server import S3Server
from tests.set_aside_jobs import DAMAGED, s3_save_90_and_damaged_100
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


@pytest.fixture(scope="module")
def saved_once(s3_server: S3Server) -> tuple[str, str]:
    """Steps 90 and 100 saved, step 100 damaged (``s3_save_90_and_damaged_100``), once for
    the removal cases, which each copy it inside the store (a save is most of a case's time):
    the root, and step 100's attempt."""
    root = f"s3://{s3_server.create_bucket()}/saved"
    attempt, _ = s3_save_90_and_damaged_100(root, s3_server.storage_options())
    return root, attempt


def _copy_of(root: str, name: str, options: dict) -> str:
    """A root ``name`` beside ``root`` (in its bucket) holding a copy of every object of it."""
    bucket, prefix = root.removeprefix("s3://").split("/", 1)
    with ObjectStore(f"s3://{bucket}", options) as store:
        for info in list(store.list(f"{prefix}/")):
            store.copy(info.key, f"{name}/{info.key.removeprefix(prefix + '/')}", info.size)
    return f"s3://{bucket}/{name}"


@pytest.mark.parametrize(
    ("removal", "taken"),
    [
        ("set_aside", "before"),
        ("set_aside", "during-the-copy"),
        ("set_aside", "while-moving-last"),
        ("set_aside", "while-deleting-the-commit"),
        ("delete", "while-deleting-the-commit"),
    ],
)
def test_a_removal_by_a_job_whose_lease_was_taken_leaves_the_step_and_last_alone(
    s3_server: S3Server, saved_once: tuple[str, str], removal: str, taken: str
) -> None:
    """A restore's set-aside of a damaged step checks the lease before it writes anything, and
    again once its copy is made (which may take half the manager's timeout) before it moves
    ``last`` or removes the step's ``COMMIT``; a pointer's compare-and-swap refused meanwhile
    checks it again, and the ``COMMIT`` goes only if it is still the version read before the
    check (as for a delete). A job whose lease another job took before or during any of that
    fails with ``LeaseLost`` and leaves the step committed and ``last`` where the other job
    put it (here on its own save of that step)."""
    direct = s3_server.storage_options()
    template, attempt = saved_once
    s3_url = _copy_of(template, f"{removal}-{taken}", direct)
    takers = {
        LEASE_NAME: json.dumps({"owner": "other", "host": "h", "pid": 1, "duration": 30}).encode(),
        f"{DAMAGED}/COMMIT": CommitRecord.encode(100, "another-job"),
        "last": f"{DAMAGED}\n".encode(),
    }

    def take_the_root() -> None:  # another job's, straight to the store
        with ObjectStore(s3_url, direct) as store:
            for name, data in takers.items():
                store.put_bytes(name, data)

    held_request = {
        "during-the-copy": ("PUT", f"damaged-{DAMAGED}-{attempt}/"),
        "while-moving-last": ("PUT", "/last"),
        "while-deleting-the-commit": ("DELETE", f"{DAMAGED}/COMMIT"),
    }
    with S3Proxy(s3_server.port) as proxy:
        options = s3_server.storage_options(endpoint_url=proxy.endpoint)
        fenced = open_store(s3_url, storage_options=options, lock_timeout=60)
        fenced.open()

        def remove() -> None:
            if removal == "delete":
                fenced.delete(100)
            else:
                fenced.set_aside(100, f"{s3_url}/{DAMAGED}")

        try:
            if taken == "before":
                take_the_root()
                with pytest.raises(distckpt.LeaseLost):
                    remove()
            else:
                held = proxy.hold(*held_request[taken])
                with held.changed_meanwhile(take_the_root), pytest.raises(distckpt.LeaseLost):
                    remove()
        finally:
            fenced.close()
    with ObjectStore(s3_url, direct) as store:
        for name in (f"{DAMAGED}/COMMIT", "last"):
            assert store.get_bytes(name) == takers[name], name
        copied = [info.key for info in store.list() if info.key.startswith("damaged-")]
    assert copied == [] or taken != "before"  # nothing written before the first check


def test_a_delete_whose_commit_another_writer_replaced_says_the_step_is_still_committed(
    s3_server: S3Server, s3_url: str
) -> None:
    """A delete run as the CLI runs it (a store never opened: no lease of its own to lose)
    whose step's COMMIT another writer replaced after it was read leaves that COMMIT, and
    says so with ``ConcurrentCommit`` naming the step, not with a bare 412. The next start
    points ``last`` at the step again."""
    direct = s3_server.storage_options()
    with S3Proxy(s3_server.port) as proxy:
        options = s3_server.storage_options(endpoint_url=proxy.endpoint)
        with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
            manager.save(1, _state(1))
            manager.save(2, _state(2))
        store = open_store(s3_url, storage_options=options, lock_timeout=60)
        with ObjectStore(s3_url, direct) as reader:
            # the same save, in other bytes: another version (ETag) of the same COMMIT
            other = json.dumps(json.loads(reader.get_bytes(COMMIT)), indent=1).encode()

        def replace_commit() -> None:
            with ObjectStore(s3_url, direct) as writer:
                writer.put_bytes(COMMIT, other)

        held = proxy.hold("DELETE", COMMIT)
        refused = pytest.raises(distckpt.ConcurrentCommit, match="still committed")
        with held.changed_meanwhile(replace_commit), refused as raised:
            store.delete(2)
    assert raised.value.step == 2 and str(raised.value.path).endswith("/step-00000002")
    with ObjectStore(s3_url, direct) as reader:
        assert reader.get_bytes(COMMIT) == other
        assert reader.get_bytes("last") == b"step-00000001\n"  # moved off before the DELETE
        with distckpt.CheckpointManager(s3_url, storage_options=direct) as manager:
            assert manager.steps() == [1, 2]
        assert reader.get_bytes("last") == b"step-00000002\n"
