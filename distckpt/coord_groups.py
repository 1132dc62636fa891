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
again, and destroyed at exit with the pool. Neither the pool nor the retired list keeps a group
alive: once ``destroy_process_group()`` destroyed it, it is freed, and the default group's store
with it. Each new group, and each attempt to make one, is named
alike on every rank by a counter the ranks share in the default group's store (:func:`group_name`,
:data:`ATTEMPT_KEY`), so that an attempt that failed on some rank (or that some rank never made)
leaves neither its name nor the addresses written under it to the next. Each rank whose
collective failed on a group reports it in the group's store (:func:`report_failure`), so that a
rank whose collective failed only because a peer had closed the connection can learn what that
peer saw (:func:`peer_failures`).
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import inspect
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from distckpt.errors import CoordinationError

logger = logging.getLogger("distckpt")
T = TypeVar("T")

# Private gloo groups, pooled per set of ranks instead of destroyed: a new group costs a
# rendezvous, and where torch names it itself (see _new_group) a group destroyed and made again
# gets the old name and meets the old group's addresses in the store. Managers are created and
# closed collectively, so every rank takes and returns groups in the same order and the pool
# pairs the same groups across ranks. Weak references: torch's registry of groups keeps a
# group alive until destroy_process_group() destroys it, and a group held past that would
# keep the default group's store with it (on rank 0 a TCPStore server, still listening on
# MASTER_PORT, where a process group initialised again must start its own).
_pool: dict[tuple[int, ...], list[weakref.ref[dist.ProcessGroup]]] = {}
# Broken groups, left registered (not destroyed) until exit for the same reason.
_retired: list[weakref.ref[dist.ProcessGroup]] = []
_pool_lock = threading.Lock()
# Held around every group creation: torch (for the groups it names itself) counts the groups
# registered so far before the new one registers, so two threads making groups at once would
# give both the same name.
_creation_lock = threading.Lock()
# Once per process: the warning that torch's private helper is gone (see _new_group).
_warned_of_torch_names = False

#: The key, in the default group's store, of the attempt (counted from 0) that the next group
#: over a set of ranks is made as (:func:`group_name`): read by every rank before it makes the
#: group, and moved past that attempt by the first rank to end it, whether it succeeded or
#: failed. A count of its own on each rank would drift apart for good once an attempt ended
#: on some ranks and not others (a rank that tried alone, or that had raised before it came);
#: torch's own name for a use_local_synchronization group, counted from the groups the
#: process holds (which a failed attempt does not add to), would give the next attempt the
#: failed one's name, under which a peer's stale address waits.
ATTEMPT_KEY = "distckpt_{ranks}/next_attempt"

#: The counters, in a group's own store, of the ranks that reported a failed collective: in
#: all, and per operation (failed, and of those timed out). Counters, not a key per rank, so
#: that reading them costs a few store requests whatever the number of ranks.
ALL_FAILURES_KEY = "distckpt-failures"
FAILED_IN_KEY = "distckpt-failures/{operation}"
TIMED_OUT_IN_KEY = "distckpt-timeouts/{operation}"
#: How often :func:`peer_failures` looks for a peer's report while it waits for one.
REPORT_POLL_SECONDS = 0.05
#: How long the store may take to answer the requests of one report or reading: a store whose
#: server cannot be reached (its host stopped or cut off) holds a request for the store's own
#: timeout (torch's default: 30 minutes), far beyond distckpt's.
STORE_SECONDS = 5.0


@dataclass(frozen=True)
class PeerFailures:
    """What the other ranks of a group reported about the operations around one of this
    rank's (see :func:`peer_failures`)."""

    #: another rank failed the operation before it
    earlier: bool = False
    #: another rank failed the same operation
    same: bool = False
    #: another rank timed out in the same operation
    timed_out: bool = False


def is_registered(group: dist.ProcessGroup) -> bool:
    """Whether ``group`` is still a live group of this process: False once
    ``destroy_process_group()`` destroyed it (or every group, the default one included)."""
    return dist.is_initialized() and group in dist.distributed_c10d._world.pg_map


