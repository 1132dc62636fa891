"""How many requests an ``s3://`` root costs: opening a manager, a save and a restore, counted
by kind on the wire (tests/s3proxy.py in front of the moto server), each against an upper
bound. The bounds are the costs docs/object-stores.md states ("What a save costs"): a change
that sends more of any kind fails here, and the page must be updated with the bound."""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import pytest
import torch

import distckpt
from distckpt.checksums import crc32
from distckpt.layout import LAST, MANIFEST_NAME, step_dir_name
from distckpt.manifest import FileRecord
from distckpt.storage import s3_root
from distckpt.storage.s3_checkpoint import S3Checkpoint
from distckpt.storage.s3_root import CommitRecord, S3Root
from distckpt.storage.s3_view import S3RootView
from tests.s3proxy import S3Proxy
from tests.s3server import S3Server
from tests.waiting import after_rank_0_removals

pytest.importorskip("botocore")

#: the steps a root keeps before the counted save, open and restore
KEPT = 5
_ATTEMPT = re.compile(r"step-\d+/[^/]+/")


def request_kind(method: str, path: str) -> str:
    """One request as ``"<operation> <object kind>"``: ``path`` is the URL path and query the
    proxy saw (``/BUCKET/KEY?QUERY``)."""
    path, _, query = path.partition("?")
    key = path.lstrip("/").partition("/")[2]
    if method == "GET" and "list-type=2" in query:
        prefix = re.search(r"prefix=([^&]*)", query)
        listed = (prefix.group(1) if prefix else "").replace("%2F", "/")
        if listed.endswith("step-"):
            return "LIST saves"  # the steps' prefixes
        return "LIST save" if _ATTEMPT.search(listed) else f"LIST {listed.rpartition('/')[2]}root"
    if method == "POST" and "delete" in query:
        return "DeleteObjects"  # the names are in the body
    name = key.rpartition("/")[2]
    if name in ("COMMIT", ".lease", "last", "best", "manifest.json"):
        return f"{method} {name}"
    if "/.writers/" in f"/{key}":
        return f"{method} claim"
    return f"{method} {'shard' if _ATTEMPT.search(key) else key}"


def _state(step: int) -> dict[str, Any]:
    return {"w": torch.arange(8.0) + step, "step": step}


def _counted(proxy: S3Proxy, since: int) -> collections.Counter[str]:
    # The lease's and the claims' renewals run on a timer (every 10 s), so whether one falls
    # inside a counted call depends on the machine's speed: those writes are not counted.
    kinds = (request_kind(method, path) for method, path, _ in proxy.log[since:])
    return collections.Counter(k for k in kinds if k not in ("PUT .lease", "PUT claim"))


def _over(counted: collections.Counter[str], bounds: dict[str, int]) -> dict[str, int]:
    return {kind: n for kind, n in counted.items() if n > bounds.get(kind, 0)}


