"""Rank 0's removals of what a commit, a delete or a start left behind (the trash, dead writers'
leftovers) come after the outcome reached every rank, in a thread of their own: a removal
slower than the collectives' timeout fails neither a committed save, a delete, the start of a
requeued job nor the call after any of them, which the other ranks make at once; ``close()``
waits for it only a while, and the next start removes what it left."""

from __future__ import annotations

import gc
import json
import os
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

import distckpt
from distckpt.fsutil import move_to_trash
from distckpt.layout import TRASH_DIR_NAME, RootLayout
from distckpt.lock import RootLock
from distckpt.storage import open_store, posix
from distckpt.tidying import BackgroundTidy, close_wait_seconds
from tests import job_servers
from tests.ranks import run_ranks, values
from tests.waiting import after_rank_0_removals, wait_until

TIMEOUT = 3.0
#: How long rank 0 takes to remove each entry: longer than the timeout.
REMOVAL_SECONDS = TIMEOUT + 2


def _slow_removals_on_rank_0(rank: int) -> None:
    """Make every removal of rank 0 take :data:`REMOVAL_SECONDS`. Replaced, not real: a removal
    that slow needs a checkpoint of many gigabytes on a slow shared filesystem, which this
    machine cannot hold in a test's time; the real removal still runs after the wait."""
    if rank != 0:
        return
    posix.PosixRootStore._remove_quietly = _slowed()  # type: ignore[method-assign]


def _slowed() -> Callable[[posix.PosixRootStore, Path], bool]:
    """The store's removal of one leftover, after a wait of :data:`REMOVAL_SECONDS`."""
    remove = posix.PosixRootStore._remove_quietly

    def slow(self: posix.PosixRootStore, leftover: Path) -> bool:
        time.sleep(REMOVAL_SECONDS)
        return remove(self, leftover)

    return slow


def _trash(root: str | Path) -> list[str]:
    trash = Path(root, TRASH_DIR_NAME)
    return sorted(entry.name for entry in trash.iterdir()) if trash.is_dir() else []


def _saves_a_delete_and_a_close(
    rank: int, world_size: int, root: str
) -> tuple[list[int | None], float, list[str]]:
    """Like a training loop: every call straight after the one before, no barrier between."""
    _slow_removals_on_rank_0(rank)
    steps: list[int | None] = []
    mgr = distckpt.CheckpointManager(root, timeout=TIMEOUT, keep_last=1)
    for step in (1, 2, 3):  # each save's retention moves the step before into the trash
        result = mgr.save(step, {"w": torch.full((4,), float(step))})
        steps.append(None if result is None else result.step)
    mgr.delete(3)
    steps.extend(mgr.steps())
    started = time.monotonic()
    mgr.close()
    return steps, time.monotonic() - started, _trash(root)


def test_a_slow_trash_never_fails_the_next_saves_a_delete_or_holds_up_close(
    tmp_path: Path,
) -> None:
    results = values(run_ranks(_saves_a_delete_and_a_close, 2, str(tmp_path), timeout=90))
    assert [steps for steps, _, _ in results] == [[1, 2, 3]] * 2
    _, close_seconds, left_at_close = results[0]
    # Three removals of REMOVAL_SECONDS each were asked for: close left while they ran, after
    # its bound (the margin is for a loaded machine, far below the removals' 15 s).
    assert left_at_close, "close() waited for every removal"
    assert close_seconds < close_wait_seconds(TIMEOUT) + REMOVAL_SECONDS
    # The next start removes what was left (its close waits for that much, quick here).
    with distckpt.CheckpointManager(tmp_path) as mgr:
        assert mgr.steps() == []
    assert _trash(tmp_path) == []


def _async_saves(rank: int, world_size: int, root: str) -> list[int]:
    """Three async saves back to back; the steps left, and the step of the last one's result."""
    _slow_removals_on_rank_0(rank)
    with distckpt.CheckpointManager(root, timeout=TIMEOUT, keep_last=1, async_save=True) as mgr:
        for step in (1, 2, 3):  # each one waits for the one before, in its own save()
            mgr.save(step, {"w": torch.full((4,), float(step))})
        result = mgr.wait()
        assert result is not None
        return [*mgr.steps(), result.step]


def test_a_slow_trash_never_delays_an_async_save_or_fails_the_next(tmp_path: Path) -> None:
    """An async save is done once committed: the removal its retention asked for does not hold
    up the background thread that the next save (and wait()) waits for."""
    assert values(run_ranks(_async_saves, 2, str(tmp_path), timeout=90)) == [[3, 3]] * 2


def _saves_step_1(rank: int, world_size: int, root: str) -> None:
    with distckpt.CheckpointManager(root) as mgr:
        mgr.save(1, {"w": torch.ones(2)})


def _opens_and_restores(rank: int, world_size: int, root: str) -> int | None:
    _slow_removals_on_rank_0(rank)
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        # the training script's first call after the constructor, with no collective between
        loaded = mgr.restore("last", state={"w": torch.zeros(2)}, missing_ok=True)
        return None if loaded is None else loaded.step


