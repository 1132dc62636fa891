"""Breaking a root's lease (``distckpt lease --break``) between real processes: a broken lease
fences its holder; a live holder on this machine (or in another PID namespace of it) is never
broken; a job that took the root meanwhile is left alone; gc removes a lock file a killed break
moved aside. The holders are processes of their own, as in ``tests/test_lease.py``. A user who
may not write the lease lock: ``tests/test_lease_break_other_user.py``; an older version, and a
lingering lock: ``tests/test_lease_break_older_version.py``.
"""

from __future__ import annotations

import fcntl
import io
import os
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import filelock
import pytest

import distckpt
import distckpt.cli
import distckpt.lease
import distckpt.lease_break
from distckpt.fsutil import atomic_write_bytes
from distckpt.layout import RootLayout
from distckpt.lease import RootLease, this_host
from distckpt.lease_break import break_lease
from tests.cli_runner import run_cli
from tests.filesystems import MountFactory, skip_or_fail
from tests.lease_holders import (
    STARTUP,
    Holder,
    _record_as_another_machine,
    in_a_pid_namespace_of_its_own,
    require_namespaces,
    start_holder,
)


def test_a_broken_lease_fences_its_holder(root: Path, holders: list[Holder]) -> None:
    root.mkdir()
    require_namespaces()
    elsewhere = start_holder(holders, root, host="node-a")  # forked: no torch imported again
    assert elsewhere.line() == "held 1"
    assert elsewhere.ask("check") == "current"

    def the_break() -> str:
        broke = run_cli("lease", "--break", os.fspath(root))
        return f"{broke.returncode} {broke.stdout} {broke.stderr}"

    # The holder's lock is in every /proc/locks of this machine, and a lock held here is a
    # live claimer's: the break runs where that holder's is hidden, as on another machine.
    broke = in_a_pid_namespace_of_its_own(the_break)
    assert broke.startswith("0 ") and "broke the lease of" in broke, broke
    assert "host node-a" in broke
    assert "an operator broke it" in elsewhere.ask("check")

    lease = RootLease.acquire(root)
    try:
        assert lease.generation == 2
        lost = elsewhere.ask("check")
        assert lost.startswith("lost LeaseLost") and f"pid {os.getpid()}" in lost
        assert elsewhere.ask("release") == "released"
        lease.check_current()  # the fenced holder's release left the new record alone
    finally:
        lease.release()


def test_break_refuses_a_live_holder_on_this_machine(root: Path, holders: list[Holder]) -> None:
    root.mkdir()
    first = start_holder(holders, root)
    assert first.line() == "held 1"
    refused = run_cli("lease", "--break", os.fspath(root))
    assert refused.returncode == 2
    assert f"pid {first.pid}" in refused.stderr and "stop it" in refused.stderr
    assert first.ask("check") == "current"


