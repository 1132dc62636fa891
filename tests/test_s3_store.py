"""``s3://`` checkpoint roots against a real S3-protocol server (moto, tests/s3server.py):
the object-store implementation of the storage seam, through the public API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt import CheckpointNotFound, CorruptCheckpoint, faults
from distckpt.errors import InjectedFault
from distckpt.lease import this_host
from distckpt.manifest import MANIFEST_CHECKSUM_KEY
from distckpt.objstore import ObjectStore
from distckpt.storage.s3_view import S3RootView
from tests.monitor_jobs import restart_with_another_monitor
from tests.ranks import run_ranks, values
from tests.s3proxy import S3Proxy
from tests.s3server import S3Server

pytest.importorskip("botocore")


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


def test_a_monitor_that_ranks_none_leaves_no_best(s3_server: S3Server, s3_url: str) -> None:
    """As on a POSIX root: after a restart with another ``monitor`` no ``best`` pointer is
    left naming the old metric's best, and retention no longer keeps that step."""
    options = s3_server.storage_options()
    out = restart_with_another_monitor(s3_url, storage_options=options)
    assert out == {"no monitor": 1, "best_step": None, "steps": [7, 8]}
    assert "best" not in _objects(s3_url, options)


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
    """Counts the requests a botocore client makes, by operation: botocore's own
    ``after-call`` event."""

    def __init__(self, store: ObjectStore) -> None:
        self.requests: dict[str, int] = {}
        store.client.meta.events.register("after-call.s3", self._count)

    def _count(self, model: Any, **_: Any) -> None:
        self.requests[model.name] = self.requests.get(model.name, 0) + 1


def _listing_cost(url: str, options: dict[str, Any]) -> tuple[list[int], dict[str, int]]:
    """The committed steps of the root, with the requests that took."""
    view = S3RootView(url, options)
    counter = _RequestCounter(view.s3.client)
    try:
        return view.committed_steps(), counter.requests
    finally:
        view.s3.close()


def test_listing_the_steps_costs_a_request_per_page_of_objects_none_per_step(
    s3_server: S3Server, s3_url: str
) -> None:
    options = s3_server.storage_options()
    _save_steps(s3_url, options, 1, 2)
    _write_attempt(s3_url, options, 3, "uncommitted")  # a step prefix with no COMMIT
    steps, requests = _listing_cost(s3_url, options)
    assert steps == [1, 2]
    # one listing of every object under the step prefixes: no HEAD of each step's COMMIT
    assert requests == {"ListObjectsV2": 1}
    # more objects under each step (leftovers of dead writers), listed 2 a page (S3 may
    # answer fewer than asked): step 2's COMMIT is on a later page than the first
    with ObjectStore(s3_url, options) as store:
        for step in (1, 2, 3):
            for index in range(6):
                store.put_bytes(f"step-{step:08d}/dead/rank-{index:05d}.pt", b"x")
    objects = sum(name.startswith("step-") for name in _objects(s3_url, options))
    with S3Proxy(s3_server.port) as proxy:
        proxy.short_pages(2, "list-type=2")
        paged = s3_server.storage_options(endpoint_url=proxy.endpoint)
        assert _listing_cost(s3_url, paged) == (steps, {"ListObjectsV2": -(-objects // 2)})


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
    # A plain process of its own, which imports distckpt afresh: the job servers' cold start
    # (their preloads) would cost more than this test, when it is the first to use them.
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],  # the tree under test, first on sys.path
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT,
    )
    assert done.returncode == 0, done.stdout + done.stderr


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
    assert (status, lease) == (0, "lease: none\n")  # this process's manager released it
    assert run("lease", "--break", s3_url)[0] == 2  # it expires by itself