def test_a_slow_leftover_never_fails_the_start_of_a_requeued_job(tmp_path: Path) -> None:
    values(run_ranks(_saves_step_1, 2, str(tmp_path), timeout=90))
    # what a job killed while retention emptied the trash leaves behind
    (tmp_path / TRASH_DIR_NAME / "step-00000000").mkdir(parents=True)
    assert values(run_ranks(_opens_and_restores, 2, str(tmp_path), timeout=90)) == [1, 1]
    with distckpt.CheckpointManager(tmp_path):
        pass  # the next start removes what the slow one left
    assert _trash(tmp_path) == []


def test_close_waits_for_the_removals_at_most_ten_seconds() -> None:
    assert close_wait_seconds(600.0) == 10.0
    assert close_wait_seconds(3.0) == 3.0


class _HeldTidy:
    """A tidy that holds each run until let go, counting runs and how many ran at once."""

    def __init__(self) -> None:
        self.started = threading.Semaphore(0)
        self.go_on = threading.Event()
        self.runs = 0
        self.at_once = 0
        self.most_at_once = 0
        self._count = threading.Lock()

    def __call__(self) -> None:
        with self._count:
            self.runs += 1
            self.at_once += 1
            self.most_at_once = max(self.most_at_once, self.at_once)
        self.started.release()
        self.go_on.wait()
        with self._count:
            self.at_once -= 1


def test_requests_while_a_tidy_runs_make_one_more_run_after_it() -> None:
    tidy = _HeldTidy()
    tidying = BackgroundTidy(tidy)
    tidying.request()
    assert tidy.started.acquire(timeout=30)
    for _ in range(3):
        tidying.request()
    assert tidying.running
    tidy.go_on.set()
    assert tidying.wait(30)
    assert (tidy.runs, tidy.most_at_once) == (2, 1)
    assert not tidying.running


def test_close_runs_a_pending_tidy_within_its_bound() -> None:
    tidy = _HeldTidy()
    tidying = BackgroundTidy(tidy)
    tidying.request()
    assert tidy.started.acquire(timeout=30)
    tidying.request()  # pending: what the runs so far did not list yet
    tidy.go_on.set()
    assert tidying.close(30)
    assert tidy.runs == 2


def test_close_past_its_bound_drops_a_pending_tidy_and_leaves_a_running_one() -> None:
    tidy = _HeldTidy()
    tidying = BackgroundTidy(tidy)
    tidying.request()
    assert tidy.started.acquire(timeout=30)
    tidying.request()  # pending: dropped once the close gives up waiting
    assert not tidying.close(0.1)  # the run going on is left to its thread
    tidying.request()  # closed: starts nothing
    tidy.go_on.set()
    assert tidying.wait(30)
    assert tidy.runs == 1


def test_a_forked_child_neither_waits_for_nor_starts_a_tidy() -> None:
    tidy = _HeldTidy()
    tidying = BackgroundTidy(tidy)
    tidying.request()
    assert tidy.started.acquire(timeout=30)
    pid = os.fork()
    if pid == 0:  # the child: the parent's run has no thread here, it would wait forever
        finished = tidying.close(30)
        tidying.request()
        os._exit(0 if finished and not tidying.running and tidy.runs == 1 else 1)
    _, status = os.waitpid(pid, 0)
    tidy.go_on.set()
    assert tidying.wait(30)
    assert os.waitstatus_to_exitcode(status) == 0


def _tidy_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "distckpt-tidy-test"]


def test_one_thread_serves_requests_while_it_waits_for_them() -> None:
    """Requests coming while the thread waits are served by it: no thread started per save."""
    served_by: list[threading.Thread] = []  # the threads themselves: idents are reused
    tidying = BackgroundTidy(
        lambda: served_by.append(threading.current_thread()),
        name="distckpt-tidy-test",
        idle_seconds=600.0,
    )
    for _ in range(3):
        tidying.request()
        assert tidying.wait(30)
    assert len(served_by) == 3 and all(thread is served_by[0] for thread in served_by)
    assert tidying.close(30)


def test_the_thread_ends_when_idle_and_the_next_request_starts_another() -> None:
    served_by: list[threading.Thread] = []
    tidying = BackgroundTidy(
        lambda: served_by.append(threading.current_thread()),
        name="distckpt-tidy-test",
        idle_seconds=0.2,
    )
    tidying.request()
    assert tidying.wait(30)
    wait_until(lambda: not _tidy_threads(), "the idle thread ended", 30)
    tidying.request()
    assert tidying.wait(30)
    assert len(served_by) == 2 and served_by[1] is not served_by[0]
    assert tidying.close(30)


