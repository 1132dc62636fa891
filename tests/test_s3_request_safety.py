"""What the requests an ``s3://`` root no longer sends (tests/test_s3_requests.py) must not
cost: each read this process skips is one whose answer it knows, and is sent again when that
answer may have changed (a ``COMMIT`` replaced, a failed update, a step to remove)."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

import distckpt
from distckpt.objstore import ObjectStore
from distckpt.storage import OpenedRoot, open_store
from distckpt.storage.s3_root import CommitRecord, S3Root
from tests.s3proxy import S3Proxy
from tests.s3server import S3Server
from tests.test_s3_requests import _counted, _state
from tests.waiting import after_rank_0_removals

pytest.importorskip("botocore")

#: the attempt of the save a lingering writer committed over step 1 (a valid attempt token)
OTHER_ATTEMPT = "0123456789ab-1"


def _saves_of_step_1(url: str, options: dict[str, Any]) -> list[str]:
    with ObjectStore(url, options) as store:
        saves = {info.key.split("/")[1] for info in store.list("step-00000001/")}
    return sorted(saves - {"COMMIT"})


def test_the_search_for_leftovers_reads_a_commit_replaced_since_this_process_read_it(
    s3_server: S3Server, s3_url: str
) -> None:
    """The open's pointers' update reads step 1's ``COMMIT``; another writer replaces it (a
    commit of another save of step 1) before the search for leftovers lists the root. The
    listing shows another ETag, so the search reads the new ``COMMIT`` and removes the save it
    no longer names, rather than keeping it on the record read before."""
    plain = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=plain) as manager:
        manager.save(1, _state(1))
    [first] = _saves_of_step_1(s3_url, plain)
    with S3Proxy(s3_server.port) as proxy:
        # the search's listing of every object (of the root's prefix, not delimited)
        listing = proxy.hold("GET", "list-type=2", "max-keys=1000", "prefix=ckpt%2F&")
        manager = distckpt.CheckpointManager(
            s3_url, storage_options=s3_server.storage_options(endpoint_url=proxy.endpoint)
        )
        try:
            assert listing.arrived.wait(60)
            with ObjectStore(s3_url, plain) as store:
                for info in list(store.list(f"step-00000001/{first}/")):
                    copy = info.key.replace(first, OTHER_ATTEMPT)
                    store.copy(info.key, copy, info.size)
                record = {"attempt": OTHER_ATTEMPT, "step": 1}
                store.put_bytes("step-00000001/COMMIT", json.dumps(record).encode())
            listing.release()
            after_rank_0_removals(manager)
        finally:
            listing.release()
            manager.close()
    assert _saves_of_step_1(s3_url, plain) == [OTHER_ATTEMPT]


def test_retention_that_removes_a_step_reads_both_pointers_and_keeps_their_targets(
    s3_server: S3Server, s3_url: str
) -> None:
    """Without a monitor, ``best`` left naming step 1 (by a run that had one) protects step 1
    from ``keep_last=1``: the pointers are read once something is to be removed."""
    with S3Proxy(s3_server.port) as proxy:
        options = s3_server.storage_options(endpoint_url=proxy.endpoint)
        with distckpt.CheckpointManager(s3_url, storage_options=options, keep_last=1) as manager:
            manager.save(1, _state(1))
            with ObjectStore(s3_url, options) as store:
                store.put_bytes("best", b"step-00000001\n")
            mark = len(proxy.log)
            manager.save(2, _state(2))
            save = _counted(proxy, mark)
            assert manager.steps() == [1, 2]
            manager.save(3, _state(3))  # best still names 1: step 2 alone is removed
            assert manager.steps() == [1, 3]
    # the update's look at best, then retention's read of both
    assert save["GET last"] == 1 and save["GET best"] == 2, save


def test_an_open_whose_pointers_update_fails_finds_the_newest_checkpoint_itself(
    s3_server: S3Server, s3_url: str
) -> None:
    """The newest checkpoint an open reports comes from its pointers' update; when that
    update fails (here its listing of the steps), the open lists and checks the root again."""
    with distckpt.CheckpointManager(s3_url, storage_options=s3_server.storage_options()) as m:
        m.save(1, _state(1))
        m.save(2, _state(2))
    with S3Proxy(s3_server.port) as proxy:
        options = s3_server.storage_options(endpoint_url=proxy.endpoint, retries=1)
        proxy.fail("GET", "list-type=2", "step-", status=403)
        store = open_store(s3_url, storage_options=options)
        try:
            opened = store.open()
        finally:
            store.close()
        assert not proxy.rules[0].times  # the update's listing was refused
    assert opened.newest is not None and opened.newest[0] == 2


def test_an_open_reports_a_newer_step_committed_while_its_pointers_update_ran(
    s3_server: S3Server, s3_url: str
) -> None:
    """A lingering job commits step 3 and moves ``last`` to it after the open's pointers'
    update listed steps 1 and 2: the update leaves ``last`` on step 3, and the open reports
    step 3 as the newest, not step 2 (the newest the update checked)."""
    plain = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=plain) as manager:
        manager.save(1, _state(1))
        manager.save(2, _state(2))
    other_url = f"{s3_url}-other"
    with distckpt.CheckpointManager(other_url, storage_options=plain) as manager:
        manager.save(3, _state(3))
    with S3Proxy(s3_server.port) as proxy:
        # the update's read of last, after its listing of the steps
        read_of_last = proxy.hold("GET", "ckpt/last")
        proxied = s3_server.storage_options(endpoint_url=proxy.endpoint)
        store = open_store(s3_url, storage_options=proxied)
        opened: list[OpenedRoot] = []
        opening = threading.Thread(target=lambda: opened.append(store.open()))
        opening.start()
        try:
            assert read_of_last.arrived.wait(60)
            # the lingering job's commit of step 3, then its move of last
            with ObjectStore(s3_url, plain) as root, ObjectStore(other_url, plain) as other:
                for info in list(other.list("step-00000003/")):
                    root.put_bytes(info.key, other.get_bytes(info.key))
                root.put_bytes("last", b"step-00000003\n")
        finally:
            read_of_last.release()
            opening.join()
            store.close()
    assert [root.newest for root in opened] == [(3, None)]


def test_a_save_moves_last_back_onto_its_step_after_another_process_moved_it_away(
    s3_server: S3Server, s3_url: str
) -> None:
    """Another process (as ``distckpt delete``) deletes the newest step 2, moving ``last``
    back to step 1; the job then saves step 2 again. ``last`` names step 2, though this
    process wrote that very target before."""
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        manager.save(1, _state(1))
        manager.save(2, _state(2))
        other = open_store(s3_url, storage_options=options)
        other.delete(2)
        other.tidy()
        manager.save(2, _state(20))
        with ObjectStore(s3_url, options) as store:
            assert store.get_bytes("last") == b"step-00000002\n"
        restored = manager.restore("last")
        assert restored is not None and restored.state["step"] == 20


def test_the_commit_records_remembered_are_those_of_steps_still_kept(
    s3_server: S3Server, s3_url: str
) -> None:
    """The records of ``COMMIT`` versions read or written, which spare reads, go with the step
    retention removes: a long job does not keep one per step it ever saved."""
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options, keep_last=1) as manager:
        for step in (1, 2, 3):
            manager.save(step, _state(step))
        assert manager.steps() == [3]
        assert set(manager._store.s3.commits) == {3}  # type: ignore[attr-defined]


def test_the_manifests_remembered_are_those_of_the_saves_still_kept(
    s3_server: S3Server, s3_url: str
) -> None:
    """The manifests read or written, which spare reads, go with the step retention or a
    delete removes, and with a save an overwrite replaced: a long job does not keep one per
    save it ever made. Read from the private memo: no public call tells what it holds."""
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options, keep_last=2) as manager:
        s3 = manager._store.s3  # type: ignore[attr-defined]
        for step in (1, 2, 3):
            manager.save(step, _state(step))
        assert manager.steps() == [2, 3] and sorted(step for step, _ in s3.manifests) == [2, 3]
        manager.save(3, _state(30), overwrite=True)
        assert sorted(s3.manifests) == [(2, s3.commits[2].attempt), (3, s3.commits[3].attempt)]
        manager.delete(2)
        assert list(s3.manifests) == [(3, s3.commits[3].attempt)]


def test_a_reader_remembers_only_the_steps_another_process_kept(
    s3_server: S3Server, s3_url: str
) -> None:
    """A read-only process, which removes nothing itself, forgets what it kept of the steps the
    writer's retention removed once it lists the root again: a reader that follows a long job
    does not keep a record and a manifest per step it ever read."""
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options, keep_last=2) as writer:
        writer.save(1, _state(1))
        with distckpt.CheckpointManager(s3_url, storage_options=options, read_only=True) as reader:
            s3 = reader._store.s3  # type: ignore[attr-defined]
            for step in range(2, 4):
                writer.save(step, _state(step))
                after_rank_0_removals(writer)  # the removed step's objects: listed till then
                assert reader.restore("last", state=_state(0)).step == step
                assert set(s3.commits) <= {step - 1, step}, s3.commits
                assert {kept for kept, _ in s3.manifests} <= {step - 1, step}, s3.manifests


def test_a_commit_record_is_remembered_under_the_step_it_was_read_from(
    s3_server: S3Server, s3_url: str
) -> None:
    """A ``COMMIT`` whose record names another step (a step's objects copied by hand) is kept
    as the version read at its own key, and leaves the record kept of the step it names."""
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options) as writer:
        writer.save(2, _state(2))
    root = S3Root(s3_url, options)
    named = root.read_commit(2)
    assert named is not None
    root.client.put_bytes(root.commit_name(7), CommitRecord.encode(2, named.attempt))
    copied = root.read_commit(7)
    assert copied is not None
    assert root.known_commit(7, copied.etag) == copied
    assert root.known_commit(2, named.etag) == named


def test_a_commit_under_a_step_prefix_of_another_width_is_not_the_steps_commit(
    s3_server: S3Server, s3_url: str
) -> None:
    """``step-2/COMMIT`` (a width no manager writes), listed after ``step-00000002/COMMIT``,
    is not step 2's: the ETag read from the listing is the one a ``HEAD`` of step 2's own
    ``COMMIT`` reads, and step 2 is no longer committed once that one is deleted."""
    root = S3Root(s3_url, s3_server.storage_options())
    try:
        for step in (1, 2):
            root.client.put_bytes(root.commit_name(step), CommitRecord.encode(step, OTHER_ATTEMPT))
        root.client.put_bytes("step-2/COMMIT", CommitRecord.encode(2, "stray"))
        heads = {step: root.client.head(root.commit_name(step)).etag for step in (1, 2)}
        assert root.commit_etags() == heads
        root.client.delete_one(root.commit_name(2))
        assert root.committed_steps() == [1]
    finally:
        root.close()


@pytest.mark.parametrize(
    ("listing", "call"), [("list_dirs", "listed_steps"), ("list_pages", "committed_steps")]
)
def test_a_listing_that_overlaps_this_processs_own_commit_keeps_what_it_committed(
    s3_server: S3Server, s3_url: str, listing: str, call: str
) -> None:
    """A listing of every step (of the step prefixes, or of every object under them) forgets
    the steps it no longer finds; a step this process commits while that listing runs (an
    async save beside ``steps()``) is missing from it, and its record and manifest stay kept
    (forgetting them would only cost requests again)."""
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options, keep_last=5) as mgr:
        mgr.save(1, _state(1))
        s3 = mgr._store.s3  # type: ignore[attr-defined]
        real_listing = getattr(s3.client, listing)
        served, resume = threading.Event(), threading.Event()

        def listing_held_after_its_last_page(prefix: str = "", **kwargs: Any) -> Any:
            # Our own call wrapped: only so can the save land between the listing's last
            # page and its end; the listing and the save are real requests to the server.
            names = list(real_listing(prefix, **kwargs))
            if threading.current_thread().name == "lister":
                served.set()
                resume.wait(30)
            yield from names

        setattr(s3.client, listing, listing_held_after_its_last_page)
        listed: list[list[int]] = []
        lister = threading.Thread(target=lambda: listed.append(getattr(s3, call)()), name="lister")
        lister.start()
        try:
            assert served.wait(30)
            mgr.save(2, _state(2))
        finally:
            resume.set()
            lister.join(30)
        assert listed == [[1]]
        assert set(s3.commits) == {1, 2}, s3.commits
        assert {step for step, _ in s3.manifests} == {1, 2}, s3.manifests