def test_a_save_open_and_restore_send_at_most_the_requests_the_docs_state(
    s3_server: S3Server, s3_url: str
) -> None:
    with S3Proxy(s3_server.port) as proxy:
        options = s3_server.storage_options(endpoint_url=proxy.endpoint)
        manager = distckpt.CheckpointManager(s3_url, storage_options=options, keep_last=10)
        for step in range(1, KEPT + 1):
            manager.save(step, _state(step))
        # what the save and the start left to remove runs in a thread: done before counting
        after_rank_0_removals(manager)
        mark = len(proxy.log)
        manager.save(KEPT + 1, _state(KEPT + 1))
        after_rank_0_removals(manager)
        save = _counted(proxy, mark)
        mark = len(proxy.log)
        restored = manager.restore("last", state=_state(0))
        restore = _counted(proxy, mark)
        manager.close()
        mark = len(proxy.log)
        manager = distckpt.CheckpointManager(s3_url, storage_options=options, keep_last=10)
        after_rank_0_removals(manager)
        opened = _counted(proxy, mark)
        mark = len(proxy.log)
        manager.restore("last", state=_state(0))
        # the open read every manifest already: the download's HEAD and GET of it only
        restore_after_open = _counted(proxy, mark)
        manager.close()
    assert restored is not None and restored.step == KEPT + 1
    kept = KEPT + 1  # committed when the restore and the second open run
    # no HEAD of COMMIT: the pointers' update reads each step's from its listing of every object
    save_bounds = {
        "LIST saves": 2,  # the step rules' listing, the pointers' update's
        # the commit's check before and after COMMIT; the pointers' update checks the save
        # again (its objects may be lost after the commit's own listing) from its listing of
        # every object, made after both
        "LIST save": 2,
        "PUT shard": 1,
        "PUT manifest.json": 1,
        "HEAD .lease": 1,  # the commit's check of the lease
        "PUT COMMIT": 1,
        "PUT last": 1,
        "GET best": 1,  # no monitor: a best pointer left behind is removed
        "DeleteObjects": 1,  # the save's claim
    }
    assert not _over(save, save_bounds), save
    restore_bounds = {
        "LIST saves": 1,  # no HEAD of each step's COMMIT: the newest is checked, and it passes
        "GET last": 1,  # read once, by the search for the newest step
        "GET COMMIT": 1,
        "LIST save": 1,
        "HEAD manifest.json": 1,
        "GET manifest.json": 1,
        "HEAD shard": 1,
        "GET shard": 1,
    }
    assert not _over(restore, restore_bounds), restore
    assert not _over(restore_after_open, restore_bounds), restore_after_open
    open_bounds = {
        "LIST root": 3,  # the root is reachable (rank 0, then every rank); leftovers
        "GET .lease": 2,  # the released lease (the exclusive create's refusal, then the take)
        "LIST saves": 1,  # every object under the step prefixes: no HEAD of each COMMIT
        # none on S3 (moto too): each COMMIT's ETag, as listed, is the MD5 digest of the record
        # naming one of its step's saves; the save's objects and the manifest's size come from
        # the listing of every object
        "GET manifest.json": kept,
        # last's (no monitor: best's too), asked again before the pointer moves to it: the
        # listing of several pages is no snapshot, the step may have been replaced since
        "HEAD COMMIT": 1,
        "GET last": 1,
        "GET best": 1,
    }
    assert not _over(opened, open_bounds), opened


def _one_saved_step(s3_server: S3Server, s3_url: str) -> S3Root:
    """A root with step 1 saved by a manager, and its S3Root straight to the server (what it
    sends is not counted, nor slowed by a proxy)."""
    with distckpt.CheckpointManager(s3_url, storage_options=s3_server.storage_options()) as m:
        m.save(1, _state(1))
    return S3Root(s3_url, s3_server.storage_options())


def _copy_as_steps(
    root: S3Root, source_step: int, steps: Iterable[int], extra_files: int = 0
) -> None:
    """Commit each of ``steps`` as a copy of the committed ``source_step``: its files copied
    inside the store, its manifest naming the step. A whole checkpoint in three requests, where
    a save sends sixteen, so that a fast test's root keeps many steps. ``extra_files``: files of
    one byte more in each copy, its manifest listing them (a save of many files)."""
    record = root.read_commit(source_step)
    assert record is not None
    source_prefix = root.attempt_prefix(source_step, record.attempt)
    manifest_key = source_prefix + MANIFEST_NAME
    files = [info for info in root.client.list(source_prefix) if info.key != manifest_key]
    manifest = S3Checkpoint(root, source_step).read_manifest()
    extra = {
        f"extra-{index:05d}": FileRecord(1, f"{crc32(b'x'):08x}") for index in range(extra_files)
    }
    listed = replace(manifest, files={**manifest.files, **extra})

    def copy(step: int) -> None:
        prefix = root.attempt_prefix(step, record.attempt)
        for info in files:
            root.client.copy(info.key, prefix + info.key[len(source_prefix) :], info.size)
        with ThreadPoolExecutor(4) as files_pool:
            list(files_pool.map(lambda name: root.client.put_bytes(prefix + name, b"x"), extra))
        root.client.put_bytes(prefix + MANIFEST_NAME, replace(listed, step=step).to_json())
        root.client.put_bytes(root.commit_name(step), CommitRecord.encode(step, record.attempt))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(copy, steps))


