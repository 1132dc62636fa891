"""Start real ranks for a test: processes joined by a gloo process group on 127.0.0.1.

``run_ranks(fn, world_size, *args)`` forks ``world_size`` processes (about 0.1 s), each of which
initialises torch.distributed (gloo, meeting in a file store in the job's temporary directory:
see :func:`init_gloo`; a short timeout), runs ``fn(rank, world_size, *args)`` and sends back
its return value (pickled by value in the rank, so a tensor arrives too) or its exception. A
rank that ends without a result that can be received fails the test, naming the rank: a test
never goes on with fewer results than ranks. A job that does not finish within ``timeout``
seconds is killed and the test fails fast instead of hanging, with every stuck rank's stacks
(Python and, where ``gdb`` is installed, native) and kernel wait in its message.
``start_method="spawn"`` starts fresh interpreters instead (slower; what a benchmark wants, since
forked ranks share the parent's memory layout), and ``fail_fast=True`` stops at the first rank
that raises instead of waiting for its peers, which may be stuck in a collective until
``pg_timeout``. ``daemon=False`` starts ranks that may start processes of their own (a daemonic
process may not: DCP's process-based ``async_save`` needs this); each such rank leads a process
group of its own, and everything still in those groups is killed when the job ends, however it
ends (a rank's children outlive it otherwise).

``run_job_ranks(train, world_size, args, out)`` starts the ranks of a job script that a test
kills and runs again (``tests/ddp_job.py``, ``tests/fsdp_job.py``): forked into the script's own
process group, so that one SIGKILL of the group reaches every rank.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import logging
import multiprocessing as mp
import os
import pickle
import queue as queue_module
import shutil
import signal
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
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


def rendezvous_file(job_dir: str | Path) -> Path:
    """Where the ranks of one job meet (:func:`init_gloo`): a file in a directory of that job's
    own, which must not hold one from an earlier job (a store file keeps every key it was given,
    and a killed job's ranks leave theirs behind)."""
    return Path(job_dir) / "rendezvous"


def init_gloo(rank: int, world_size: int, store_file: str | Path, timeout: float) -> None:
    """Join a gloo process group of ``world_size`` ranks meeting in the ``FileStore`` at
    ``store_file`` (:func:`rendezvous_file`), which the group keeps using for the subgroups it
    makes later, so it must last as long as the job.

    A file, not a ``TCPStore``: torch's store client connects to ``::ffff:127.0.0.1`` even when
    given ``127.0.0.1``, and the client and the server each name the other end with a reverse
    DNS lookup (``getnameinfo`` without ``NI_NUMERICHOST``), which the hosts file cannot answer
    for a v4-mapped address. Six such lookups per 2-rank job go to the DNS server, and where it
    drops one now and then the job waits out glibc's 5 s retry. A file store opens no socket,
    and no store server thread runs in the parent while it forks the ranks (one holding glibc's
    resolver lock at a fork once left a rank blocked for ever in its connect)."""
    delta = datetime.timedelta(seconds=timeout)
    store = dist.FileStore(str(store_file), world_size)
    store.set_timeout(delta)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=delta)


def _stack_file(job_dir: str, rank: int) -> Path:
    return Path(job_dir) / f"rank{rank}.stacks"


def _child(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    args: tuple[Any, ...],
    queue: Any,
    pg_timeout: float,
    env: dict[str, str],
    job_dir: str,
    own_process_group: bool,
) -> None:
    if own_process_group:
        # Before anything starts a child, so that every descendant is in the group run_ranks
        # kills at the end (the parent sets it too: whichever runs first).
        os.setpgid(0, 0)
    # First of all, so that a rank stuck anywhere after this can be asked for its stacks
    # (run_ranks on a timeout); the file object must outlive the registration.
    stack_file = _stack_file(job_dir, rank).open("w")
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)

    import torch

    os.environ.update(env)
    torch.set_num_threads(1)  # forked children must not share the parent's OpenMP pool
    result = RankResult(rank)
    try:
        if world_size > 0:
            init_gloo(rank, world_size, rendezvous_file(job_dir), pg_timeout)
        result.value = fn(rank, max(world_size, 1), *args)
    except BaseException as exc:
        result.error_type = type(exc).__name__
        result.error = str(exc)
        result.traceback = traceback.format_exc()
    queue.put((rank, _pickled(result)))
    queue.close()
    queue.join_thread()
    # Skip interpreter teardown: a rank whose peers died must not hang in atexit handlers.
    os._exit(0)


def _pickled(result: RankResult) -> bytes:
    """``result`` as plain pickle bytes, made in the rank itself.

    The queue's own pickler (torch registers reductions with it) would send a tensor as a
    shared-memory handle that only the sending process can serve, so a tensor returned by a
    rank that has exited could not be received. Plain pickle copies a tensor's data. A return
    value that cannot be pickled at all is reported as the rank's error."""
    try:
        return pickle.dumps(result)
    except Exception as exc:
        unpicklable = RankResult(
            result.rank,
            error_type=type(exc).__name__,
            error=str(exc),
            traceback=f"the rank's return value {result.value!r} cannot be pickled: {exc!r}",
        )
        return pickle.dumps(unpicklable)


