"""Processes that share a root but no process group: two jobs, a job next to maintenance
commands, a reader next to a writer's retention, a crashed lock holder, and a filesystem
without ``flock``.

Every process here is a real, separate process (forked, or a ``python -m distckpt``
subprocess); they meet only through the root's file lock and its directory layout.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import filelock
import pytest
import torch

import distckpt
from distckpt import reader
from distckpt.fsutil import read_link
from distckpt.layout import RootLayout, step_dir_name
from distckpt.lock import PROBE_GRACE_SECONDS
from distckpt.storage import open_store
from tests.ranks import Collected, run_ranks
from tests.waiting import after_rank_0_removals

TIMEOUT = 10  # manager timeout: the commit lock waits at most half of it
JOB_TIMEOUT = 60  # a process still running past this counts as hung


# ---------------------------------------------------------------------------------- helpers


def _child(fn: Callable[..., Any], args: tuple[Any, ...], queue: Any) -> None:
    torch.set_num_threads(1)
    try:
        queue.put(("ok", fn(*args)))
    except BaseException:
        queue.put(("error", traceback.format_exc()))
    finally:
        queue.close()
        queue.join_thread()
        os._exit(0)


class Proc:
    """A forked process running ``fn(*args)``; :meth:`result` is its return value."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        ctx = mp.get_context("fork")
        self.queue = ctx.Queue()
        self.process = ctx.Process(target=_child, args=(fn, args, self.queue), daemon=True)
        self.process.start()

    def result(self, timeout: float = JOB_TIMEOUT) -> Any:
        try:
            status, value = self.queue.get(timeout=timeout)
        except Exception:
            raise AssertionError(f"process {self.process.pid} hung for {timeout} s") from None
        finally:
            if self.process.is_alive():
                self.process.join(5)
            if self.process.is_alive():
                self.process.kill()
        if status == "error":
            raise AssertionError(f"process {self.process.pid} failed:\n{value}")
        return value


def state_of(step: int, job: int = 0) -> dict[str, Any]:
    return {"step": step, "job": job, "w": torch.full((4,), float(job * 1000 + step))}


def state_ok(state: Any, step: int, job: int) -> bool:
    want = state_of(step, job)
    return (
        state["step"] == want["step"]
        and state["job"] == want["job"]
        and torch.equal(state["w"], want["w"])
    )


def staging_dirs(root: Path) -> list[str]:
    staging = root / ".staging"
    return sorted(p.name for p in staging.iterdir() if p.is_dir()) if staging.is_dir() else []


def entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory)) if directory.is_dir() else []


def check_root(root: Path) -> None:
    """Every committed dir verifies, and ``last`` names the newest."""
    report = distckpt.verify(root)
    assert report.ok, str(report)
    committed = sorted(c.step for c in report.checkpoints)
    if committed:
        assert read_link(root / "last") == step_dir_name(committed[-1])


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------- two jobs


def _competing_job(root: str, job: int, steps: int, barrier: Any) -> dict[str, Any]:
    """Save steps 1..``steps`` (the other job saves the same ones, so they collide on
    every step), opening a new manager every 4 saves, which waits for the other job's manager
    to close (one writing job at a time holds the root's lease)."""
    out: dict[str, Any] = {"saved": [], "refused": Counter(), "errors": []}
    barrier.wait()
    mgr = None
    try:
        for step in range(1, steps + 1):
            if step % 4 == 1:
                if mgr is not None:
                    mgr.close()
                mgr = distckpt.CheckpointManager(root, timeout=TIMEOUT, wait_for_root=JOB_TIMEOUT)
            try:
                mgr.save(step, state_of(step, job), metadata={"job": job})
                out["saved"].append(step)
            except (distckpt.InvalidStep, distckpt.CheckpointExists) as exc:
                out["refused"][type(exc).__name__] += 1
            except distckpt.CheckpointError as exc:
                out["errors"].append(describe(exc))
    finally:
        if mgr is not None:
            mgr.close()
    return out


def test_two_jobs_share_a_root(root: Path) -> None:
    barrier = mp.get_context("fork").Barrier(2)
    jobs = [Proc(_competing_job, str(root), job, 24, barrier) for job in (1, 2)]
    outs = [job.result() for job in jobs]
    print("refused saves:", [dict(out["refused"]) for out in outs])

    assert [out["errors"] for out in outs] == [[], []]  # only the clear refusals
    saved = [set(out["saved"]) for out in outs]
    assert not saved[0] & saved[1], "both jobs think they committed the same step"
    check_root(root)
    committed = {c.step for c in distckpt.verify(root).checkpoints}
    assert committed == saved[0] | saved[1]  # every save that returned is there
    for job, steps in zip((1, 2), saved):  # ... and holds what that job saved
        for step in steps:
            ckpt = distckpt.load_checkpoint(root / step_dir_name(step))
            assert ckpt.metadata == {"job": job} and state_ok(ckpt.state, step, job)
    assert sum(sum(out["refused"].values()) for out in outs) > 0  # they did collide
    assert staging_dirs(root) == []