def _costs_as_steps_are_added(
    s3_server: S3Server,
    direct: S3Root,
    batches: Iterable[Iterable[int]],
    call: Callable[[dict[str, Any]], None],
) -> list[collections.Counter[str]]:
    """For each of ``batches``: its steps committed as copies of step 1, ``last`` moved to
    the newest step, then what ``call`` (given the storage options through the proxy) sends."""
    costs = []
    with S3Proxy(s3_server.port) as proxy:
        options = s3_server.storage_options(endpoint_url=proxy.endpoint)
        for copies in batches:
            _copy_as_steps(direct, 1, copies)
            direct.client.put_bytes(LAST, step_dir_name(max(direct.committed_steps())).encode())
            mark = len(proxy.log)
            call(options)
            costs.append(_counted(proxy, mark))
    return costs


@pytest.mark.parametrize("suffix", ["", "/last"])
def test_a_load_of_the_newest_step_costs_as_much_with_20_kept_steps_as_with_2(
    s3_server: S3Server, s3_url: str, suffix: str
) -> None:
    # restore("last") sends no request per kept step either: the bounds above hold it
    # (no HEAD of COMMIT, one GET of it); a manager behind the proxy would double the time.
    direct = _one_saved_step(s3_server, s3_url)

    def load(options: dict[str, Any]) -> None:
        assert distckpt.load_checkpoint(s3_url + suffix, storage_options=options).step == 100

    costs = _costs_as_steps_are_added(s3_server, direct, [[100], range(2, 20)], load)
    assert len(direct.committed_steps()) == 20
    direct.close()
    assert costs[0] == costs[1], costs
    searched = {"LIST saves": 1, "GET last": 1, "GET COMMIT": 1, "LIST save": 1}
    if suffix:
        searched["GET last"] += 1  # read first to tell what the URL names
    assert {kind: costs[0][kind] for kind in searched} == searched, costs[0]
    assert costs[0]["HEAD COMMIT"] == 0, costs[0]


def test_an_open_costs_one_request_a_kept_step_with_20_kept_steps_as_with_2(
    s3_server: S3Server, s3_url: str
) -> None:
    """An open's pointers' update checks every kept step: its manifest is read (a ``GET``),
    its ``COMMIT``'s record, its save's objects and the manifest's size come from the listing
    of every object under the step prefixes that the update makes anyway (the ETag of
    ``COMMIT`` is the MD5 digest of the record naming a save listed): no ``GET`` of
    ``COMMIT``, no ``HEAD`` of the manifest, no listing of each save, nor a ``GET`` of
    ``COMMIT`` by the search for leftovers; only the ``COMMIT`` of the step ``last`` moves to
    is asked for again (a ``HEAD``). N + 9 requests counted (the lease's two ``PUT``s are
    not), as docs/object-stores.md states."""
    direct = _one_saved_step(s3_server, s3_url)

    def open_root(options: dict[str, Any]) -> None:
        manager = distckpt.CheckpointManager(s3_url, storage_options=options)
        after_rank_0_removals(manager)  # the search for leftovers is part of the open's cost
        manager.close()  # the release of the lease is not: each open's starts after it

    costs = _costs_as_steps_are_added(s3_server, direct, [[2], range(3, 21)], open_root)
    direct.close()
    fixed = {"LIST root": 3, "GET .lease": 2, "LIST saves": 1, "GET last": 1, "GET best": 1}
    for kept, cost in zip((2, 20), costs):
        assert cost == {**fixed, "GET manifest.json": kept, "HEAD COMMIT": 1}, cost
        assert cost.total() == kept + 9


