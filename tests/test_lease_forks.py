"""A holder's children and launcher: a child forked by the lease's holder (a data loader
worker, a pool) keeps none of its locks, whether it outlives the holder, exits normally, or is
forked while another thread takes a lock; one that releases what it inherited (a ``finally``
block, an exit hook) releases nothing of its parent's: a writer lock, a root's lease record or
an ``s3://`` store's lease object; lock files are made as the umask allows; and a worker
notices that its launcher died.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import distckpt
import distckpt.lease
import distckpt.lease_break
from distckpt.errors import LauncherGone
from distckpt.fsutil import atomic_write_bytes
from distckpt.launcher import LauncherWatch
from distckpt.layout import RootLayout
from distckpt.lease import (
    RootLease,
    read_holder,
)
from distckpt.lock import RootLock, WriterLock
from distckpt.objlease import LeaseRecord
from distckpt.objstore import ObjectStore
from distckpt.storage import open_store
from distckpt.storage.s3_root import LEASE_NAME
from tests import job_servers
from tests.lease_holders import (
    STARTUP,
)
from tests.s3server import S3Server


def test_a_forked_child_of_the_holder_does_not_keep_the_lease(root: Path) -> None:
    """A dataloader worker forked by rank 0 inherits its descriptors; once rank 0 is dead, the
    lease must be free even while such a child still runs."""
    root.mkdir()
    child_pid_file = root.parent / "child.pid"
    holder_pid = os.fork()
    if holder_pid == 0:  # the holder: takes the lease, forks a long-lived child, dies
        try:
            lease = RootLease.acquire(root)  # referenced: held until the holder dies
            if os.fork() == 0:
                # written once the fork's hooks have run in the child: the holder dies after
                # that, not in the instant before the child has closed its copies
                atomic_write_bytes(child_pid_file, str(os.getpid()).encode(), fsync=False)
                time.sleep(STARTUP)
            else:
                deadline = time.monotonic() + STARTUP
                while not child_pid_file.exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
        finally:
            os._exit(0)
    os.waitpid(holder_pid, 0)
    try:
        holder = read_holder(root)
        assert holder is not None and holder.pid == holder_pid and holder.alive is False
        with RootLease.acquire(root) as lease:
            assert lease.generation == 2
    finally:
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):
            os.kill(int(child_pid_file.read_text()), signal.SIGKILL)


_FORKING_HOLDER = textwrap.dedent(
    """
    import os, sys
    import torch
    import distckpt
    from distckpt.lock import WriterLock

    root, staging = sys.argv[1], sys.argv[2]
    manager = distckpt.CheckpointManager(root, fsync=False)
    writer = WriterLock(distckpt.layout.Path(staging))
    writer.acquire()
    child = os.fork()
    if child == 0:
        # a helper forked by the job (a data loader worker, a pool) that ends normally: its
        # exit hooks run and its copies of the locks are collected
        sys.exit(0)
    os.waitpid(child, 0)
    print("child exited", flush=True)
    for line in sys.stdin:
        try:
            manager.save(1, {"w": torch.zeros(1)})
            print("saved", flush=True)
        except distckpt.CheckpointError as exc:
            print("failed", type(exc).__name__, exc, flush=True)
    """
)


def test_a_forked_child_exiting_leaves_the_holders_locks_held(root: Path) -> None:
    """A child of the holder that exits normally (exit hooks, garbage collection) unlocks
    nothing of its parent's: the lease, a writer's lock and the parent's save stand."""
    root.mkdir()
    staging = RootLayout(root).staging_root / "step-00000009.feedface"
    staging.parent.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", _FORKING_HOLDER, os.fspath(root), os.fspath(staging)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "child exited"
        seen = read_holder(root)
        assert seen is not None and seen.pid == holder.pid and seen.alive is True
        with pytest.raises(distckpt.RootInUse):
            RootLease.acquire(root)
        assert WriterLock.writer_is_alive(staging)
        holder.stdin.write("save\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "saved"
    finally:
        holder.kill()
        holder.wait(timeout=STARTUP)


_FORKING_WHILE_LOCKING = textwrap.dedent(
    """
    import os, sys, threading, time
    from pathlib import Path
    from distckpt.lock import WriterLock

    scratch, rounds = Path(sys.argv[1]), int(sys.argv[2])
    children_holding = 0
    for round_ in range(rounds):
        writer = WriterLock(scratch / f"step-{round_:08d}.feedface")
        ready = threading.Barrier(2)

        def take() -> None:
            ready.wait()
            writer.acquire()

        taker = threading.Thread(target=take)
        taker.start()
        ready.wait()
        # the fork lands at another point of the other thread's acquire in each round
        time.sleep((round_ % 40) * 2e-6)
        child = os.fork()
        if child == 0:
            lock_file = os.path.realpath(writer.path)
            fds = os.listdir("/proc/self/fd")
            held = [fd for fd in fds if os.path.realpath(f"/proc/self/fd/{fd}") == lock_file]
            os._exit(1 if held else 0)
        _, status = os.waitpid(child, 0)
        children_holding += os.waitstatus_to_exitcode(status)
        taker.join()
        writer.release()
    print(children_holding, flush=True)
    """
)


def test_a_child_forked_while_another_thread_takes_a_lock_holds_no_copy_of_it(
    tmp_path: Path,
) -> None:
    """A fork while another thread of the holder is taking a lock (between opening the lock
    file and locking it, or right after) leaves the child no descriptor of that lock: a child
    holding one would keep the lock after the holder died."""
    rounds = 40
    # In a job server: a process of its own, which finds torch imported already.
    done = job_servers.run_script_preloaded(
        _FORKING_WHILE_LOCKING,
        [os.fspath(tmp_path), str(rounds)],
        tmp_path,
        STARTUP * 2,
        stderr_apart=True,
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == 0, f"{done.stdout.strip()} of {rounds} children held the lock"


#: how long a forked child may take to release what it inherited: past it, it is deadlocked
CHILD_DEADLINE = 30.0


def _in_a_forked_child(release: Callable[[], None]) -> None:
    """Run ``release`` in a forked child of this process, which then ends with ``os._exit``
    (nothing of the test process runs in it); its failure fails the test, and so does a child
    still running at :data:`CHILD_DEADLINE` (killed then: a release deadlocked on a lock
    copied mid-use fails fast, not at the suite's timeout)."""
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try:
            release()
        except BaseException:
            os._exit(1)
        os._exit(0)
    deadline = time.monotonic() + CHILD_DEADLINE
    while (ended := os.waitpid(child, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            pytest.fail(f"the child's release did not end within {CHILD_DEADLINE:g} s")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(ended[1]) == 0, "the child's release raised"


def test_a_forked_child_releasing_a_writer_lock_leaves_the_parents_held(tmp_path: Path) -> None:
    staging = tmp_path / "step-00000001.feedface"
    writer = WriterLock(staging)
    writer.acquire()
    try:
        _in_a_forked_child(writer.release)
        assert writer.path.exists()
        assert WriterLock.writer_is_alive(staging)  # a cleanup keeps the parent's staging dir
    finally:
        writer.release()
    assert not writer.path.exists() and not WriterLock.writer_is_alive(staging)


def test_a_forked_child_releasing_a_roots_lease_leaves_the_parent_its_holder(
    tmp_path: Path,
) -> None:
    with RootLease.acquire(tmp_path) as lease:
        _in_a_forked_child(lease.release)
        lease.check_current()  # still the root's current lease: the record is not released
        holder = read_holder(tmp_path)
        assert holder is not None and holder.pid == os.getpid() and holder.alive


def test_a_forked_child_closing_an_s3_store_leaves_the_parent_its_lease(
    s3_server: S3Server, s3_url: str
) -> None:
    pytest.importorskip("botocore")
    options = s3_server.storage_options()
    store = open_store(s3_url, storage_options=options)
    store.open()
    try:
        _in_a_forked_child(store.close)
        with ObjectStore(s3_url, options) as direct:
            record = LeaseRecord.decode(direct.get_bytes(LEASE_NAME))
        assert record is not None and record.pid == os.getpid() and not record.released
        assert store.prune() == []  # the lease's check passes: still the parent's
    finally:
        store.close()


def test_lock_files_are_created_as_the_umask_allows(tmp_path: Path) -> None:
    """The lock files (commit, lease, writer) get the mode the process's umask leaves of
    0o666, as any file it creates: a root shared by a group (umask 002) stays writable by the
    group's other members, who must open the lock files to take the locks."""
    root = tmp_path / "root"
    root.mkdir()
    staging = RootLayout(root).staging_root / "step-00000001.feedface"
    staging.parent.mkdir()
    previous = os.umask(0o002)
    try:
        with RootLease.acquire(root), RootLock(RootLayout(root).lock_path, timeout=STARTUP):
            writer = WriterLock(staging)
            writer.acquire()
            writer_mode = writer.path.stat().st_mode & 0o777
            writer.release()
    finally:
        os.umask(previous)
    assert writer_mode == 0o664
    assert (RootLayout(root).lease_lock_path.stat().st_mode & 0o777) == 0o664
    assert (RootLayout(root).lock_path.stat().st_mode & 0o777) == 0o664


def _watch_the_launcher(report: Path) -> None:
    """A worker's part: report whether its launcher is gone at its start, then watch it until
    it is (or a minute has passed) and report what the watch's check says."""
    watch = LauncherWatch()
    report.write_text(f"started {watch.launcher_gone()}")
    deadline = time.monotonic() + 60
    while not watch.launcher_gone() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        watch.check()
        report.write_text("not gone")
    except LauncherGone as exc:
        report.write_text(f"LauncherGone {exc}")


def _start_launcher_and_worker(report: Path) -> tuple[int, int]:
    """A launcher forked from this process, which forks a worker (its child) watching it into
    ``report`` and then sleeps until killed (a fresh interpreter for each would spend seconds
    importing torch); returns their pids. Neither returns into this process: each ends with
    ``os._exit``."""
    reader, writer = os.pipe()
    launcher = os.fork()
    if launcher == 0:  # pragma: no cover - the launcher
        try:
            os.close(reader)
            worker = os.fork()
            if worker == 0:  # the worker
                status = 1
                try:
                    os.close(writer)
                    _watch_the_launcher(report)
                    status = 0
                finally:
                    os._exit(status)
            os.write(writer, str(worker).encode())
            os.close(writer)
            time.sleep(600)
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as said:
        worker = int(said.read())
    return launcher, worker


def _wait_for_text(path: Path, prefix: str) -> str:
    deadline = time.monotonic() + STARTUP
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if text.startswith(prefix):
            return text
        time.sleep(0.05)
    raise AssertionError(f"{path} never started with {prefix!r}")


def test_a_worker_notices_its_launcher_died(tmp_path: Path) -> None:
    report = tmp_path / "worker.txt"
    launcher, worker = _start_launcher_and_worker(report)
    reaped = False
    try:
        assert _wait_for_text(report, "started") == "started False"
        os.kill(launcher, signal.SIGKILL)  # the agent dies; its worker lives on
        os.waitpid(launcher, 0)
        reaped = True
        gone = _wait_for_text(report, "LauncherGone")
        assert f"parent pid {launcher}" in gone and "orphan" in gone
    finally:
        if not reaped:
            os.kill(launcher, signal.SIGKILL)
            os.waitpid(launcher, 0)
        with contextlib.suppress(ProcessLookupError):  # it may have finished on its own
            os.kill(worker, signal.SIGKILL)


def test_launcher_watch_only_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert LauncherWatch.for_this_process() is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    watch = LauncherWatch.for_this_process()
    assert watch is not None and watch.parent_pid == os.getppid() and not watch.launcher_gone()
