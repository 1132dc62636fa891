"""``s3://`` checkpoint roots against a real S3-protocol server (moto, tests/s3server.py):
the object-store implementation of the storage seam, through the public API."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

import distckpt
from distckpt import CheckpointNotFound, CorruptCheckpoint, RootInUse, StoreAccessDenied, faults
from distckpt.errors import InjectedFault
from distckpt.lease import this_host, this_process_host
from distckpt.manifest import MANIFEST_CHECKSUM_KEY
from distckpt.objstore import ObjectStore
from distckpt.storage import open_store, s3_lease
from distckpt.storage.s3_view import S3RootView
from tests.ranks import run_ranks, values
from tests.s3proxy import S3Proxy
from tests.s3server import S3Server
from tests.waiting import wait_until

pytest.importorskip("botocore")

T = TypeVar("T")

JOB_TIMEOUT = 120.0


def _objects(url: str, options: dict[str, Any]) -> dict[str, int]:
    """Every object under the root, by name relative to it, with its size."""
    with ObjectStore(url, options) as store:
        return {info.key: info.size for info in store.list()}


def _state(step: int) -> dict[str, Any]:
    return {"w": torch.arange(4.0) + step, "step": step}


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_save_and_restore_in_one_process(s3_server: S3Server, s3_url: str, fmt: str) -> None:
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options, format=fmt) as manager:
        first = manager.save(10, _state(10))
        manager.save(20, _state(20), metrics={"loss": 0.5})
        assert first is not None and first.path == f"{s3_url}/step-00000010"
        assert manager.steps() == [10, 20] and manager.latest_step() == 20
        assert [info.path for info in manager.checkpoints()] == [
            f"{s3_url}/step-00000010",
            f"{s3_url}/step-00000020",
        ]
        template = {"w": torch.zeros(4), "step": 0}
        restored = manager.restore("last", state=template)
        assert restored is not None and restored.step == 20
        assert torch.equal(template["w"], torch.arange(4.0) + 20)
        older = manager.restore(10, state={"w": torch.zeros(4), "step": 0})
        assert older is not None and torch.equal(older.state["w"], torch.arange(4.0) + 10)
    names = _objects(s3_url, options)
    assert "step-00000020/COMMIT" in names and "last" in names
    # every object of a save lies under its own prefix next to the commit object
    assert all(
        name.count("/") >= 2 for name in names if name.startswith("step-") and "COMMIT" not in name
    )


def _two_ranks(rank: int, world_size: int, url: str, options: dict[str, Any], fmt: str) -> Any:
    # "torch" keeps each rank's own state; "dcp" saves one (replicated) state
    value = rank if fmt == "torch" else 0
    with distckpt.CheckpointManager(url, storage_options=options, format=fmt) as manager:
        for step in (1, 2):
            manager.save(step, {"w": torch.full((3,), float(step * 10 + value))})
        template = {"w": torch.zeros(3)}
        restored = manager.restore("last", state=template)
        assert restored is not None
        return restored.step, template["w"].tolist(), manager.steps()


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_two_ranks_save_and_restore(s3_server: S3Server, s3_url: str, fmt: str) -> None:
    options = s3_server.storage_options()
    out = values(run_ranks(_two_ranks, 2, s3_url, options, fmt, timeout=JOB_TIMEOUT))
    if fmt == "torch":
        assert out == [(2, [20.0] * 3, [1, 2]), (2, [21.0] * 3, [1, 2])]
        assert "step-00000002/" in "".join(_objects(s3_url, options))
    else:
        assert out == [(2, [20.0] * 3, [1, 2])] * 2


def _async_job(rank: int, world_size: int, url: str, options: dict[str, Any]) -> Any:
    with distckpt.CheckpointManager(url, storage_options=options, async_save=True) as manager:
        pending = manager.save(5, {"w": torch.full((2,), float(rank))})
        assert pending is not None and not pending.done
        done = manager.wait()
        assert done is not None and done.done
        loaded = manager.restore("last")
        assert loaded is not None
        return done.path, loaded.state["w"].tolist()


def test_async_save_on_two_ranks(s3_server: S3Server, s3_url: str) -> None:
    options = s3_server.storage_options()
    out = values(run_ranks(_async_job, 2, s3_url, options, timeout=JOB_TIMEOUT))
    assert out == [(f"{s3_url}/step-00000005", [0.0, 0.0]), (f"{s3_url}/step-00000005", [1.0, 1.0])]


def test_retention_keeps_last_and_best_and_deletes_commit_objects(
    s3_server: S3Server, s3_url: str
) -> None:
    options = s3_server.storage_options()
    losses = {1: 0.5, 2: 0.1, 3: 0.3, 4: 0.4}
    with distckpt.CheckpointManager(
        s3_url, storage_options=options, keep_last=1, keep_best=1, monitor="loss"
    ) as manager:
        for step, loss in losses.items():
            manager.save(step, _state(step), metrics={"loss": loss})
        assert manager.steps() == [2, 4] and manager.best_step() == 2
        best = manager.restore("best")
        assert best is not None and best.step == 2
    loaded = distckpt.load_checkpoint(f"{s3_url}/best", storage_options=options)
    assert loaded.step == 2 and torch.equal(loaded.state["w"], torch.arange(4.0) + 2)
    names = _objects(s3_url, options)
    assert not any(name.startswith(("step-00000001/", "step-00000003/")) for name in names)
    with ObjectStore(s3_url, options) as store:
        assert store.get_bytes("last") == b"step-00000004\n"
        assert store.get_bytes("best") == b"step-00000002\n"


def test_a_delete_unpublishes_the_commit_object_before_the_data(
    s3_server: S3Server, s3_url: str
) -> None:
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        for step in (1, 2):
            manager.save(step, _state(step))
        faults.arm("during_delete", "raise")
        with pytest.raises(InjectedFault):
            manager.delete(2)
        faults.disarm()
        # stopped between the two: the commit object is gone, the data still there
        names = _objects(s3_url, options)
        assert "step-00000002/COMMIT" not in names
        assert any(name.startswith("step-00000002/") for name in names)
        assert manager.steps() == [1] and manager.latest_step() == 1
        assert _objects(s3_url, options)["last"] == len(b"step-00000001\n")
        removed = manager.gc()
        assert [location.rsplit("/", 2)[-2] for location in map(str, removed)] == ["step-00000002"]
    assert not any(name.startswith("step-00000002/") for name in _objects(s3_url, options))


def test_delete_and_prune(s3_server: S3Server, s3_url: str) -> None:
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        for step in (1, 2, 3):
            manager.save(step, _state(step))
        manager.delete(3)
        assert manager.steps() == [1, 2]
        with pytest.raises(CheckpointNotFound):
            manager.delete(3)
        assert manager.restore("last").step == 2  # type: ignore[union-attr]
    with distckpt.CheckpointManager(
        s3_url, storage_options=options, keep_last=1, every_n_steps=4, link="symlink", fsync=True
    ) as manager:
        assert manager.prune() == [1]
        assert manager.steps() == [2]
        assert manager.save(3, _state(3)) is None  # the schedule says no
        assert manager.should_save(4) and manager.save(4, _state(4)) is not None
        assert manager.steps() == [4]
    assert _objects(s3_url, options)["last"] == len(b"step-00000004\n")  # a pointer object


def test_overwrite_replaces_the_checkpoint(s3_server: S3Server, s3_url: str) -> None:
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        manager.save(7, {"w": torch.zeros(2)})
        with pytest.raises(distckpt.CheckpointExists):
            manager.save(7, {"w": torch.ones(2)})
        manager.save(7, {"w": torch.ones(2)}, overwrite=True)
        loaded = manager.restore(7)
        assert loaded is not None and loaded.state["w"].tolist() == [1.0, 1.0]
    attempts = {name.split("/")[1] for name in _objects(s3_url, options) if "/" in name}
    attempts.discard("COMMIT")
    assert len(attempts) == 1  # the replaced save's objects are gone


def _save_steps(url: str, options: dict[str, Any], *steps: int) -> None:
    with distckpt.CheckpointManager(url, storage_options=options) as manager:
        for step in steps:
            manager.save(step, _state(step))


def _write_attempt(url: str, options: dict[str, Any], step: int, attempt: str) -> None:
    """Objects of a save that never committed (what a killed writer leaves)."""
    with ObjectStore(url, options) as store:
        store.put_bytes(f"step-{step:08d}/{attempt}/rank-00000.pt", b"x" * 10)


def test_gc_removes_a_dead_writers_save_but_not_a_live_one(
    s3_server: S3Server, s3_url: str
) -> None:
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        manager.save(1, _state(1))
        claims = {
            "dead": None,  # no claim at all
            "live": (this_host(), os.getpid(), 4e9),  # alive: this process
            # on another machine: its expiry is trusted for 60 s more (clock skew)
            "late": ("elsewhere", 1, time.time() - 10),
            "expired": ("elsewhere", 1, time.time() - 120),
        }
        with ObjectStore(s3_url, options) as store:
            for attempt, claim in claims.items():
                _write_attempt(s3_url, options, 2, attempt)
                if claim is not None:
                    host, pid, expires = claim
                    record = {"attempt": attempt, "host": host, "pid": pid, "expires_unix": expires}
                    store.put_bytes(f".writers/{attempt}", json.dumps(record).encode())
        removed = manager.gc()
        assert sorted(removed) == [f"{s3_url}/step-00000002/{a}" for a in ("dead", "expired")]
        names = _objects(s3_url, options)
        assert {name.split("/")[1] for name in names if name.startswith("step-00000002/")} == {
            "live",
            "late",
        }
        assert manager.steps() == [1]


def test_a_step_without_its_commit_object_is_not_committed(
    s3_server: S3Server, s3_url: str
) -> None:
    options = s3_server.storage_options()
    _save_steps(s3_url, options, 1, 2)
    with ObjectStore(s3_url, options) as store:
        store.delete(["step-00000002/COMMIT"])  # every object of the save is still there
    loaded = distckpt.load_checkpoint(s3_url, storage_options=options)
    assert loaded.step == 1
    with pytest.raises(CheckpointNotFound):
        distckpt.load_checkpoint(f"{s3_url}/step-00000002", storage_options=options)
    with distckpt.CheckpointManager(s3_url, storage_options=options, read_only=True) as manager:
        assert manager.steps() == [1] and manager.latest_step() == 1


class _RequestCounter:
    """Counts the requests a botocore client makes, by operation, and the entries (objects
    and rolled-up prefixes) its listings return: botocore's own ``after-call`` event."""

    def __init__(self, store: ObjectStore) -> None:
        self.requests: dict[str, int] = {}
        self.listed = 0
        store.client.meta.events.register("after-call.s3", self._count)

    def _count(self, model: Any, parsed: dict[str, Any], **_: Any) -> None:
        self.requests[model.name] = self.requests.get(model.name, 0) + 1
        self.listed += len(parsed.get("Contents", [])) + len(parsed.get("CommonPrefixes", []))


