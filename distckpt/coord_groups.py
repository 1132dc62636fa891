"""The private gloo process groups on which each :class:`~distckpt.coord.Coordinator` runs
its collectives, pooled per set of ranks.

Each coordinator (and each background twin of one, :meth:`~distckpt.coord.Coordinator.spawn`)
takes a group of its own with the manager's timeout, so distckpt's collectives never interleave
with the training loop's, and gives it back when it closes. A module of its own because it is
the groups' lifecycle (creation, reuse, retirement, destruction at exit) and health (the
failure reports of :func:`report_failure`), which no verb of the coordinator depends on:
:mod:`distckpt.coord` takes a group when a coordinator is made or its group broke, and returns
or retires it when one is closed.

A group on which a collective failed is broken for good: gloo closes its connections after a
timeout, and every later collective on it fails at once. Such a group is retired, never pooled
again, and destroyed at exit with the pool (destroyed sooner, torch would give the next group
its name: see ``_pool``). Each rank whose collective failed on a group reports it in the
group's store (:func:`report_failure`), so that a rank whose collective failed only because a
peer had closed the connection can learn what that peer saw (:func:`peer_failures`).
"""

from __future__ import annotations

import atexit
import datetime
import logging
import threading
import time
from dataclasses import dataclass

import torch.distributed as dist

from distckpt.errors import CoordinationError

logger = logging.getLogger("distckpt")

# Private gloo groups, pooled per set of ranks instead of destroyed: torch names a group made
# with use_local_synchronization=True after its ranks and the number of live groups, so a group
# destroyed and made again gets the old name and meets the old group's addresses in the store.
# Managers are created and closed collectively, so every rank takes and returns groups in the
# same order and the pool pairs the same groups across ranks.
_pool: dict[tuple[int, ...], list[dist.ProcessGroup]] = {}
# Broken groups, kept alive (not destroyed) until exit for the same reason.
_retired: list[dist.ProcessGroup] = []
_pool_lock = threading.Lock()

#: The key, in a group's own store, under which group rank N reports a failed collective.
FAILURE_KEY = "distckpt-failed/{rank}"
#: How often :func:`peer_failures` looks for a peer's report while it waits for one.
REPORT_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class FailureReport:
    """What a rank whose collective failed on a group tells the group's other ranks."""

    #: the group rank that failed
    rank: int
    #: the operation, as its coordinator counts them, in which it failed
    operation: int
    #: whether its collective ran out of time (rather than losing a peer)
    timed_out: bool


def is_registered(group: dist.ProcessGroup) -> bool:
    """Whether ``group`` is still a live group of this process: False once
    ``destroy_process_group()`` destroyed it (or every group, the default one included)."""
    return dist.is_initialized() and group in dist.distributed_c10d._world.pg_map


def _store_of(group: dist.ProcessGroup) -> dist.Store | None:
    """The store ``group`` was made with, under the group's own prefix (None once destroyed)."""
    entry = dist.distributed_c10d._world.pg_map.get(group)
    return None if entry is None else entry[1]


def report_failure(group: dist.ProcessGroup, report: FailureReport) -> None:
    """Tell the other ranks of ``group`` that a collective failed here. Best effort: a store that
    is gone (the job is ending) only loses the report, which tells the peers why, not whether."""
    store = _store_of(group)
    if store is None:
        return
    value = f"{report.operation} {int(report.timed_out)}"
    try:
        store.set(FAILURE_KEY.format(rank=report.rank), value)
    except Exception as exc:  # the failure itself is raised by the caller: never mask it
        logger.debug("could not report a failed collective to the other ranks: %s", exc)


def peer_failures(
    group: dist.ProcessGroup, *, rank: int, world_size: int, wait: float
) -> list[FailureReport]:
    """The failures the other ranks of ``group`` reported, waiting up to ``wait`` seconds for a
    first one: a peer that closed the connection reports why a moment after it closed it (a dead
    peer never does, hence the bound)."""
    store = _store_of(group)
    if store is None:
        return []
    deadline = time.monotonic() + wait
    while True:
        reports: list[FailureReport] = []
        try:
            for peer in range(world_size):
                key = FAILURE_KEY.format(rank=peer)
                if peer != rank and store.check([key]):
                    operation, timed_out = store.get(key).decode().split()
                    reports.append(FailureReport(peer, int(operation), timed_out == "1"))
        except Exception as exc:  # a store that is gone tells nothing more
            logger.debug("could not read the other ranks' failure reports: %s", exc)
            return reports
        if reports or time.monotonic() >= deadline:
            return reports
        time.sleep(REPORT_POLL_SECONDS)


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


def retire_private_group(group: dist.ProcessGroup) -> None:
    """Never hand out ``group`` again (a collective failed on it); it is destroyed at exit."""
    with _pool_lock:
        _retired.append(group)


@atexit.register
def _destroy_pool() -> None:
    """Destroy the pooled and retired groups while the interpreter still runs: left to interpreter
    shutdown, a gloo thread may free the last collective's buffers without the GIL and abort
    the process ("terminate called without an active exception")."""
    with _pool_lock:
        groups = [group for free in _pool.values() for group in free] + _retired
        _pool.clear()
        _retired.clear()
    if not (dist.is_available() and dist.is_initialized()):
        return
    live = dist.distributed_c10d._world.pg_map
    for group in groups:
        if group in live:
            try:
                dist.destroy_process_group(group)
            except Exception as exc:  # shutting down: never mask the job's own exit status
                logger.debug("destroying a pooled group at exit failed: %s", exc)
