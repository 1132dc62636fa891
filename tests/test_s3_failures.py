"""``s3://`` roots against a real S3-protocol server (moto, tests/s3server.py) when things go
wrong: a second job or a refused credential, two writers racing for one step, a store that dies
or loses objects, a job killed mid-save or that lost its lease, reads racing deletes, claims
renewed or unreadable. The everyday use is tested in ``tests/test_s3_store.py``; who holds a
root, across PID namespaces and versions, in ``tests/test_s3_holders.py``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

import distckpt
from distckpt import RootInUse, StoreAccessDenied, faults
from distckpt.lease import this_host
from distckpt.objstore import ObjectStore
from distckpt.storage import open_store, s3_lease
from tests.ranks import run_ranks, values
from tests.s3proxy import S3Proxy
from tests.s3server import S3Server
from tests.test_s3_store import JOB_TIMEOUT, _objects, _state
from tests.waiting import wait_until

pytest.importorskip("botocore")


T = TypeVar("T")


def test_a_second_job_on_the_root_is_refused(s3_server: S3Server, s3_url: str) -> None:
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options) as first:
        first.save(1, _state(1))
        with pytest.raises(RootInUse):
            distckpt.CheckpointManager(s3_url, storage_options=options)
    # released at close: the next job opens it at once
    with distckpt.CheckpointManager(s3_url, storage_options=options) as second:
        assert second.latest_step() == 1


def _with_wrong_secret(rank: int, world_size: int, url: str, options: dict[str, Any]) -> str:
    try:
        distckpt.CheckpointManager(url, storage_options=options, timeout=30)
    except StoreAccessDenied as exc:
        return type(exc).__name__
    return "opened"


def test_a_refused_credential_fails_every_rank_clearly() -> None:
    pytest.importorskip("boto3")
    server = S3Server(auth=True).start()
    try:
        url = f"s3://{server.create_bucket()}/ckpt"
        options = server.storage_options(secret="not-the-secret")
        out = values(run_ranks(_with_wrong_secret, 2, url, options, timeout=JOB_TIMEOUT))
        assert out == ["StoreAccessDenied", "StoreAccessDenied"]
    finally:
        server.stop()


def _commit_racing(store: Any, attempt: str, ready: threading.Barrier) -> str:
    from distckpt.manifest import Manifest

    area = store.begin_staging(5, attempt)
    ready.wait()
    try:
        store.commit(
            area, Manifest(step=5, world_size=1, format="torch", files={}), overwrite=False
        )
    except distckpt.CheckpointExists as exc:  # ConcurrentCommit is one, too
        return type(exc).__name__
    finally:
        store.discard_staging(area)
    return "committed"


def test_two_writers_never_both_commit_one_step(s3_server: S3Server, s3_url: str) -> None:
    from distckpt.storage import open_store

    options = s3_server.storage_options()
    stores = [open_store(s3_url, storage_options=options) for _ in range(2)]
    ready = threading.Barrier(2)
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(
            pool.map(lambda pair: _commit_racing(*pair, ready), zip(stores, ["one", "two"]))
        )
    assert sorted(outcomes)[-1] == "committed" and outcomes.count("committed") == 1
    winner = ["one", "two"][outcomes.index("committed")]
    with ObjectStore(s3_url, options) as store:
        assert json.loads(store.get_bytes("step-00000005/COMMIT"))["attempt"] == winner


def _save_after_the_server_died(
    rank: int, world_size: int, url: str, options: dict, pid: int
) -> str:
    import torch.distributed as dist

    with distckpt.CheckpointManager(url, storage_options=options, timeout=60) as manager:
        manager.save(1, _state(1))
        dist.barrier()
        if rank == 0:
            os.killpg(pid, signal.SIGKILL)
        dist.barrier()
        try:
            manager.save(2, _state(2))
        except distckpt.CheckpointError as exc:
            return type(exc).__name__
        finally:
            with contextlib.suppress(distckpt.CheckpointError):
                manager.close()
    return "saved"


def test_an_unreachable_store_fails_the_save_on_every_rank() -> None:
    server = S3Server().start()
    try:
        url = f"s3://{server.create_bucket()}/ckpt"
        options = server.storage_options(retries=2, connect_timeout=2)
        assert server._proc is not None
        out = values(
            run_ranks(
                _save_after_the_server_died,
                2,
                url,
                options,
                server._proc.pid,
                timeout=JOB_TIMEOUT,
            )
        )
        assert out == ["StoreUnavailable", "StoreUnavailable"]
    finally:
        server.stop()


def test_a_job_that_lost_the_lease_commits_nothing(s3_server: S3Server, s3_url: str) -> None:
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        manager.save(1, _state(1))
        with ObjectStore(s3_url, options) as store:  # another job took the root over
            store.put_bytes(".lease", b'{"owner": "other", "host": "h", "pid": 1, "duration": 30}')
        with pytest.raises(distckpt.LeaseLost):
            manager.save(2, _state(2))
        for change in (lambda: manager.delete(1), manager.prune, manager.gc):
            with pytest.raises(distckpt.LeaseLost):
                change()
        assert manager.steps() == [1]
    assert not any(name.startswith("step-00000002/") for name in _objects(s3_url, options))


def _killed_mid_save(rank: int, world_size: int, url: str, options: dict[str, Any]) -> None:
    manager = distckpt.CheckpointManager(url, storage_options=options)
    manager.save(1, _state(1))
    faults.arm("after_shard_write", "kill")  # SIGKILL after its files are uploaded
    manager.save(2, _state(2))


def test_a_killed_job_is_taken_over_at_once_and_its_save_collected(
    s3_server: S3Server, s3_url: str
) -> None:
    options = s3_server.storage_options()
    run_ranks(_killed_mid_save, 0, s3_url, options, timeout=JOB_TIMEOUT, expect_killed=True)
    left = _objects(s3_url, options)
    assert any(name.startswith("step-00000002/") for name in left)  # uploaded, never committed
    assert any(name.startswith(".writers/") for name in left)
    # its holder is a dead process of this machine: no wait for the lease to expire
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        assert manager.steps() == [1]
    names = _objects(s3_url, options)
    assert not any(name.startswith(("step-00000002/", ".writers/")) for name in names), names


def test_a_damaged_commit_object_is_skipped_and_reported(s3_server: S3Server, s3_url: str) -> None:
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        manager.save(1, _state(1))
        manager.save(2, _state(2))
        with ObjectStore(s3_url, options) as store:
            store.put_bytes("step-00000002/COMMIT", b"not a commit record")
        assert manager.latest_step() == 1
        assert manager.restore("last").step == 1  # type: ignore[union-attr]
    report = distckpt.verify(s3_url, storage_options=options)
    assert not report.ok and "not a commit record" in str(report)
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        assert manager.gc() == []  # which save it names is unknown: nothing of it is removed
        manager.delete(2)
        assert manager.gc() != [] and manager.steps() == [1]
    assert not any(name.startswith("step-00000002/") for name in _objects(s3_url, options))


def _read_to_its_end_here(path: Path) -> bool:
    """Whether a descriptor of this process has ``path`` open and has read all of it (the
    descriptor's offset, from /proc/self/fdinfo, is the file's size): a spool follower has
    taken every byte of the file as it is now."""
    size, target = path.stat().st_size, os.fspath(path.resolve())
    for descriptor in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{descriptor}") != target:
                continue
            info = Path(f"/proc/self/fdinfo/{descriptor}").read_text().splitlines()
        except FileNotFoundError:  # closed meanwhile
            continue
        offsets = [int(line.split()[1]) for line in info if line.startswith("pos:")]
        if offsets == [size]:
            return True
    return False


def test_a_spool_is_uploaded_as_written_and_checked_against_the_records(
    s3_server: S3Server, s3_url: str, tmp_path: Path
) -> None:
    from distckpt.checksums import ChecksumWriter, file_checksum
    from distckpt.manifest import FileRecord
    from distckpt.storage.s3_spool import SpoolUploads

    options = s3_server.storage_options()
    with ObjectStore(s3_url, options) as store:
        uploads = SpoolUploads(store, tmp_path, "save/")
        records = {}
        for name in ("kept", "rewritten", "removed"):
            with ChecksumWriter(tmp_path / name, fsync=False) as writer:
                writer.write(name.encode() * 1000)
            records[name] = FileRecord(size=writer.size, checksum=writer.checksum, rank=0)
        files = [tmp_path / name for name in records]
        wait_until(lambda: all(map(_read_to_its_end_here, files)), "every file followed", 30)
        rewritten = tmp_path / "rewritten"
        rewritten.write_bytes(b"other bytes, same name")  # in place, shorter
        records["rewritten"] = FileRecord(size=22, checksum=file_checksum(rewritten), rank=0)
        (tmp_path / "removed").unlink()
        del records["removed"]
        done = uploads.finish(records)
        assert "kept" in done and "removed" not in done
        assert store.get_bytes("save/kept") == b"kept" * 1000
        # a file changed after it was followed does not match its record: left to upload again
        assert "rewritten" not in done
        assert "save/removed" not in {info.key for info in store.list("save/")}


def _save_losing_rank_1_object(
    rank: int, world_size: int, url: str, options: dict[str, Any]
) -> tuple[str, int | None, int | None, int | None, list[int]]:
    def lose_own_upload(event: distckpt.events.PhaseEvent) -> None:
        # Rank 1's file is in the store once its write ends; losing it before rank 0's commit
        # checks the staged objects is what a store that dropped the object looks like.
        if event.phase == "save.write" and event.ok:
            with ObjectStore(url, options) as store:
                store.delete([i.key for i in store.list() if i.key.endswith("rank-00001.pt")])

    with distckpt.CheckpointManager(url, storage_options=options, timeout=60) as manager:
        remove = distckpt.events.add_listener(lose_own_upload) if rank == 1 else lambda: None
        try:
            manager.save(1, {"w": torch.ones(1000)})
        except distckpt.StagedFileMismatch as exc:
            assert exc.path is not None and exc.path.endswith("rank-00001.pt")
            # and what this rank's manager lists after the failed save
            steps = manager.steps()
            return type(exc).__name__, exc.rank, exc.written_bytes, exc.found_bytes, steps
        finally:
            remove()
    raise AssertionError("a save whose rank 1 object is gone was committed")


def test_a_staged_object_lost_before_the_commit_fails_the_save_on_every_rank(
    s3_server: S3Server, s3_url: str
) -> None:
    options = s3_server.storage_options()
    out = values(run_ranks(_save_losing_rank_1_object, 2, s3_url, options, timeout=JOB_TIMEOUT))
    for error_type, rank, written, found, steps in out:
        assert (error_type, rank, found) == ("StagedFileMismatch", 1, None)
        assert written is not None and written > 4000
        assert steps == []  # nothing committed, as every rank's manager sees it
    assert not any(key.startswith("step-00000001/") for key in _objects(s3_url, options))


def test_gc_beside_a_save_that_commits_meanwhile_keeps_the_committed_checkpoint(
    s3_server: S3Server, s3_url: str
) -> None:
    # The interleaving made exact: gc looks at step 2's save while its COMMIT is on the way,
    # the save commits and deletes its claim, and only then does gc's read of a claim answer.
    removed: list[Any] = []
    with S3Proxy(s3_server.port) as job_proxy, S3Proxy(s3_server.port) as gc_proxy:
        commit_on_the_way = job_proxy.hold("PUT", "step-00000002/COMMIT")
        claim_read = gc_proxy.hold("GET", "/.writers/")

        def gc() -> None:
            commit_on_the_way.arrived.wait(30)
            store = open_store(
                s3_url, storage_options=s3_server.storage_options(endpoint_url=gc_proxy.endpoint)
            )
            removed.extend(store.collect_leftovers())

        def release_the_commit() -> None:
            claim_read.arrived.wait(30)
            commit_on_the_way.release()

        threads = [threading.Thread(target=gc), threading.Thread(target=release_the_commit)]
        for thread in threads:
            thread.start()
        job_options = s3_server.storage_options(endpoint_url=job_proxy.endpoint)
        with distckpt.CheckpointManager(s3_url, storage_options=job_options) as manager:
            manager.save(1, _state(1))
            assert manager.save(2, _state(2)) is not None
            claim_read.release()  # the save is done: its claim is gone
            for thread in threads:
                thread.join(60)
            assert claim_read.arrived.is_set() and removed == []
            assert manager.steps() == [1, 2]
        names = _objects(s3_url, s3_server.storage_options())
        assert "step-00000002/COMMIT" in names
        assert any(
            name.startswith("step-00000002/") and name.endswith("/manifest.json") for name in names
        )


def _with_step_2_changed_between_head_and_get(
    server: S3Server,
    url: str,
    read: Callable[[str, dict[str, Any]], T],
    change: Callable[[], None] | None = None,
) -> tuple[T, list[tuple[str, str, int]]]:
    """``read(url, storage_options)`` of a root holding steps 1 and 2, through a proxy that
    holds the GET of step 2's shard (after its HEAD) while ``change`` runs (by default: step 2
    removed as retention does, ``COMMIT`` first); what it returned, and the proxy's log."""
    options = server.storage_options()
    with distckpt.CheckpointManager(url, storage_options=options, format="torch") as manager:
        manager.save(1, _state(1))
        manager.save(2, _state(2))

    def delete_step_2() -> None:
        with ObjectStore(url, options) as store:
            saved = [i.key for i in store.list("step-00000002/") if not i.key.endswith("COMMIT")]
            store.delete(["step-00000002/COMMIT"])
            store.delete(saved)

    with S3Proxy(server.port) as proxy:
        shard_get = proxy.hold("GET", "step-00000002/", "rank-00000.pt")
        with shard_get.changed_meanwhile(change or delete_step_2):
            result = read(url, server.storage_options(endpoint_url=proxy.endpoint))
        return result, proxy.log


