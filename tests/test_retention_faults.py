"""Retention that fails after a commit, on a POSIX and an ``s3://`` root (a real moto server):
what the log says about when it is applied again is what happens."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt import faults

#: what the log promises for a retention that failed after a commit
PROMISE = "retention at the next commit or by distckpt prune"


def _root(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """A fresh root of ``kind`` and the managers' options for it."""
    if kind == "posix":
        return str(tmp_path / "root"), {"fsync": False}
    server = request.getfixturevalue("s3_server")
    return f"s3://{server.create_bucket()}/ckpt", {"storage_options": server.storage_options()}


@pytest.mark.parametrize("then", ["commit", "prune"])
@pytest.mark.parametrize("kind", ["posix", "s3"])
def test_a_failed_retention_is_applied_where_the_log_says(
    kind: str,
    then: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``keep_last=1``; retention fails in the save of step 3 (step 2 stays). The log says it
    is applied at the next commit or by ``prune``: a start leaves step 2 (a job opening the
    root to restore it must not lose it), the next commit or a prune removes it."""
    root, options = _root(kind, tmp_path, request)
    state = {"w": torch.zeros(2)}
    with distckpt.CheckpointManager(root, keep_last=1, **options) as mgr:
        mgr.save(1, state)
        mgr.save(2, state)
        faults.arm("during_retention", "raise")
        try:
            with caplog.at_level(logging.ERROR, logger="distckpt"):
                assert mgr.save(3, state).step == 3  # committed all the same
        finally:
            faults.disarm()
        assert mgr.steps() == [2, 3]
    assert [r for r in caplog.records if PROMISE in r.getMessage()]
    with distckpt.CheckpointManager(root, keep_last=1, **options) as mgr:
        assert mgr.steps() == [2, 3]  # a start applies no retention
        assert mgr.restore(2).step == 2
        if then == "commit":
            mgr.save(4, state)
            assert mgr.steps() == [4]
        else:
            assert mgr.prune() == [2]
            assert mgr.steps() == [3]
