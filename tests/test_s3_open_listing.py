"""The open of an ``s3://`` root checks each step's save from the listing of every object
under the step prefixes it makes anyway (tests/test_s3_requests.py counts it), not from a
listing of each save. That listing, of several pages, is no snapshot: a step committed or
replaced by another process while it runs must be judged as a listing of the save made after
its ``COMMIT`` was read would judge it, not taken for damaged and passed over."""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace

import pytest

import distckpt
from distckpt.checksums import crc32
from distckpt.layout import BEST, LAST, MANIFEST_NAME, step_dir_name
from distckpt.manifest import FileRecord
from distckpt.storage.s3_checkpoint import S3Checkpoint
from distckpt.storage.s3_root import CommitRecord, S3Root
from tests.s3proxy import HOLD_TIMEOUT, S3Proxy
from tests.s3server import S3Server
from tests.test_s3_requests import _copy_as_steps, _one_saved_step, _state
from tests.waiting import after_rank_0_removals

pytest.importorskip("botocore")

#: attempt tokens whose objects a listing shows before their step's ``COMMIT`` ("0" < "C")
#: and after it ("f" > "C")
BEFORE_COMMIT = "0123456789ab-1"
AFTER_COMMIT = "fedcba987654-1"
#: a file of the saves written here that sorts before their manifest: a listing past the
#: manifest has passed it too
EARLY_FILE = "extra-00000"
#: what the open's listing of every object under the step prefixes holds in its path
STEP_LISTING = "prefix=ckpt%2Fstep-"


def _save_contents(
    root: S3Root, step: int, metrics: Mapping[str, float] | None = None
) -> dict[str, bytes]:
    """A save of ``step``: step 1's files, and :data:`EARLY_FILE`, which its manifest lists
    (with ``metrics``, instead of step 1's)."""
    source = S3Checkpoint(root, 1)
    manifest = source.read_manifest()
    prefix = source._prefix()  # the committed save's, to copy its files from
    contents = {name: root.client.get_bytes(prefix + name) for name in manifest.files}
    contents[EARLY_FILE] = b"x"
    files = {**manifest.files, EARLY_FILE: FileRecord(1, f"{crc32(b'x'):08x}")}
    metrics = manifest.metrics if metrics is None else metrics
    contents[MANIFEST_NAME] = replace(manifest, step=step, files=files, metrics=metrics).to_json()
    return contents


def _write(
    root: S3Root, step: int, attempt: str, contents: dict[str, bytes], *, commit: bool = False
) -> None:
    """Write ``contents`` under the save ``attempt`` of ``step``; with ``commit``, then its
    ``COMMIT`` naming that save (over any there)."""
    for name, data in contents.items():
        root.client.put_bytes(root.attempt_prefix(step, attempt) + name, data)
    if commit:
        root.client.put_bytes(root.commit_name(step), CommitRecord.encode(step, attempt))


def _page_after(root: S3Root, key: str) -> int:
    """How many one-key pages of the open's listing come before the one after ``key``'s."""
    keys = sorted(info.key for info in root.client.list("step-"))
    return keys.index(key) + 1