def _listing_cost(url: str, options: dict[str, Any]) -> tuple[list[int], dict[str, int], int]:
    """The committed steps of the root, with the requests and listed entries that took."""
    view = S3RootView(url, options)
    counter = _RequestCounter(view.s3.client)
    try:
        return view.committed_steps(), counter.requests, counter.listed
    finally:
        view.s3.close()


def test_listing_the_steps_costs_the_same_whatever_each_step_holds(
    s3_server: S3Server, s3_url: str
) -> None:
    options = s3_server.storage_options()
    _save_steps(s3_url, options, 1, 2)
    _write_attempt(s3_url, options, 3, "uncommitted")  # a step prefix with no COMMIT
    steps, requests, listed = _listing_cost(s3_url, options)
    assert steps == [1, 2]
    # one delimited listing for the step prefixes, one HEAD per step for its COMMIT
    assert requests == {"ListObjectsV2": 1, "HeadObject": 3} and listed == 3
    # many more objects under each step (leftovers of dead writers, files of a wide save)
    with ObjectStore(s3_url, options) as store:
        for step in (1, 2, 3):
            for index in range(20):
                store.put_bytes(f"step-{step:08d}/dead/rank-{index:05d}.pt", b"x")
    assert _listing_cost(s3_url, options) == (steps, requests, listed)