def test_a_break_leaves_alone_a_job_that_took_the_root_after_its_holder_was_judged_dead(
    root: Path,
    holders: list[Holder],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An operator breaks the lease of a holder on a machine that died; between the break's
    reading of the record and its writing, the requeued job (a real process, taking the real
    lock) takes the root over. The break changes nothing and says so: the requeued job keeps
    its lease, its lock file stays, and a third job is refused."""
    from distckpt.cli import main

    root.mkdir()
    dead = _record_as_another_machine(root, host=this_host() + "-node7")
    lock_file = RootLayout(root).lease_lock_path
    requeued: list[Holder] = []
    real_read_holder = distckpt.lease_break.read_holder

    def judged_dead_then_the_requeued_job_claims(where: str | os.PathLike[str]) -> object:
        judged = real_read_holder(where)
        # forked here: the break reads the record before it takes any lock
        requeued.append(start_holder(holders, root))
        assert requeued[-1].line() == f"held {dead.generation + 1}"
        return judged

    # A wrapper around the break's read: the read and the write are microseconds apart, and no
    # real part can schedule another process's claim between them. The claim itself is real.
    monkeypatch.setattr(
        distckpt.lease_break, "read_holder", judged_dead_then_the_requeued_job_claims
    )
    with pytest.raises(distckpt.LeaseTakenMeanwhile) as refused:
        break_lease(root)
    (job,) = requeued
    message = str(refused.value)
    assert f"judged dead as {dead.describe()}" in message
    assert "taken meanwhile by" in message and f"pid {job.pid}" in message
    assert "The lease record was left as it was" in message
    assert isinstance(refused.value, distckpt.RootInUse)
    assert refused.value.judged == replace(dead, alive=False)  # its lock was free
    assert refused.value.holder is not None and refused.value.holder.pid == job.pid
    assert job.ask("check") == "current"
    assert lock_file.exists()
    with pytest.raises(distckpt.RootInUse):
        RootLease.acquire(root)

    # The command line says so too, with exit status 2: the same race once more, with the
    # first requeued job dead and the dead machine's record written back.
    job.kill()
    _record_as_another_machine(root, host=this_host() + "-node7")
    assert main(["lease", "--break", os.fspath(root)], out=io.StringIO()) == 2
    assert len(requeued) == 2 and "taken meanwhile by" in capsys.readouterr().err
    assert requeued[-1].ask("check") == "current"


def test_a_holder_in_another_pid_namespace_of_this_machine_is_judged_by_its_lock(
    root: Path, holders: list[Holder], monkeypatch: pytest.MonkeyPatch
) -> None:
    """flock is kept per kernel, so a holder in another PID namespace of this machine is on
    this machine: alive, its lease is not broken; dead, it is taken over, also where locks
    are local to each machine (where another machine's holder would be refused)."""
    require_namespaces()
    root.mkdir()
    # forked into it, as `unshare --pid --fork --mount-proc` runs a command: no torch imported
    first = start_holder(holders, root, pid_namespace=True)
    assert (first.line(), first.line()) == ("pid 1", "held 1")
    # no mount with machine-local locks can be made here (see the test above)
    monkeypatch.setattr(distckpt.lease, "locks_local_to_machine", lambda path: True)
    with pytest.raises(distckpt.RootInUse, match="on this machine and alive"):
        break_lease(root)
    assert first.ask("check") == "current"
    first.kill()
    with RootLease.acquire(root, wait=STARTUP) as lease:
        assert lease.generation == 2


@pytest.mark.parametrize(
    "claimer",
    [
        "this machine",
        "this machine, on btrfs",
        "another machine",
        "another machine, its moved lock file removed meanwhile",
    ],
)
def test_a_break_leaves_alone_a_job_slower_to_write_its_record_than_the_break_to_probe(
    root: Path,
    holders: list[Holder],
    monkeypatch: pytest.MonkeyPatch,
    mounts: MountFactory,
    claimer: str,
) -> None:
    """A requeued job (a real process) took the lease's lock and writes its record later
    than the break waits for the lock (a loaded disk's fsync, a stopped process): the record
    still names the dead machine's holder. The break leaves the record alone, and the job its
    lock file: once it writes its record it holds the only lease, and a third job is refused
    (the break once moved the job's lock file aside for good, and a third job took the root).
    A moved lock file removed meanwhile (a cleanup) leaves the refusal standing and the
    break's lock released. On btrfs a file's device is its subvolume's, not the one
    ``/proc/locks`` names."""
    if claimer.endswith("on btrfs"):
        root = mounts.get("btrfs").path / root.parent.name
    root.mkdir()
    dead = _record_as_another_machine(root, host=this_host() + "-node7")
    requeued = start_holder(holders, root, wait=STARTUP, paused=True)
    assert requeued.line() == "locked"
    if claimer.startswith("this machine"):
        # the dead holder had the claimer's pid on its machine (fresh PID namespaces of one
        # image give the same pids): a pid names no process beyond its machine
        dead = replace(dead, pid=requeued.pid)
        atomic_write_bytes(RootLayout(root).lease_record_path, dead.to_json(), fsync=True)
    if claimer.startswith("another machine"):
        # One machine here: the lock of a claimer on another machine (an NFS client) is in no
        # /proc/locks here, nor is the job's in a PID namespace that cannot see it, where the
        # break runs below; it takes the lock for a dead machine's and moves its file aside.
        # The job writes its record right after the move (a wrapper: no real part can
        # schedule it there; the write itself is real).
        real_move_aside = distckpt.lease_break._move_aside

        def moved_aside_then_the_job_writes_its_record(where: Path) -> Path | None:
            moved_aside = real_move_aside(where)
            # an operator's gc meanwhile keeps the moved file, however old the lock file was
            assert distckpt.cli.main(["gc", os.fspath(root)], out=io.StringIO()) == 0
            assert moved_aside is not None and moved_aside.exists()
            assert requeued.ask("go") == f"held {dead.generation + 1}"
            if claimer.endswith("removed meanwhile"):
                moved_aside.unlink()
            return moved_aside

        monkeypatch.setattr(
            distckpt.lease_break, "_move_aside", moved_aside_then_the_job_writes_its_record
        )
        a_day_ago = time.time() - 86400  # a lock file made long ago: a rename keeps its age
        os.utime(RootLayout(root).lease_lock_path, (a_day_ago, a_day_ago))

    def the_break_then_whether_its_lock_is_released() -> str:
        try:
            return repr(break_lease(root))
        finally:
            if claimer.endswith("removed meanwhile"):
                # nothing to put back: the break's new lock file stays, its lock released (a
                # lock of another open file, even in this process, conflicts with it)
                with open(RootLayout(root).lease_lock_path) as lock_file:
                    fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)

    if claimer.startswith("another machine"):
        refused = in_a_pid_namespace_of_its_own(the_break_then_whether_its_lock_is_released)
        assert refused.startswith("raised LeaseTakenMeanwhile: "), refused
        assert "The lease record was left as it" in refused
    else:
        with pytest.raises(distckpt.LeaseTakenMeanwhile, match="The lease record was left as"):
            break_lease(root)
    if claimer.startswith("this machine"):
        assert requeued.ask("go") == f"held {dead.generation + 1}"
    assert requeued.ask("check") == "current"
    if not claimer.endswith("removed meanwhile"):  # its lock file is gone: see the break
        with pytest.raises(distckpt.RootInUse, match=f"pid {requeued.pid}"):
            RootLease.acquire(root)
    assert requeued.ask("check") == "current"
    assert [path.name for path in root.glob(".lease.*.lingering")] == []


def test_gc_removes_a_lease_lock_file_a_killed_break_moved_aside(
    root: Path, holders: list[Holder]
) -> None:
    """A break killed between moving a lingering lock file aside and removing it leaves the
    file behind: gc removes it once 60 s old, whether a job holds the lease or not (a break
    holding the lease lock may still be at work, and where locks do not reach, as here on
    another NFS client, that lock looks free: a young file is kept even when none looks held)."""
    from distckpt.cli import main

    root.mkdir()
    moved_aside = RootLayout(root).lingering_lease_lock_path("a" * 32)
    moved_aside.touch()
    job = start_holder(holders, root)
    assert job.line() == "held 1"
    assert main(["gc", os.fspath(root)], out=io.StringIO()) == 0
    assert moved_aside.exists()
    an_hour_ago = time.time() - 3600
    os.utime(moved_aside, (an_hour_ago, an_hour_ago))
    assert main(["gc", os.fspath(root)], out=io.StringIO()) == 0
    assert not moved_aside.exists()
    job.kill()
    moved_aside.touch()
    assert main(["gc", os.fspath(root)], out=io.StringIO()) == 0
    assert moved_aside.exists()
    os.utime(moved_aside, (an_hour_ago, an_hour_ago))
    out = io.StringIO()
    assert main(["gc", os.fspath(root)], out=out) == 0
    assert not moved_aside.exists() and f"removed {moved_aside}" in out.getvalue()


def test_a_lock_held_by_a_child_of_pid_2_in_a_pid_namespace_is_a_live_claimers(
    root: Path,
) -> None:
    """In a container started with ``docker --init`` pid 1 is tini and pid 2 the launcher,
    whose ranks hold the lease: only the kernel's flag tells a kernel thread, not a parent
    pid of 2 (which is kthreadd on the host alone)."""
    root.mkdir()
    lock_file = root / "held.lock"
    lock_file.touch()

    def seen_from_pid_1() -> str:
        ready, said_ready = os.pipe()
        launcher = os.fork()  # the namespace's pid 2, as a launcher under tini
        if launcher == 0:  # pragma: no cover - the child
            rank = os.fork()
            if rank == 0:
                with open(lock_file) as held:
                    fcntl.flock(held, fcntl.LOCK_EX)
                    os.write(said_ready, f"{os.getpid()} {os.getppid()}".encode())
                    time.sleep(STARTUP)
                os._exit(0)
            os.waitpid(rank, 0)
            os._exit(0)
        os.close(said_ready)
        pids = os.read(ready, 100).decode()
        try:
            return f"launcher {launcher}, rank and parent {pids}: " + str(
                distckpt.lease_break._locked_here(lock_file)
            )
        finally:
            os.kill(int(pids.split()[0]), signal.SIGKILL)
            os.waitpid(launcher, 0)

    assert in_a_pid_namespace_of_its_own(seen_from_pid_1) == "launcher 2, rank and parent 3 2: True"


def _locked_by_a_child(path: Path) -> int:
    """The pid of a forked child that created ``path`` and holds its flock until killed."""
    ready, said_ready = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT)
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        os.write(said_ready, b"locked")
        time.sleep(STARTUP)
        os._exit(0)
    os.close(said_ready)
    try:
        assert os.read(ready, 6) == b"locked"
    finally:
        os.close(ready)
    return child


