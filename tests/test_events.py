"""A phase-event listener sees the phases of a real save on real ranks."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt import events, faults
from tests.ranks import run_ranks, values

SAVE_PHASES = {"save.propose", "save.write", "save.agree", "save.commit"}
COMMIT_PHASES = {"commit.lock", "commit.manifest", "commit.publish", "commit.links"}
COMMIT_PHASES |= {"commit.retention"}
#: at 2 ranks: the proposal's all-gather, the agreement's gather, the commit's broadcast
COLLECTIVE_PHASES = {"collective.all_gather", "collective.gather", "collective.broadcast"}
#: inside ``save.propose``: every rank's snapshot, and rank 0's root work beside it
PROPOSE_PHASES = {"propose.snapshot"}


def _phases_of_a_save(rank: int, world_size: int, root: str) -> set[tuple[str, int | None]]:
    seen: list[events.PhaseEvent] = []
    with distckpt.CheckpointManager(root, keep_last=1, timeout=30) as manager:
        remove = events.add_listener(seen.append)
        try:
            manager.save(3, {"w": torch.ones(8) * rank})
        finally:
            remove()
    assert all(event.ok and event.seconds >= 0 and event.rank == rank for event in seen)
    return {(event.phase, event.step) for event in seen}


def test_a_listener_sees_every_phase_of_a_save(tmp_path: Path) -> None:
    rank0, rank1 = values(run_ranks(_phases_of_a_save, 2, str(tmp_path)))
    for phases in (rank0, rank1):
        assert {(name, 3) for name in SAVE_PHASES} <= phases
        assert {(name, None) for name in COLLECTIVE_PHASES} <= phases
        assert {(name, 3) for name in PROPOSE_PHASES} <= phases
    assert {(name, 3) for name in COMMIT_PHASES} <= rank0  # rank 0 alone commits
    assert not {name for name, _ in rank1} & COMMIT_PHASES
    assert ("propose.root", 3) in rank0  # rank 0 alone looks at the root
    assert not {name for name, _ in rank1} & {"propose.root"}
    assert not {name for name, _ in rank0 | rank1} & {"propose.copy"}  # a sync save copies nothing


def _collectives_of_a_save(rank: int, world_size: int, root: str) -> dict[str, int]:
    seen: list[str] = []
    with distckpt.CheckpointManager(root, timeout=30) as manager:
        remove = events.add_listener(lambda event: seen.append(event.phase))
        try:
            manager.save(1, {"w": torch.ones(8) * rank})
        finally:
            remove()
    return dict(Counter(name for name in seen if name.startswith("collective.")))


@pytest.mark.parametrize(
    ("world_size", "collectives"),
    [
        # propose: one all-gather; agree: a gather to rank 0; commit: a broadcast
        (2, {"collective.all_gather": 1, "collective.gather": 1, "collective.broadcast": 1}),
        # from 3 ranks on the proposal, too, is a gather to rank 0 and a broadcast
        (3, {"collective.gather": 2, "collective.broadcast": 2}),
    ],
)
def test_a_save_costs_three_small_collectives_at_2_ranks_and_four_from_3_on(
    tmp_path: Path, world_size: int, collectives: dict[str, int]
) -> None:
    results = values(run_ranks(_collectives_of_a_save, world_size, str(tmp_path)))
    assert results == [collectives] * world_size


def _collectives_of_a_lone_rank(rank: int, world_size: int, root: str) -> dict[str, Any]:
    seen: list[str] = []
    with distckpt.CheckpointManager(root, timeout=30) as manager:
        remove = events.add_listener(lambda event: seen.append(event.phase))
        try:
            manager.save(1, {"w": torch.ones(8)})
            loaded = manager.restore(mmap=True)
        finally:
            remove()
    assert loaded is not None
    return {
        "collectives": [name for name in seen if name.startswith("collective.")],
        "phases": sorted(set(seen)),
        "restored": loaded.state["w"].tolist(),
    }


def test_a_job_of_one_rank_saves_and_restores_without_a_collective(tmp_path: Path) -> None:
    # torch.distributed is initialised, with a group of one rank: there is no one to tell.
    (out,) = values(run_ranks(_collectives_of_a_lone_rank, 1, str(tmp_path)))
    assert out["collectives"] == []
    assert {"save.propose", "save.write", "save.agree", "save.commit"} <= set(out["phases"])
    assert out["restored"] == [1.0] * 8


def _propose_threads(rank: int, world_size: int, root: str) -> dict[str, str]:
    threads: dict[str, str] = {}

    def note_thread(event: events.PhaseEvent) -> None:
        threads[event.phase] = threading.current_thread().name  # listeners run in its thread

    with distckpt.CheckpointManager(root, keep_last=1, async_save=True, timeout=30) as manager:
        remove = events.add_listener(note_thread)
        try:
            manager.save(1, {"w": torch.ones(8) * rank})
            manager.wait()
        finally:
            remove()
    return threads


def test_rank_0s_root_work_runs_beside_the_snapshot_not_after_it(tmp_path: Path) -> None:
    rank0, rank1 = values(run_ranks(_propose_threads, 2, str(tmp_path)))
    # Another thread than the caller's, which takes the snapshot: the two overlap.
    assert rank0["propose.snapshot"] == rank0["save.propose"]
    # The copy of an async save is a phase of its own, in the caller's thread, on every rank.
    assert rank0["propose.copy"] == rank0["propose.snapshot"]
    assert rank1["propose.copy"] == rank1["propose.snapshot"]
    assert rank0["propose.root"] not in (rank0["propose.snapshot"], rank0["save.write"])


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_failed_phase_says_so_and_a_raising_listener_breaks_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, async_save: bool
) -> None:
    """The module's promises: a listener hears of a phase that ended with an error (``ok``
    False), the failed write's own phase as well as the commit its error comes out of, in the
    async save's background thread too, and of none other; one that raises is logged and the
    save goes on."""
    seen: list[events.PhaseEvent] = []

    def broken(event: events.PhaseEvent) -> None:
        raise ValueError("a broken listener")

    removers = [events.add_listener(broken), events.add_listener(seen.append)]
    try:
        with distckpt.CheckpointManager(tmp_path, async_save=async_save, fsync=False) as manager:
            faults.arm("after_shard_write", "raise")
            with pytest.raises(faults.InjectedFault):
                manager.save(1, {"w": torch.ones(8)})
                manager.wait()
            failed = {event.phase for event in seen if not event.ok}
            seen.clear()
            manager.save(2, {"w": torch.ones(8)})
            manager.wait()
            assert manager.steps() == [2]
    finally:
        for remove in removers:
            remove()
    assert {"save.write", "save.commit"} <= failed <= SAVE_PHASES
    assert {event.phase for event in seen if event.step == 2} >= SAVE_PHASES
    assert all(event.ok for event in seen)
    assert "phase-event listener" in caplog.text and "a broken listener" in caplog.text
