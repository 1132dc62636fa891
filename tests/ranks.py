"""Start real ranks for a test: processes joined by a gloo process group on 127.0.0.1.

``run_ranks(fn, world_size, *args)`` forks ``world_size`` processes (about 0.1 s), each of which
initialises torch.distributed (gloo, meeting in a store the parent holds: see
:func:`host_rendezvous`; a short timeout), runs ``fn(rank, world_size,
*args)`` and sends back its return value or its exception. A job that does not finish within
``timeout`` seconds is killed and the test fails fast instead of hanging. ``start_method="spawn"``
starts fresh interpreters instead (slower; what a benchmark wants, since forked ranks share the
parent's memory layout), and ``fail_fast=True`` stops at the first rank that raises instead of
waiting for its peers, which may be stuck in a collective until ``pg_timeout``.

``run_job_ranks(train, world_size, args)`` starts the ranks of a job script that a test kills
and runs again (``tests/ddp_job.py``, ``tests/fsdp_job.py``): forked into the script's own
process group, so that one SIGKILL of the group reaches every rank.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass
class RankResult:
    rank: int
    value: Any = None
    error_type: str | None = None
    error: str | None = None
    traceback: str | None = None

    def unwrap(self) -> Any:
        if self.error_type is not None:
            raise AssertionError(f"rank {self.rank} raised {self.error_type}:\n{self.traceback}")
        return self.value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def host_rendezvous(timeout: float) -> dist.TCPStore:
    """The store a job's ranks meet in: a ``TCPStore`` server on a port the kernel picks, held by
    the calling (parent) process from the moment it is made until it is dropped, so no other
    process can take the port before the ranks connect. (A port found free by
    :func:`free_port` and bound later by rank 0 can be taken in between, under a loaded full
    suite, by another test's server or job: rank 0 fails and its peer joins a stranger's store.)
    Pass its ``port`` to the ranks' :func:`init_gloo`."""
    return dist.TCPStore(
        "127.0.0.1",
        0,
        is_master=True,
        timeout=datetime.timedelta(seconds=timeout),
        wait_for_workers=False,
    )


def init_gloo(rank: int, world_size: int, port: int, timeout: float) -> None:
    """Join a gloo process group of ``world_size`` ranks meeting in the store on 127.0.0.1:``port``
    that the parent holds (:func:`host_rendezvous`)."""
    delta = datetime.timedelta(seconds=timeout)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=delta)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=delta)


def _child(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    args: tuple[Any, ...],
    queue: Any,
    pg_timeout: float,
    env: dict[str, str],
) -> None:
    import torch

    os.environ.update(env)
    torch.set_num_threads(1)  # forked children must not share the parent's OpenMP pool
    result = RankResult(rank)
    try:
        if world_size > 0:
            init_gloo(rank, world_size, port, pg_timeout)
        result.value = fn(rank, max(world_size, 1), *args)
    except BaseException as exc:
        result.error_type = type(exc).__name__
        result.error = str(exc)
        result.traceback = traceback.format_exc()
    queue.put(result)
    queue.close()
    queue.join_thread()
    # Skip interpreter teardown: a rank whose peers died must not hang in atexit handlers.
    os._exit(0)


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    pg_timeout: float = 30.0,
    env: dict[str, str] | None = None,
    expect_killed: bool = False,
    start_method: str = "fork",
    fail_fast: bool = False,
) -> list[RankResult]:
    """Run ``fn`` on ``world_size`` real ranks; ``world_size=0`` runs one process with no
    process group. Returns one :class:`RankResult` per rank (ranks killed by a signal, only
    allowed with ``expect_killed``, are missing; with ``fail_fast``, so are the ranks that had
    not reported when the first rank raised). With ``start_method="spawn"``, ``fn`` and
    ``args`` must be importable or picklable by reference."""
    ctx = mp.get_context(start_method)
    queue = ctx.Queue()
    rendezvous = host_rendezvous(pg_timeout) if world_size > 0 else None
    port = rendezvous.port if rendezvous is not None else 0
    procs = [
        ctx.Process(
            target=_child,
            args=(fn, rank, world_size, port, args, queue, pg_timeout, env or {}),
            daemon=True,
        )
        for rank in range(max(world_size, 1))
    ]
    for proc in procs:
        proc.start()
    results: dict[int, RankResult] = {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    try:
        while len(results) < len(procs):
            remaining = (deadline - datetime.datetime.now()).total_seconds()
            if remaining <= 0:
                raise TimeoutError(f"ranks did not finish within {timeout} s (a hang)")
            try:
                item = queue.get(timeout=min(remaining, 0.5))
                results[item.rank] = item
                if fail_fast and item.error_type is not None:
                    break
            except Exception:  # queue.Empty: check for ranks that died without reporting
                dead = [p for p in procs if p.exitcode is not None and p.exitcode != 0]
                if dead and not expect_killed:
                    codes = {procs.index(p): p.exitcode for p in dead}
                    raise AssertionError(f"ranks died without reporting: {codes}") from None
                if all(p.exitcode is not None for p in procs) and queue.empty():
                    break
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
    return [results[rank] for rank in sorted(results)]


def values(results: list[RankResult]) -> list[Any]:
    """Every rank's return value, failing the test with the traceback of any rank that raised."""
    return [result.unwrap() for result in results]


#: The process group timeout of a job script's ranks (``run_job_ranks``). A job's
#: ``CheckpointManager`` takes the same ``timeout``: a rank left waiting in a collective its
#: peer never joins then fails, naming the collective, well within the time a test gives the
#: job, instead of after the manager's default of 600 s.
JOB_TIMEOUT_SECONDS = 60.0


def _job_rank(
    train: Callable[[int, Any], None], rank: int, world_size: int, port: int, args: Any
) -> None:
    import faulthandler
    import signal

    import torch

    # A test that finds the job stuck asks for every thread's stack (tests.killing.run).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    torch.set_num_threads(1)
    init_gloo(rank, world_size, port, timeout=JOB_TIMEOUT_SECONDS)
    train(rank, args)
    dist.barrier()  # no rank tears the group down under a peer's last collective
    dist.destroy_process_group()


def run_job_ranks(train: Callable[[int, Any], None], world_size: int, args: Any) -> int:
    """The ranks of a job script: ``world_size`` forked processes (not daemonic: a rank may start
    loader workers), in the job's own process group so that a SIGKILL of the group reaches every
    rank, each joining gloo and running ``train(rank, args)``. Returns the job's exit status:
    the largest of the ranks'."""
    context = mp.get_context("fork")
    rendezvous = host_rendezvous(JOB_TIMEOUT_SECONDS)  # held until every rank has ended
    ranks = [
        context.Process(target=_job_rank, args=(train, rank, world_size, rendezvous.port, args))
        for rank in range(world_size)
    ]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join()
    return max(abs(process.exitcode or 0) for process in ranks)