# ---------------------------------------------------------------------------------- maintenance


def _saving_loop(root: str, stop: Any, keep_last: int | None, limit: int) -> dict[str, Any]:
    out: dict[str, Any] = {"saved": [], "errors": []}
    with distckpt.CheckpointManager(root, keep_last=keep_last, timeout=TIMEOUT) as mgr:
        step = 0
        while not stop.is_set() and step < limit:
            step += 1
            try:
                mgr.save(step, state_of(step))
                out["saved"].append(step)
            except Exception as exc:
                out["errors"].append(describe(exc))
    return out


def _deleting_loop(root: str, stop: Any, seed: int) -> dict[str, Any]:
    """The store's ``delete(step)`` of a random committed step (the newest too) and its
    ``collect_leftovers()``, each from a newly made store, over and over: what an operator's
    tool does next to a live job, with no manager (a second manager would be a second writing
    job, refused while the first holds the root's lease)."""
    rng = random.Random(seed)
    out: dict[str, Any] = {"deleted": [], "gc": 0, "clear": Counter(), "errors": []}
    while not stop.is_set():
        try:
            store = open_store(root, lock_timeout=TIMEOUT / 2)
            steps = RootLayout.at(root).committed_steps()
            if steps:
                step = rng.choice(steps)
                store.delete(step)
                out["deleted"].append(step)
            for _ in range(5):
                store.collect_leftovers()
                out["gc"] += 1
        except distckpt.CheckpointNotFound as exc:  # retention removed it first: clear
            out["clear"][type(exc).__name__] += 1
        except Exception as exc:
            out["errors"].append(describe(exc))
        time.sleep(0.01)
    return out


def _cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "distckpt", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_maintenance_next_to_a_saving_job(root: Path) -> None:
    """While a job saves with ``keep_last=2``: ``distckpt prune --keep-last 1`` and
    ``distckpt gc``, twice each and all at once, and in another process the store's
    ``delete(step)`` and ``collect_leftovers()`` over and over. Every command succeeds, no
    save fails, nothing breaks."""
    stop = mp.get_context("fork").Event()
    writer = Proc(_saving_loop, str(root), stop, 2, 100_000)
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (root / "last").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    deleter = Proc(_deleting_loop, str(root), stop, 0)
    # Each command starts a Python that imports torch: about 2 s of CPU.
    batch = [
        _cli(*args) for args in [("prune", str(root), "--keep-last", "1"), ("gc", str(root))] * 2
    ]
    commands = []
    for command in batch:
        _, stderr = command.communicate(timeout=JOB_TIMEOUT)
        commands.append((command.args[3], command.returncode, stderr))
    stop.set()
    wrote, deleted = writer.result(), deleter.result()
    print(
        f"saved {len(wrote['saved'])}; deleted {len(deleted['deleted'])} "
        f"({dict(deleted['clear'])}), {deleted['gc']} gc; errors: {wrote['errors']}"
    )

    for name, code, stderr in commands:
        assert code == 0 and "Traceback" not in stderr, f"distckpt {name}: {code}\n{stderr}"
    assert wrote["errors"] == [], wrote["errors"]
    assert deleted["errors"] == [], deleted["errors"]
    assert len(wrote["saved"]) >= 5
    check_root(root)
    assert staging_dirs(root) == [] and entries(root / ".trash") == []


# ---------------------------------------------------------------------------------- readers


def _reading_loop(root: str, seconds: float, slow_listing: bool = False) -> dict[str, Any]:
    """``load_checkpoint(root)`` (which resolves "last") over and over. ``slow_listing``: 20 ms
    pass between listing the root's step dirs and reading them, as on a loaded NFS server."""
    if slow_listing:
        real_listing = RootLayout.committed_steps

        def committed_steps(self: RootLayout) -> list[int]:
            steps = real_listing(self)
            time.sleep(0.02)
            return steps

        RootLayout.committed_steps = committed_steps  # type: ignore[method-assign]
    collected = Collected()
    logging.getLogger("distckpt").addHandler(collected)
    out: dict[str, Any] = {"loads": 0, "steps": set(), "errors": Counter(), "wrong": []}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            ckpt = distckpt.load_checkpoint(root)
        except Exception as exc:
            out["errors"][describe(exc)[:300]] += 1
            continue
        out["loads"] += 1
        out["steps"].add(ckpt.step)
        if not state_ok(ckpt.state, ckpt.step, 0):
            out["wrong"].append(ckpt.step)
    out["retries"] = sum("vanished" in record.getMessage() for record in collected.records)
    return out


