"""Processes that share a root but no process group, and its locks: a live lock holder times
out and a dead one does not block, a crashed job does not block its successor, a filesystem
without ``flock`` is a clear error on every rank, and ``gc`` and a starting manager never take
a live save's writer lock, probe or lease record for leftovers.

Every process here is a real, separate process (forked from this one, or a script run in a
job server of tests/job_servers.py); they meet only through the root's file lock and its directory
layout."""

from __future__ import annotations

import errno
import fcntl
import multiprocessing as mp
import os
import signal
import textwrap
import time
from pathlib import Path
from typing import Any

import filelock
import torch

import distckpt
from distckpt.fsutil import read_link
from distckpt.layout import RootLayout, step_dir_name
from distckpt.lock import PROBE_GRACE_SECONDS
from distckpt.storage import open_store
from tests import job_servers
from tests.fault_checks import entries
from tests.ranks import run_ranks
from tests.shared_root import (
    JOB_TIMEOUT,
    TIMEOUT,
    Proc,
    _saving_loop,
    check_root,
    describe,
    staging_dirs,
    state_of,
)
from tests.waiting import after_rank_0_removals

# ---------------------------------------------------------------------------------- lock holders


def _hold_lock(path: str, held: Any) -> None:
    lock = filelock.FileLock(path)
    lock.acquire()
    held.set()
    time.sleep(JOB_TIMEOUT)


def test_live_lock_holder_times_out_and_dead_one_does_not_block(root: Path) -> None:
    distckpt.CheckpointManager(root, timeout=TIMEOUT).close()
    held = mp.get_context("fork").Event()
    holder = mp.get_context("fork").Process(
        target=_hold_lock, args=(str(root / ".lock"), held), daemon=True
    )
    holder.start()
    try:
        assert held.wait(JOB_TIMEOUT)
        started = time.monotonic()
        try:
            distckpt.CheckpointManager(root, timeout=2).close()
            raise AssertionError("a manager opened while another process held the lock")
        except distckpt.CoordinationTimeout as exc:
            assert "another process" in str(exc)
        assert 0.8 < time.monotonic() - started < 5  # waited its timeout / 2, then said so
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(5)
        started = time.monotonic()
        distckpt.CheckpointManager(root, timeout=TIMEOUT).close()
        assert time.monotonic() - started < 1.0  # the kernel dropped the dead holder's lock
    finally:
        if holder.is_alive():
            holder.kill()


_KILLED_MID_COMMIT = textwrap.dedent(
    """
    import sys, torch, distckpt
    with distckpt.CheckpointManager(sys.argv[1], timeout=10) as mgr:
        for step in (1, 2):
            mgr.save(step, {"step": step, "job": 0, "w": torch.full((4,), float(step))})
    """
)


