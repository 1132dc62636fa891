"""The pool of private gloo groups on real ranks: a group on which a collective failed, on
this rank or only on a peer, is never handed to another coordinator."""

from __future__ import annotations

import pytest
import torch

import distckpt
from distckpt.coord import Coordinator
from tests.ranks import run_ranks, values

#: Short, as rank 0 waits it out once; long enough for two local ranks to make a group.
TIMEOUT = 1.0


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