def _store_of(group: dist.ProcessGroup) -> dist.Store | None:
    """The store ``group`` was made with, under the group's own prefix (None once destroyed)."""
    entry = dist.distributed_c10d._world.pg_map.get(group)
    return None if entry is None else entry[1]


def _within(seconds: float, ask: Callable[[], T], default: T) -> T:
    """What ``ask`` returns, or ``default`` if it did not return within ``seconds`` (see
    :data:`STORE_SECONDS`; the request is left to end in a daemon thread). ``ask`` must not
    raise."""
    answers: list[T] = []
    worker = threading.Thread(
        target=lambda: answers.append(ask()), name="distckpt-store", daemon=True
    )
    worker.start()
    worker.join(seconds)
    return answers[0] if answers else default


def report_failure(group: dist.ProcessGroup, *, operation: int, timed_out: bool) -> None:
    """Tell the other ranks of ``group`` that a collective of ``operation`` (as its coordinator
    counts them) failed here, and whether it timed out. Best effort: a store that is gone or
    does not answer in :data:`STORE_SECONDS` only loses the report, which tells the peers why,
    not whether."""
    _within(STORE_SECONDS, lambda: _report(group, operation, timed_out), None)


def _report(group: dist.ProcessGroup, operation: int, timed_out: bool) -> None:
    store = _store_of(group)
    if store is not None:
        write_report(store, operation, timed_out)


def write_report(store: dist.Store, operation: int, timed_out: bool) -> None:
    """The counters of one rank's failure of ``operation`` in ``store``: the timeout first and
    the failure last, so that a peer which reads the failure (before the timeout, as
    :func:`_read_failures` does) also sees the timeout that came with it, and raises the same
    class as the rank that timed out."""
    try:
        if timed_out:
            store.add(TIMED_OUT_IN_KEY.format(operation=operation), 1)
        store.add(ALL_FAILURES_KEY, 1)
        store.add(FAILED_IN_KEY.format(operation=operation), 1)
    except Exception as exc:  # the failure itself is raised by the caller: never mask it
        logger.debug("could not report a failed collective to the other ranks: %s", exc)


def peer_failures(
    group: dist.ProcessGroup, *, operation: int, timed_out_here: bool, wait: float
) -> PeerFailures:
    """What the other ranks of ``group`` reported about ``operation`` and the one before,
    once this rank reported its own failure of ``operation`` (``timed_out_here``: whether it
    timed out), waiting up to ``wait`` seconds for a first report of theirs (one of the
    operation before, when this rank timed out: its peers a call ahead time out with it): a peer
    that closed the connection reports why a moment after it closed it (a dead peer never does,
    hence the bound). A rank only ever misses a failure of the operation before its own (see
    :mod:`distckpt.coord`), so no older one is read. A store that does not answer tells
    nothing."""
    return _within(
        wait + STORE_SECONDS,
        lambda: _read_failures(group, operation, timed_out_here, wait),
        PeerFailures(),
    )


def _read_failures(
    group: dist.ProcessGroup, operation: int, timed_out_here: bool, wait: float
) -> PeerFailures:
    store = _store_of(group)
    if store is None:
        return PeerFailures()
    deadline = time.monotonic() + wait
    while True:
        try:  # the failures before the timeouts: the reverse of write_report's order
            earlier = operation > 1 and _count(store, FAILED_IN_KEY, operation - 1) > 0
            same = _count(store, FAILED_IN_KEY, operation) > 1  # this rank's own counts once
            timeouts = _count(store, TIMED_OUT_IN_KEY, operation) - int(timed_out_here)
        except Exception as exc:  # a store that is gone tells nothing more
            logger.debug("could not read the other ranks' failure reports: %s", exc)
            return PeerFailures()
        # A rank that timed out stops at a peer's report of this operation only if it did not
        # time out itself: peers a call ahead time out together and see each other's report
        # before that of the rank left behind in the operation before, which they must join.
        if earlier or (same and not timed_out_here) or time.monotonic() >= deadline:
            return PeerFailures(earlier, same, timeouts > 0)
        time.sleep(REPORT_POLL_SECONDS)


def _count(store: dist.Store, key: str, operation: int) -> int:
    return int(store.add(key.format(operation=operation), 0))