def test_load_checkpoint_and_verify_by_url(s3_server: S3Server, s3_url: str) -> None:
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        manager.save(10, _state(10))
        manager.save(20, _state(20))
    for where, step in ((s3_url, 20), (f"{s3_url}/last", 20), (f"{s3_url}/step-00000010", 10)):
        loaded = distckpt.load_checkpoint(where, storage_options=options, verify=True, mmap=True)
        assert loaded.step == step and loaded.path == f"{s3_url}/step-{step:08d}"
        # memory-mapped from a downloaded file that is gone by now: still readable
        assert torch.equal(loaded.state["w"], torch.arange(4.0) + step)
        assert distckpt.verify(where, storage_options=options).ok
    report = distckpt.verify(s3_url, storage_options=options)
    assert [c.step for c in report.checkpoints] == [10, 20]

    # corrupt one object of step 20 (same size, other bytes)
    with ObjectStore(s3_url, options) as store:
        name = next(
            n
            for n in _objects(s3_url, options)
            if n.startswith("step-00000020/") and n.endswith("/rank-00000.pt")
        )
        data = bytearray(store.get_bytes(name))
        data[-1] ^= 0xFF
        store.put_bytes(name, bytes(data))
    assert not distckpt.verify(f"{s3_url}/last", storage_options=options).ok
    assert distckpt.verify(f"{s3_url}/step-00000010", storage_options=options).ok
    bad = distckpt.verify(s3_url, storage_options=options)
    assert not bad.ok and "checksum mismatch" in str(bad)
    with pytest.raises(CorruptCheckpoint):
        distckpt.load_checkpoint(f"{s3_url}/step-00000020", storage_options=options, verify=True)
    # "last" falls back past the corrupt checkpoint when checksums are checked
    assert distckpt.load_checkpoint(s3_url, storage_options=options, verify=True).step == 10


