"""Run a training job, SIGKILL the whole of it at chosen moments, re-run the same command, and
compare everything it recorded with an uninterrupted reference run, bit for bit.

A job records, per rank, one line per training batch in ``OUT/losses-rank{r}.txt``
(``epoch batch loss-in-float.hex``) and its final state in ``OUT/final-rank{r}.pt``. A kill
moment is a number of lines a file of ``OUT`` (by default rank 0's losses) has gained since the
run started: the job is killed (its whole process group: every rank, Lightning's DDP children,
loader workers) as soon as that many are there, and the next run starts only once every
process of that group is gone. No fixed sleeps: a kill waits for the job's own progress.

A run is a child of a job server: see :mod:`tests.job_servers`.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from filelock import FileLock

from tests.job_servers import start_preloaded
from tests.processes import (
    wait_until_group_is_gone,
)


def _count_lines(path: Path) -> int:
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:
        return 0


def run(
    command: Sequence[str],
    out: Path,
    *,
    kill_after: int | None = None,
    counted: str = "losses-rank0.txt",
    timeout: float = 240,
) -> bool:
    """Run ``command`` (a Python script, relative to the repository, and its arguments) in a
    process group of its own (in a job server: see the module doc); with ``kill_after``, SIGKILL the
    group once ``OUT/counted`` (rank 0's losses unless told) has that many more lines. True if
    the job was killed, False if it finished (its exit status must then be 0)."""
    log = out / counted
    start = _count_lines(log)
    job = start_preloaded(command, out / "job.log")
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
        if not job.server.reported_exit(job.request_id):  # still running, or its server died
            with contextlib.suppress(ProcessLookupError):  # it may have ended meanwhile
                os.killpg(job.pid, signal.SIGKILL)
            if job.server.alive:
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
