"""Run a training job, SIGKILL the whole of it at chosen moments, re-run the same command, and
compare everything it recorded with an uninterrupted reference run, bit for bit.

A job records, per rank, one line per training batch in ``OUT/losses-rank{r}.txt``
(``epoch batch loss-in-float.hex``) and its final state in ``OUT/final-rank{r}.pt``. A kill
moment is a number of lines a file of ``OUT`` (by default rank 0's losses) has gained since the
run started: the job is killed (its whole process group: every rank, Lightning's DDP children,
loader workers) as soon as that many are there, and the next run starts only once every
process of that group is gone. No fixed sleeps: a kill waits for the job's
own progress, however slow a loaded machine makes it.

A run is a forked copy of the test's process running the script as ``__main__`` (see
:func:`_run_script`), not a fresh interpreter: importing torch and Lightning again costs a
fresh one 2 to 6 s, every run. Nothing passes from one run to the next that way either: each
is forked from the test's process, which never runs the job itself, and each job seeds its
own RNGs and sets its own thread count, as it would in a fresh interpreter.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing as mp
import os
import random
import runpy
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import pytest
import torch
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]


#: How long the processes of a killed job may take to be gone (a rank in uninterruptible sleep,
#: an fsync on a loaded disk, dies only once that returns).
GROUP_EXIT_SECONDS = 60.0


@dataclass(frozen=True)
class ProcStat:
    """What ``/proc/PID/stat`` says of a process: its parent, state letter, process group and
    start time (in clock ticks since boot: with the pid, it names one process, even after the
    pid is reused)."""

    ppid: int
    state: str
    group: int
    started: int

    @property
    def live(self) -> bool:
        """Not a zombie (dead, waiting to be reaped) or being torn down."""
        return self.state not in _DEAD_STATES


_DEAD_STATES = ("Z", "X")


def _stat_fields(stat_file: Path) -> list[str] | None:
    try:
        stat = stat_file.read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may hold spaces or parentheses: the fields start after its last ")".
    return stat[stat.rindex(")") + 2 :].split()


def _live_thread_state(pid: int) -> str | None:
    """The state of a thread of process ``pid`` that has not exited yet, if any."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return None
    for task in tasks:
        fields = _stat_fields(task / "stat")
        if fields is not None and fields[0] not in _DEAD_STATES:
            return fields[0]
    return None


def proc_stat(pid: int) -> ProcStat | None:
    """The ``/proc`` stat of process ``pid``; None once it is gone. A killed process's main
    thread may show as a zombie while its other threads are still exiting, and those still hold
    its files and their locks (rank 0: the root's lease): its state is then a live thread's."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    if fields is None:
        return None
    state, ppid, group = fields[:3]
    if state in _DEAD_STATES:
        state = _live_thread_state(pid) or state
    return ProcStat(int(ppid), state, int(group), int(fields[19]))  # field 22, starttime


def thread_state(pid: int, tid: int) -> str | None:
    """The state letter of thread ``tid`` of process ``pid`` alone; None once it is gone."""
    fields = _stat_fields(Path(f"/proc/{pid}/task/{tid}/stat"))
    return None if fields is None else fields[0]


def live_group_members(group: int) -> list[int]:
    """Pids of the processes of process group ``group`` that have not died yet."""
    pids = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    stats = {pid: proc_stat(pid) for pid in pids}
    return [pid for pid, stat in stats.items() if stat and stat.group == group and stat.live]


def wait_until_group_is_gone(group: int, timeout: float = GROUP_EXIT_SECONDS) -> None:
    """Wait until every process of the SIGKILLed process group ``group`` has died. The job's
    own process ends first; a rank still in uninterruptible sleep dies later and holds what it
    held (the root's lease) until then, so a job started again at once would find the root in
    use."""
    deadline = time.monotonic() + timeout
    while members := live_group_members(group):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"processes {members} of killed process group {group} still live after "
                f"{timeout:g} s"
            )
        time.sleep(0.02)


def _count_lines(path: Path) -> int:
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:
        return 0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


#: The warning filters of a fresh interpreter started without ``-W`` (pytest installs its own).
_FRESH_WARNING_FILTERS: tuple[tuple[str, type[Warning], str], ...] = (
    ("default", DeprecationWarning, "__main__"),
    ("ignore", DeprecationWarning, ""),
    ("ignore", PendingDeprecationWarning, ""),
    ("ignore", ImportWarning, ""),
    ("ignore", ResourceWarning, ""),
)


def _print_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """Print a warning to stderr, as a fresh interpreter's ``warnings.showwarning`` does (the
    test's records it for pytest's summary instead)."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _as_in_a_fresh_interpreter() -> None:
    """Undo, in a job forked from a test, what pytest changed in the test's process: its
    warning filters and its recording of warnings and log records (a job prints them to its
    log, which tests read), and its signal handlers."""
    warnings.resetwarnings()
    for action, category, module in reversed(_FRESH_WARNING_FILTERS):
        warnings.filterwarnings(action, category=category, module=module)  # type: ignore[arg-type]
    warnings.showwarning = _print_warning
    logging.getLogger().handlers.clear()
    logging.getLogger().setLevel(logging.WARNING)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGALRM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_DFL)