class RankResultLost(AssertionError):
    """A rank's result could not be received, or a rank reported more than once or not at
    all: the test must fail, not go on with fewer results than ranks."""


def _received(rank: int, payload: bytes) -> RankResult:
    """The :class:`RankResult` that ``rank`` sent as ``payload``."""
    try:
        result = pickle.loads(payload)
    except Exception as exc:
        raise RankResultLost(f"the result of rank {rank} could not be unpickled: {exc!r}") from exc
    if not isinstance(result, RankResult) or result.rank != rank:
        raise RankResultLost(f"rank {rank} sent something other than its result: {result!r}")
    return result


def _check_every_rank_reported(
    results: dict[int, RankResult], procs: list[BaseProcess], expect_killed: bool
) -> None:
    """Fail unless each rank reported, except, with ``expect_killed``, a rank a signal
    killed (a rank that exited, even with status 0, without reporting is a lost result)."""
    unreported = {rank: proc.exitcode for rank, proc in enumerate(procs) if rank not in results}
    lost = {
        rank: exitcode
        for rank, exitcode in unreported.items()
        if not (expect_killed and exitcode is not None and exitcode < 0)
    }
    if lost:
        raise RankResultLost(f"ranks ended without a result (rank: exit status): {lost}")


#: How long ``gdb`` may take to print a stuck rank's native stacks (it loads torch's symbols).
GDB_SECONDS = 60.0

#: Where a native frame's line is cut: its function and library, not its arguments' values.
NATIVE_FRAME_CHARS = 200


