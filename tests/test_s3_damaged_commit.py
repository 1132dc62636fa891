"""A step whose ``COMMIT`` object is damaged (not a commit record): ``overwrite=True`` replaces
it, a save of it that fails leaves nothing behind, and a forced or scheduled save of it is
refused before anything is uploaded, with the message a POSIX root gives for a damaged step
dir."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt import faults
from distckpt.errors import InjectedFault
from distckpt.layout import LAST
from distckpt.objstore import ObjectStore
from distckpt.storage import RootStore, open_store
from tests.s3server import S3Server
from tests.test_s3_set_aside import _requests_sent
from tests.test_s3_store import _objects, _state

STEP_PREFIX = "step-00000002/"


def _damage_step_2(url: str, options: dict[str, Any]) -> None:
    with ObjectStore(url, options) as store:
        store.put_bytes(STEP_PREFIX + "COMMIT", b"not a commit record")


def _save_two_steps_and_damage_step_2(
    manager: distckpt.CheckpointManager, url: str, options: dict[str, Any]
) -> set[str]:
    """The saves of step 2 (one) before its ``COMMIT`` is damaged."""
    manager.save(1, _state(1))
    manager.save(2, _state(2))
    saves = _saves_of_step_2(url, options)
    _damage_step_2(url, options)
    return saves


def _saves_of_step_2(url: str, options: dict[str, Any]) -> set[str]:
    return {
        name.split("/")[1]
        for name in _objects(url, options)
        if name.startswith(STEP_PREFIX) and name.count("/") == 2
    }


def test_overwrite_replaces_a_damaged_commit_and_the_old_save_goes_as_a_leftover(
    s3_server: S3Server, s3_url: str
) -> None:
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        (old_save,) = _save_two_steps_and_damage_step_2(manager, s3_url, options)
        with pytest.raises(distckpt.CheckpointExists, match="overwrite=True"):
            manager.save(2, _state(20))
        assert manager.save(2, _state(20), overwrite=True) is not None
        restored = manager.restore("last", state={"w": torch.empty(4), "step": 0})
        assert restored is not None and restored.step == 2 and restored.state["step"] == 20
        # which save the damaged COMMIT named was unknown: the old one is an ordinary leftover
        removed = manager.gc()
        assert removed == [f"{s3_url}/{STEP_PREFIX}{old_save}"]
    assert old_save not in _saves_of_step_2(s3_url, options)
    assert distckpt.verify(s3_url, storage_options=options).ok


def test_a_failed_save_of_a_step_whose_commit_is_damaged_removes_its_own_objects(
    s3_server: S3Server, s3_url: str
) -> None:
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        before = _save_two_steps_and_damage_step_2(manager, s3_url, options)
        faults.arm("before_manifest", "raise")  # after every upload, before the commit
        try:
            with pytest.raises(InjectedFault):
                manager.save(2, _state(20), overwrite=True)
        finally:
            faults.disarm()
        # its objects went with the failed save: gc, which cannot tell which save a damaged
        # COMMIT names, would keep them for as long as it stays damaged
        assert _saves_of_step_2(s3_url, options) == before
        assert manager.gc() == []


@pytest.mark.parametrize("kind", ["posix", "s3"])
def test_a_scheduled_save_of_a_damaged_committed_step_is_refused_before_any_upload(
    s3_server: S3Server, tmp_path: Path, kind: str
) -> None:
    if kind == "s3":
        root = f"s3://{s3_server.create_bucket()}/ckpt"
        options: dict[str, Any] | None = s3_server.storage_options()
    else:
        root, options = str(tmp_path / "root"), None
    with distckpt.CheckpointManager(root, storage_options=options) as manager:
        manager.save(1, _state(1))
        manager.save(2, _state(2))
    if kind == "s3":
        _damage_step_2(root, options or {})
        before = _objects(root, options or {})
    else:
        (tmp_path / "root" / "step-00000002" / "manifest.json").write_text("not a manifest")
    # A requeued job counting from step 1 (step 2 is damaged): its schedule is due at step 2.
    with distckpt.CheckpointManager(root, storage_options=options, every_n_steps=1) as manager:
        for force in (False, True):
            with pytest.raises(distckpt.CorruptCheckpoint) as refused:
                manager.save(2, _state(20), force=force)
            message = str(refused.value)
            assert "step 2 is already committed" in message, message
            assert "manager.delete(2)" in message and "overwrite=True" in message, message
            assert refused.value.step == 2
        if kind == "s3":
            assert _objects(root, options or {}).keys() - {".lease"} == before.keys() - {".lease"}
        else:
            assert not list((tmp_path / "root" / ".staging").glob("*"))


def _damage_step_2_naming(attempt: str, url: str, options: dict[str, Any]) -> None:
    """Damage step 2's ``COMMIT`` so that it still reads as a commit record, naming the save
    ``attempt`` with a character flipped: a save that is not there."""
    flipped = ("0" if attempt[0] != "0" else "1") + attempt[1:]
    with ObjectStore(url, options) as store:
        store.put_bytes(
            STEP_PREFIX + "COMMIT", json.dumps({"step": 2, "attempt": flipped}).encode()
        )


@pytest.mark.parametrize("record", ["garbage", "naming a save not there"])
def test_a_restore_that_skips_a_damaged_commit_warns_that_it_cannot_set_it_aside(
    s3_server: S3Server, s3_url: str, caplog: pytest.LogCaptureFixture, record: str
) -> None:
    """Unlike a damaged step dir on a filesystem, which a restore sets aside, a damaged
    ``COMMIT`` names no save to move: the step stays committed, and the warning says what to
    do (docs/object-stores.md). So does one that still reads as a record but names a save of
    which nothing is there, beside the step's save: neither the start's cleanup nor the
    restore (nor a gc) takes the save it was written for for a dead writer's (they once
    deleted it, and set aside an empty copy)."""
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        saves = _save_two_steps_and_damage_step_2(manager, s3_url, options)
    if record == "naming a save not there":
        (attempt,) = saves
        _damage_step_2_naming(attempt, s3_url, options)
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        with caplog.at_level(logging.WARNING, logger="distckpt"):
            restored = manager.restore("last", state={"w": torch.empty(4), "step": 0})
        assert restored is not None and restored.step == 1
        assert f"cannot set aside the damaged checkpoint {s3_url}/step-00000002" in caplog.text
        assert "manager.delete(2)" in caplog.text and "overwrite=True" in caplog.text
        assert manager.steps() == [1, 2]
        # still committed: a save of the step is refused, forced or not
        with pytest.raises(distckpt.CorruptCheckpoint):
            manager.save(2, _state(20), force=True)
        with pytest.raises(distckpt.CheckpointExists):
            manager.save(2, _state(20))
        manager.gc()
    assert _saves_of_step_2(s3_url, options) == saves


def test_an_open_skips_a_damaged_commit_beside_a_whole_save_with_a_warning(
    s3_server: S3Server, s3_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A damaged ``COMMIT`` beside a whole save of its step: its ETag is the digest of no
    record naming that save, so the open reads it rather than take the step from its listing,
    finds it damaged and skips the step with a warning; ``last`` moves back to step 1."""
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        _save_two_steps_and_damage_step_2(manager, s3_url, options)
    with caplog.at_level(logging.WARNING, logger="distckpt"):
        distckpt.CheckpointManager(s3_url, storage_options=options).close()
    assert f"skipping damaged checkpoint {s3_url}/{STEP_PREFIX.rstrip('/')}" in caplog.text
    with ObjectStore(s3_url, options) as store:
        assert store.get_bytes(LAST).decode().strip() == "step-00000001"


