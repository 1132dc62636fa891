"""The writer claim ``.writers/<attempt>`` of a save that committed is not left behind when its
writer dies before deleting it: the next start or ``distckpt gc`` removes it, and a committed
step kept forever keeps no claim (README: whatever a crash left behind is cleaned by the next
start). A claim says when it expires: 30 s after it was written."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt import events, faults
from distckpt.cli import main
from distckpt.objstore import ObjectStore
from distckpt.storage import s3_lease
from tests.cli_runner import run_cli_in_a_process
from tests.ranks import run_ranks
from tests.s3server import S3Server, aws_environment
from tests.test_s3_store import JOB_TIMEOUT, _objects, _state


def _killed_right_after_the_commit(
    rank: int, world_size: int, url: str, options: dict[str, Any]
) -> None:
    manager = distckpt.CheckpointManager(url, storage_options=options)
    manager.save(1, _state(1))
    faults.arm("after_rename", "kill")  # SIGKILL once COMMIT is made, before the claim goes
    manager.save(2, _state(2))


def _claims(url: str, options: dict[str, Any]) -> list[str]:
    return [name for name in _objects(url, options) if name.startswith(".writers/")]


def _commit_and_get_killed(url: str, options: dict[str, Any]) -> None:
    run_ranks(
        _killed_right_after_the_commit, 0, url, options, timeout=JOB_TIMEOUT, expect_killed=True
    )
    assert len(_claims(url, options)) == 1  # the committed save's


def _restored_step(manager: distckpt.CheckpointManager) -> int:
    restored = manager.restore("last", state={"w": torch.empty(4), "step": 0})
    assert restored is not None and restored.state["step"] == restored.step
    return restored.step


def test_the_next_start_removes_the_claim_of_a_writer_killed_after_its_commit(
    s3_server: S3Server, s3_url: str
) -> None:
    options = s3_server.storage_options()
    _commit_and_get_killed(s3_url, options)
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        assert manager.steps() == [1, 2] and _restored_step(manager) == 2
    assert _claims(s3_url, options) == []  # the start's cleanup, which the close waits for
    # the step, kept, keeps no claim
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        assert manager.steps() == [1, 2] and _restored_step(manager) == 2
    assert _claims(s3_url, options) == []


def test_distckpt_gc_removes_the_claim_of_a_writer_killed_after_its_commit(
    s3_server: S3Server, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = s3_server.storage_options()
    _commit_and_get_killed(s3_url, options)
    # the command reads the store's endpoint and credentials as a user's shell gives them
    for name, value in aws_environment(s3_server).items():
        monkeypatch.setenv(name, value)
    assert main(["gc", s3_url], out=io.StringIO()) == 0
    assert _claims(s3_url, options) == []
    assert distckpt.verify(s3_url, storage_options=options).ok
    with distckpt.CheckpointManager(s3_url, storage_options=options, read_only=True) as manager:
        assert manager.steps() == [1, 2] and _restored_step(manager) == 2


def test_gc_beside_a_writer_paused_after_its_commit_keeps_its_live_claim(
    s3_server: S3Server, s3_url: str, tmp_path: Path
) -> None:
    """A ``distckpt gc`` in another process, run while the writer is held right after its
    ``COMMIT`` (before it deletes its claim), leaves the claim: it is live. It goes once the
    writer finishes."""
    options = s3_server.storage_options()
    seen: dict[str, Any] = {}

    def gc_beside(event: events.PhaseEvent) -> None:
        if event.phase == "commit.publish" and event.ok and event.step == 2:
            seen["before"] = _claims(s3_url, options)
            seen["gc"] = run_cli_in_a_process(
                "gc", s3_url, scratch=tmp_path, extra_env=aws_environment(s3_server)
            )
            seen["after"] = _claims(s3_url, options)

    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        manager.save(1, _state(1))
        remove = events.add_listener(gc_beside)
        try:
            assert manager.save(2, _state(2)) is not None
        finally:
            remove()
        assert seen["gc"].returncode == 0, seen["gc"].stderr
        assert len(seen["before"]) == 1 and seen["after"] == seen["before"]
        assert _claims(s3_url, options) == []  # the writer's own delete, once committed
        assert manager.steps() == [1, 2] and _restored_step(manager) == 2


def test_a_writers_claim_expires_30_s_after_it_was_written(
    s3_server: S3Server, s3_url: str
) -> None:
    """docs/object-stores.md: a claim carries "an expiry 30 s ahead by its clock"."""
    options = s3_server.storage_options()
    seen: list[float] = []

    def read_claim(event: events.PhaseEvent) -> None:
        if event.phase == "commit.publish" and not seen:
            with ObjectStore(s3_url, options) as direct:
                (name,) = [info.key for info in direct.list(".writers/")]
                seen.append(json.loads(direct.get_bytes(name))["expires_unix"] - time.time())

    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        remove = events.add_listener(read_claim)
        try:
            manager.save(1, _state(1))
        finally:
            remove()
    # the claim was written before this read, within the save: a few seconds at most
    assert seen and s3_lease.LEASE_SECONDS - 10 < seen[0] <= s3_lease.LEASE_SECONDS