def test_crashed_job_does_not_block_its_successor(root: Path, tmp_path: Path) -> None:
    """A job SIGKILLed while it holds the root lock (armed through ``DISTCKPT_FAULT``, read
    at import, as under torchrun) blocks nothing: a new manager opens at once and cleans up."""
    # In a job server: a process of its own that imports distckpt afresh (the fault is read
    # at that import) but finds torch imported already.
    crashed = job_servers.run_script_preloaded(
        _KILLED_MID_COMMIT,
        [str(root)],
        tmp_path,
        JOB_TIMEOUT,
        extra_env={"DISTCKPT_FAULT": "after_manifest:kill:0:2"},
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout
    assert staging_dirs(root) != []  # its step 2 was being committed

    started = time.monotonic()
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        opened = time.monotonic() - started
        assert opened < 1.0, f"the new manager waited {opened:.1f} s for a dead job's lock"
        after_rank_0_removals(mgr)
        assert entries(root / ".staging") == [] and mgr.steps() == [1]
        assert read_link(root / "last") == step_dir_name(1)
        assert mgr.save(2, state_of(2)).step == 2
    check_root(root)


# ---------------------------------------------------------------------------------- no flock


def _without_flock(rank: int, world_size: int, root: str) -> dict[str, Any]:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    fcntl.flock = refuse  # what Lustre without -o flock answers
    try:
        distckpt.CheckpointManager(root, timeout=TIMEOUT).close()
    except Exception as exc:
        return {
            "type": type(exc).__name__,
            "checkpoint_error": isinstance(exc, distckpt.CheckpointError),
            "error": str(exc),
        }
    return {"type": None}


def test_no_flock_is_a_clear_error_on_every_rank(root: Path) -> None:
    results = run_ranks(_without_flock, 2, str(root), timeout=JOB_TIMEOUT, pg_timeout=TIMEOUT)
    outs = [r.unwrap() for r in results]
    for rank, out in enumerate(outs):
        assert out["type"] is not None, f"rank {rank} opened a root it cannot lock"
        assert out["checkpoint_error"], out
        # The first lock a manager takes is the root's lease.
        assert "flock" in out["error"] and str(root / ".lease") in out["error"], out
    # No soft-lock marker was left behind: a manager where flock works opens at once.
    started = time.monotonic()
    distckpt.CheckpointManager(root, timeout=TIMEOUT).close()
    assert time.monotonic() - started < 1.0


def _saving_with_slow_lock_files(root: str, saves: int) -> dict[str, Any]:
    """Save ``saves`` steps, each writer lock file taking 50 ms between its creation and its
    flock (a slow or loaded filesystem): the window in which a cleanup may look at it."""
    real_open = os.open

    def slow_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        fd = real_open(path, flags, *args, **kwargs)
        if str(path).endswith(".lock") and ".staging" in str(path) and flags & os.O_CREAT:
            time.sleep(0.05)
        return fd

    os.open = slow_open
    return _saving_loop(root, mp.get_context("fork").Event(), 2, saves)


def _gc_loop(root: str, stop: Any) -> dict[str, Any]:
    """``distckpt gc``'s collection (the store, no manager) over and over."""
    out: dict[str, Any] = {"gc": 0, "errors": []}
    store = open_store(root, lock_timeout=TIMEOUT / 2)
    while not stop.is_set():
        try:
            store.collect_leftovers()
            out["gc"] += 1
        except Exception as exc:
            out["errors"].append(describe(exc))
        time.sleep(0.002)
    return out


def test_gc_never_fails_a_live_save(root: Path) -> None:
    """``gc`` (and every manager start) probes the writer lock beside each staging dir; a
    save whose lock file was just created must not fail, nor lose its lock, because of it."""
    distckpt.CheckpointManager(root, timeout=TIMEOUT).close()
    stop = mp.get_context("fork").Event()
    collector = Proc(_gc_loop, str(root), stop)
    wrote = Proc(_saving_with_slow_lock_files, str(root), 20).result()
    stop.set()
    collected = collector.result()
    print(f"saved {len(wrote['saved'])} of 20 next to {collected['gc']} gc runs")
    assert collected["errors"] == []
    assert wrote["errors"] == [], "\n".join(wrote["errors"])
    check_root(root)


def test_a_start_removes_the_probes_and_links_a_killed_process_left(root: Path) -> None:
    """Probes and links under construction are made under the root lock by the lease's holder
    (or a maintenance command): found by a start that holds both, each was left by a process
    that died, however recently (no grace period then); ``distckpt ls``, which looks without
    the lock, and ``distckpt gc``, which holds no lease, count only old ones (where the root
    lock does not reach, a job that just took the lease may be making them)."""
    from distckpt.lock import find_leftovers

    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        mgr.save(1, {"w": torch.zeros(3)})
    planted = [
        ".probe-0123abcd",
        ".probe-link-0123abcd",
        f".last.{'ab' * 16}.tmp",
        f".best.{'cd' * 16}.tmp",
    ]
    (root / planted[0]).write_bytes(b"distckpt write probe\n")
    os.symlink(root.name, root / planted[1], target_is_directory=True)
    os.symlink(step_dir_name(1), root / planted[2], target_is_directory=True)
    (root / planted[3]).write_text(step_dir_name(1) + "\n")
    (root / ".lastly.tmp").write_text("not ours\n")  # only distckpt's own names are removed

    layout = RootLayout.at(root)
    assert find_leftovers(layout) == []  # all younger than the grace period
    assert open_store(root).collect_leftovers() == []  # distckpt gc's: the same
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        removed = {path.name for path in mgr.gc()}
    assert removed == set(planted)
    left = sorted(p.name for p in root.iterdir() if p.name.startswith(".") and p.is_file())
    assert left == [".lastly.tmp", ".lease", ".lease.json", ".lock"]
    assert read_link(root / "last") == step_dir_name(1)


def test_gc_leaves_the_lease_record_a_starting_manager_writes(root: Path) -> None:
    """A starting manager writes the lease record (through a temporary file) holding the
    lease, not the root lock: ``distckpt gc``'s collection, which holds the root lock, must
    leave that file alone (removing it made the manager's start fail with FileNotFoundError
    under load), and so must the lease holder's own cleanup: where locks do not reach, a job
    that has just taken the lease over may be writing it. Whether a process holds the lease
    cannot be told there, so only the file's age can: it goes once older than
    ``PROBE_GRACE_SECONDS`` (a live one exists for milliseconds)."""
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        after_rank_0_removals(mgr)
        writing = root / f"..lease.json.{'ef' * 16}.tmp"
        writing.write_text("{}")
        assert open_store(root).collect_leftovers() == []
        assert mgr.gc() == []
        assert writing.exists()
    assert open_store(root).collect_leftovers() == []  # no holder now, but young
    assert writing.exists()
    long_ago = time.time() - PROBE_GRACE_SECONDS - 1
    os.utime(writing, (long_ago, long_ago))
    assert open_store(root).collect_leftovers() == [writing]
    assert not writing.exists()