def test_a_flipped_bit_in_a_manifest_object_is_found_and_set_aside(
    s3_server: S3Server, s3_url: str
) -> None:
    """The manifest's own checksum on an s3:// root: step 2's manifest object with one bit
    flipped (its epoch 3 reads 7) is reported by verify, skipped by restore("last") and set
    aside; step 1's, with its checksum removed as an older version writes it, reads as before."""
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        manager.save(1, _state(1), epoch=3)
        manager.save(2, _state(2), epoch=3)
    manifests = {
        name[: len("step-00000001")]: name
        for name in _objects(s3_url, options)
        if name.endswith("/manifest.json")
    }
    with ObjectStore(s3_url, options) as store:
        older = json.loads(store.get_bytes(manifests["step-00000001"]))
        del older[MANIFEST_CHECKSUM_KEY]
        store.put_bytes(manifests["step-00000001"], json.dumps(older).encode())
        flipped = bytearray(store.get_bytes(manifests["step-00000002"]))
        flipped[flipped.index(b'"epoch": 3') + len(b'"epoch": ')] ^= 0x04
        store.put_bytes(manifests["step-00000002"], bytes(flipped))

    report = distckpt.verify(s3_url, storage_options=options)
    assert [c.ok for c in report.checkpoints] == [True, False]
    (problem,) = report.checkpoints[1].problems
    assert manifests["step-00000002"] in problem and "checksum mismatch of the manifest" in problem
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        restored = manager.restore("last", state=_state(0))
        assert restored is not None and (restored.step, restored.epoch) == (1, 3)
        assert manager.steps() == [1]
    report = distckpt.verify(s3_url, storage_options=options)
    assert report.ok and len(report.set_aside) == 1


