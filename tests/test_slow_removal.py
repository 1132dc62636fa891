"""Rank 0's removals of what a commit, a delete or a start left behind (the trash, dead writers'
leftovers) come after the outcome reached every rank: a removal slower than the collectives'
timeout neither fails a committed save nor the start of a requeued job."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

import distckpt
from distckpt.layout import TRASH_DIR_NAME
from distckpt.storage import posix
from tests.ranks import run_ranks, values

TIMEOUT = 3.0
#: How long rank 0 takes to remove each entry: longer than the timeout.
REMOVAL_SECONDS = TIMEOUT + 2


def _slow_removals_on_rank_0(rank: int) -> None:
    """Make every removal of rank 0 take :data:`REMOVAL_SECONDS`. Replaced, not real: a removal
    that slow needs a checkpoint of many gigabytes on a slow shared filesystem, which this
    machine cannot hold in a test's time; the real removal still runs after the wait."""
    if rank != 0:
        return
    remove = posix.PosixRootStore._remove_quietly

    def slow(self: posix.PosixRootStore, leftover: Path) -> bool:
        time.sleep(REMOVAL_SECONDS)
        return remove(self, leftover)

    posix.PosixRootStore._remove_quietly = slow  # type: ignore[method-assign]


def _saves_and_a_delete(rank: int, world_size: int, root: str) -> list[int | None]:
    _slow_removals_on_rank_0(rank)
    steps: list[int | None] = []
    with distckpt.CheckpointManager(root, timeout=TIMEOUT, keep_last=1) as mgr:
        for step in (1, 2):  # the second one's retention moves step 1 into the trash
            result = mgr.save(step, {"w": torch.full((4,), float(step))})
            steps.append(None if result is None else result.step)
        dist.barrier()  # the training loop's own collective: rank 0 finished removing
        mgr.delete(2)
        dist.barrier()
        steps.extend(mgr.steps())
    return steps


def test_a_slow_trash_never_fails_a_committed_save_or_a_delete(tmp_path: Path) -> None:
    assert values(run_ranks(_saves_and_a_delete, 2, str(tmp_path), timeout=90)) == [[1, 2]] * 2
    assert list((tmp_path / TRASH_DIR_NAME).iterdir()) == []


def _opens(rank: int, world_size: int, root: str) -> bool:
    _slow_removals_on_rank_0(rank)
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        dist.barrier()  # rank 0 removed the leftovers before this
        return mgr.latest_step() == 1


def test_a_slow_leftover_never_fails_the_start_of_a_requeued_job(tmp_path: Path) -> None:
    with distckpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"w": torch.ones(2)})
    # what a job killed while retention emptied the trash leaves behind
    (tmp_path / TRASH_DIR_NAME / "step-00000000").mkdir(parents=True)
    assert values(run_ranks(_opens, 2, str(tmp_path), timeout=90)) == [True, True]
    assert list((tmp_path / TRASH_DIR_NAME).iterdir()) == []
