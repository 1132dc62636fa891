"""How often one search for a root's newest checkpoint reads a step that fails its check: once
per version of the step. The search lists the root again when nothing passed (a checkpoint
deleted, or replaced under its number, while it was read), but a step still committed as it
was when found failing is not read again; one replaced meanwhile is.

Reads are counted for real: the ``openat`` calls of a traced process on a local root, the
requests through a proxy on an ``s3://`` root."""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt.layout import MANIFEST_NAME, step_dir_name
from distckpt.objstore import ObjectStore
from distckpt.storage.posix_view import PosixCheckpoint
from distckpt.storage.s3_checkpoint import S3Checkpoint
from tests.places import Place
from tests.s3proxy import S3Proxy
from tests.s3server import S3Server
from tests.syscall_trace import traced_file_calls
from tests.test_s3_requests import request_kind

#: the steps saved, then damaged, in each root
DAMAGED_STEPS = (1, 2)
#: a step of an s3 root whose ``COMMIT`` is then replaced by bytes that are no commit record
NO_COMMIT_RECORD_STEP = 3


def _save(root: str, steps: tuple[int, ...], options: dict[str, Any] | None = None) -> None:
    with distckpt.CheckpointManager(root, storage_options=options, fsync=False) as manager:
        for step in steps:
            manager.save(step, {"w": torch.full((64,), float(step))})


def _overwritten_with_a_larger_save(root: str, options: dict[str, Any] | None) -> None:
    """Another job saves step 1 again (``overwrite``), with files of other sizes."""
    with distckpt.CheckpointManager(root, storage_options=options, fsync=False) as job:
        job.save(1, {"w": torch.full((128,), 10.0)}, overwrite=True)


def _truncated_rank_file(root: str, step: int, options: dict[str, Any] | None) -> None:
    """The step's one rank file cut to 10 bytes (on s3: rewritten as 10 bytes)."""
    if options is None:
        (rank_file,) = Path(root, step_dir_name(step)).glob("rank-*")
        os.truncate(rank_file, 10)
        return
    with ObjectStore(root, options) as store:
        (rank_file,) = (
            info.key for info in store.list(step_dir_name(step) + "/") if info.key.endswith(".pt")
        )
        store.put_bytes(rank_file, b"x" * 10)


def test_a_search_of_a_local_root_opens_each_damaged_manifest_once(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _save(os.fspath(root), DAMAGED_STEPS)
    for step in DAMAGED_STEPS:
        _truncated_rank_file(os.fspath(root), step, None)
    code = f"""
import distckpt
try:
    distckpt.load_checkpoint({os.fspath(root)!r})
except distckpt.CheckpointNotFound:
    pass
else:
    raise SystemExit("a damaged checkpoint was loaded")
"""
    calls = traced_file_calls(code, tmp_path, "openat")
    opened = collections.Counter(
        Path(call.path).parent.name for call in calls if Path(call.path).name == MANIFEST_NAME
    )
    assert opened == {step_dir_name(step): 1 for step in DAMAGED_STEPS}


def test_a_search_of_an_s3_root_reads_each_damaged_step_once(
    s3_server: S3Server, s3_url: str
) -> None:
    options = s3_server.storage_options()
    _save(s3_url, (*DAMAGED_STEPS, NO_COMMIT_RECORD_STEP), options)
    for step in DAMAGED_STEPS:
        _truncated_rank_file(s3_url, step, options)
    with ObjectStore(s3_url, options) as store:
        store.put_bytes(f"{step_dir_name(NO_COMMIT_RECORD_STEP)}/COMMIT", b"garbage")
    with S3Proxy(s3_server.port) as proxy:
        proxied = s3_server.storage_options(endpoint_url=proxy.endpoint)
        with pytest.raises(distckpt.CheckpointNotFound):
            distckpt.load_checkpoint(s3_url, storage_options=proxied)
        log = list(proxy.log)
    for step in DAMAGED_STEPS:
        reads = collections.Counter(
            request_kind(method, path)
            for method, path, _ in log
            if f"/{step_dir_name(step)}/" in path.replace("%2F", "/")
        )
        # the check's read of COMMIT, and the one telling a damaged step from a deleted one
        assert reads["GET COMMIT"] == 2, (step, reads)
        assert reads["GET manifest.json"] == 1, (step, reads)
        assert reads["LIST save"] == 1, (step, reads)  # its files' sizes
    no_record_reads = collections.Counter(
        request_kind(method, path)
        for method, path, _ in log
        if f"/{step_dir_name(NO_COMMIT_RECORD_STEP)}/" in path.replace("%2F", "/")
    )
    # as a damaged save's step: the check's read, and the one telling it from a deleted step
    assert no_record_reads == {"GET COMMIT": 2}, no_record_reads


def test_a_step_replaced_while_the_search_reads_it_is_read_again(
    place: Place, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another job overwrites the only step between the search's read of its manifest and of
    its files, with files of other sizes: the search finds the new checkpoint, not none. (On
    s3 the read sees the step's ``COMMIT`` name another save, so it takes the step for
    deleted meanwhile and lists the root again.)"""
    root = f"{place.base}/ckpt"
    _save(root, (1,), place.options)
    checkpoint_class = PosixCheckpoint if place.options is None else S3Checkpoint
    real_file_problems = checkpoint_class.file_problems
    replaced: list[int] = []

    def replaced_before_its_files_are_checked(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not replaced:
            replaced.append(1)
            _overwritten_with_a_larger_save(root, place.options)
        return real_file_problems(self, *args, **kwargs)

    # A hook in the searching process itself: no other process can be timed into the window
    # between the manifest's read and the files' check.
    monkeypatch.setattr(checkpoint_class, "file_problems", replaced_before_its_files_are_checked)
    loaded = distckpt.load_checkpoint(root, storage_options=place.options)
    assert replaced == [1]
    assert loaded.step == 1 and torch.equal(loaded.state["w"], torch.full((128,), 10.0))


def test_a_damaged_step_replaced_right_after_its_check_is_read_again(
    place: Place, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The only step is damaged; right after the search's ``exists()`` said it is still the
    save it read (so it is taken for damaged, not deleted), another job overwrites it with a
    good save. Only the version the search recorded of its failing read tells that the step
    committed now is another: the search reads it again and finds the new checkpoint."""
    root = f"{place.base}/ckpt"
    _save(root, (1,), place.options)
    _truncated_rank_file(root, 1, place.options)
    checkpoint_class = PosixCheckpoint if place.options is None else S3Checkpoint
    real_exists = checkpoint_class.exists
    replaced: list[int] = []

    def replaced_once_it_is_found_still_there(self: Any) -> bool:
        still_there = real_exists(self)
        if not replaced:
            replaced.append(1)
            _overwritten_with_a_larger_save(root, place.options)
        return still_there

    # A hook in the searching process itself: nothing real pauses a search between its
    # exists() and its listing of the root again, to let another job overwrite the step there.
    monkeypatch.setattr(checkpoint_class, "exists", replaced_once_it_is_found_still_there)
    loaded = distckpt.load_checkpoint(root, storage_options=place.options)
    assert replaced == [1]
    assert loaded.step == 1 and torch.equal(loaded.state["w"], torch.full((128,), 10.0))