def _restore_the_wrong_shape(rank: int, world_size: int, url: str, options: dict[str, Any]) -> str:
    with distckpt.CheckpointManager(url, storage_options=options, format="dcp") as manager:
        manager.save(1, {"w": torch.zeros(3)})
        with pytest.raises(distckpt.InvalidArgument) as raised:
            manager.restore("last", state={"w": torch.zeros(5)})
        return str(raised.value)


def test_a_dcp_format_error_names_the_s3_location_not_the_download(
    s3_server: S3Server, s3_url: str
) -> None:
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options, format="dcp") as manager:
        manager.save(1, {"w": torch.zeros(3)})
    where = f"{s3_url}/step-00000001"
    for state in (None, {"w": torch.zeros(5)}):  # no state=; a shape the checkpoint lacks
        with pytest.raises(distckpt.InvalidArgument) as raised:
            distckpt.load_checkpoint(f"{s3_url}/last", storage_options=options, state=state)
        assert where in str(raised.value) and "distckpt-read" not in str(raised.value)
    # restore on two ranks: the error is renamed on its rank, before the ranks agree on it
    for message in values(
        run_ranks(_restore_the_wrong_shape, 2, f"{s3_url}2", options, timeout=JOB_TIMEOUT)
    ):
        assert f"{s3_url}2/step-00000001" in message and "distckpt-read" not in message


def test_export_from_a_url(s3_server: S3Server, s3_url: str, tmp_path: Path) -> None:
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        manager.save(3, _state(3))
    out = distckpt.export(f"{s3_url}/last", tmp_path / "out.pt", storage_options=options)
    exported = torch.load(out, weights_only=True)
    assert torch.equal(exported["w"], torch.arange(4.0) + 3)


def test_an_export_error_names_the_s3_location(
    s3_server: S3Server, s3_url: str, tmp_path: Path
) -> None:
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options, format="dcp") as manager:
        manager.save(3, _state(3))
    with pytest.raises(distckpt.InvalidArgument) as raised:  # "dcp" is exported whole
        distckpt.export(f"{s3_url}/last", tmp_path / "out.pt", rank=0, storage_options=options)
    assert f"{s3_url}/step-00000003" in str(raised.value)
    assert "distckpt-read" not in str(raised.value)


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


def test_storage_options_with_a_directory_are_refused(tmp_path: Path) -> None:
    with pytest.raises(distckpt.InvalidArgument, match="s3:// roots only"):
        distckpt.CheckpointManager(tmp_path, storage_options={"key": "k"})


def test_a_local_root_works_without_botocore(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "sys.modules['botocore'] = None  # as if not installed: importing it raises\n"
        "import torch, distckpt\n"
        f"m = distckpt.CheckpointManager({str(tmp_path / 'ckpt')!r})\n"
        "m.save(1, {'w': torch.zeros(1)}); m.restore('last'); m.close()\n"
        "assert distckpt.verify(m.root).ok\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_cli_on_an_s3_root_with_the_aws_environment(
    s3_server: S3Server, s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from distckpt.cli import main

    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options, monitor="loss") as manager:
        for step in (1, 2, 3):
            manager.save(step, _state(step), metrics={"loss": 1.0 / step})
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    monkeypatch.setenv("AWS_REGION", "us-east-1")

    def run(*args: str) -> tuple[int, str]:
        out = io.StringIO()
        return main(list(args), out), out.getvalue()

    status, listing = run("ls", "--json", s3_url)
    assert status == 0
    payload = json.loads(listing)
    assert [c["step"] for c in payload["checkpoints"]] == [1, 2, 3]
    assert payload["links"] == {"last": "step-00000003", "best": "step-00000003"}
    status, info = run("info", f"{s3_url}/last")
    assert status == 0 and f"{s3_url}/step-00000003" in info
    assert run("verify", s3_url)[0] == 0
    assert run("export", f"{s3_url}/step-00000002", str(tmp_path / "two.pt"))[0] == 0
    assert torch.load(tmp_path / "two.pt", weights_only=True)["step"] == 2
    _write_attempt(s3_url, options, 4, "dead")
    status, collected = run("gc", "--json", s3_url)
    assert status == 0 and json.loads(collected)["removed"] == [f"{s3_url}/step-00000004/dead"]
    status, pruned = run("prune", "--json", s3_url, "--keep-last", "1")
    assert status == 0 and json.loads(pruned) == {"removed": [1, 2], "kept": [3]}
    with ObjectStore(s3_url, options) as store:  # corrupt the last checkpoint's file
        name = next(n for n in _objects(s3_url, options) if n.endswith(".pt"))
        store.put_bytes(name, bytes(len(store.get_bytes(name))))
    assert run("verify", s3_url)[0] == 1
    assert run("ls", "s3://no-such-bucket-here/x")[0] == 2
    status, lease = run("lease", s3_url)
    assert status == 0 and f"pid {os.getpid()}" in lease  # this process's manager held it
    assert run("lease", "--break", s3_url)[0] == 2  # it expires by itself


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
        with pytest.raises(distckpt.LeaseLost):
            manager.delete(1)
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


