"""A restarted job works past a damaged newest checkpoint on an ``s3://`` root: the restore that
skips it sets its save aside (copied under ``damaged-step-N-<attempt>/``, never deleted), so the
job saves the steps after the one it loaded again; a set-aside killed midway, out of its
budget, or met by an older version's start loses nothing. The local-root tests are in
``tests/test_set_aside.py``."""

from __future__ import annotations

import json
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import torch

import distckpt
from distckpt.layout import rank_file_name, set_aside_name
from distckpt.objstore import ObjectStore
from distckpt.objurl import S3Url
from distckpt.storage import open_store, open_view
from distckpt.storage.s3_root import CommitRecord
from tests.older_version import run_older_version
from tests.ranks import run_ranks, values
from tests.s3proxy import S3Proxy
from tests.s3server import S3Server, aws_environment
from tests.set_aside_jobs import (
    DAMAGED,
    JOB_TIMEOUT,
    restart,
    run_cli,
    s3_digests,
    s3_save_90_and_100,
    s3_save_90_and_damaged_100,
    save_90_and_100,
    weights,
)


def _s3_objects(url: str, options: dict[str, Any]) -> dict[str, str]:
    """Every object under the root, by relative name, with its ETag."""
    with ObjectStore(url, options) as store:
        return {info.key: info.etag for info in store.list()}


def test_an_s3_restart_sets_a_damaged_newest_checkpoint_aside_and_saves_past_it(
    s3_server: S3Server, s3_url: str
) -> None:
    pytest.importorskip("botocore")
    options = s3_server.storage_options()
    values(run_ranks(save_90_and_100, 2, s3_url, options, timeout=JOB_TIMEOUT))
    (rank_file,) = [
        name
        for name in _s3_objects(s3_url, options)
        if name.startswith(f"{DAMAGED}/") and name.endswith(rank_file_name(1))
    ]
    with ObjectStore(s3_url, options) as store:
        store.put_bytes(rank_file, store.get_bytes(rank_file)[:100])  # cut short
    attempt = rank_file.split("/")[1]
    damaged_objects = s3_digests(s3_url, options, f"{DAMAGED}/{attempt}/")

    out = values(run_ranks(restart, 2, s3_url, options, False, timeout=JOB_TIMEOUT))

    for rank, rank_out in enumerate(out):
        assert rank_out["restored"] == 90
        assert "save_error" not in rank_out, rank_out.get("save_error")
        assert rank_out["saved"] == list(range(91, 101))
        assert rank_out["last"] == (100, weights(100, rank).tolist())
    where = f"{s3_url}/damaged-{DAMAGED}-{attempt}"
    assert any(m.startswith("set aside") and where in m for m in out[0]["logged"])
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        manager.gc()  # a set-aside save is no leftover
    # Moved, every byte kept: no step-N/<attempt>/ is left, which any version's cleanup may
    # take for a dead writer's save.
    assert s3_digests(s3_url, options, f"damaged-{DAMAGED}-{attempt}/") == damaged_objects
    assert not [n for n in _s3_objects(s3_url, options) if n.startswith(f"{DAMAGED}/{attempt}/")]
    report = distckpt.verify(s3_url, storage_options=options)
    assert report.ok and report.set_aside == (where,)


def test_an_s3_record_left_by_a_killed_set_aside_goes_with_its_save(
    s3_server: S3Server, s3_url: str
) -> None:
    """A set-aside killed between writing its record and deleting COMMIT leaves both: the
    step stays committed, and once it is deleted (or replaced) its record goes too."""
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        for step in (90, 100):
            manager.save(step, {"w": weights(step, 0)})
        (commit,) = [n for n in _s3_objects(s3_url, options) if n == f"{DAMAGED}/COMMIT"]
        with ObjectStore(s3_url, options) as store:
            attempt = json.loads(store.get_bytes(commit))["attempt"]
            record = f"damaged-{DAMAGED}-{attempt}"
            store.put_bytes(record, json.dumps({"step": 100, "attempt": attempt}).encode())
        manager.delete(100)
    assert record not in _s3_objects(s3_url, options)
    assert distckpt.verify(s3_url, storage_options=options).set_aside == ()