def describe_stuck(pid: int, stack_file: Path | None, native_stacks: bool = True) -> str:
    """Where a stuck process waits: each thread's state and kernel wait channel, its Python
    stacks (asked for with SIGUSR1 where ``stack_file`` holds its :mod:`faulthandler`
    registration) and, with ``native_stacks`` where ``gdb`` is installed, its native stacks,
    which name the lock a thread is blocked on (a rank stuck in C code shows only its last
    Python call)."""
    from tests.processes import thread_state

    lines: list[str] = []
    try:
        threads = sorted(int(tid) for tid in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        return f"process {pid} is gone"
    for tid in threads:
        state = thread_state(pid, tid)
        try:
            wchan = Path(f"/proc/{pid}/task/{tid}/wchan").read_text()
        except FileNotFoundError:
            wchan = "?"
        lines.append(f"thread {tid}: state {state or '?'}, waits in {wchan}")
    if stack_file is not None and stack_file.exists():
        os.kill(pid, signal.SIGUSR1)
        time.sleep(1.0)  # faulthandler writes from the signal handler, at once
        lines.append("Python stacks:\n" + stack_file.read_text(errors="replace"))
    else:
        lines.append("no Python stacks: the rank never reached its code")
    if native_stacks and shutil.which("gdb"):
        try:
            native = subprocess.run(
                ["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt 30"],
                capture_output=True,
                text=True,
                timeout=GDB_SECONDS,
            ).stdout
        except subprocess.TimeoutExpired:
            native = f"(gdb took more than {GDB_SECONDS} s)"
        frames = [
            line[:NATIVE_FRAME_CHARS]
            for line in native.splitlines()
            if line.startswith(("Thread ", "#"))
        ]
        lines.append("native stacks:\n" + "\n".join(frames))
    return "\n".join(lines)


def lead_own_process_group(proc: BaseProcess) -> None:
    """Make a just-started rank the leader of a process group of its own, from the parent: the
    rank does the same first thing (:func:`_child`), and whichever comes first wins. A rank that
    already did it, or has exec'd (``spawn``), refuses the parent's call: that is fine."""
    assert proc.pid is not None
    with contextlib.suppress(PermissionError, ProcessLookupError):
        os.setpgid(proc.pid, proc.pid)


def kill_process_group(pgid: int) -> None:
    """SIGKILL every process still in the group ``pgid`` (a rank and what it started). The
    group's id stays reserved while any member lives, even after its leader has been reaped;
    an emptied group's id could in principle be handed out again, but Linux hands out process
    ids in increasing order up to ``pid_max`` before reusing any, not within a job's seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


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
    native_stacks: bool = True,
    daemon: bool = True,
) -> list[RankResult]:
    """Run ``fn`` on ``world_size`` real ranks; ``world_size=0`` runs one process with no process
    group. Returns one :class:`RankResult` per rank, or raises :class:`RankResultLost`
    (ranks killed by a signal, only allowed with ``expect_killed``, are missing; with
    ``fail_fast``, so are the ranks that had not reported when the first rank raised). With
    ``start_method="spawn"``, ``fn`` and ``args`` must be importable or picklable by
    reference. On a timeout, the :class:`TimeoutError` describes each rank that had not
    reported (:func:`describe_stuck`; ``native_stacks=False`` leaves out ``gdb``'s stacks,
    which take seconds). With ``daemon=False`` the ranks may start processes, each rank in a
    process group of its own that is killed (SIGKILL) at the end, on success, failure,
    timeout or interrupt alike."""
    ctx = mp.get_context(start_method)
    queue = ctx.Queue()
    # The ranks' stack files and their rendezvous store.
    job_dir = tempfile.TemporaryDirectory(prefix="ranks-")
    procs = [
        ctx.Process(
            target=_child,
            args=(
                fn,
                rank,
                world_size,
                args,
                queue,
                pg_timeout,
                env or {},
                job_dir.name,
                not daemon,
            ),
            daemon=daemon,
        )
        for rank in range(max(world_size, 1))
    ]
    results: dict[int, RankResult] = {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    try:
        for proc in procs:
            proc.start()
        if not daemon:
            for proc in procs:
                lead_own_process_group(proc)
        while len(results) < len(procs):
            remaining = (deadline - datetime.datetime.now()).total_seconds()
            if remaining <= 0:
                stuck = [
                    f"rank {rank} (pid {proc.pid}):\n"
                    + describe_stuck(proc.pid, _stack_file(job_dir.name, rank), native_stacks)
                    for rank, proc in enumerate(procs)
                    if rank not in results and proc.is_alive() and proc.pid is not None
                ]
                raise TimeoutError(
                    f"ranks did not finish within {timeout} s (a hang); the stuck ranks:\n"
                    + "\n\n".join(stuck)
                )
            try:
                rank, payload = queue.get(timeout=min(remaining, 0.5))
            except queue_module.Empty:  # check for ranks that died without reporting
                dead = [p for p in procs if p.exitcode is not None and p.exitcode != 0]
                if dead and not expect_killed:
                    codes = {procs.index(p): p.exitcode for p in dead}
                    raise AssertionError(f"ranks died without reporting: {codes}") from None
                if all(p.exitcode is not None for p in procs) and queue.empty():
                    break
                continue
            if rank in results:
                raise RankResultLost(f"rank {rank} reported twice")
            results[rank] = _received(rank, payload)
            if fail_fast and results[rank].error_type is not None:
                break
        if not (fail_fast and any(r.error_type is not None for r in results.values())):
            _check_every_rank_reported(results, procs, expect_killed)
    finally:
        for proc in procs:
            if proc.pid is not None and not daemon:
                kill_process_group(proc.pid)
            if proc.pid is not None and proc.is_alive():
                proc.kill()
            if proc.pid is not None:
                proc.join(5)
        job_dir.cleanup()  # only now: a rank may still have been waiting in the store
    return [results[rank] for rank in sorted(results)]


class Collected(logging.Handler):
    """Keeps every record it is handed (caplog's handler does not reach into a forked rank's
    records back in the test's process)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def values(results: list[RankResult]) -> list[Any]:
    """Every rank's return value, failing the test with the traceback of any rank that raised,
    or if ``results`` is empty (a test asserting over no values would pass whatever the ranks
    did) or holds a rank twice or out of order. That every rank is there is
    :func:`run_ranks`'s check: only it knows which may be missing (``expect_killed``)."""
    ranks = [result.rank for result in results]
    if not ranks or ranks != sorted(set(ranks)):
        raise RankResultLost(f"not one result from each rank, in order: ranks {ranks}")
    return [result.unwrap() for result in results]


#: The process group timeout of a job script's ranks (``run_job_ranks``). A job's
#: ``CheckpointManager`` takes the same ``timeout``: a rank left waiting in a collective its
#: peer never joins then fails, naming the collective, well within the time a test gives the
#: job, instead of after the manager's default of 600 s.
JOB_TIMEOUT_SECONDS = 60.0


def _job_rank(
    train: Callable[[int, Any], None], rank: int, world_size: int, store_file: Path, args: Any
) -> None:
    import torch

    # A test that finds the job stuck asks for every thread's stack (tests.killing.run).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    torch.set_num_threads(1)
    init_gloo(rank, world_size, store_file, timeout=JOB_TIMEOUT_SECONDS)
    train(rank, args)
    dist.barrier()  # no rank tears the group down under a peer's last collective
    dist.destroy_process_group()


def run_job_ranks(train: Callable[[int, Any], None], world_size: int, args: Any, out: Path) -> int:
    """The ranks of a job script: ``world_size`` forked processes (not daemonic: a rank may start
    loader workers), in the job's own process group so that a SIGKILL of the group reaches every
    rank, each joining gloo and running ``train(rank, args)``. They meet in a store file in a
    new directory under the job's output directory ``out``: one that a killed run leaves behind
    is the test's to clean, and the next run gets a fresh one. Returns the job's exit status:
    the largest of the ranks'."""
    context = mp.get_context("fork")
    job_dir = tempfile.mkdtemp(prefix="rendezvous-", dir=out)
    ranks = [
        context.Process(
            target=_job_rank, args=(train, rank, world_size, rendezvous_file(job_dir), args)
        )
        for rank in range(world_size)
    ]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join()
    shutil.rmtree(job_dir)  # only once every rank has ended
    return max(abs(process.exitcode or 0) for process in ranks)
