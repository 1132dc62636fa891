"""A rank that fails mid-save on real gloo ranks: a write, a snapshot or a copy failing on one
rank fails the save on every rank and leaves nothing behind, an async save of a refused step
raises in ``save()``, and a failed proposal leaves no staging fd or thread behind."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt import faults
from tests.core_ranks import JOB_TIMEOUT, TIMEOUT, _err, _staging_entries, _weights
from tests.ranks import run_ranks, values
from tests.waiting import after_rank_0_removals

# --------------------------------------------------------------------------- a failing rank


def _second_save_fails_on_rank_1(rank: int, world_size: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        mgr.save(1, {"w": _weights(1, rank)})
        faults.arm("after_shard_write", "raise", rank=1)
        try:
            mgr.save(2, {"w": _weights(2, rank)})
        except Exception as exc:
            out["error"] = _err(exc)
        if rank == 0:
            # Rank 0 cleans up before it raises, so what it sees now is what a crash leaves.
            out["steps"] = mgr.steps()
            out["last"] = os.readlink(Path(root) / "last")
            out["staging"] = _staging_entries(Path(root))
        out["retry"] = mgr.save(2, {"w": _weights(2, rank)}).step
    return out


def test_rank_raising_mid_write_fails_every_rank_and_leaves_nothing(root: Path) -> None:
    out = values(run_ranks(_second_save_fails_on_rank_1, 2, str(root), timeout=JOB_TIMEOUT))
    for rank_out in out:
        name, message, is_checkpoint_error, _ = rank_out["error"]
        assert is_checkpoint_error, name
        assert "rank 1" in message
        assert rank_out["retry"] == 2
    assert out[0]["steps"] == [1]
    assert out[0]["last"] == "step-00000001"
    assert out[0]["staging"] == []
    assert _staging_entries(root) == []


class _RefusesItsState:
    """An object whose ``state_dict()`` raises: rank 0's snapshot fails while its root work,
    in the thread beside it, opens the staging area."""

    def state_dict(self) -> dict[str, Any]:
        raise ValueError("this state refuses to be saved")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise AssertionError("never saved, so never loaded")


def _snapshot_fails_on_rank_0(rank: int, world_size: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, timeout=TIMEOUT, async_save=True) as mgr:
        state: dict[str, Any] = {"w": _weights(1, rank)}
        try:
            mgr.save(1, {**state, "obj": _RefusesItsState()} if rank == 0 else state)
        except Exception as exc:
            out["error"] = _err(exc)
        if rank == 0:
            out["staging"] = _staging_entries(Path(root))
        out["retry"] = mgr.save(1, state).step
        mgr.wait()
        out["steps"] = mgr.steps()
    return out


def test_a_snapshot_failing_beside_the_root_work_fails_every_rank_and_leaves_nothing(
    root: Path,
) -> None:
    out = values(run_ranks(_snapshot_fails_on_rank_0, 2, str(root), timeout=JOB_TIMEOUT))
    for rank_out in out:
        assert "refuses to be saved" in rank_out["error"][1]
        assert rank_out["retry"] == 1
        assert rank_out["steps"] == [1]
    assert out[0]["staging"] == []  # the staging area opened beside the snapshot is gone


def _copy_fails_on_rank_1(rank: int, world_size: int, root: str) -> dict[str, Any]:
    from distckpt import events

    out: dict[str, Any] = {"gathered_in": set(), "copy_ok": []}

    def note(event: events.PhaseEvent) -> None:
        if event.phase == "collective.all_gather" and event.step is None:
            out["gathered_in"].add(threading.current_thread().name)
        if event.phase == "propose.copy":
            out["copy_ok"].append(event.ok)

    with distckpt.CheckpointManager(root, timeout=TIMEOUT, async_save=True) as mgr:
        state: dict[str, Any] = {"w": _weights(1, rank)}
        # A tensor with no data (a parameter never materialised): its copy fails, after the
        # proposal was made and while the all-gather of the proposals runs beside it.
        broken = {**state, "z": torch.empty(4, device="meta")} if rank == 1 else state
        remove = events.add_listener(note)
        try:
            mgr.save(1, broken)
        except Exception as exc:
            out["error"] = _err(exc)
        finally:
            remove()
        out["in_flight"] = mgr.save_in_flight
        if rank == 0:
            out["staging"] = _staging_entries(Path(root))
            out["steps_after_failure"] = mgr.steps()
        out["retry"] = mgr.save(1, state).step
        mgr.wait()
        out["steps"] = mgr.steps()
    return out


def test_a_copy_failing_on_one_rank_beside_the_all_gather_fails_save_on_every_rank(
    root: Path,
) -> None:
    out = values(run_ranks(_copy_fails_on_rank_1, 2, str(root), timeout=JOB_TIMEOUT))
    for rank_out in out:
        _, message, is_checkpoint_error, _ = rank_out["error"]  # raised by save() itself
        assert is_checkpoint_error and "rank 1" in message and "meta" in message, message
        assert not rank_out["in_flight"]
        assert rank_out["retry"] == 1 and rank_out["steps"] == [1]
        assert "distckpt-propose-gather" in rank_out["gathered_in"]  # it ran beside the copy
    assert out[1]["copy_ok"] == [False] and out[0]["copy_ok"] == [True]
    assert out[0]["staging"] == [] and out[0]["steps_after_failure"] == []


def _async_save_of_an_old_step(rank: int, world_size: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, timeout=TIMEOUT, async_save=True) as mgr:
        mgr.save(2, {"w": _weights(2, rank)})
        mgr.wait()
        try:
            mgr.save(1, {"w": _weights(1, rank)})  # refused by rank 0's root work
        except distckpt.CheckpointError as exc:
            out["error"] = _err(exc)
        out["in_flight"] = mgr.save_in_flight
        out["steps"] = mgr.steps()
        if rank == 0:
            out["staging"] = _staging_entries(Path(root))
    return out


def test_an_async_save_of_a_refused_step_raises_in_save_on_every_rank(root: Path) -> None:
    out = values(run_ranks(_async_save_of_an_old_step, 2, str(root), timeout=JOB_TIMEOUT))
    for rank_out in out:
        assert "error" in rank_out  # raised by save() itself, not later by wait()
        assert rank_out["error"][2]  # a CheckpointError on every rank
        assert not rank_out["in_flight"]
        assert rank_out["steps"] == [2]
    assert out[0]["staging"] == []


# --------------------------------------------------------------------------- a failed proposal


#: How long rank 0's root work is held before it opens the staging area (a slow root: NFS, an
#: object store). A proposal that failed without waiting for its root work has raised long
#: before, so a staging area, its writer lock and the thread would outlive the failed save.
SLOW_ROOT_SECONDS = 0.3


def _slow_root_work(seconds: float) -> None:
    """Hold rank 0's root work at the ``before_staging`` fault point for ``seconds``: no slow
    root (NFS, an object store far away) exists here, so the delay is added at the point where
    such a root would spend it."""
    real_hit = faults.hit

    def hit(point: str, rank: int) -> None:
        if point == "before_staging":
            time.sleep(seconds)
        real_hit(point, rank)

    faults.hit = hit  # the proposal calls faults.hit through the module: this reaches it


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _propose_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("distckpt-propose")]


def _failed_proposals(
    rank: int, world_size: int, root: str, async_save: bool, failing_rank: int
) -> dict[str, Any]:
    """Save step 2 twice, failing each time on ``failing_rank`` alone: a metric that is no
    number (checked before the root work starts), then a state that refuses to be saved
    (after it started); rank 0's root work is slow both times."""
    out: dict[str, Any] = {"errors": [], "threads": []}
    _slow_root_work(SLOW_ROOT_SECONDS)
    with distckpt.CheckpointManager(root, timeout=TIMEOUT, async_save=async_save) as mgr:
        state: dict[str, Any] = {"w": _weights(2, rank)}
        mgr.save(1, {"w": _weights(1, rank)})  # the manager's own fds and threads are open now
        mgr.wait()
        after_rank_0_removals(mgr)  # whose thread holds fds for a while (gc waits for it, too)
        fds = _open_fds()
        failing = rank == failing_rank
        attempts = [
            ({**state}, {"loss": "not a number" if failing else 0.5}),
            ({**state, "obj": _RefusesItsState()} if failing else state, {"loss": 0.5}),
        ]
        for bad_state, metrics in attempts:
            try:
                mgr.save(2, bad_state, metrics=metrics)
            except Exception as exc:
                out["errors"].append(_err(exc))
            out["threads"].append(_propose_threads())  # right after save() raised
        mgr.gc()
        if rank == 0:
            out["staging"] = _staging_entries(Path(root))
        out["fds_leaked"] = _open_fds() - fds
        out["retry"] = mgr.save(2, state, metrics={"loss": 0.5}).step
        mgr.wait()
        out["steps"] = mgr.steps()
    return out


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_a_failed_proposal_leaves_no_staging_fd_or_thread_behind(
    root: Path, world_size: int, async_save: bool
) -> None:
    failing_rank = world_size - 1  # with 2 ranks, rank 1: rank 0's own arguments are fine
    out = values(
        run_ranks(
            _failed_proposals, world_size, str(root), async_save, failing_rank, timeout=JOB_TIMEOUT
        )
    )
    for rank_out in out:
        (metric_error, state_error) = rank_out["errors"]
        assert metric_error[0] == "InvalidArgument", metric_error
        assert "must be a number" in metric_error[1], metric_error
        assert state_error[2] and "refuses to be saved" in state_error[1], state_error
        assert rank_out["threads"] == [[], []]
        assert rank_out["fds_leaked"] == 0
        assert rank_out["retry"] == 2 and rank_out["steps"] == [1, 2]
    assert out[0]["staging"] == []