def _s3_save_100_and_kill_its_set_aside(url: str, options: dict[str, Any]) -> tuple[str, str, str]:
    """Save 90 and 100, then leave what a set-aside of 100 killed while it copied leaves: its
    record and one object of the save copied, of several; the save's attempt, the record's
    name and the copied object's."""
    attempt = s3_save_90_and_100(url, options)
    with ObjectStore(url, options) as store:
        record = f"damaged-{DAMAGED}-{attempt}"
        store.put_bytes(record, json.dumps({"step": 100, "attempt": attempt}).encode())
        first, *rest = store.list(f"{DAMAGED}/{attempt}/")
        assert rest  # a part of the copy, not all of it
        copied = f"{record}/{first.key.rpartition('/')[2]}"
        store.copy(first.key, copied, first.size)
    return attempt, record, copied


@pytest.mark.parametrize("removal", ["delete", "replace"])
def test_an_s3_step_whose_set_aside_was_killed_then_removed_leaves_no_set_aside_copy(
    s3_server: S3Server, s3_url: str, removal: str
) -> None:
    """A set-aside killed with its record written and part of its copy made, then the step
    deleted or replaced by a job killed before its tidy() deleted the objects: nothing is
    listed as set aside, and the next start deletes the part of the copy, not completes it."""
    pytest.importorskip("botocore")
    direct = s3_server.storage_options()
    attempt, set_aside, _ = _s3_save_100_and_kill_its_set_aside(s3_url, direct)
    with S3Proxy(s3_server.port) as proxy:
        # tidy's deletes refused: what a job killed before its tidy leaves
        proxy.fail("POST", "?delete", body_parts=(DAMAGED.encode(),), times=100)
        options = s3_server.storage_options(endpoint_url=proxy.endpoint, retries=1)
        with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
            if removal == "delete":
                manager.delete(100)
            else:
                manager.save(100, {"w": weights(101, 0)}, overwrite=True)
    assert [n for n in _s3_objects(s3_url, direct) if n.startswith(set_aside)] != []
    assert distckpt.verify(s3_url, storage_options=direct).set_aside == ()
    with distckpt.CheckpointManager(s3_url, storage_options=direct) as manager:
        assert sorted(manager.gc()) == [f"{s3_url}/{set_aside}", f"{s3_url}/{DAMAGED}/{attempt}"]
    left = _s3_objects(s3_url, direct)
    assert [n for n in left if n.startswith((set_aside, f"{DAMAGED}/{attempt}/"))] == []
    assert distckpt.verify(s3_url, storage_options=direct).set_aside == ()


def test_an_s3_delete_that_failed_after_dropping_the_set_aside_record_leaves_the_copy_made(
    s3_server: S3Server, s3_url: str
) -> None:
    """A delete that dropped the record of a killed set-aside but not the step's COMMIT: the
    step is still committed, and the part of the copy made is no leftover (the next restore's
    set-aside goes on with it)."""
    pytest.importorskip("botocore")
    direct = s3_server.storage_options()
    _, set_aside, copied = _s3_save_100_and_kill_its_set_aside(s3_url, direct)
    with S3Proxy(s3_server.port) as proxy:
        proxy.fail("DELETE", f"{DAMAGED}/COMMIT", times=100)
        options = s3_server.storage_options(endpoint_url=proxy.endpoint, retries=1)
        with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
            with pytest.raises(distckpt.CheckpointError):
                manager.delete(100)
            assert manager.gc() == []
    assert set_aside not in _s3_objects(s3_url, direct)
    assert copied in _s3_objects(s3_url, direct)
    assert open_view(s3_url, storage_options=direct).committed_steps() == [90, 100]


# ------------------------------------------------------------- s3, with an older version


