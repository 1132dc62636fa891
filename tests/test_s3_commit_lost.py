"""An ``s3://`` save whose objects the store lost between the commit's check and its
``COMMIT`` (a ``gc`` whose clock runs ahead took it for a dead writer's, the window
docs/object-stores.md names) fails with ``CommitLost`` on every rank, as a POSIX commit the
filesystem lost does: a new step is left uncommitted, and an ``overwrite=True`` keeps the
checkpoint it was to replace, whose objects are not deleted."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import torch

import distckpt
from distckpt import events
from distckpt.errors import ObjectNotFound
from distckpt.layout import MANIFEST_NAME
from distckpt.objstore import ObjectStore
from tests.ranks import run_ranks, values
from tests.s3proxy import S3Proxy
from tests.s3server import S3Server
from tests.test_s3_store import JOB_TIMEOUT, _objects, _state
from tests.waiting import after_rank_0_removals

STEP_PREFIX = "step-00000002/"


def _change_object_of_the_new_save(
    url: str, options: dict[str, Any], file_name: str, replacement: bytes | None = None
) -> None:
    """Delete the file ``file_name`` of the step 2 save being committed once the commit's
    manifest is uploaded, after its staged objects were checked: what a ``gc`` taking the
    save for a dead writer's does in that window. The save being committed is the one
    ``COMMIT`` does not name yet (an overwrite's old one is named). With ``replacement`` the
    object is replaced by those bytes instead (another writer's object of another size)."""
    with ObjectStore(url, options) as store:
        try:
            named = json.loads(store.get_bytes(STEP_PREFIX + "COMMIT"))["attempt"]
        except ObjectNotFound:
            named = None
        keys = [
            info.key
            for info in list(store.list(STEP_PREFIX))
            if info.key.endswith(file_name) and info.key.split("/")[1] != named
        ]
        if replacement is None:
            store.delete(keys)
            return
        for key in keys:
            store.put_bytes(key, replacement)


def _save_losing_an_object(
    rank: int, world_size: int, url: str, options: dict[str, Any], overwrite: bool
) -> tuple[str, list[int], float]:
    def lose(event: events.PhaseEvent) -> None:
        if event.phase == "commit.manifest" and event.ok:
            _change_object_of_the_new_save(url, options, "rank-00001.pt")

    with distckpt.CheckpointManager(url, storage_options=options, timeout=60) as manager:
        manager.save(1, _state(1))
        if overwrite:
            manager.save(2, _state(2))
        remove = events.add_listener(lose) if rank == 0 else lambda: None
        try:
            manager.save(2, _state(200), overwrite=overwrite)
            outcome = "committed"
        except distckpt.CommitLost as exc:
            assert exc.step == 2 and str(exc.path).endswith("rank-00001.pt")
            kept = "the checkpoint it was to replace is kept" in str(exc)
            assert kept == overwrite, str(exc)
            outcome = type(exc).__name__
        finally:
            remove()
        restored = manager.restore("last", state={"w": torch.empty(4), "step": 0})
        assert restored is not None
        return outcome, manager.steps(), float(restored.state["w"][0])


def test_an_overwrite_whose_new_save_lost_an_object_fails_and_keeps_the_old_checkpoint(
    s3_server: S3Server, s3_url: str
) -> None:
    options = s3_server.storage_options()
    out = values(run_ranks(_save_losing_an_object, 2, s3_url, options, True, timeout=JOB_TIMEOUT))
    assert out == [("CommitLost", [1, 2], 2.0)] * 2
    assert distckpt.verify(s3_url, storage_options=options).ok
    # the old save's objects are all there, and nothing of the lost one is left
    step_2 = [name for name in _objects(s3_url, options) if name.startswith(STEP_PREFIX)]
    assert sorted(name.rsplit("/", 1)[1] for name in step_2) == [
        "COMMIT",
        "manifest.json",
        "rank-00000.pt",
        "rank-00001.pt",
    ]


def test_a_new_step_whose_save_lost_an_object_fails_and_is_not_committed(
    s3_server: S3Server, s3_url: str
) -> None:
    options = s3_server.storage_options()
    out = values(run_ranks(_save_losing_an_object, 2, s3_url, options, False, timeout=JOB_TIMEOUT))
    assert out == [("CommitLost", [1], 1.0)] * 2
    assert distckpt.verify(s3_url, storage_options=options).ok
    assert not [name for name in _objects(s3_url, options) if name.startswith(STEP_PREFIX)]


def test_a_commit_whose_second_listing_fails_is_committed_and_the_failure_logged(
    s3_server: S3Server, s3_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with S3Proxy(s3_server.port) as proxy:
        options = s3_server.storage_options(endpoint_url=proxy.endpoint, retries=1)
        with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
            manager.save(1, _state(1))
            # the commit's check lists the save once before COMMIT, then once after it
            proxy.fail("GET", "list-type=2", "step-00000002", skip=1)
            with caplog.at_level(logging.ERROR, logger="distckpt"):
                assert manager.save(2, _state(2)) is not None
            assert "could not list it again" in caplog.text
            assert manager.steps() == [1, 2] and manager.latest_step() == 2
    assert distckpt.verify(s3_url, storage_options=s3_server.storage_options()).ok


def _save_whose_undo_fails(
    s3_server: S3Server,
    s3_url: str,
    caplog: pytest.LogCaptureFixture,
    *,
    overwrite: bool,
    failures: int = 100,
) -> tuple[distckpt.CommitLost, str | None]:
    """Save step 2 (over a committed step 2 with ``overwrite``) in one process, losing its
    file before ``COMMIT``, while the first ``failures`` requests that would put ``COMMIT``
    back fail (the proxy; one attempt per request): the ``CommitLost`` raised, and the attempt
    the replaced ``COMMIT`` named."""
    direct = s3_server.storage_options()

    def lose(event: events.PhaseEvent) -> None:
        if event.phase == "commit.manifest" and event.ok:
            _change_object_of_the_new_save(s3_url, direct, "rank-00000.pt")

    old = None
    with S3Proxy(s3_server.port) as proxy:
        options = s3_server.storage_options(endpoint_url=proxy.endpoint, retries=1)
        with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
            manager.save(1, _state(1))
            if overwrite:
                manager.save(2, _state(2))
                with ObjectStore(s3_url, direct) as store:
                    old = json.loads(store.get_bytes(STEP_PREFIX + "COMMIT"))["attempt"]
                # the overwrite's own COMMIT goes through, no put of the old one back does
                undo = proxy.fail("PUT", STEP_PREFIX + "COMMIT", skip=1, times=failures)
            else:  # the delete of the new COMMIT, a batch delete
                undo = proxy.fail("POST", "delete", times=failures)
            remove = events.add_listener(lose)
            try:
                with (
                    caplog.at_level(logging.CRITICAL, logger="distckpt"),
                    pytest.raises(distckpt.CommitLost) as lost,
                ):
                    manager.save(2, _state(200), overwrite=overwrite)
            finally:
                remove()
                undo.times = 0
    return lost.value, old


def _assert_committed_damaged(lost: distckpt.CommitLost, log: str) -> None:
    assert "step 2 is now committed damaged" in str(lost)
    assert "nothing was committed" not in str(lost)
    assert "manager.delete(2)" in log


@pytest.mark.parametrize("overwrite", [True, False])
def test_an_undo_that_fails_once_is_tried_again(
    s3_server: S3Server, s3_url: str, caplog: pytest.LogCaptureFixture, overwrite: bool
) -> None:
    lost, _ = _save_whose_undo_fails(s3_server, s3_url, caplog, overwrite=overwrite, failures=1)
    kept = " (the checkpoint it was to replace is kept)" if overwrite else ""
    assert f"nothing was committed{kept}:" in str(lost), str(lost)
    direct = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=direct) as manager:
        assert manager.steps() == ([1, 2] if overwrite else [1])


def test_an_overwrite_whose_undo_fails_keeps_the_old_checkpoint_set_aside(
    s3_server: S3Server, s3_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    lost, old = _save_whose_undo_fails(s3_server, s3_url, caplog, overwrite=True)
    _assert_committed_damaged(lost, caplog.text)
    kept_at = f"{s3_url}/damaged-step-00000002-{old}"
    assert f"kept, set aside at {kept_at}" in str(lost)
    assert kept_at in caplog.text and "to get it back" in caplog.text
    # the next start deletes the old save's objects under step-2 only once they are copied
    direct = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=direct) as manager:
        manager.gc()
    copied = [name for name in _objects(s3_url, direct) if name.startswith("damaged-step")]
    assert sorted(name.rpartition("/")[2] for name in copied if "/" in name) == [
        "manifest.json",
        "rank-00000.pt",
    ]


def test_a_new_step_whose_undo_fails_is_committed_damaged_and_says_so(
    s3_server: S3Server, s3_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    lost, _ = _save_whose_undo_fails(s3_server, s3_url, caplog, overwrite=False)
    _assert_committed_damaged(lost, caplog.text)
    assert "set aside" not in str(lost)


@pytest.mark.parametrize(
    ("file_name", "replacement"),
    [("manifest.json", None), ("rank-00000.pt", b"of another size")],
    ids=["manifest-lost", "file-resized"],
)
def test_a_save_whose_object_was_lost_or_resized_before_its_commit_fails_uncommitted(
    s3_server: S3Server, s3_url: str, file_name: str, replacement: bytes | None
) -> None:
    """docs/object-stores.md: "if an object went missing or changed size since the check,
    the save fails on every rank with CommitLost"."""
    options = s3_server.storage_options()

    def lose(event: events.PhaseEvent) -> None:
        if event.phase == "commit.manifest" and event.ok:
            _change_object_of_the_new_save(s3_url, options, file_name, replacement)

    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        manager.save(1, _state(1))
        remove = events.add_listener(lose)
        try:
            with pytest.raises(distckpt.CommitLost) as lost:
                manager.save(2, _state(2))
        finally:
            remove()
        assert str(lost.value.path).endswith(file_name) and lost.value.step == 2
        assert "nothing was committed" in str(lost.value)
        assert manager.steps() == [1] and manager.latest_step() == 1
    assert distckpt.verify(s3_url, storage_options=options).ok
    assert not [name for name in _objects(s3_url, options) if name.startswith(STEP_PREFIX)]


@pytest.mark.parametrize("lost_object", ["rank-00000.pt", MANIFEST_NAME])
@pytest.mark.parametrize("second_listing_fails", [False, True])
def test_a_save_that_loses_an_object_right_after_its_commit_is_not_last_nor_removes_the_one_before(
    s3_server: S3Server, s3_url: str, second_listing_fails: bool, lost_object: str
) -> None:
    """The window after the commit's second listing (which may have failed, only logged),
    before the pointers' update: an object of the committed save deleted there (the same
    ``gc``), a file or the manifest the update does not read back, is found by the update's
    own check of the save, so ``last`` stays on step 1 and retention (``keep_last=1``) keeps
    step 1."""
    options = s3_server.storage_options()

    def lose(event: events.PhaseEvent) -> None:
        if event.phase == "commit.publish" and event.ok and event.step == 2:
            with ObjectStore(s3_url, options) as store:
                named = json.loads(store.get_bytes(STEP_PREFIX + "COMMIT"))["attempt"]
                store.delete([f"{STEP_PREFIX}{named}/{lost_object}"])

    with S3Proxy(s3_server.port) as proxy:
        proxied = s3_server.storage_options(endpoint_url=proxy.endpoint, retries=1)
        with distckpt.CheckpointManager(s3_url, storage_options=proxied, keep_last=1) as manager:
            manager.save(1, _state(1))
            if second_listing_fails:
                proxy.fail("GET", "list-type=2", "step-00000002", skip=1)
            remove = events.add_listener(lose)
            try:
                manager.save(2, _state(2))
            finally:
                remove()
            assert not [rule for rule in proxy.rules if rule.times]  # the failure was answered
            after_rank_0_removals(manager)
            restored = manager.restore("last", state={"w": torch.empty(4), "step": 0})
            assert restored is not None and restored.step == 1
    with ObjectStore(s3_url, options) as store:
        assert store.get_bytes("last").decode().strip() == "step-00000001"