def _open_during(
    s3_server: S3Server,
    s3_url: str,
    skip: int,
    change: Callable[[], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Open a manager whose listing of the step prefixes comes a key a page, ``change``
    running while the page after the first ``skip`` is held, and close it once the open's
    tidy ran; its warnings go to ``caplog``."""
    with S3Proxy(s3_server.port) as proxy, caplog.at_level(logging.WARNING, logger="distckpt"):
        proxy.short_pages(1, STEP_LISTING)
        held = proxy.hold("GET", STEP_LISTING, skip=skip)
        options = s3_server.storage_options(endpoint_url=proxy.endpoint)
        with held.changed_meanwhile(change):
            manager = distckpt.CheckpointManager(s3_url, storage_options=options)
        after_rank_0_removals(manager)
        manager.close()


def _assert_step_2_taken(
    s3_server: S3Server, s3_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Check that an open (:func:`_open_during`) moved ``last`` to step 2, skipping no step,
    and that only the save of step 2 that :data:`BEFORE_COMMIT` names is left once the open's
    tidy ran."""
    root = S3Root(s3_url, s3_server.storage_options())
    prefix = f"{step_dir_name(2)}/"
    saves = sorted({info.key[len(prefix) :].partition("/")[0] for info in root.client.list(prefix)})
    assert root.read_pointer(LAST)[0] == step_dir_name(2)
    root.close()
    assert saves == [BEFORE_COMMIT, "COMMIT"]
    assert "skipping" not in caplog.text


def test_a_step_committed_while_the_open_lists_the_steps_is_not_taken_for_damaged(
    s3_server: S3Server, s3_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A save of step 2 has its manifest and rank file written, not yet its early file nor
    its ``COMMIT``, when the open's listing passes them; its writer then writes both before
    that listing reaches ``COMMIT``. The listing shows the step committed, its early file
    missing: the save is listed again, found whole, and ``last`` moves to it."""
    root = _one_saved_step(s3_server, s3_url)
    contents = _save_contents(root, 2)
    early = {EARLY_FILE: contents.pop(EARLY_FILE)}
    _write(root, 2, BEFORE_COMMIT, contents)
    skip = _page_after(root, root.attempt_prefix(2, BEFORE_COMMIT) + MANIFEST_NAME)

    committing = functools.partial(_write, root, 2, BEFORE_COMMIT, early, commit=True)
    _open_during(s3_server, s3_url, skip, committing, caplog)
    _assert_step_2_taken(s3_server, s3_url, caplog)
    root.close()


def test_a_step_replaced_while_the_open_lists_the_steps_is_checked_as_replaced(
    s3_server: S3Server, s3_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Step 2 is committed as a save listed after its ``COMMIT``, which is spelled otherwise
    than this version writes it (so its ETag tells no record: it is read, after the listing).
    While the open's listing is past the step's ``COMMIT``, another writer replaces the step
    by a save listed before ``COMMIT``, which that listing never shows, and which misses
    :data:`EARLY_FILE`. The ``COMMIT`` read names that save, none of whose objects the
    listing shows: the save is listed again, and found missing that one file only (not its
    manifest, nor the files it has): skipped with a warning naming it, ``last`` left on step
    1. Checked from the listing's sizes, every file of it would be told missing."""
    root = _one_saved_step(s3_server, s3_url)
    contents = _save_contents(root, 2)
    _write(root, 2, AFTER_COMMIT, contents)
    spelled = json.dumps({"step": 2, "attempt": AFTER_COMMIT}, indent=1).encode()
    root.client.put_bytes(root.commit_name(2), spelled)
    skip = _page_after(root, root.commit_name(2))
    del contents[EARLY_FILE]
    replacing = functools.partial(_write, root, 2, BEFORE_COMMIT, contents, commit=True)
    _open_during(s3_server, s3_url, skip, replacing, caplog)
    assert root.read_pointer(LAST)[0] == step_dir_name(1)
    root.close()
    replacing_save = f"{s3_url}/{step_dir_name(2)}/{BEFORE_COMMIT}"
    assert f"{replacing_save}/{EARLY_FILE}: missing" in caplog.text
    assert f"{replacing_save}/{MANIFEST_NAME}: missing" not in caplog.text


def _last_after_open_during(
    s3_server: S3Server,
    s3_url: str,
    change: Callable[[S3Root], None],
    caplog: pytest.LogCaptureFixture,
) -> str | None:
    """Commit step 2 whole beside step 1 (a save listed after its ``COMMIT``), open a manager
    while ``change`` (given the root) runs once the open's listing is past step 2's ``COMMIT``;
    what ``last`` names then."""
    root = _one_saved_step(s3_server, s3_url)
    _write(root, 2, AFTER_COMMIT, _save_contents(root, 2), commit=True)
    skip = _page_after(root, root.commit_name(2))
    _open_during(s3_server, s3_url, skip, functools.partial(change, root), caplog)
    root.close()
    root = S3Root(s3_url, s3_server.storage_options())
    last = root.read_pointer(LAST)[0]
    root.close()
    return last


def test_a_step_replaced_by_a_damaged_save_after_the_listing_passed_it_is_not_last(
    s3_server: S3Server, s3_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Once the open's listing is past step 2's ``COMMIT`` (whose listed ETag tells the save
    it names), another writer replaces step 2 by a save missing one of its manifest's files.
    Before ``last`` moves to step 2, its ``COMMIT`` is asked for again: changed, the step is
    read and checked again, found damaged and skipped with a warning; ``last`` stays on step
    1."""

    def replace_by_a_damaged_save(root: S3Root) -> None:
        contents = _save_contents(root, 2)
        del contents[EARLY_FILE]
        _write(root, 2, BEFORE_COMMIT, contents, commit=True)

    last = _last_after_open_during(s3_server, s3_url, replace_by_a_damaged_save, caplog)
    assert last == step_dir_name(1)
    assert f"skipping damaged checkpoint {s3_url}/{step_dir_name(2)}" in caplog.text


def test_a_step_uncommitted_after_the_listing_passed_it_is_not_last(
    s3_server: S3Server, s3_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Once the open's listing is past step 2's ``COMMIT``, another process deletes that
    ``COMMIT`` (the save's objects left for a later tidy). Asked for again before ``last``
    moves to step 2, it is gone: ``last`` stays on step 1."""

    def uncommit(root: S3Root) -> None:
        root.client.delete([root.commit_name(2)])

    assert _last_after_open_during(s3_server, s3_url, uncommit, caplog) == step_dir_name(1)


def test_best_follows_the_committed_save_not_a_leftover_listed_before_it(
    s3_server: S3Server, s3_url: str
) -> None:
    """Step 2 holds, beside its committed save, a whole leftover save listed before it (a dead
    writer's) whose metrics rank it below step 1, and a ``COMMIT`` spelled otherwise than this
    version writes it: its ETag is the digest of no record, so the open reads it rather than
    take the first save the listing shows with a manifest. ``best`` stays on step 2, as the
    committed save's metrics rank it."""
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options, monitor="loss") as manager:
        manager.save(1, _state(1), metrics={"loss": 2.0})
        manager.save(2, _state(2), metrics={"loss": 1.0})
    root = S3Root(s3_url, options)
    record = root.read_commit(2)
    assert record is not None and record.attempt > BEFORE_COMMIT
    _write(root, 2, BEFORE_COMMIT, _save_contents(root, 2, metrics={"loss": 9.0}))
    spelled = json.dumps({"step": 2, "attempt": record.attempt}, indent=1).encode()
    root.client.put_bytes(root.commit_name(2), spelled)
    with distckpt.CheckpointManager(s3_url, storage_options=options, monitor="loss") as manager:
        after_rank_0_removals(manager)
    assert root.read_pointer(BEST)[0] == step_dir_name(2)
    root.close()


def test_an_open_reads_the_manifests_of_several_steps_at_once(
    s3_server: S3Server, s3_url: str
) -> None:
    """The open's reads of each step's manifest go out four steps at a time: while the read
    of the newest step's manifest is held, the oldest step's is read (one step after another,
    newest first as the checks go, it would wait)."""
    root = _one_saved_step(s3_server, s3_url)
    _copy_as_steps(root, 1, range(2, 5))
    root.close()
    with S3Proxy(s3_server.port) as proxy:
        held = proxy.hold("GET", f"ckpt/{step_dir_name(4)}/", MANIFEST_NAME)
        options = s3_server.storage_options(endpoint_url=proxy.endpoint)
        opened: list[distckpt.CheckpointManager] = []

        def open_root() -> None:
            opened.append(distckpt.CheckpointManager(s3_url, storage_options=options))

        opening = threading.Thread(target=open_root)
        opening.start()
        try:
            assert held.arrived.wait(60)
            # a bound far below the hold's own (after which it goes on unreleased), not a timing
            read_meanwhile = proxy.wait_for(
                "GET", f"{step_dir_name(1)}/", MANIFEST_NAME, timeout=HOLD_TIMEOUT / 2
            )
        finally:
            held.release()
            opening.join()
        for manager in opened:
            manager.close()
    assert read_meanwhile
    assert len(opened) == 1


def test_an_open_whose_chosen_steps_keep_changing_gives_up_and_leaves_last_alone(
    s3_server: S3Server, s3_url: str, caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    """Steps 2-6 read whole from the listing, and every later question about their
    ``COMMIT`` finds it gone: each round drops the step it chose and chooses the next older
    one, until its rounds are spent. The open then logs that the steps kept changing and
    leaves ``last`` where it was, on step 1, rather than move it to a step just found gone."""
    root = _one_saved_step(s3_server, s3_url)
    _copy_as_steps(root, 1, range(2, 7))
    asked: list[int] = []
    real_etag = S3Root.current_commit_etag

    def gone_from_step_2(self: S3Root, step: int, store: object = None) -> str | None:
        asked.append(step)
        return None if step >= 2 else real_etag(self, step, store)

    # Nothing real deletes a COMMIT between every two requests of one open, for four rounds.
    monkeypatch.setattr(S3Root, "current_commit_etag", gone_from_step_2)
    with caplog.at_level(logging.WARNING, logger="distckpt"):
        distckpt.CheckpointManager(s3_url, storage_options=s3_server.storage_options()).close()
    assert "kept changing while checked" in caplog.text
    assert asked == [6, 5, 4, 3]
    assert root.read_pointer(LAST)[0] == step_dir_name(1)
    root.close()