def _run_script(command: Sequence[str], log: str) -> None:
    """What ``python SCRIPT ARGS...`` (``command``) does, in a process forked from the test's,
    leading a process group of its own: the script runs as ``__main__`` from the repository,
    its output going to ``log``, and its ``atexit`` handlers run when it ends (the test's own
    are forgotten first). torch and Lightning are imported already."""
    os.setsid()
    output = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(output)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.chdir(ROOT)
    os.environ.clear()
    os.environ.update(_env())
    torch.set_num_threads(1)  # what OMP_NUM_THREADS=1 gives a fresh interpreter
    _as_in_a_fresh_interpreter()
    sys.argv = list(command)
    sys.path.insert(0, str((ROOT / command[0]).parent))  # as ``python SCRIPT`` puts it
    # The test's exit handlers are not the job's; the job's own run when it ends, as they do
    # at a fresh interpreter's exit (a multiprocessing child skips them otherwise).
    atexit._clear()
    try:
        runpy.run_path(str(ROOT / command[0]), run_name="__main__")
    finally:
        atexit._run_exitfuncs()


def _start(command: Sequence[str], log: Path) -> BaseProcess:
    """Start ``command`` forked (:func:`_run_script`); returns once it leads its process
    group, so that a SIGKILL of the group reaches it."""
    # A process group of the test's would be the job's too, where a fresh interpreter has none.
    assert not torch.distributed.is_initialized(), "a job forked from a test in a process group"
    job = mp.get_context("fork").Process(target=_run_script, args=(command, str(log)))
    job.start()
    assert job.pid is not None
    while job.exitcode is None:
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(job.pid) == job.pid:
                break
        time.sleep(0.001)
    return job


def run(
    command: Sequence[str],
    out: Path,
    *,
    kill_after: int | None = None,
    counted: str = "losses-rank0.txt",
    timeout: float = 240,
) -> bool:
    """Run ``command`` (a Python script, relative to the repository, and its arguments) in a
    process group of its own (forked: see the module doc); with ``kill_after``, SIGKILL the
    group once ``OUT/counted`` (rank 0's losses unless told) has that many more lines. True if
    the job was killed, False if it finished (its exit status must then be 0)."""
    log = out / counted
    start = _count_lines(log)
    job = _start(command, out / "job.log")
    assert job.pid is not None
    deadline = time.monotonic() + timeout
    try:
        while job.exitcode is None:
            if kill_after is not None and _count_lines(log) - start >= kill_after:
                os.killpg(job.pid, signal.SIGKILL)
                job.join()
                wait_until_group_is_gone(job.pid)
                return True
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{command} did not finish within {timeout} s; its ranks' stacks:\n"
                    + _stacks_of_stuck_job(job.pid, out / "job.log")
                )
            time.sleep(0.02)
    finally:
        if job.exitcode is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.join()
    # The job's own children (ranks, loader workers) must not outlive it either.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(job.pid, signal.SIGKILL)
    wait_until_group_is_gone(job.pid)
    if job.exitcode != 0:
        output = (out / "job.log").read_text()[-4000:]
        raise AssertionError(f"{command} exited {job.exitcode}:\n{output}")
    return False