def test_a_manager_dropped_without_close_frees_the_root_while_its_tidy_thread_waits(
    tmp_path: Path,
) -> None:
    """The waiting thread holds neither the runner nor the store: a manager dropped without
    ``close`` gives the root's lease back when it is collected, as before the thread outlived
    its run, so the same process opens the root again at once."""
    mgr = distckpt.CheckpointManager(tmp_path, keep_last=1)
    for step in (1, 2):
        mgr.save(step, {"w": torch.full((2,), float(step))})
    after_rank_0_removals(mgr)
    assert any(thread.name == "distckpt-tidy" for thread in threading.enumerate())
    del mgr
    gc.collect()
    with distckpt.CheckpointManager(tmp_path) as again:
        assert again.steps() == [2]


def test_close_ends_the_idle_thread() -> None:
    tidy = _HeldTidy()
    tidy.go_on.set()
    tidying = BackgroundTidy(tidy, name="distckpt-tidy-test", idle_seconds=600.0)
    tidying.request()
    assert tidying.wait(30) and _tidy_threads()
    assert tidying.close(30)
    assert not _tidy_threads()  # ended within the close, not 600 s later
    tidying.request()  # closed: starts nothing
    assert tidy.runs == 1 and not _tidy_threads()


def test_a_tidy_deletes_only_trash_entries_it_listed_under_the_commit_lock(
    tmp_path: Path,
) -> None:
    """A checkpoint moved into the trash and back out within one hold of the commit lock (an
    overwrite putting back the checkpoint it replaced, when its second rename failed) is never
    deleted by a tidy running meanwhile."""
    store = open_store(tmp_path, lock_timeout=30)
    layout = RootLayout.at(tmp_path)
    checkpoint = tmp_path / "step-1"
    checkpoint.mkdir()
    (checkpoint / "rank0.pt").write_bytes(b"weights")
    tidying = BackgroundTidy(store.tidy)
    with RootLock(layout.lock_path, timeout=30):
        trashed = move_to_trash(checkpoint, layout.trash_root, fsync=False)
        assert trashed is not None
        tidying.request()
        time.sleep(0.5)  # the time a tidy that listed the trash unlocked would take to delete it
        trashed.rename(checkpoint)
    assert tidying.wait(30)
    assert (checkpoint / "rank0.pt").read_bytes() == b"weights"


#: Saves twice with keep_last=1 and collects leftovers while no thread can be started, then
#: saves once more with threads back; argv: the root. Prints what it saw, as JSON.
_NO_THREAD_CAN_START = textwrap.dedent(
    """
    import json, os, resource, sys, torch, distckpt

    root = sys.argv[1]
    trash = os.path.join(root, ".trash")
    # A save first, so that every module the save path imports lazily is loaded before the uid
    # changes: the other user may not read the interpreter's installation.
    with distckpt.CheckpointManager(root + "-warm-up") as warm_up:
        warm_up.save(1, {"w": torch.zeros(2)})
    if os.geteuid() == 0:  # the kernel never applies RLIMIT_NPROC to root
        os.setgid(65534)
        os.setuid(65534)
    soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    # The user's threads are this process's (or more): any new one is refused, for real.
    resource.setrlimit(resource.RLIMIT_NPROC, (len(os.listdir("/proc/self/task")), hard))
    mgr = distckpt.CheckpointManager(root, keep_last=1, timeout=20)
    saved = [mgr.save(step, {"w": torch.full((2,), float(step))}).done for step in (1, 2)]
    trashed = os.listdir(trash)
    removed_by_gc = len(mgr.gc())
    trash_after_gc = os.listdir(trash)
    resource.setrlimit(resource.RLIMIT_NPROC, (soft, hard))
    saved.append(mgr.save(3, {"w": torch.full((2,), 3.0)}).done)
    mgr._tidying.wait(60)  # tests.waiting.after_rank_0_removals, which this script cannot import
    print(json.dumps([saved, trashed, removed_by_gc, trash_after_gc, os.listdir(trash)]))
    mgr.close()
    """
)


def test_a_tidy_thread_that_cannot_start_fails_nothing_and_its_removals_come_later() -> None:
    """README: where rank 0 cannot start the removals' thread, nothing fails or hangs: the
    constructor and the saves succeed, gc() deletes what retention moved into the trash inside
    its own call, and the next commit's removals run once a thread can start again. The start
    fails for real: RLIMIT_NPROC, as under a container's pids limit, in a process of another
    user (the kernel does not apply it to root)."""
    with tempfile.TemporaryDirectory() as shared:
        os.chmod(shared, 0o777)  # written by the other user; tmp_path's parents are private
        # In a job server: a process of its own, which finds torch imported already.
        done = job_servers.run_script_preloaded(
            _NO_THREAD_CAN_START, [os.path.join(shared, "root")], Path(shared), stderr_apart=True
        )
        assert done.returncode == 0, done.stderr
        saved, trashed, removed_by_gc, trash_after_gc, trash_at_end = json.loads(
            done.stdout.splitlines()[-1]
        )
        assert saved == [True, True, True]
        assert trashed and removed_by_gc == len(trashed) and trash_after_gc == []
        assert trash_at_end == []  # step 2, moved there by step 3's retention
        assert "could not start removing the root's leftovers" in done.stderr
        assert distckpt.CheckpointManager(Path(shared) / "root", read_only=True).steps() == [3]