def _restore_last(url: str, options: dict[str, Any]) -> distckpt.Checkpoint | None:
    """A restore of ``last`` by a read-only manager (no lease: others may write meanwhile)."""
    with distckpt.CheckpointManager(
        url, storage_options=options, format="torch", read_only=True
    ) as manager:
        return manager.restore("last", state={"w": torch.zeros(4), "step": 0})


def test_a_checkpoint_deleted_between_a_reads_head_and_get_falls_back_to_the_older_step(
    s3_server: S3Server, s3_url: str
) -> None:
    restored, log = _with_step_2_changed_between_head_and_get(s3_server, s3_url, _restore_last)
    assert restored is not None and restored.step == 1
    step_2_shard = [(method, status) for method, path, status in log if "00000002/" in path]
    assert ("HEAD", 200) in step_2_shard and ("GET", 404) in step_2_shard


def test_a_checkpoint_overwritten_while_it_is_read_is_read_again_as_overwritten(
    s3_server: S3Server, s3_url: str
) -> None:
    """ "a reader sees the old checkpoint or the new one": the save of step 2 that another
    job's overwrite replaced while a restore read it has vanished, not turned damaged; the
    restore reads the step again and loads the new save."""

    def overwrite() -> None:  # another job's, with other values
        options = s3_server.storage_options()
        with distckpt.CheckpointManager(s3_url, storage_options=options, format="torch") as job:
            job.save(2, _state(7), overwrite=True)

    restored, _ = _with_step_2_changed_between_head_and_get(
        s3_server, s3_url, _restore_last, overwrite
    )
    assert restored is not None and restored.step == 2
    assert torch.equal(restored.state["w"], _state(7)["w"])


