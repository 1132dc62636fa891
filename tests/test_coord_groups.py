"""Private gloo groups on real ranks: a group on which a collective failed, on this rank or
only on a peer, is never handed to another coordinator; when a rank finds a peer's
connection closed, it waits for the peers' failure reports only where they can be on their
way (``distckpt.coord_health``), and its error names itself, not the peer."""

from __future__ import annotations

import os
import signal

import pytest
import torch

import distckpt
from distckpt.coord import Coordinator
from tests.ranks import run_ranks, values

#: Short, as rank 0 waits it out once; long enough for two local ranks to make a group.
TIMEOUT = 2.0


def all_gather_error_and_report_waits(coord: Coordinator, rank: int) -> tuple[str, list[float]]:
    """The error class an all_gather of this rank's number raises ("no error" if none) and the
    ``wait`` of every read of the peers' failure reports it made, in order."""
    import distckpt.coord_health as coord_health

    waits: list[float] = []
    real_peer_failures = coord_health.peer_failures

    def recording_peer_failures(*args: object, **kwargs: float) -> object:
        waits.append(kwargs["wait"])
        return real_peer_failures(*args, **kwargs)  # type: ignore[arg-type]

    # A spy, not a stand-in (the real reads run): whether a rank waited for reports is what
    # its callers test, and telling a wait from none by the clock would be a timed assertion.
    coord_health.peer_failures = recording_peer_failures  # type: ignore[assignment]
    try:
        coord.all_gather(lambda: rank, what="a call a peer fails")
    except distckpt.CoordinationError as exc:
        return type(exc).__name__, waits
    finally:
        coord_health.peer_failures = real_peer_failures
    return "no error", waits


def _closed_after_a_peers_failure(rank: int, world_size: int) -> list[int]:
    """Rank 0 times out in a collective rank 1 never enters: rank 1's own collectives all
    completed, and only rank 0's report says the group broke. Each closes its coordinator and
    makes a new one."""
    coord = Coordinator(None, TIMEOUT)
    coord.all_gather(lambda: rank, what="the first collective")
    if rank == 0:
        with pytest.raises(distckpt.CoordinationTimeout):
            coord.all_gather(lambda: rank, what="a collective rank 1 skips")
    # the training loop's own group: rank 0 reported its failure before it came here
    torch.distributed.barrier()
    coord.close()
    again = Coordinator(None, TIMEOUT)
    try:
        return again.all_gather(lambda: rank, what="a new coordinator's collective")
    finally:
        again.close()


def test_a_group_a_peer_saw_fail_is_not_pooled_again() -> None:
    """Rank 1 must retire the group too, or it would take it from the pool for the next
    coordinator while rank 0 makes a fresh one, and neither would meet the other."""
    assert values(run_ranks(_closed_after_a_peers_failure, 2)) == [[0, 1]] * 2


def _peer_dies_in_the_first_operation(rank: int, world_size: int) -> tuple[str, list[float]]:
    """Rank 1 dies once the group is made, before the first collective of the first operation;
    rank 0 finds its connection closed there."""
    coord = Coordinator(None, TIMEOUT)
    coord.begin_operation()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        return all_gather_error_and_report_waits(coord, rank)
    finally:
        coord.close()


def test_a_peer_dead_in_the_first_operation_is_reported_without_waiting() -> None:
    """docs/faults.md: a survivor raises at once when its peer dies during a call. No
    operation came before the first, so no failure report can be on its way there."""
    assert values(run_ranks(_peer_dies_in_the_first_operation, 2, expect_killed=True)) == [
        ("CoordinationError", [0.0])
    ]


def _rank_0_dies(rank: int, world_size: int) -> tuple[int, str, int | None]:
    coord = Coordinator(None, 3.0)  # long enough for three local ranks to make a group
    coord.all_gather(lambda: rank, what="meeting")
    if rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        coord.all_gather(lambda: rank, what="a call rank 0 died before")
    except distckpt.CoordinationError as exc:
        return rank, type(exc).__name__, exc.rank
    finally:
        coord.close()
    return rank, "no error", None


def test_each_survivor_of_a_dead_rank_names_itself() -> None:
    """README ("failure of one rank"): a rank that died is not the rank the survivors' error
    names; each names itself. Rank 0 dies, so an error naming rank 0 on every rank fails."""
    assert values(run_ranks(_rank_0_dies, 3, expect_killed=True)) == [
        (1, "CoordinationError", 1),
        (2, "CoordinationError", 2),
    ]