def failed_anywhere(group: dist.ProcessGroup) -> bool:
    """Whether any rank reported a failed collective on ``group`` (one store request); True
    when the store does not answer: such a group is not to be handed out again."""
    return _within(STORE_SECONDS, lambda: _any_failure(group), True)


def _any_failure(group: dist.ProcessGroup) -> bool:
    store = _store_of(group)
    if store is None:
        return True  # destroyed: never to be handed out again
    try:
        return int(store.add(ALL_FAILURES_KEY, 0)) > 0
    except Exception as exc:  # a store that is gone: the job is ending, nothing to pool for
        logger.debug("could not read the other ranks' failure reports: %s", exc)
        return True


def take_private_group(ranks: tuple[int, ...], timeout: float) -> dist.ProcessGroup:
    """A gloo group over the global ``ranks`` with ``timeout`` seconds per collective: a pooled
    one still alive, or else a new one, which every rank of ``ranks`` (and only those) makes at
    the same time, under the name of that attempt (:func:`group_name`)."""
    with _pool_lock:
        free = _registered(_pool.get(ranks, []))
        group = free.pop(0) if free else None
        _pool[ranks] = [weakref.ref(g) for g in free]
    delta = datetime.timedelta(seconds=timeout)
    if group is None:
        try:
            with _creation_lock:
                return _new_group(ranks, delta)
        except Exception as exc:
            raise CoordinationError(f"could not create distckpt's gloo group: {exc}") from exc
    set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if set_timeout is not None:  # older torch: the group keeps the timeout it was made with
        set_timeout(delta, group)
    return group


def group_name(ranks: tuple[int, ...], attempt: int) -> str:
    """The name of distckpt's ``attempt``-th group over ``ranks`` (counted from 0), the same
    on every rank: the prefix under which the ranks meet in the default group's store."""
    return f"distckpt_{_spelled(ranks)}_{attempt}"


def _spelled(ranks: tuple[int, ...]) -> str:
    """``ranks`` as a short name, alike on every rank, fit for a prefix of the store's keys."""
    digest = hashlib.sha1(",".join(map(str, ranks)).encode(), usedforsecurity=False)
    return digest.hexdigest()[:16]


def default_group_store() -> dist.Store:
    """The store of the default group, in which the ranks meet to make every other group."""
    c10d = dist.distributed_c10d
    return c10d._world.pg_map[c10d._get_default_group()][1]


def next_attempt(store: dist.Store, ranks: tuple[int, ...]) -> int:
    """The attempt the next group over ``ranks`` is made as (see :data:`ATTEMPT_KEY`)."""
    return int(store.add(ATTEMPT_KEY.format(ranks=_spelled(ranks)), 0))


def _end_attempt(store: dist.Store, ranks: tuple[int, ...], attempt: int) -> None:
    """Move the shared count past ``attempt``, unless another rank did already: compare and
    set, so that a rank that ends an attempt late never takes the count back."""
    key = ATTEMPT_KEY.format(ranks=_spelled(ranks))
    store.compare_set(key, str(attempt), str(attempt + 1))


def _new_group(ranks: tuple[int, ...], timeout: datetime.timedelta) -> dist.ProcessGroup:
    """A new gloo group over ``ranks``, made with the other ranks under the name of the
    attempt they share (:data:`ATTEMPT_KEY`), whatever attempts before failed here or on the
    others. Called under ``_creation_lock``.

    Every rank reads the attempt before it writes its address under the attempt's name, and
    none ends a successful attempt before a barrier on the new group (which gloo's lazy
    connection, ``TORCH_GLOO_LAZY_INIT=1``, also passes only once every member connected), so
    no rank of an attempt that succeeds reads the count after another moved it on. A rank that fails
    moves the count on before it raises, so the ranks meet the next time under a new name."""
    c10d = dist.distributed_c10d
    helper = getattr(c10d, "_new_process_group_helper", None)
    if not takes_a_name(helper):
        return _new_group_named_by_torch(ranks, timeout)
    default_store = default_group_store()
    attempt = next_attempt(default_store, ranks)
    members = sorted(ranks)  # in the order new_group puts them: group rank 0 is the lowest
    try:
        pg, _ = helper(
            len(members),
            members.index(dist.get_rank()),
            members,
            dist.Backend("gloo"),
            default_store,
            group_name(ranks, attempt),
            timeout=timeout,
        )
        # What new_group does after the helper, which leaves the group's ranks to its callers.
        c10d._world.pg_group_ranks[pg] = {rank: index for index, rank in enumerate(members)}
        try:
            # Before the count moves on: with TORCH_GLOO_LAZY_INIT=1 gloo returns before it
            # connected, so a fast rank would move the count before a slow peer read it. The
            # barrier connects every member under this attempt's name first.
            dist.barrier(group=pg)
        except BaseException:
            dist.destroy_process_group(pg)
            raise
    finally:
        _end_attempt(default_store, ranks, attempt)
    return pg