def _older_version_starts(older: Path, url: str, options: dict[str, Any]) -> None:
    """An older version's writing manager opens the root (its start removes what it takes
    for leftovers), runs gc, and closes: in a process of its own, importing that version."""
    code = (
        "import json\n"
        "url, options = json.loads(sys.argv[1])\n"
        "manager = distckpt.CheckpointManager(url, storage_options=options)\n"
        "manager.gc()\n"
        "manager.close()\n"
    )
    run_older_version(older, code, url, options)


def _assert_set_aside_whole(
    url: str, options: dict[str, Any], attempt: str, digests: dict[str, str]
) -> None:
    """Step 100's save is set aside with every byte, listed as such, and no longer under a
    ``step-N/`` prefix."""
    assert s3_digests(url, options, f"damaged-{DAMAGED}-{attempt}/") == digests
    assert not [name for name in _s3_objects(url, options) if name.startswith(f"{DAMAGED}/")]
    report = distckpt.verify(url, storage_options=options)
    assert report.ok and report.set_aside == (f"{url}/damaged-{DAMAGED}-{attempt}",)


def test_an_older_versions_start_and_gc_leave_an_s3_set_aside_save(
    s3_server: S3Server, s3_url: str, older_distckpt: Path
) -> None:
    options = s3_server.storage_options()
    attempt, digests = s3_save_90_and_damaged_100(s3_url, options)
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        restored = manager.restore(state={"w": torch.zeros(256)})
        assert restored is not None and restored.step == 90
    _assert_set_aside_whole(s3_url, options, attempt, digests)

    _older_version_starts(older_distckpt, s3_url, options)

    _assert_set_aside_whole(s3_url, options, attempt, digests)