def test_an_open_reads_a_commit_whose_etag_is_not_the_digest_of_a_record_it_would_write(
    s3_server: S3Server, s3_url: str
) -> None:
    """A ``COMMIT`` whose bytes are not the record this version writes (another version's
    spelling of it; a damaged one; a store whose ETag is no MD5 digest) is read: one ``GET``,
    and the step is checked and kept as the others are."""
    direct = _one_saved_step(s3_server, s3_url)
    _copy_as_steps(direct, 1, [2])
    record = direct.read_commit(2)
    assert record is not None
    spelled = json.dumps({"step": 2, "attempt": record.attempt}, indent=1).encode()
    direct.client.put_bytes(direct.commit_name(2), spelled)

    def open_root(options: dict[str, Any]) -> None:
        with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
            after_rank_0_removals(manager)
            assert manager.steps() == [1, 2, 3]

    [cost] = _costs_as_steps_are_added(s3_server, direct, [[3]], open_root)
    assert direct.read_pointer(LAST)[0] == step_dir_name(3)
    direct.close()
    assert cost["GET COMMIT"] == 1, cost


def test_a_load_asks_once_about_each_newer_step_a_dead_writer_left(
    s3_server: S3Server, s3_url: str
) -> None:
    """A step prefix a dead writer left uncommitted, newer than the newest committed step,
    costs the search for the newest step one request (its ``COMMIT`` looked for, not found)."""
    direct = _one_saved_step(s3_server, s3_url)
    leftovers = range(2, 5)
    for step in leftovers:
        direct.client.put_bytes(direct.attempt_prefix(step, "dead") + "rank-00000.pt", b"left")
    direct.close()
    with S3Proxy(s3_server.port) as proxy:
        options = s3_server.storage_options(endpoint_url=proxy.endpoint)
        mark = len(proxy.log)
        assert distckpt.load_checkpoint(s3_url, storage_options=options).step == 1
        counted = _counted(proxy, mark)
    assert counted["GET COMMIT"] == len(leftovers) + 1, counted
    assert counted["HEAD COMMIT"] == 0, counted


def test_reading_the_committed_steps_costs_one_listing_with_22_steps_as_with_3(
    s3_server: S3Server, s3_url: str
) -> None:
    """What a save's pointers' update reads of every step, each step's ``COMMIT`` and its
    ETag, comes from one listing of every object under the step prefixes (one page here), not
    a ``HEAD`` per step; the save's other requests, which the bounds above hold, are none of
    them one per kept step: a save costs as much with 22 kept steps as with 3."""
    direct = _one_saved_step(s3_server, s3_url)
    costs = []
    with S3Proxy(s3_server.port) as proxy:
        options = s3_server.storage_options(endpoint_url=proxy.endpoint)
        for copies in ([2, 3], range(4, 23)):
            _copy_as_steps(direct, 1, copies)
            root = S3Root(s3_url, options)
            mark = len(proxy.log)
            assert root.committed_steps() == list(range(1, max(copies) + 1))
            costs.append(_counted(proxy, mark))
            root.close()
    direct.close()
    assert costs[0] == costs[1] == {"LIST saves": 1}, costs