def _new_group_named_by_torch(
    ranks: tuple[int, ...], timeout: datetime.timedelta
) -> dist.ProcessGroup:
    """A torch whose private helper is gone or changed: torch's own name, which a failed
    attempt leaves to the next (see :data:`ATTEMPT_KEY`), and which ranks that hold different
    numbers of groups spell differently; said once per process."""
    global _warned_of_torch_names
    if not _warned_of_torch_names:
        _warned_of_torch_names = True
        logger.warning(
            "torch %s changed its private _new_process_group_helper: distckpt's gloo groups "
            "take torch's own names, so a manager on a subgroup may fail to make its group "
            "when its ranks made different numbers of groups before, and a renewal retried "
            "after a failed one may fail again",
            torch.__version__,
        )
    return dist.new_group(
        ranks=list(ranks), backend="gloo", timeout=timeout, use_local_synchronization=True
    )


def takes_a_name(helper: Callable[..., object] | None) -> bool:
    """Whether ``helper`` (torch's private ``_new_process_group_helper``) takes the arguments
    :func:`_new_group` gives it: the group's size, this rank's place in it, its global ranks,
    the backend, the store and the name, in that order (as torch 2.13's does), and a
    ``timeout``."""
    if helper is None:
        return False
    try:
        parameters = list(inspect.signature(helper).parameters)
    except (TypeError, ValueError):
        return False
    expected = ["group_size", "group_rank", "global_ranks_in_group", "backend", "store"]
    return parameters[:6] == [*expected, "group_name"] and "timeout" in parameters


def _registered(refs: list[weakref.ref[dist.ProcessGroup]]) -> list[dist.ProcessGroup]:
    """The groups of ``refs`` still alive and registered (:func:`is_registered`), in order."""
    groups = (ref() for ref in refs)
    return [group for group in groups if group is not None and is_registered(group)]


def return_private_group(ranks: tuple[int, ...], group: dist.ProcessGroup) -> None:
    """Give ``group``, taken for ``ranks``, back to the pool for the next coordinator. The pool
    holds it weakly: once ``destroy_process_group()`` destroyed it, it is freed with its store."""
    with _pool_lock:
        _pool.setdefault(ranks, []).append(weakref.ref(group))


def retire_private_group(group: dist.ProcessGroup) -> None:
    """Never hand out ``group`` again (a collective failed on it); it is destroyed at exit, or
    freed with its store when ``destroy_process_group()`` destroyed it first."""
    with _pool_lock:
        _retired[:] = [ref for ref in _retired if ref() is not None]
        _retired.append(weakref.ref(group))


@atexit.register
def _destroy_pool() -> None:
    """Destroy the pooled and retired groups while the interpreter still runs: left to interpreter
    shutdown, a gloo thread may free the last collective's buffers without the GIL and abort
    the process ("terminate called without an active exception")."""
    with _pool_lock:
        refs = [ref for free in _pool.values() for ref in free] + _retired
        _pool.clear()
        _retired.clear()
    if not (dist.is_available() and dist.is_initialized()):
        return
    for group in _registered(refs):
        try:
            dist.destroy_process_group(group)
        except Exception as exc:  # shutting down: never mask the job's own exit status
            logger.debug("destroying a pooled group at exit failed: %s", exc)