def test_a_commit_whose_step_reads_another_still_names_its_save_under_its_own_step(
    s3_server: S3Server, s3_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Step 2's ``COMMIT`` says step 3 (a flipped digit) but names step 2's save, which is
    there: it is no ``COMMIT`` naming a missing save (that is looked for under the step it is
    read under, not under the step its bytes say, where step 3's save lies), so gc removes
    a dead writer's save of step 2 beside it (it once kept it for good, with a warning)."""
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        for step in (1, 2, 3):
            manager.save(step, _state(step))
    (attempt,) = _saves_of_step_2(s3_url, options)
    dead_writers = "d" * len(attempt)
    with ObjectStore(s3_url, options) as store:
        for info in store.list(f"{STEP_PREFIX}{attempt}/"):  # no claim: a dead writer's
            store.copy(info.key, info.key.replace(attempt, dead_writers), info.size)
        store.put_bytes(
            STEP_PREFIX + "COMMIT", json.dumps({"step": 3, "attempt": attempt}).encode()
        )
    assert _saves_of_step_2(s3_url, options) == {attempt, dead_writers}
    with (
        caplog.at_level(logging.WARNING, logger="distckpt"),
        distckpt.CheckpointManager(s3_url, storage_options=options) as manager,
    ):
        manager.gc()
    assert "COMMIT is damaged" not in caplog.text
    assert _saves_of_step_2(s3_url, options) == {attempt}


def _three_steps_saved_then_the_store_opened(url: str, options: dict[str, Any]) -> RootStore:
    with distckpt.CheckpointManager(url, storage_options=options) as manager:
        for step in (1, 2, 3):
            manager.save(step, _state(step))
    store = open_store(url, storage_options=options, lock_timeout=60.0)
    store.open()
    return store


def test_looking_for_leftovers_lists_the_root_once_however_many_steps_it_holds(
    s3_server: S3Server, s3_url: str
) -> None:
    """Whether each step's ``COMMIT`` names a save that is there is told from the one listing
    of the root a cleanup (every start, gc, ls) makes: no request more per step (each step's
    prefix was once listed again)."""
    options = s3_server.storage_options()
    store = _three_steps_saved_then_the_store_opened(s3_url, options)
    try:
        listings = _requests_sent(store.s3.client, "ListObjectsV2")  # type: ignore[attr-defined]
        assert store.leftovers() == []
    finally:
        store.close()
    assert len(listings) == 1, [params.get("Prefix") for params in listings]


def test_a_save_below_a_damaged_commit_names_delete_not_a_set_aside(
    s3_server: S3Server, s3_url: str
) -> None:
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        _save_two_steps_and_damage_step_2(manager, s3_url, options)
        manager.delete(1)  # so that step 1 is a new step below the damaged one
        with pytest.raises(distckpt.InvalidStep) as refused:
            manager.save(1, _state(1))
    message = str(refused.value)
    assert "a restore cannot set it aside" in message, message
    assert f"distckpt delete {s3_url} 2" in message and "sets it aside" not in message, message


def test_a_save_committed_after_the_cleanups_listing_is_not_taken_for_a_damaged_commit(
    s3_server: S3Server, s3_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Another job re-saves step 2 between a cleanup's listing of the root and its read of
    that step's ``COMMIT``: the listing misses the new save, which is looked for again."""
    options = s3_server.storage_options()
    store = _three_steps_saved_then_the_store_opened(s3_url, options)
    client = store.s3.client  # type: ignore[attr-defined]
    real_list = client.list

    def the_root_listed_then_step_2_saved_again(prefix: str = "") -> Any:
        listed = list(real_list(prefix))
        if prefix == "":
            # no real part can schedule another job's save between the two requests: the
            # copy and the COMMIT written here are real objects of the real server
            with ObjectStore(s3_url, options) as other:
                old = json.loads(other.get_bytes(STEP_PREFIX + "COMMIT"))["attempt"]
                new = "b" * len(old)
                for info in list(other.list(f"{STEP_PREFIX}{old}/")):
                    other.copy(info.key, info.key.replace(old, new), info.size)
                record = json.dumps({"step": 2, "attempt": new}).encode()
                other.put_bytes(STEP_PREFIX + "COMMIT", record)
        return iter(listed)

    try:
        with caplog.at_level(logging.WARNING, logger="distckpt"):
            client.list = the_root_listed_then_step_2_saved_again
            store.leftovers()
    finally:
        store.close()
    assert "COMMIT is damaged" not in caplog.text
    assert distckpt.verify(s3_url, storage_options=options).ok