def _stacks_of_stuck_job(group: int, log: Path) -> str:
    """The end of a stuck job's log after asking its processes for their threads' stacks (a
    job's ranks register SIGUSR1 with :mod:`faulthandler`: see ``tests.ranks``), so a hang
    names where it waits."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGUSR1)
    time.sleep(2)
    return log.read_text(errors="replace")[-12000:]


def kill_moments(seed: int, count: int, low: int, high: int) -> list[int]:
    """``count`` seeded random kill moments, each in ``[low, high]`` batches into a run."""
    chooser = random.Random(seed)
    return [chooser.randint(low, high) for _ in range(count)]


def run_killed(
    command: Sequence[str], out: Path, moments: Sequence[int], *, counted: str = "losses-rank0.txt"
) -> int:
    """Run ``command``, killing it at each of ``moments`` (lines of ``OUT/counted``) in turn
    and re-running it, then once more to the end. Returns how many runs were really killed (a
    run may finish first)."""
    killed = sum(run(command, out, kill_after=moment, counted=counted) for moment in moments)
    run(command, out)
    return killed


def shared_output(
    factory: pytest.TempPathFactory, name: str, make: Callable[[Path, Path], None]
) -> tuple[Path, Path]:
    """The output directory and root of a run, made once per test session under the name
    ``name`` by ``make(root, out)`` and shared by every test and every xdist worker that asks
    for it: the first makes it under a file lock, the others wait for it. A test that changes
    them works on a copy."""
    shared = factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's directory, above each worker's own
    out, root = shared / name, shared / f"{name}-root"
    with FileLock(str(shared / f"{name}.lock")):
        if not (out / "done").exists():
            # A run that failed in another worker is made again from nothing.
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(root, ignore_errors=True)
            out.mkdir()
            make(root, out)
            (out / "done").touch()
    return out, root


def shared_reference(
    factory: pytest.TempPathFactory, name: str, script: str, options: Sequence[str] = ()
) -> Path:
    """The output directory of an uninterrupted run of ``script root out *options``, made once
    per test session under the name ``name`` (see :func:`shared_output`)."""

    def uninterrupted(root: Path, out: Path) -> None:
        run([script, str(root), str(out), *options], out)

    return shared_output(factory, f"{name}-reference", uninterrupted)[0]


def losses(out: Path, rank: int, log: str = "losses") -> dict[tuple[int, int], set[str]]:
    """Every loss rank ``rank`` logged in ``OUT/{log}-rank{rank}.txt``, by (epoch, batch); a
    batch run again after a resume adds its value to the set."""
    logged: dict[tuple[int, int], set[str]] = {}
    for line in (out / f"{log}-rank{rank}.txt").read_text().splitlines():
        epoch, batch, loss = line.split()
        logged.setdefault((int(epoch), int(batch)), set()).add(loss)
    return logged


def assert_equal(expected: Any, actual: Any, path: str = "") -> None:
    """``actual`` equals ``expected`` exactly: tensors by ``torch.equal``, recursively."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and torch.equal(expected, actual), path
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and expected.keys() == actual.keys(), path
        for key in expected:
            assert_equal(expected[key], actual[key], f"{path}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(expected) == len(actual), path
        for index, (one, other) in enumerate(zip(expected, actual)):
            assert_equal(one, other, f"{path}[{index}]")
    else:
        assert expected == actual, path


def assert_same_run(
    reference: Path, resumed: Path, world_size: int, *, skip: Sequence[str] = ()
) -> None:
    """Every batch's loss on every rank, in every run of ``resumed``, and each rank's final
    state equal the reference's exactly (``skip``: keys of the final state not compared)."""
    for rank in range(world_size):
        expected = losses(reference, rank)
        assert all(len(values) == 1 for values in expected.values())
        assert losses(resumed, rank) == expected, f"rank {rank}: losses differ"
        final = torch.load(reference / f"final-rank{rank}.pt", weights_only=False)
        again = torch.load(resumed / f"final-rank{rank}.pt", weights_only=False)
        for key in skip:
            final.pop(key), again.pop(key)
        assert_equal(final, again, f"rank {rank}")
