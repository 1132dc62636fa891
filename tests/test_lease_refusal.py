"""A job refused the root names its holder, on every rank, even when it comes in the instant
between the holder taking the lease's lock and writing its record; refused after a wait, it
says how long it waited in all; a holder with the refused process's pid in another PID
namespace is named as another job, not as this process."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import distckpt
from distckpt import lease
from tests.lease_holders import Holder, require_namespaces, start_holder
from tests.ranks import run_ranks, values

TIMEOUT = 30.0


def _refusal(
    rank: int, world_size: int, root: str, found_held: str | None = None
) -> tuple[str, int | None]:
    if found_held is not None:
        # Only observes: it tells the holder when this job has found the lock held, the one
        # instant the holder's record write must come after (see the test below).
        try_lock = lease._try_lock

        def try_lock_and_say_when_held(*args: Any, **kwargs: Any) -> Any:
            lock = try_lock(*args, **kwargs)
            if lock is None:
                Path(found_held).touch()
            return lock

        lease._try_lock = try_lock_and_say_when_held  # type: ignore[assignment]
    try:
        with distckpt.CheckpointManager(root, timeout=TIMEOUT):
            return ("opened", None)
    except distckpt.RootInUse as exc:
        holder = exc.holder  # an attribute on every rank, never missing
        return (str(exc), holder.pid if holder is not None else None)


def test_a_job_refused_before_the_holder_wrote_its_record_names_the_holder(
    tmp_path: Path,
) -> None:
    """The holder here is this process: it takes the lease's lock, and writes its record only
    once the other job has found the lock held (a real winner spends a few milliseconds
    between the two, which no second job can be timed into by any other means)."""
    root = tmp_path / "root"
    root.mkdir()
    # A killed holder's record still claims the root: the refusal must not name that one.
    killed = Holder(root)
    try:
        assert killed.line() == "held 1"
    finally:
        killed.kill()
    dead = lease.read_holder(root)
    assert dead is None or dead.pid != os.getpid()
    found_held = tmp_path / "found-held"
    lock = lease._try_lock(lease._lock_path(root), 0)
    assert lock is not None

    def write_the_record_late() -> None:
        deadline = time.monotonic() + 60
        while not found_held.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        claimed.append(lease.RootLease._claim(root, lock, None))

    claimed: list[lease.RootLease] = []
    writer = threading.Thread(target=write_the_record_late)
    writer.start()
    try:
        refusals = values(
            run_ranks(_refusal, 2, os.fspath(root), os.fspath(found_held), timeout=60)
        )
    finally:
        writer.join()
        for held in claimed:
            held.release()
    for message, holder_pid in refusals:
        assert holder_pid == os.getpid(), message
        assert f"pid {os.getpid()}" in message


def test_a_job_refused_while_the_holder_writes_no_record_gets_no_holder_on_every_rank(
    tmp_path: Path,
) -> None:
    """A lock held with no record written (as by a holder that never gets that far): the
    refusal says so, and ``holder`` is None, an attribute still, on both ranks."""
    root = tmp_path / "root"
    root.mkdir()
    lock = lease._try_lock(lease._lock_path(root), 0)
    assert lock is not None
    try:
        refusals = values(run_ranks(_refusal, 2, os.fspath(root), timeout=60))
    finally:
        lock.release()
    for message, holder_pid in refusals:
        assert holder_pid is None and "record cannot be read" in message, message


def test_a_job_refused_after_waiting_in_pieces_says_the_whole_wait(tmp_path: Path) -> None:
    """A wait longer than half the timeout is made of several tries (``decide_within``), each
    of which waits its own piece: the refusal gives the time waited in all, not the last piece."""
    root = tmp_path / "ckpt"
    holder = Holder(root)
    try:
        assert holder.line() == "held 1"
        with pytest.raises(distckpt.RootInUse) as refused:
            # timeout 1: tries of 0.5 s at most, three of them
            distckpt.CheckpointManager(root, wait_for_root=1.5, timeout=1.0)
    finally:
        holder.kill()
    assert refused.value.waited >= 1.5  # the deadline is what ends the wait: never before it
    assert str(refused.value).endswith(f" (waited {refused.value.waited:g} s)"), refused.value
    assert f"pid {holder.pid}," in str(refused.value)


def test_a_holder_with_the_same_pid_in_another_pid_namespace_is_named_as_another_job(
    tmp_path: Path, holders: list[Holder]
) -> None:
    """Two processes on this machine, each pid 1 of a PID namespace of its own: the one refused
    is not told that it holds the root itself (same pid, same hostname and boot), but is given
    the other as the holder."""
    require_namespaces()
    root = tmp_path / "root"
    root.mkdir()
    # Forked into their namespaces, as `unshare --pid --fork --mount-proc` runs a command: a
    # fresh interpreter would spend seconds importing torch.
    holder = start_holder(holders, root, pid_namespace=True)
    assert (holder.line(), holder.line()) == ("pid 1", "held 1")
    contender = start_holder(holders, root, pid_namespace=True)
    assert contender.line() == "pid 1"
    refusal = contender.line()
    assert refusal.startswith(f"refused RootInUse root {root} is in use by "), refusal
    assert "pid 1, since" in refusal and "(generation 1)" in refusal, refusal
    assert "this process" not in refusal and "not closed" not in refusal, refusal


def _refusal_after_waiting(rank: int, world_size: int, root: str) -> str:
    try:
        # timeout 1: tries of 0.5 s at most, which the start's saying that it waits must not
        # lengthen (the try running over would end the start in CoordinationTimeout)
        with distckpt.CheckpointManager(root, wait_for_root=2, timeout=1.0):
            return "opened"
    except distckpt.RootInUse:
        return "RootInUse"


def test_a_waiting_start_with_a_short_timeout_is_refused_on_every_rank_not_timed_out(
    tmp_path: Path,
) -> None:
    """Two ranks wait for a root another process holds, in tries of half a short timeout: the
    line saying that the start waits costs no try any time, so both are refused the root."""
    root = tmp_path / "ckpt"
    holder = Holder(root)
    try:
        assert holder.line() == "held 1"
        refusals = values(run_ranks(_refusal_after_waiting, 2, os.fspath(root), timeout=60))
    finally:
        holder.kill()
    assert refusals == ["RootInUse", "RootInUse"], refusals
