"""The ranks agree on the attempt each new private group is made as, through the default
group's store, so that an attempt that ended on some ranks and not others (a rank that tried
alone, a peer that had raised before the attempt) leaves no rank counting differently from the
others: the next group is made in step. And where torch's private helper changed, distckpt
says once that its groups take torch's own names."""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import distckpt
from distckpt import coord_groups
from tests.ranks import run_ranks, values
from tests.test_coord import TIMEOUT
from tests.test_coord_failures import broken_background_group


def _rank_1_gives_up_on_the_proposal(rank: int, world_size: int, root: str) -> list[object]:
    """Save 4 broke the background group; in save 6, rank 1 gives up on the proposal's last
    collective just as it completed, so rank 0 alone has the plan and tries the background
    group's renewal alone (and fails); then saves 8, 10 and 12 run in step."""
    manager = broken_background_group(rank, root)
    dist.barrier()
    real_all_gather = dist.all_gather
    gave_up: list[bool] = []

    def complete_then_give_up(*args: Any, **kwargs: Any) -> None:
        real_all_gather(*args, **kwargs)
        in_the_agreement = any(f.name == "agree_on" for f in traceback.extract_stack())
        if in_the_agreement and not gave_up:
            gave_up.append(True)
            raise RuntimeError("Timed out waiting 3000ms for recv operation to complete")

    # Patched because the race it stands for (a rank giving up on a collective the very moment
    # its peer's part arrives, the peer's side completing) cannot be produced on demand: the
    # collective really runs on both ranks, then rank 1 alone raises gloo's own timeout.
    if rank == 1:
        dist.all_gather = complete_then_give_up
    try:
        with pytest.raises(distckpt.CoordinationError):
            manager.save(6, {"w": torch.ones(4)})
    finally:
        dist.all_gather = real_all_gather
    outcomes: list[object] = [gave_up == [True] if rank == 1 else True]
    dist.barrier()
    for step in (8, 10, 12):
        try:
            manager.save(step, {"w": torch.full((4,), float(step))})
            saved = manager.wait()
            outcomes.append(saved is not None and saved.step)
        except distckpt.CoordinationError as exc:
            outcomes.append(type(exc).__name__)
        dist.barrier()
    manager.close()
    return outcomes


def test_saves_recover_after_one_rank_renewed_the_background_group_alone(
    tmp_path: Path,
) -> None:
    """README: "Where a rank gave up on that save's last agreement just as the others completed
    it (...), the save after may fail as well, and the ones after it commit". A renewal attempt
    made by rank 0 alone (rank 1 had raised before it) leaves the ranks agreeing on the next
    attempts: counted on each rank, rank 1 would make every later group as the attempt rank 0
    had used up, and every later save would fail. The first save after may still fail (rank
    1's group broke, rank 0's did not: they learn it in that save)."""
    root = str(tmp_path)
    results = values(run_ranks(_rank_1_gives_up_on_the_proposal, 2, root, timeout=150))
    for outcomes in results:
        assert outcomes[0] is True, results  # rank 1 gave up once, inside the agreement
        assert outcomes[2:] == [10, 12], results
    assert {2, 10, 12} <= set(distckpt.CheckpointManager(root, read_only=True).steps())


def _alone_then_together(rank: int, world_size: int, root: str) -> list[object]:
    """Rank 0 alone tries to make a manager (rank 1 never comes: it fails); then both make
    managers together, on roots of their own, three times."""
    outcomes: list[object] = []
    if rank == 0:
        with pytest.raises(distckpt.CoordinationError):
            distckpt.CheckpointManager(f"{root}/alone", timeout=TIMEOUT)
    dist.barrier()
    for n in range(3):
        with distckpt.CheckpointManager(f"{root}/together{n}", timeout=TIMEOUT) as manager:
            manager.save(1, {"w": torch.ones(2)})
            outcomes.append(manager.steps())
        dist.barrier()
    return outcomes


def test_managers_made_together_after_one_rank_failed_to_make_one_alone(
    tmp_path: Path,
) -> None:
    results = values(run_ranks(_alone_then_together, 2, str(tmp_path), timeout=90))
    assert results == [[[1], [1], [1]]] * 2, results


def _groups_named_by_torch(rank: int, world_size: int) -> list[str]:
    """Two new groups made where torch's private helper changed; the warnings logged."""
    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logging.getLogger("distckpt").addHandler(handler)
    c10d = dist.distributed_c10d
    helper = c10d._new_process_group_helper
    # Patched because no torch whose helper changed is installed here: a signature distckpt
    # does not know is what makes it fall back to torch's own names (torch's new_group still
    # calls the helper, so it stays callable).
    c10d._new_process_group_helper = lambda *args, **kwargs: helper(*args, **kwargs)
    try:
        for _ in range(2):
            group = coord_groups.take_private_group((0,), TIMEOUT)
            assert dist.get_world_size(group) == 1
    finally:
        c10d._new_process_group_helper = helper
        logging.getLogger("distckpt").removeHandler(handler)
    return warnings


def test_a_torch_without_the_helper_says_once_that_groups_take_its_names() -> None:
    """README: the guarantee that a manager on a subgroup makes its group whatever other groups
    its ranks made holds with torch's private helper; with another, a warning says so."""
    (warnings,) = values(run_ranks(_groups_named_by_torch, 1, timeout=60))
    assert len(warnings) == 1, warnings
    assert "torch's own names" in warnings[0], warnings


def _late_rank_under_lazy_gloo(rank: int, world_size: int) -> tuple[str, float]:
    """Rank 1 comes a second late to a private group's creation; with gloo's lazy connection
    the helper returns before any peer connected."""
    if rank == 1:
        time.sleep(1.0)
    group = coord_groups.take_private_group((0, 1), 10.0)
    total = torch.ones(1)
    dist.all_reduce(total, group=group)
    return group.group_name, float(total)


def test_a_late_rank_meets_the_others_under_gloos_lazy_connection() -> None:
    """With TORCH_GLOO_LAZY_INIT=1 a fast rank must not move the shared count on before a
    slow peer read it: both make the group under one name, and it works."""
    results = values(
        run_ranks(_late_rank_under_lazy_gloo, 2, timeout=60, env={"TORCH_GLOO_LAZY_INIT": "1"})
    )
    assert results[0] == results[1]
    assert results[0][1] == 2.0