def _kill_this_process(*args: Any, **kwargs: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize(
    ("killed", "older_starts_next"),
    [
        ("while-copying", False),
        ("while-copying-then-uncommitted", False),
        ("after-unpublishing", False),
        ("after-unpublishing", True),
    ],
    ids=[
        "while-copying",
        "while-copying-then-uncommitted",
        "after-unpublishing",
        "after-unpublishing-older-starts-next",
    ],
)
def test_an_s3_set_aside_killed_midway_is_completed_and_loses_nothing(
    s3_server: S3Server, s3_url: str, older_distckpt: Path, killed: str, older_starts_next: bool
) -> None:
    """SIGKILLed after copying one object (step 100 still committed: the next restart sets it
    aside again, copying the rest) or after deleting COMMIT (the copy whole: the next start
    deletes the originals), then restarted by this version, or first started by an older one,
    which deletes the originals as a dead writer's save: harmless, they were copied. (Killed
    while copying, the step is still committed, which every version's start leaves alone.)
    Killed while copying and then uncommitted otherwise (its COMMIT deleted by hand, or by a
    version that knows no set-aside record), the next start completes the copy the record
    names before it deletes the originals as a leftover."""
    options = s3_server.storage_options()
    attempt, digests = s3_save_90_and_damaged_100(s3_url, options)
    child = os.fork()
    if child == 0:  # pragma: no cover - the child is killed
        if killed.startswith("while-copying"):
            copy = ObjectStore.copy
            copies: list[str] = []

            def copy_once_then_die(self: ObjectStore, source: str, target: str, size: int) -> None:
                if copies:
                    _kill_this_process()
                copies.append(source)
                copy(self, source, target, size)

            ObjectStore.copy = copy_once_then_die  # type: ignore[method-assign]
        else:
            from distckpt.storage.s3_upkeep import Upkeep

            Upkeep._delete_prefix = _kill_this_process  # type: ignore[method-assign]
        with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
            manager.restore(state={"w": torch.zeros(256)})
        os._exit(0)
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    committed = killed.startswith("while-copying")
    assert (f"{DAMAGED}/COMMIT" in _s3_objects(s3_url, options)) == committed
    if killed == "while-copying-then-uncommitted":
        with ObjectStore(s3_url, options) as store:
            store.delete_one(f"{DAMAGED}/COMMIT")

    if older_starts_next:
        _older_version_starts(older_distckpt, s3_url, options)
    # this version's restart: it takes the lease the killed job held (a dead process here)
    with distckpt.CheckpointManager(s3_url, storage_options=options, wait_for_root=30) as manager:
        restored = manager.restore(state={"w": torch.zeros(256)})
        assert restored is not None and restored.step == 90
        assert manager.steps() == [90]

    _assert_set_aside_whole(s3_url, options, attempt, digests)


def _requests_sent(store: ObjectStore, operation: str) -> list[dict[str, Any]]:
    """The parameters of each ``operation`` request (botocore's name, e.g. ``CopyObject``)
    that ``store``'s client sends from now on (their API parameters), by botocore's own event
    hook: the requests are real."""
    sent: list[dict[str, Any]] = []
    store.client.meta.events.register(
        f"before-parameter-build.s3.{operation}", lambda params, **_: sent.append(dict(params))
    )
    return sent


def test_an_s3_set_aside_out_of_its_budget_stays_committed_and_is_continued_later(
    s3_server: S3Server,
    s3_url: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A copy that does not finish within the store's budget (half the manager's timeout:
    the other ranks wait for it in the restore's collective) leaves the step committed, with a
    warning; ls and verify do not list it as set aside; the next set-aside copies only what
    is missing."""
    options = s3_server.storage_options()
    attempt, digests = s3_save_90_and_damaged_100(s3_url, options)
    location = f"{s3_url}/{DAMAGED}"
    with distckpt.CheckpointManager(s3_url, storage_options=options, timeout=40) as manager:
        assert manager._store.set_aside_budget == 20.0  # type: ignore[attr-defined]

    store = open_store(s3_url, storage_options=options, lock_timeout=0.0)  # no time to copy
    store.open()
    try:
        with caplog.at_level(logging.WARNING, logger="distckpt"):
            assert store.set_aside(100, location) is None
    finally:
        store.close()
    assert any("did not finish within" in r.getMessage() for r in caplog.records)
    objects = _s3_objects(s3_url, options)
    assert f"{DAMAGED}/COMMIT" in objects and f"damaged-{DAMAGED}-{attempt}" in objects
    # the record is there, the step still committed: not listed as set aside
    assert distckpt.verify(s3_url, storage_options=options).set_aside == ()
    for name, value in aws_environment(s3_server).items():  # what the CLI's client reads
        monkeypatch.setenv(name, value)
    status, text = run_cli("ls", s3_url)
    assert status == 0 and "set aside" not in text and "DAMAGED" in text

    # one object copied before (a set-aside that ran out of time, or was killed)
    first = sorted(digests)[0]
    with ObjectStore(s3_url, options) as client:
        source = f"{DAMAGED}/{attempt}/{first}"
        client.copy(source, f"damaged-{DAMAGED}-{attempt}/{first}", client.head(source).size)
    store = open_store(s3_url, storage_options=options, lock_timeout=60.0)
    store.open()
    try:
        copies = _requests_sent(store.s3.client, "CopyObject")  # type: ignore[attr-defined]
        assert store.set_aside(100, location) == f"{s3_url}/damaged-{DAMAGED}-{attempt}"
    finally:
        store.close()
    assert len(copies) == len(digests) - 1
    _assert_set_aside_whole(s3_url, options, attempt, digests)


def test_listing_s3_set_aside_saves_reads_their_records_not_their_copies(
    s3_server: S3Server, s3_url: str
) -> None:
    options = s3_server.storage_options()
    attempt, digests = s3_save_90_and_damaged_100(s3_url, options)
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        manager.restore(state={"w": torch.zeros(256)})
    view = open_view(s3_url, storage_options=options)
    client = view.s3.client  # type: ignore[attr-defined]
    listings = _requests_sent(client, "ListObjectsV2")
    keys_listed: list[str] = []
    client.client.meta.events.register(
        "after-call.s3.ListObjectsV2",
        lambda parsed, **_: keys_listed.extend(item["Key"] for item in parsed.get("Contents", [])),
    )
    assert view.set_aside_checkpoints() == [f"{s3_url}/damaged-{DAMAGED}-{attempt}"]
    assert listings and all(params.get("Delimiter") == "/" for params in listings)
    copied = [key for key in keys_listed if f"damaged-{DAMAGED}-{attempt}/" in key]
    assert copied == [] and digests  # the copy is there, never listed


def test_an_s3_set_aside_copies_the_objects_of_a_save_at_once(
    s3_server: S3Server, s3_url: str
) -> None:
    """While one object's copy is held back, another's goes through: the copies run side by
    side (``max_concurrency`` at a time), not one after another."""
    options = s3_server.storage_options()
    attempt, digests = s3_save_90_and_damaged_100(s3_url, options)
    assert len(digests) >= 2
    copy_prefix = f"damaged-{DAMAGED}-{attempt}/"
    with S3Proxy(s3_server.port) as proxy:
        held = proxy.hold("PUT", copy_prefix)
        store = open_store(
            s3_url, storage_options={**options, "endpoint_url": proxy.endpoint}, lock_timeout=60
        )
        store.open()
        try:
            with ThreadPoolExecutor(1) as setting_aside:
                where = setting_aside.submit(store.set_aside, 100, f"{s3_url}/{DAMAGED}")
                assert held.arrived.wait(JOB_TIMEOUT)
                # another copy is answered while the first is held
                assert proxy.wait_for("PUT", copy_prefix, timeout=JOB_TIMEOUT)
                held.release()
                assert where.result(JOB_TIMEOUT) == f"{s3_url}/damaged-{DAMAGED}-{attempt}"
        finally:
            held.release()
            store.close()
    _assert_set_aside_whole(s3_url, options, attempt, digests)


def test_an_s3_set_aside_made_between_two_pages_of_a_cleanup_listing_keeps_its_copy(
    s3_server: S3Server, s3_url: str
) -> None:
    """A cleanup whose listing (pages of one key, as any store may answer) saw part of a
    set-aside copy but not its record, because a restore elsewhere wrote the record, copied
    the save and deleted its ``COMMIT`` between two pages, reads the record again before it
    takes the copy for a stray: the copy is kept whole."""
    direct = s3_server.storage_options()
    attempt = s3_save_90_and_100(s3_url, direct)
    saved = f"{DAMAGED}/{attempt}/"
    digests = s3_digests(s3_url, direct, saved)
    copy = f"{set_aside_name(100, attempt)}/"
    first = sorted(digests)[0]
    with ObjectStore(s3_url, direct) as store:
        # a part of a copy whose record is gone while the step stays committed: the record's
        # key sorts just before its copy's, so a listing's page may end between them
        store.copy(saved + first, copy + first, store.head(saved + first).size)
        keys = [info.key for info in store.list()]
    root_listing = f"prefix={quote(S3Url.parse(s3_url).key(''), safe='')}&"
    with S3Proxy(s3_server.port) as proxy:
        proxy.short_pages(1, root_listing)
        options = s3_server.storage_options(endpoint_url=proxy.endpoint)
        with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
            manager.gc()  # waits for the start's own cleanup, which lists the root too

            def set_aside_elsewhere() -> None:  # in a restore's order: record, copy, COMMIT
                with ObjectStore(s3_url, direct) as store:
                    store.put_bytes(copy[:-1], CommitRecord.encode(100, attempt))
                    for name in digests:
                        store.copy(saved + name, copy + name, store.head(saved + name).size)
                    store.delete_one(f"{DAMAGED}/COMMIT")

            # page k + 1 lists keys[k]: hold the page after the one listing the copy's part
            held = proxy.hold(
                "GET", root_listing, "continuation-token", skip=keys.index(copy + first)
            )
            with held.changed_meanwhile(set_aside_elsewhere):
                manager.gc()
    assert s3_digests(s3_url, direct, copy) == digests
