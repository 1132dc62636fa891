"""distckpt's private gloo groups are named alike on every rank, whatever groups each rank
made or failed to make before: an async save's background group whose renewal failed on one
rank is renewed by the next save, in the same job (each attempt meets the other ranks under a
name of its own, never on the store keys a failed attempt left behind), and a manager on a
subgroup makes its group although its ranks hold different numbers of groups."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import distckpt
from distckpt import coord_groups, coord_health
from tests.ranks import run_ranks, values
from tests.test_async_handoff import no_descriptor_left
from tests.test_coord import TIMEOUT
from tests.test_coord_failures import broken_background_group


@contextlib.contextmanager
def renewal_without_descriptors(limited: bool) -> Iterator[None]:
    """Where ``limited``: the next group this process makes for distckpt is made with no file
    descriptor left (:func:`~tests.test_async_handoff.no_descriptor_left`), so that gloo cannot
    make its sockets and the renewal fails on this rank, while the other renews as usual."""
    real_take = coord_health.take_private_group

    def take_without_descriptors(ranks: tuple[int, ...], timeout: float) -> dist.ProcessGroup:
        with no_descriptor_left(True):
            return real_take(ranks, timeout)

    # Patched because rank 0 needs descriptors for the rest of the save (its proposal, the
    # removal of the staging area), so the limit must cover the group's creation alone, and
    # no hook of the library marks that point.
    if limited:
        coord_health.take_private_group = take_without_descriptors
    try:
        yield
    finally:
        coord_health.take_private_group = real_take


def _shared_attempt() -> int:
    """The attempt the next group over ranks 0 and 1 is made as, as every rank reads it."""
    return coord_groups.next_attempt(coord_groups.default_group_store(), (0, 1))


def _renewal_fails_once_then_succeeds(rank: int, world_size: int, root: str) -> dict[str, object]:
    """Save 2 commits; rank 1 comes late to save 4's background write, which breaks the
    background group; save 6's renewal fails (rank 0 can make no socket, after rank 1 wrote
    its address in the store for the new group); save 8 renews the group again and commits.
    Returns the shared attempt before save 6 and before save 8 (read between barriers, alike
    on every rank) and the name of the group save 8 renewed."""
    manager = broken_background_group(rank, root)
    dist.barrier()  # the training loop's own group: both ranks in step again
    before_failed = _shared_attempt()
    dist.barrier()
    with renewal_without_descriptors(rank == 0), pytest.raises(distckpt.CoordinationError):
        manager.save(6, {"w": torch.ones(4)})
    dist.barrier()
    before_renewal = _shared_attempt()
    dist.barrier()
    manager.save(8, {"w": torch.full((4,), 8.0)})
    saved = manager.wait()
    coord = manager._background.coord
    renewed = None if coord.broken or coord.group is None else coord.group.group_name
    manager.close()
    return {
        "committed": saved is not None and saved.step,
        "renewed": renewed,
        "attempts": (before_failed, before_renewal),
    }


def test_a_renewal_that_failed_on_one_rank_succeeds_at_the_next_save(tmp_path: Path) -> None:
    """README: when the new group fails too, "that save raises on every rank and the one after tries
    again", and commits: the ranks name each attempt's group alike, whatever attempts failed before
    on some of them (torch's own name for such a group, counted from the groups each process holds,
    would meet the failed attempt's store keys, or another rank's other name). Beside the commit,
    which a renewal under a stale name fails only when a peer's stale address is still met, the
    names say it without a race: the failed attempt moved the shared attempt on (each rank's
    failed attempt was made as one from ``before_failed`` up), and every rank's renewed group
    has the same name, of the attempt after them."""
    root = str(tmp_path)
    results = values(run_ranks(_renewal_fails_once_then_succeeds, 2, root, timeout=120))
    before_failed, before_renewal = results[0]["attempts"]
    assert [r["attempts"] for r in results] == [(before_failed, before_renewal)] * 2, results
    assert before_renewal > before_failed, results
    expected = coord_groups.group_name((0, 1), before_renewal)
    assert [r["renewed"] for r in results] == [expected] * 2, results
    assert expected != coord_groups.group_name((0, 1), before_failed)
    assert [r["committed"] for r in results] == [8, 8], results
    assert distckpt.CheckpointManager(root, read_only=True).steps() == [2, 8]


def test_torch_still_lets_distckpt_name_its_groups() -> None:
    """The private helper through which the ranks name each attempt alike still takes what
    distckpt gives it; a torch that changed it would leave distckpt to torch's own names,
    with which a renewal retried after a failed one may fail again."""
    assert coord_groups.takes_a_name(dist.distributed_c10d._new_process_group_helper)
    assert not coord_groups.takes_a_name(None)
    assert not coord_groups.takes_a_name(lambda group_size, group_rank: None)


def test_group_names_differ_per_attempt_and_per_set_of_ranks() -> None:
    names = {coord_groups.group_name(ranks, n) for ranks in [(0, 1), (0, 2)] for n in range(3)}
    assert len(names) == 6, names
    assert all("/" not in name for name in names), names  # a prefix of the store's keys


def _manager_on_a_subgroup(rank: int, world_size: int, root: str) -> object:
    """Ranks 1 and 2 save on a subgroup of their own; rank 1 also made a group alone, so the
    two hold different numbers of groups (torch's own name for a new group would differ)."""
    subgroup = dist.new_group([1, 2], use_local_synchronization=True) if rank > 0 else None
    if rank == 1:
        dist.new_group([1], use_local_synchronization=True)
    if rank == 0:
        return None
    with distckpt.CheckpointManager(root, group=subgroup, timeout=TIMEOUT) as manager:
        manager.save(1, {"w": torch.ones(2)})
        return manager.steps()


def test_a_manager_on_a_subgroup_makes_its_group_whatever_groups_its_ranks_made(
    tmp_path: Path,
) -> None:
    """README: a manager "makes its own gloo group with `timeout` (with `group=`, among that
    group's ranks alone, whatever other groups each of them made before)"."""
    results = values(run_ranks(_manager_on_a_subgroup, 3, str(tmp_path), timeout=60))
    assert results == [None, [1], [1]], results