def test_reader_next_to_retention(root: Path) -> None:
    """Two readers loop ``load_checkpoint(root)`` while a writer saves with ``keep_last=1``,
    so the checkpoint a reader resolved is often deleted under it: every load succeeds (it
    resolves again when its checkpoint vanished) with a whole, matching state. One reader
    lists the root slowly, which widens the window between listing and reading."""
    stop = mp.get_context("fork").Event()
    writer = Proc(_saving_loop, str(root), stop, 1, 100_000)
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (root / "last").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    readers = [Proc(_reading_loop, str(root), 3.0, slow) for slow in (False, True)]
    reads = [reader.result() for reader in readers]
    stop.set()
    wrote = writer.result()
    for read in reads:
        print(
            f"{read['loads']} loads of {len(read['steps'])} steps, {read['retries']} "
            f"retried after a vanish; writer saved {len(wrote['saved'])}"
        )
    assert wrote["errors"] == []
    for read in reads:
        assert read["wrong"] == []  # never a mix of two checkpoints, never a partial one
        assert dict(read["errors"]) == {}, dict(read["errors"])
        assert read["loads"] > 10 and len(read["steps"]) > 3
    check_root(root)


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


def test_crashed_job_does_not_block_its_successor(root: Path) -> None:
    """A job SIGKILLed while it holds the root lock (armed through ``DISTCKPT_FAULT``, read
    at import, as under torchrun) blocks nothing: a new manager opens at once and cleans up."""
    env = dict(os.environ, DISTCKPT_FAULT="after_manifest:kill:0:2")
    crashed = subprocess.run(
        [sys.executable, "-c", _KILLED_MID_COMMIT, str(root)],
        env=env,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT,
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
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


# ---------------------------------------------------------------------------------- vanished


def _save_with_retention(root: str, step: int) -> None:
    """Another job's save of ``step`` with ``keep_last=1``: its retention deletes the rest."""
    with distckpt.CheckpointManager(root, keep_last=1, fsync=False, timeout=TIMEOUT) as mgr:
        mgr.save(step, {"w": torch.full((4,), float(step))})


def _deleted_once_resolved(monkeypatch: pytest.MonkeyPatch, root: Path) -> list[int]:
    """Make the next reads of ``root`` meet retention in the window between resolving a
    checkpoint and reading it: right after the first resolve, another process saves a newer
    step with ``keep_last=1``, which deletes the resolved one. Returns the steps it saved."""
    real_resolve, saved = reader.resolve, []

    def retention_strikes_after_resolve(*args: Any, **kwargs: Any) -> Any:
        found = real_resolve(*args, **kwargs)
        if not saved:  # once: the reader's retry must then succeed
            saved.append(2)
            Proc(_save_with_retention, os.fspath(root), 2).result()
        return found

    # A hook in the reader's own process: no other process can be timed into that window.
    monkeypatch.setattr(reader, "resolve", retention_strikes_after_resolve)
    return saved


def _load_root(root: Path) -> distckpt.Checkpoint:
    return distckpt.load_checkpoint(root)


def _restore_last_read_only(root: Path) -> distckpt.Checkpoint:
    # Read-only: a reading manager takes no lease, so the other job can save and retain.
    with distckpt.CheckpointManager(root, read_only=True, timeout=TIMEOUT) as mgr:
        return mgr.restore("last")


@pytest.mark.parametrize(
    "read", [_load_root, _restore_last_read_only], ids=["load_checkpoint", "restore-last"]
)
def test_a_checkpoint_vanishing_mid_read_is_resolved_again(
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    read: Callable[[Path], distckpt.Checkpoint],
) -> None:
    _save_with_retention(os.fspath(root), 1)
    saved = _deleted_once_resolved(monkeypatch, root)
    caplog.set_level(logging.WARNING, logger="distckpt")
    ckpt = read(root)
    assert saved == [2]  # the retention really ran between resolving and reading
    assert ckpt.step == 2 and torch.equal(ckpt.state["w"], torch.full((4,), 2.0))
    retries = [r.getMessage() for r in caplog.records if "vanished" in r.getMessage()]
    named = "'last'" if read is _restore_last_read_only else repr(os.fspath(root))
    vanished = root / step_dir_name(1)
    assert retries == [f"{vanished} vanished while being read; resolving {named} again"]


def test_a_step_named_explicitly_that_vanishes_mid_read_is_not_replaced(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _save_with_retention(os.fspath(root), 1)
    _deleted_once_resolved(monkeypatch, root)
    try:
        distckpt.load_checkpoint(root / step_dir_name(1))
    except distckpt.CheckpointVanished as exc:
        assert isinstance(exc, FileNotFoundError)
        assert f"{root / step_dir_name(1)} was deleted while it was being read" in str(exc)
    else:
        raise AssertionError("a vanished step named explicitly was replaced by another one")
