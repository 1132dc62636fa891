"""The save's proposal round on real ranks: the verdict rank 0 takes from every rank's
proposal (one step everywhere, the free space every rank's part needs) reaches every rank."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import distckpt
from tests.ranks import run_ranks, values

TIMEOUT = 20.0
#: The timeout rank 1's lone background collective waits out, and where a background save
#: that did not renew its group would wait for a peer; long enough for two local ranks to
#: make a group.
SHORT_TIMEOUT = 2.0

#: Rank 1's part of the save (1 MiB of float32); rank 0's is one element.
LARGE_ELEMENTS = 256 << 10


def _lopsided_save(rank: int, world_size: int, root: str, space_margin: float) -> str:
    """A save where rank 1 writes nearly all the bytes: the error class and message."""
    elements = LARGE_ELEMENTS if rank == 1 else 1
    with distckpt.CheckpointManager(root, space_margin=space_margin, timeout=TIMEOUT) as mgr:
        try:
            mgr.save(1, {"w": torch.zeros(elements)})
        except distckpt.CheckpointError as exc:
            return f"{type(exc).__name__}: {exc}"
        return "saved"


def test_the_free_space_check_counts_every_ranks_part_of_the_save(tmp_path: Path) -> None:
    """README: the free space a save needs is estimated from the bytes the format writes, on
    every rank. A margin of four times the free space per MiB of the save refuses rank 1's
    MiB, where rank 0's one element alone (a few KiB at most) would pass."""
    space_margin = shutil.disk_usage(tmp_path).free / (256 << 10)
    results = values(run_ranks(_lopsided_save, 2, str(tmp_path), space_margin))
    for message in results:
        assert message.startswith("InsufficientSpace: saving step 1 needs about 1"), message
    assert not list(tmp_path.glob("step-*"))


def _twin_broken_on_rank_1_alone(rank: int, world_size: int, root: str) -> tuple[int, bool, bool]:
    """Rank 1's background coordinator's group breaks, rank 0's does not: a collective only
    rank 1 enters times out. The next async save renews it on every rank. Returns the step
    saved, and whether this rank's background group was broken before and after it."""
    with distckpt.CheckpointManager(root, async_save=True, timeout=SHORT_TIMEOUT) as mgr:
        mgr.save(1, {"w": torch.zeros(4)})
        mgr.wait()
        if rank == 1:
            with pytest.raises(distckpt.CoordinationTimeout):
                mgr._background.coord.all_gather(lambda: rank, what="a collective rank 0 skips")
        torch.distributed.barrier()  # the training loop's own group
        broken_before = mgr._background.coord.broken
        mgr.save(2, {"w": torch.ones(4)})
        saved = mgr.wait()
        return saved.step, broken_before, mgr._background.coord.broken


def test_a_background_group_broken_on_one_rank_is_renewed_on_every_rank(tmp_path: Path) -> None:
    """The proposals carry whether each rank's background group broke; the verdict renews it
    on every rank if any rank's did, so the next async save commits."""
    results = values(run_ranks(_twin_broken_on_rank_1_alone, 2, str(tmp_path)))
    assert results == [(2, False, False), (2, True, False)]


def _other_steps_where_rank_0s_is_committed(rank: int, world_size: int, root: str) -> str:
    """Rank 0 forces a save of step 5, committed already (which returns that checkpoint);
    rank 1 forces one of step 6."""
    with distckpt.CheckpointManager(root, fsync=False, timeout=TIMEOUT) as mgr:
        mgr.save(5, {"w": torch.zeros(2)})
        try:
            saved = mgr.save(5 + rank, {"w": torch.zeros(2)}, force=True)
        except distckpt.CheckpointError as exc:
            return f"{type(exc).__name__}: {exc}"
        return f"saved {saved.step}"


def test_different_steps_are_refused_where_rank_0s_is_committed_already(tmp_path: Path) -> None:
    """README: a step number that differs between ranks is refused, also where rank 0's step
    is committed and its checkpoint would be returned: rank 1 would think step 6 saved."""
    for message in values(run_ranks(_other_steps_where_rank_0s_is_committed, 2, str(tmp_path))):
        assert message.startswith("InvalidStep: the ranks passed different steps"), message