def _with_step_2_deleted_between_head_and_get(
    server: S3Server, url: str, read: Callable[[dict[str, Any]], T]
) -> tuple[T, list[tuple[str, str, int]]]:
    """``read(storage_options)`` of a root holding steps 1 and 2, through a proxy that holds
    the GET of step 2's shard (the one after its HEAD) while step 2 is removed as retention
    does (``COMMIT`` first, then its objects); what it returned, and the proxy's log."""
    options = server.storage_options()
    with distckpt.CheckpointManager(url, storage_options=options, format="torch") as manager:
        manager.save(1, _state(1))
        manager.save(2, _state(2))
    with S3Proxy(server.port) as proxy:
        shard_get = proxy.hold("GET", "step-00000002/", "rank-00000.pt")

        def delete_step_2() -> None:
            shard_get.arrived.wait(30)
            with ObjectStore(url, options) as store:
                store.delete(["step-00000002/COMMIT"])
                store.delete([info.key for info in store.list("step-00000002/")])
            shard_get.release()

        deleter = threading.Thread(target=delete_step_2)
        deleter.start()
        result = read(server.storage_options(endpoint_url=proxy.endpoint))
        deleter.join(30)
        assert shard_get.arrived.is_set()
        return result, proxy.log


def test_a_checkpoint_deleted_between_a_reads_head_and_get_falls_back_to_the_older_step(
    s3_server: S3Server, s3_url: str
) -> None:
    def restore_last(options: dict[str, Any]) -> distckpt.Checkpoint | None:
        with distckpt.CheckpointManager(
            s3_url, storage_options=options, format="torch", read_only=True
        ) as manager:
            return manager.restore("last", state={"w": torch.zeros(4), "step": 0})

    restored, log = _with_step_2_deleted_between_head_and_get(s3_server, s3_url, restore_last)
    assert restored is not None and restored.step == 1
    step_2_shard = [(method, status) for method, path, status in log if "00000002/" in path]
    assert ("HEAD", 200) in step_2_shard and ("GET", 404) in step_2_shard


def test_verify_takes_a_checkpoint_deleted_between_a_reads_head_and_get_for_gone_not_damaged(
    s3_server: S3Server, s3_url: str
) -> None:
    def verify(options: dict[str, Any]) -> distckpt.VerifyReport:
        return distckpt.verify(s3_url, storage_options=options)

    # Retention deleting a checkpoint while verify reads it is no damage: the object is found
    # missing (not a refused precondition), the checkpoint gone, and only step 1 is reported.
    report, _ = _with_step_2_deleted_between_head_and_get(s3_server, s3_url, verify)
    (only,) = report.checkpoints
    assert only.ok and only.step == 1  # (`last` still names step 2: the test deleted it)


