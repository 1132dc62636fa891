"""The private gloo process groups on which each :class:`~distckpt.coord.Coordinator` runs
its collectives, pooled per set of ranks.

Each coordinator (and each background twin of one, :meth:`~distckpt.coord.Coordinator.spawn`)
takes a group of its own with the manager's timeout, so distckpt's collectives never interleave
with the training loop's, and gives it back when it closes. A module of its own because it is
the groups' lifecycle (creation, reuse, destruction at exit), which no verb of the coordinator
depends on: :mod:`distckpt.coord` only takes a group when a coordinator is made and returns it
when one is closed.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import threading

import torch.distributed as dist

from distckpt.errors import CoordinationError

logger = logging.getLogger("distckpt")

# Private gloo groups, pooled per set of ranks instead of destroyed: torch names a group made
# with use_local_synchronization=True after its ranks and the number of live groups, so a group
# destroyed and made again gets the old name and meets the old group's addresses in the store.
# Managers are created and closed collectively, so every rank takes and returns groups in the
# same order and the pool pairs the same groups across ranks.
_pool: dict[tuple[int, ...], list[dist.ProcessGroup]] = {}
_pool_lock = threading.Lock()


def take_private_group(ranks: tuple[int, ...], timeout: float) -> dist.ProcessGroup:
    """A gloo group over the global ``ranks`` with ``timeout`` seconds per collective: a pooled
    one still alive, or else a new one, which every rank of ``ranks`` (and only those) makes at
    the same time."""
    live = dist.distributed_c10d._world.pg_map
    with _pool_lock:
        free = [g for g in _pool.get(ranks, []) if g in live]
        group = free.pop(0) if free else None
        _pool[ranks] = free
    delta = datetime.timedelta(seconds=timeout)
    if group is None:
        try:
            return dist.new_group(
                ranks=list(ranks),
                backend="gloo",
                timeout=delta,
                use_local_synchronization=True,
            )
        except Exception as exc:
            raise CoordinationError(f"could not create distckpt's gloo group: {exc}") from exc
    set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if set_timeout is not None:  # older torch: the group keeps the timeout it was made with
        set_timeout(delta, group)
    return group


def return_private_group(ranks: tuple[int, ...], group: dist.ProcessGroup) -> None:
    """Give ``group``, taken for ``ranks``, back to the pool for the next coordinator."""
    with _pool_lock:
        _pool.setdefault(ranks, []).append(group)


@atexit.register
def _destroy_pool() -> None:
    """Destroy the pooled groups while the interpreter still runs: left to interpreter
    shutdown, a gloo thread may free the last collective's buffers without the GIL and abort
    the process ("terminate called without an active exception")."""
    with _pool_lock:
        groups = [group for free in _pool.values() for group in free]
        _pool.clear()
    if not (dist.is_available() and dist.is_initialized()):
        return
    live = dist.distributed_c10d._world.pg_map
    for group in groups:
        if group in live:
            try:
                dist.destroy_process_group(group)
            except Exception as exc:  # shutting down: never mask the job's own exit status
                logger.debug("destroying a pooled group at exit failed: %s", exc)