def test_a_break_past_a_lingering_lock_leaves_alone_a_job_that_locked_the_new_file_first(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past a dead machine's lingering lock the break moves the lock file aside and locks a new
    one: a job waiting for the root that locked the new file first, and has not written its
    record yet, is left alone (``LeaseTakenMeanwhile``), the record not broken, and the file
    moved aside removed all the same."""
    root.mkdir()
    dead = _record_as_another_machine(root, host=this_host() + "-node7")
    lock_file = RootLayout(root).lease_lock_path
    # As in tests/test_lease_break_older_version.py: a process here stands in for the NFS
    # server's lingering lock, and the break is told that no process here holds it.
    monkeypatch.setattr(distckpt.lease_break, "_locked_here", lambda path: False)
    children = [_locked_by_a_child(lock_file)]
    real_move_aside = distckpt.lease_break._move_aside

    def a_waiting_job_locks_the_new_file_first(root_path: Path) -> Path | None:
        moved_aside = real_move_aside(root_path)
        children.append(_locked_by_a_child(lock_file))
        return moved_aside

    # A wrapper at the break's own seam: a waiting job polls the lock every 0.05 s, and nothing
    # real lands its poll between the move and the break's lock. The lock it takes is real.
    monkeypatch.setattr(distckpt.lease_break, "_move_aside", a_waiting_job_locks_the_new_file_first)
    try:
        with pytest.raises(distckpt.LeaseTakenMeanwhile, match="has not written its record"):
            break_lease(root)
    finally:
        for child in children:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
    assert len(children) == 2  # the break did move the lingering lock's file aside
    record = distckpt.lease.LeaseHolder.from_json(RootLayout(root).lease_record_path.read_bytes())
    assert record == dead and record.held
    assert [path.name for path in root.glob(".lease.*.lingering")] == []


def _kthreadd_pid() -> str | None:
    """The pid of ``kthreadd``, the parent of every kernel thread, found by its name (pid 2
    on a host, another pid or none in a PID namespace): None if this namespace shows none."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().startswith(f"{stat.parent.name} (kthreadd) "):
                return stat.parent.name
        except OSError:  # ended meanwhile
            continue
    return None


#: PF_KTHREAD among other flags, and the flags of a process (PF_FORKNOEXEC | PF_RANDOMIZE)
KERNEL_THREAD_FLAGS, PROCESS_FLAGS = 0x00200040, 0x00400040


def test_a_lock_held_by_a_kernel_thread_is_no_live_jobs_claim(tmp_path: Path) -> None:
    """On an NFS server its clients' locks are held by its lockd and nfsd kernel threads: a
    break run there passes over a dead client's lingering lock, which no job of the server
    holds. Read from the flags of ``/proc/<pid>/stat``, after a comm that may hold ") "."""
    for pid, flags in (("7", KERNEL_THREAD_FLAGS), ("8", PROCESS_FLAGS)):
        (tmp_path / pid).mkdir()
        stat = f"{pid} (a) b) S 2 0 0 0 -1 {flags} 0 0 0 0 1 2 0 0 20 0 1 0 5 0 0\n"
        (tmp_path / pid / "stat").write_text(stat)
    assert distckpt.lease_break._kernel_thread("7", proc=tmp_path)
    assert not distckpt.lease_break._kernel_thread("8", proc=tmp_path)
    assert not distckpt.lease_break._kernel_thread("9", proc=tmp_path)  # ended: no claim of one


def test_this_machines_kthreadd_is_a_kernel_thread_and_this_process_is_not() -> None:
    kthreadd = _kthreadd_pid()
    if kthreadd is None:  # a PID namespace (a container) shows none
        skip_or_fail("no kernel thread is visible in /proc here")
    assert distckpt.lease_break._kernel_thread(kthreadd)
    assert not distckpt.lease_break._kernel_thread(str(os.getpid()))


def test_a_lease_lock_taken_on_a_file_moved_aside_meanwhile_is_dropped_for_the_new_one(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job waiting for the lease lock may lock the file a break moves aside at that moment
    (past a dead machine's lingering lock): that lock excludes nobody, since every later job
    locks the new file. The job lets it go and tries the new file, which the break holds."""
    root.mkdir()
    lock_file = RootLayout(root).lease_lock_path
    lock_file.touch()
    breaks: list[int] = []
    real_flock = distckpt.lease._flock

    def moved_aside_as_it_is_locked(
        path: Path, timeout: float, *, on_acquired: Callable[[int], None] | None = None
    ) -> filelock.BaseFileLock:
        def then(descriptor: int) -> None:
            if not breaks:  # the first lock only
                os.rename(lock_file, RootLayout(root).lingering_lease_lock_path("a" * 32))
                breaks.append(_locked_by_a_child(lock_file))  # the break's, of the new file
            assert on_acquired is not None
            on_acquired(descriptor)

        return real_flock(path, timeout, on_acquired=then)

    # A wrapper at the lease's own seam: nothing real moves the file aside between the job's
    # opening it and locking it. The move and both locks are real.
    monkeypatch.setattr(distckpt.lease, "_flock", moved_aside_as_it_is_locked)
    try:
        assert distckpt.lease._try_lock(lock_file, 0) is None
    finally:
        for child in breaks:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
    assert breaks