def test_a_claim_renewed_while_its_save_ends_is_not_left_behind(
    s3_server: S3Server, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # renewals every second, so that one comes while the save's COMMIT is held
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
        proxy.drop("GET", "/.writers/", times=10)  # every answer to the claim's read is lost
        options = s3_server.storage_options(endpoint_url=proxy.endpoint)
        gc = open_store(s3_url, storage_options=options)
        with pytest.raises(distckpt.StoreUnavailable):
            gc.collect_leftovers()
    assert staged in _objects(s3_url, s3_server.storage_options())


def _exited_pid() -> int:
    """The pid of a process of this machine that has exited (unless reused at once)."""
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(child.stdout)


_OPEN_FROM_ANOTHER_PID_NAMESPACE = """
import sys, distckpt
try:
    with distckpt.CheckpointManager(sys.argv[1], storage_options=eval(sys.argv[2])):
        print("opened")
except distckpt.RootInUse:
    print("RootInUse")
"""


def test_a_live_holder_is_not_taken_over_from_another_pid_namespace_of_its_host(
    s3_server: S3Server, s3_url: str
) -> None:
    # A container with the host's network (so its hostname) but its own PID namespace: the
    # holder's pid names no process there, yet the holder runs.
    unshare = ["unshare", "--pid", "--fork"]
    can_unshare = (
        shutil.which("unshare") is not None and not subprocess.run([*unshare, "true"]).returncode
    )
    if not can_unshare and os.environ.get("CI") != "true":
        pytest.skip("this machine cannot make a PID namespace (unshare --pid)")
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        manager.save(1, _state(1))
        other = subprocess.run(
            [
                *unshare,
                sys.executable,
                "-c",
                _OPEN_FROM_ANOTHER_PID_NAMESPACE,
                s3_url,
                repr(options),
            ],
            capture_output=True,
            text=True,
            timeout=JOB_TIMEOUT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        assert other.stdout.strip() == "RootInUse", other.stderr[-2000:]
        assert manager.save(2, _state(2)) is not None  # still the holder


def _write_claim(url: str, options: dict[str, Any], attempt: str, claim: dict[str, Any]) -> None:
    with ObjectStore(url, options) as store:
        store.put_bytes(f"step-00000001/{attempt}/rank-00000.pt", b"staged")
        store.put_bytes(f".writers/{attempt}", json.dumps(claim).encode())


def test_a_claim_of_an_exited_pid_counts_only_in_this_pid_namespace_and_boot(
    s3_server: S3Server, s3_url: str
) -> None:
    here = this_process_host()
    assert here.startswith(f"{this_host()}/pidns:")  # /proc says where on this machine
    boot = here.rpartition("/boot:")[2]
    options = s3_server.storage_options()
    hosts = {
        "other-ns": f"{this_host()}/pidns:1/boot:{boot}",
        "other-boot": here.replace(f"/boot:{boot}", "/boot:00000000"),
        "this-ns": here,
        "older-writer": this_host(),  # a plain hostname: judged by the pid alone, as before
    }
    dead = _exited_pid()
    for attempt, host in hosts.items():
        _write_claim(s3_url, options, attempt, {"host": host, "pid": dead, "expires_unix": 4e9})
    store = open_store(s3_url, storage_options=options)
    alive = {
        leftover.path.rpartition("/")[2]: leftover.writer_alive for leftover in store.leftovers()
    }
    assert alive == {"other-ns": True, "other-boot": True, "this-ns": False, "older-writer": False}


@pytest.mark.parametrize("older_holder_alive", [True, False])
def test_an_older_versions_lease_on_this_host_is_judged_by_its_pid(
    s3_server: S3Server, s3_url: str, older_holder_alive: bool
) -> None:
    options = s3_server.storage_options()
    pid = os.getppid() if older_holder_alive else _exited_pid()
    older_record = {"owner": "older", "host": this_host(), "pid": pid, "duration": 600.0}
    with ObjectStore(s3_url, options) as store:
        store.put_bytes(".lease", json.dumps(older_record).encode())
    if older_holder_alive:
        with pytest.raises(RootInUse):
            distckpt.CheckpointManager(s3_url, storage_options=options)
    else:  # its holder is gone: taken over at once, not after 600 s
        with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
            assert manager.save(1, _state(1)) is not None