def test_saves_of_many_files_are_listed_while_they_fit_a_page_else_asked_about_per_step(
    s3_server: S3Server, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process keeping the manifests of saves of more than LISTED_OBJECTS_PER_STEP objects
    each (a writer, once open) reads the committed steps from one listing of every object
    while those steps fit a page (LISTING_PAGE objects), as an open does; past that, it lists
    the step prefixes and sends a HEAD of each step's COMMIT (as many requests as before the
    listing of every object came), not a page of a listing per LISTING_PAGE of their files."""
    # The rules at a fraction of their numbers: at the real ones this root would need saves
    # of hundreds of files, which take minutes to write to the test server.
    monkeypatch.setattr(s3_root, "LISTED_OBJECTS_PER_STEP", 4)
    direct = _one_saved_step(s3_server, s3_url)
    copies = [2, 3, 4]
    _copy_as_steps(direct, 1, copies, extra_files=12)
    direct.close()
    costs = []
    with S3Proxy(s3_server.port) as proxy:
        root = S3Root(s3_url, s3_server.storage_options(endpoint_url=proxy.endpoint))
        for step in copies:
            S3Checkpoint(root, step).read_manifest()  # as the open of a writer reads them
        root.read_commit(1)  # a step kept without its manifest: 4 steps kept, 3 manifests
        objects = sum(len(manifest.files) + 2 for manifest in root.manifests.values())
        assert objects > 4 * len(copies)  # more than LISTED_OBJECTS_PER_STEP each
        # The 4 steps kept, at the manifests' average, fit a page of 1000 (the real one), not
        # one of as many objects as the 3 manifests name: the steps kept count, not the
        # manifests alone.
        for page in (s3_root.LISTING_PAGE, objects):
            monkeypatch.setattr(s3_root, "LISTING_PAGE", page)
            mark = len(proxy.log)
            assert root.committed_steps() == [1, *copies]
            costs.append(_counted(proxy, mark))
        root.close()
    assert costs == [{"LIST saves": 1}, {"LIST saves": 1, "HEAD COMMIT": 4}], costs


def test_a_listing_of_steps_of_many_files_stops_and_asks_about_each_step(
    s3_server: S3Server, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that read no manifest (a reader), or one whose manifests tell that the steps
    fit a page (a writer) in a root holding more than they name (a dead writer's save), lists
    every object under the step prefixes, but stops at the end of a page past which more than
    LISTED_OBJECTS_PER_STEP objects per step were listed: it lists the step prefixes and asks
    about each step's COMMIT instead."""
    # The rule at a fraction of its number: at the real one this root would need a dead save
    # of hundreds of files, which take seconds to write to the test server.
    monkeypatch.setattr(s3_root, "LISTED_OBJECTS_PER_STEP", 4)
    direct = _one_saved_step(s3_server, s3_url)
    # a dead writer's save of many files, left uncommitted
    dead = 12
    names = [direct.attempt_prefix(2, "dead") + f"rank-{rank:05d}.pt" for rank in range(dead)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda name: direct.client.put_bytes(name, b"x"), names))
    direct.close()
    with S3Proxy(s3_server.port) as proxy:
        proxy.short_pages(3, "list-type=2")
        options = s3_server.storage_options(endpoint_url=proxy.endpoint)
        view = S3RootView(s3_url, options)
        assert view.committed_steps() == [1]
        view.s3.close()
        counted = _counted(proxy, 0)
        writer = S3Root(s3_url, options)
        S3Checkpoint(writer, 1).read_manifest()  # as its open reads it
        assert writer._listing_pays()  # by that manifest, its step fits a page
        mark = len(proxy.log)
        assert writer.committed_steps() == [1]
        writer_counted = _counted(proxy, mark)
        writer.close()
    # 3 objects of step 1, then the dead ones, 3 a page: 2 steps listed from the second page
    # on, and 3 pages hold 9 objects, past 2 * LISTED_OBJECTS_PER_STEP, before the last one
    assert 3 + dead > 3 * 3 > 2 * 4 >= 2 * 3
    # those 3 pages, the step prefixes, a HEAD of each step's COMMIT
    assert counted == writer_counted == {"LIST saves": 3 + 1, "HEAD COMMIT": 2}, counted


def test_an_open_asks_again_about_the_commits_of_last_and_best_when_they_differ(
    s3_server: S3Server, s3_url: str
) -> None:
    """With a monitor whose ``best`` (step 1) is not ``last`` (step 2), the open asks for both
    steps' ``COMMIT`` again before it moves the pointers (a ``HEAD`` each): N + 12 requests
    in all, as docs/object-stores.md states (N + 10 counted: the lease's ``PUT``s are not)."""
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options, monitor="loss") as manager:
        manager.save(1, _state(1), metrics={"loss": 1.0})
        manager.save(2, _state(2), metrics={"loss": 2.0})
    with S3Proxy(s3_server.port) as proxy:
        proxied = s3_server.storage_options(endpoint_url=proxy.endpoint)
        manager = distckpt.CheckpointManager(s3_url, storage_options=proxied, monitor="loss")
        after_rank_0_removals(manager)
        cost = _counted(proxy, 0)
        manager.close()
    assert cost["HEAD COMMIT"] == 2, cost
    assert cost.total() == 2 + 10, cost