def test_verify_takes_a_checkpoint_deleted_between_a_reads_head_and_get_for_gone_not_damaged(
    s3_server: S3Server, s3_url: str
) -> None:
    def verify(url: str, options: dict[str, Any]) -> distckpt.VerifyReport:
        return distckpt.verify(url, storage_options=options)

    # Retention deleting a checkpoint while verify reads it is no damage: the object is found
    # missing (not a refused precondition), the checkpoint gone, and only step 1 is reported.
    report, _ = _with_step_2_changed_between_head_and_get(s3_server, s3_url, verify)
    (only,) = report.checkpoints
    assert only.ok and only.step == 1  # (`last` still names step 2: the test deleted it)


def test_a_claim_renewed_while_its_save_ends_is_not_left_behind(
    s3_server: S3Server, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Renewals every second, so that one comes while the save's COMMIT is held. Patched in:
    # the real 30 s lease would keep this test waiting for minutes; the renewals are real.
    monkeypatch.setattr(s3_lease, "LEASE_SECONDS", 3.0)
    with S3Proxy(s3_server.port) as proxy:
        commit = proxy.hold("PUT", "step-00000001/COMMIT")
        renewal = proxy.hold("PUT", "/.writers/", skip=1)  # the first PUT creates the claim

        def claim_writes() -> int:
            return sum(
                1 for method, path, _ in proxy.log if method == "PUT" and ".writers/" in path
            )

        def release_in_the_racy_order() -> None:
            renewal.arrived.wait(30)  # the renewer is writing the claim
            commit.release()
            # the save ending deletes the claim once the renewer gave up on that write (its
            # request times out); the write reaches the store only after that delete
            assert proxy.wait_for("POST", "?delete", timeout=30)
            written_before = claim_writes()
            renewal.release()
            deadline = time.monotonic() + 30
            while claim_writes() == written_before and time.monotonic() < deadline:
                time.sleep(0.05)  # until the store answered the late write

        releaser = threading.Thread(target=release_in_the_racy_order)
        releaser.start()
        options = s3_server.storage_options(endpoint_url=proxy.endpoint)
        with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
            manager.save(1, _state(1))
            releaser.join(30)
            assert renewal.arrived.is_set()
            claims = [n for n in _objects(s3_url, s3_server.storage_options()) if "writers" in n]
            assert claims == []


def test_a_commit_applied_whose_answer_was_lost_is_a_commit(
    s3_server: S3Server, s3_url: str
) -> None:
    # The client retries the COMMIT create; the store refuses the retry (the first try made
    # it), and what it refused for is this save's own commit.
    with S3Proxy(s3_server.port) as proxy:
        lost_answer = proxy.drop("PUT", "step-00000010/COMMIT")
        options = s3_server.storage_options(endpoint_url=proxy.endpoint)
        with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
            saved = manager.save(10, _state(10))
            assert lost_answer.arrived.is_set()
            assert saved is not None and saved.step == 10
            assert manager.steps() == [10]


def test_gc_that_cannot_read_a_claim_stops_instead_of_removing_the_save(
    s3_server: S3Server, s3_url: str
) -> None:
    attempt = "a" * 32
    claim = {"attempt": attempt, "host": this_host(), "pid": os.getpid()}
    claim["expires_unix"] = time.time() + 30  # a live writer (this process), mid-save
    staged = f"step-00000001/{attempt}/rank-00000.pt"
    with ObjectStore(s3_url, s3_server.storage_options()) as store:
        store.put_bytes(f".writers/{attempt}", json.dumps(claim).encode())
        store.put_bytes(staged, b"staged")
    with S3Proxy(s3_server.port) as proxy:
        # every answer to the claim's read is lost; one attempt a request: more would only be
        # lost the same way, each after a backoff
        lost = proxy.drop("GET", "/.writers/", times=10)
        options = s3_server.storage_options(endpoint_url=proxy.endpoint, retries=1)
        gc = open_store(s3_url, storage_options=options)
        with pytest.raises(distckpt.StoreUnavailable):
            gc.collect_leftovers()
        assert lost.arrived.is_set()  # it failed reading the claim, not before
    assert staged in _objects(s3_url, s3_server.storage_options())


@pytest.mark.parametrize(
    "refused",
    [
        ("GET", "step-00000002/COMMIT"),
        ("GET", "prefix=ckpt%2Fstep-00000002%2F"),
        ("POST", "?delete"),
    ],
    ids=["commit-read", "listing", "claim-delete"],
)
def test_a_failed_saves_discard_tries_each_request_once(
    s3_server: S3Server, refused: tuple[str, str]
) -> None:
    """Removing a failed save is best effort (what it leaves is gc's): on a store that stopped
    answering it must not add a whole retry budget per request to the save's failure."""
    url = f"s3://{s3_server.create_bucket()}/ckpt"
    with S3Proxy(s3_server.port) as proxy:
        options = s3_server.storage_options(endpoint_url=proxy.endpoint, retries=3)
        with distckpt.CheckpointManager(url, storage_options=options) as manager:
            proxy.fail("PUT", "rank-00000", status=403)  # not retried: the save fails at once
            proxy.fail(*refused, status=503, times=100)
            with pytest.raises(StoreAccessDenied):
                manager.save(2, _state(2))
            method, part = refused
            sent = [path for sent_method, path, _ in proxy.log if sent_method == method]
            assert sum(part in path for path in sent) == 1, proxy.log
