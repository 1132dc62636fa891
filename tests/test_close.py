"""What ``close()`` lets go of while the process that closed the manager lives on (an evaluation
after training, a requeued job's next start), and what a closed manager answers.

One process on a real directory: the lease is rank 0's, and a closed manager's refusal comes
before any collective."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import distckpt
from distckpt.lease import read_holder
from tests.core_ranks import TIMEOUT, _staging_entries, _weights


def test_close_releases_the_lease_while_the_closed_manager_is_still_referenced(
    root: Path,
) -> None:
    """The lease goes at ``close()``, not when the manager is garbage: a job that keeps its
    closed manager (a trainer's attribute) does not hold the root."""
    first = distckpt.CheckpointManager(root, fsync=False, timeout=TIMEOUT)
    holder = read_holder(root)
    assert holder is not None and holder.pid == os.getpid() and holder.alive
    first.save(1, {"w": _weights(1, 0)})
    first.close()
    assert read_holder(root) is None
    # ``first``, closed, is still referenced (a local of this test) while the next one opens
    with distckpt.CheckpointManager(root, fsync=False, timeout=TIMEOUT) as second:
        assert second.steps() == [1]


def test_a_closed_manager_refuses_every_collective_call_and_writes_nothing(root: Path) -> None:
    """Each call that would run collectives or change the root raises ManagerClosed (a
    RuntimeError) naming the call and the rank, before anything is written; a second close does
    nothing."""
    mgr = distckpt.CheckpointManager(root, fsync=False, timeout=TIMEOUT)
    mgr.save(1, {"w": _weights(1, 0)})
    mgr.close()
    calls: dict[str, Callable[[], object]] = {
        "save": lambda: mgr.save(2, {"w": _weights(2, 0)}, force=True),
        "restore": lambda: mgr.restore("last", state={"w": torch.zeros(3)}),
        "delete": lambda: mgr.delete(1),
        "prune": mgr.prune,
        "gc": mgr.gc,
        "should_save": lambda: mgr.should_save(2),
        "agree_on": lambda: mgr.agree_on(lambda: None, what="nothing"),
    }
    for name, call in calls.items():
        with pytest.raises(distckpt.ManagerClosed) as refused:
            call()
        assert isinstance(refused.value, RuntimeError)
        assert (refused.value.call, refused.value.rank) == (name, 0)
        assert str(refused.value) == f"this CheckpointManager is closed: {name}() refused"
        assert sorted(entry.name for entry in root.glob("step-*")) == ["step-00000001"], name
    assert _staging_entries(root) == []
    mgr.close()
    assert read_holder(root) is None
