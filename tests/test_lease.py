"""The root's writer lease between real processes: exclusion, waiting, a SIGKILLed holder,
fencing after an operator breaks a lease, and a worker noticing that its launcher died.

Every holder is a separate ``python`` process driven through its stdin; every process a test
starts is killed by its pid when the test ends.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import fields as dataclass_fields
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import distckpt
import distckpt.lease
import distckpt.lease_break
from distckpt.fsutil import atomic_write_bytes
from distckpt.launcher import LauncherWatch
from distckpt.layout import LEASE_RECORD_NAME, RootLayout
from distckpt.lease import (
    LeaseHolder,
    RootLease,
    _boot_id,
    read_holder,
    this_host,
)
from distckpt.lease_break import break_lease
from distckpt.lock import RootLock, WriterLock, locks_local_to_machine
from tests.filesystems import MountFactory

STARTUP = 30.0  # a process that has not answered by then counts as hung (a loaded machine)

_HOLDER = textwrap.dedent(
    """
    import sys
    from distckpt.errors import CheckpointError
    from distckpt.lease import RootLease

    if sys.argv[3:] == ["announce"]:
        print("acquiring", flush=True)  # imports done: the acquire starts now
    try:
        lease = RootLease.acquire(sys.argv[1], wait=float(sys.argv[2]))
    except CheckpointError as exc:
        print("refused", type(exc).__name__, exc, flush=True)
        sys.exit(3)
    print("held", lease.generation, flush=True)
    for line in sys.stdin:
        if line.strip() == "check":
            try:
                lease.check_current()
                print("current", flush=True)
            except CheckpointError as exc:
                print("lost", type(exc).__name__, exc, flush=True)
        elif line.strip() == "release":
            lease.release()
            print("released", flush=True)
    """
)


class Holder:
    """A process that takes a root's lease and answers ``check`` and ``release``."""

    def __init__(
        self,
        root: Path,
        *,
        wait: float = 0.0,
        prefix: tuple[str, ...] = (),
        announce: bool = False,
    ) -> None:
        """``announce``: it first prints "acquiring", when its acquire starts."""
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-c", _HOLDER, os.fspath(root), str(wait)]
            + (["announce"] if announce else []),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def line(self, timeout: float = STARTUP) -> str:
        """The next line it prints; "" when none came within ``timeout`` or it exited."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().strip() if ready else ""

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.line()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=STARTUP)


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    started: list[Holder] = []
    yield started
    for holder in started:
        holder.kill()


def _start(holders: list[Holder], root: Path, **options: object) -> Holder:
    holder = Holder(root, **options)  # type: ignore[arg-type]
    holders.append(holder)
    return holder


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The command line run in this process (a process of its own would spend seconds
    importing torch), with its exit status and what it wrote to stdout and to stderr. What it
    judges of a holder is the same: a lease's lock is taken through a file descriptor of its
    own, which another of this process's descriptors holding it excludes too."""
    from distckpt.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = main(list(args), out=stdout)
    return subprocess.CompletedProcess(
        ["distckpt", *args], status, stdout.getvalue(), stderr.getvalue()
    )


def test_second_job_is_refused_naming_the_holder(root: Path, holders: list[Holder]) -> None:
    root.mkdir()
    first = _start(holders, root)
    assert first.line() == "held 1"
    second = _start(holders, root)
    answer = second.line()
    assert answer.startswith("refused RootInUse")
    assert f"root {root} is in use by" in answer
    assert f"pid {first.pid}" in answer and "on host" in answer and "since" in answer
    assert second.proc.wait(timeout=STARTUP) == 3
    assert first.ask("check") == "current"  # the refused job changed nothing
    shown = _cli("lease", os.fspath(root))
    assert f"pid {first.pid}" in shown.stdout and "(alive)" in shown.stdout


def test_two_jobs_starting_at_once_one_wins(root: Path, holders: list[Holder]) -> None:
    root.mkdir()
    racers = [_start(holders, root), _start(holders, root)]
    answers = [racer.line() for racer in racers]
    assert sorted(answer.split()[0] for answer in answers) == ["held", "refused"]
    winner = racers[answers.index("held 1")]
    loser_answer = next(answer for answer in answers if answer.startswith("refused"))
    assert "RootInUse" in loser_answer and f"pid {winner.pid}" in loser_answer


def test_a_waiting_job_proceeds_when_the_holder_ends(root: Path, holders: list[Holder]) -> None:
    root.mkdir()
    first = _start(holders, root)
    assert first.line() == "held 1"
    second = _start(holders, root, wait=STARTUP)
    assert second.line(timeout=1.5) == ""  # still waiting
    assert first.ask("release") == "released"
    assert second.line() == "held 2"
    assert "lost" in first.ask("check")  # released: it may not commit any more


def test_a_sigkilled_holder_blocks_nobody(root: Path, holders: list[Holder]) -> None:
    root.mkdir()
    first = _start(holders, root)
    assert first.line() == "held 1"
    first.kill()
    holder = read_holder(root)
    assert holder is not None and holder.pid == first.pid and holder.alive is False
    assert "dead: the next writer takes over" in _cli("ls", os.fspath(root)).stdout
    began = time.monotonic()
    lease = RootLease.acquire(root)  # no wait, no manual step
    try:
        assert time.monotonic() - began < 5
        assert lease.generation == 2 and lease.holder.pid == os.getpid()
        listed = json.loads(_cli("ls", "--json", os.fspath(root)).stdout)
        assert listed["lease"]["generation"] == 2 and listed["lease"]["alive"] is True
    finally:
        lease.release()
    assert read_holder(root) is None
    assert "lease: none" in _cli("ls", os.fspath(root)).stdout


def test_an_exception_in_the_loop_releases_the_lease(root: Path) -> None:
    root.mkdir()
    with pytest.raises(ZeroDivisionError), RootLease.acquire(root):
        raise ZeroDivisionError  # the training loop failing
    record = json.loads((root / LEASE_RECORD_NAME).read_text())
    assert record["released_utc"] is not None
    with RootLease.acquire(root) as lease:
        assert lease.generation == 2


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
    done = subprocess.run(
        [sys.executable, "-c", _FORKING_WHILE_LOCKING, os.fspath(tmp_path), str(rounds)],
        capture_output=True,
        text=True,
        timeout=STARTUP * 2,
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == 0, f"{done.stdout.strip()} of {rounds} children held the lock"


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


def _on_another_host() -> tuple[str, ...]:
    """A prefix that runs a command under another host name: a UTS namespace of its own. This
    machine is the only one here, so a second machine is a second host name on the same kernel
    (locks still reach it, which breaking a lease does not rely on)."""
    unshare = shutil.which("unshare")
    prefix = (unshare or "unshare", "--uts", "--user", "--map-root-user", "sh", "-c")
    if unshare is None:
        pytest.skip("needs unshare(1) to give a process another host name")
    probe = subprocess.run(
        [*prefix, "hostname node-a && hostname"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0 or probe.stdout.strip() != "node-a":
        pytest.skip(f"cannot make a UTS namespace here: {probe.stderr.strip()}")
    return (*prefix, 'hostname node-a && exec "$0" "$@"')


def test_a_broken_lease_fences_its_holder(root: Path, holders: list[Holder]) -> None:
    root.mkdir()
    elsewhere = _start(holders, root, prefix=_on_another_host())
    assert elsewhere.line() == "held 1"
    assert elsewhere.ask("check") == "current"

    broke = _cli("lease", "--break", os.fspath(root))
    assert broke.returncode == 0, broke.stderr
    assert "broke the lease of" in broke.stdout and "host node-a" in broke.stdout
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
    first = _start(holders, root)
    assert first.line() == "held 1"
    refused = _cli("lease", "--break", os.fspath(root))
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
        requeued.append(_start(holders, root))
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


def _in_another_pid_namespace() -> tuple[str, ...]:
    """A prefix that runs a command in a PID namespace of its own on this machine (a
    container sharing the host's hostname): its pids name other processes than ours."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs unshare(1) for a PID namespace")
    # --kill-child: the command dies with unshare, which the test kills by its pid
    return (unshare, "--pid", "--fork", "--mount-proc", "--kill-child")


def test_a_holder_in_another_pid_namespace_of_this_machine_is_judged_by_its_lock(
    root: Path, holders: list[Holder], monkeypatch: pytest.MonkeyPatch
) -> None:
    """flock is kept per kernel, so a holder in another PID namespace of this machine is on
    this machine: alive, its lease is not broken; dead, it is taken over, also where locks
    are local to each machine (where another machine's holder would be refused)."""
    root.mkdir()
    first = _start(holders, root, prefix=_in_another_pid_namespace())
    assert first.line() == "held 1"
    # no mount with machine-local locks can be made here (see the test above)
    monkeypatch.setattr(distckpt.lease, "locks_local_to_machine", lambda path: True)
    with pytest.raises(distckpt.RootInUse, match="on this machine and alive"):
        break_lease(root)
    assert first.ask("check") == "current"
    first.kill()
    with RootLease.acquire(root, wait=STARTUP) as lease:
        assert lease.generation == 2


#: The package of an older version (commit e3b8cf7), whose lease records have no boot id and
#: whose ``lease --break`` breaks a holder unless its host is this hostname (see
#: tests/test_s3_set_aside.py, which keeps it for the same reason: a shallow clone lacks
#: history).
OLDER_VERSION_ARCHIVE = Path(__file__).parent / "fixtures/older-version/distckpt-e3b8cf7.tar.xz"


def test_an_older_versions_break_refuses_a_live_holder_of_this_version_on_this_machine(
    root: Path, holders: list[Holder], tmp_path: Path
) -> None:
    """This version's record keeps the keys an older version decodes (it ignores the boot id)
    and the plain hostname it compares: its ``lease --break`` finds the holder on its machine
    and alive, and refuses."""
    older = tmp_path / "older"
    with tarfile.open(OLDER_VERSION_ARCHIVE) as tar:
        tar.extractall(older, filter="data")
    root.mkdir()
    first = _start(holders, root)
    assert first.line() == "held 1"
    refused = subprocess.run(
        [sys.executable, "-m", "distckpt", "lease", "--break", os.fspath(root)],
        env=dict(os.environ, PYTHONPATH=os.fspath(older)),
        cwd=older,
        capture_output=True,
        text=True,
        timeout=STARTUP,
    )
    assert refused.returncode == 2, refused.stderr
    assert f"pid {first.pid}" in refused.stderr and "stop it" in refused.stderr
    assert first.ask("check") == "current"


_LINGERING_LOCK = textwrap.dedent(
    """
    import fcntl, os, sys, time

    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(600)
    """
)


@pytest.mark.parametrize("waiting_version", ["this", "older"])
def test_a_break_past_a_lingering_lock_leaves_the_requeued_job_one_lease(
    root: Path,
    holders: list[Holder],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    waiting_version: str,
) -> None:
    """On NFS a dead machine's lock lingers until the server's lease ends, and the operator
    breaks the lease meanwhile, while the requeued job waits for the lock (``wait_for_root``,
    of this version or an older one). The lingering lock ends at the worst moment, just as the
    break writes the record: the break holds the lock of a new lock file by then, so the
    requeued job claims the root after the break, on the file every later job locks. It holds
    the only lease, generation 4; a third job is refused."""
    root.mkdir()
    dead = _record_as_another_machine(root, host=this_host() + "-node7")
    lock_file = RootLayout(root).lease_lock_path
    # No NFS server here whose lease of a dead client's lock could be let run out: a process
    # holding the flock of the lock file stands in for it, as that lock looks the same from
    # here (held by no process the break can judge), until the process is killed.
    lingering = subprocess.Popen(
        [sys.executable, "-c", _LINGERING_LOCK, os.fspath(lock_file)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert lingering.stdout is not None and lingering.stdout.readline().strip() == "locked"
        prefix: tuple[str, ...] = ()
        if waiting_version == "older":
            older = tmp_path / "older"
            with tarfile.open(OLDER_VERSION_ARCHIVE) as tar:
                tar.extractall(older, filter="data")
            # its own directory first on the path, so that it imports its own package
            prefix = ("env", "-C", os.fspath(older), f"PYTHONPATH={older}")
        requeued = _start(holders, root, wait=STARTUP, prefix=prefix, announce=True)
        assert requeued.line() == "acquiring"
        claimed_during_the_write: list[str] = []
        real_write = distckpt.lease_break.atomic_write_bytes

        def the_lingering_lock_ends_as_the_break_writes(
            path: Path, data: bytes, **kw: bool
        ) -> None:
            lingering.kill()
            lingering.wait(timeout=STARTUP)
            # a job polling a free lock takes it within a few of filelock's 0.05 s polls
            claimed_during_the_write.append(requeued.line(timeout=2.0))
            real_write(path, data, **kw)

        # A wrapper around the break's write: no real part can end the lingering lock between
        # the break's re-reading of the record and its writing. The end itself is real.
        monkeypatch.setattr(
            distckpt.lease_break, "atomic_write_bytes", the_lingering_lock_ends_as_the_break_writes
        )
        try:
            broken = break_lease(root)
        except distckpt.LeaseTakenMeanwhile:
            # It took the new lock file in the instant between its making and the break's
            # lock (it polls every 0.05 s): the break then changes nothing, also one lease.
            assert claimed_during_the_write == []
        else:
            assert broken is not None and broken.token == dead.token and broken.broken_utc
            assert claimed_during_the_write == [""]  # it waited for the break's lock
    finally:
        if lingering.poll() is None:
            lingering.kill()
        lingering.wait(timeout=STARTUP)
    assert requeued.line() == f"held {dead.generation + 1}"
    assert requeued.ask("check") == "current"
    assert lock_file.exists()
    assert [path.name for path in root.glob(".lease.*.lingering")] == []
    with pytest.raises(distckpt.RootInUse):
        RootLease.acquire(root)
    assert requeued.ask("check") == "current"


def test_gc_removes_a_lease_lock_file_a_killed_break_moved_aside(
    root: Path, holders: list[Holder]
) -> None:
    """A break killed between moving a lingering lock file aside and removing it leaves the
    file behind: gc removes it, once 60 s old while a job holds the lease (a break holding it
    may still be at work), at once when nobody holds it."""
    from distckpt.cli import main

    root.mkdir()
    moved_aside = RootLayout(root).lingering_lease_lock_path("a" * 32)
    moved_aside.touch()
    job = _start(holders, root)
    assert job.line() == "held 1"
    assert main(["gc", os.fspath(root)], out=io.StringIO()) == 0
    assert moved_aside.exists()
    an_hour_ago = time.time() - 3600
    os.utime(moved_aside, (an_hour_ago, an_hour_ago))
    assert main(["gc", os.fspath(root)], out=io.StringIO()) == 0
    assert not moved_aside.exists()
    job.kill()
    moved_aside.touch()
    out = io.StringIO()
    assert main(["gc", os.fspath(root)], out=out) == 0
    assert not moved_aside.exists() and f"removed {moved_aside}" in out.getvalue()


_LAUNCHER = textwrap.dedent(
    """
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
    print(child.pid, flush=True)
    time.sleep(600)
    """
)
_WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from distckpt.errors import LauncherGone
    from distckpt.launcher import LauncherWatch

    out = Path(sys.argv[1])
    watch = LauncherWatch()
    out.write_text(f"started {watch.launcher_gone()}")
    deadline = time.monotonic() + 60
    while not watch.launcher_gone() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        watch.check()
        out.write_text("not gone")
    except LauncherGone as exc:
        out.write_text(f"LauncherGone {exc}")
    """
)


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
    launcher = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, _WORKER, os.fspath(report)],
        stdout=subprocess.PIPE,
        text=True,
    )
    worker_pid = 0
    try:
        assert launcher.stdout is not None
        worker_pid = int(launcher.stdout.readline())
        assert _wait_for_text(report, "started") == "started False"
        os.kill(launcher.pid, signal.SIGKILL)  # the agent dies; its worker lives on
        launcher.wait(timeout=STARTUP)
        gone = _wait_for_text(report, "LauncherGone")
        assert f"parent pid {launcher.pid}" in gone and "orphan" in gone
    finally:
        if launcher.poll() is None:
            os.kill(launcher.pid, signal.SIGKILL)
            launcher.wait(timeout=STARTUP)
        if worker_pid:
            with contextlib.suppress(ProcessLookupError):  # it may have finished on its own
                os.kill(worker_pid, signal.SIGKILL)


def test_launcher_watch_only_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert LauncherWatch.for_this_process() is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    watch = LauncherWatch.for_this_process()
    assert watch is not None and watch.parent_pid == os.getppid() and not watch.launcher_gone()


def test_machine_local_lock_mounts_are_recognised(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
        "2 1 0:50 / /nfs rw,relatime - nfs4 srv:/x rw,vers=4.2,local_lock=all,addr=10.0.0.1\n"
        "3 1 0:51 / /nfs/locked rw - nfs4 srv:/y rw,vers=4.2,local_lock=none\n"
        "4 1 0:52 / /lustre rw shared:3 - lustre mgs@tcp:/fs rw,localflock\n"
    )
    assert locks_local_to_machine(Path("/nfs/run"), mountinfo)
    assert not locks_local_to_machine(Path("/nfs/locked/run"), mountinfo)
    assert locks_local_to_machine(Path("/lustre/a/b"), mountinfo)
    assert not locks_local_to_machine(Path("/home/run"), mountinfo)
    assert not locks_local_to_machine(tmp_path)  # this machine's own mounts


def test_errors_are_checkpoint_errors() -> None:
    assert issubclass(distckpt.RootInUse, BlockingIOError)
    assert issubclass(distckpt.LeaseLost, RuntimeError)
    assert issubclass(distckpt.LauncherGone, RuntimeError)
    for error in (distckpt.RootInUse, distckpt.LeaseLost, distckpt.LauncherGone):
        assert issubclass(error, distckpt.CheckpointError)


def _record_as_another_machine(root: Path, host: str, boot_id: str | None = None) -> LeaseHolder:
    """Write the lease record a job holding ``root`` from machine ``host`` writes (the
    module's own record format); its lock lives on that machine, not here."""
    holder = LeaseHolder(
        host=host,
        boot_id=boot_id,
        pid=4242,
        job_id="job-on-node-b",
        started_utc="2026-01-01T00:00:00+00:00",
        generation=3,
        token="0" * 32,
    )
    atomic_write_bytes(RootLayout(root).lease_record_path, holder.to_json(), fsync=True)
    return holder


@pytest.mark.parametrize("wait", [0.0, 0.6])
def test_a_holder_on_another_machine_is_refused_where_locks_are_local_to_each_machine(
    root: Path, monkeypatch: pytest.MonkeyPatch, wait: float
) -> None:
    root.mkdir()
    holder = _record_as_another_machine(root, host=this_host() + "-node-b")
    # No NFS or Lustre driver on the test machines, so no mount with machine-local locks
    # (``local_lock=all``, ``localflock``) can be made; the mountinfo parsing that detects one is
    # tested on its own (test_machine_local_lock_mounts_are_recognised).
    monkeypatch.setattr(distckpt.lease, "locks_local_to_machine", lambda path: True)
    started = time.monotonic()
    with pytest.raises(distckpt.RootInUse) as refused:
        distckpt.CheckpointManager(root, wait_for_root=wait, timeout=STARTUP)
    assert time.monotonic() - started >= wait
    assert isinstance(refused.value, BlockingIOError)
    assert refused.value.holder == holder
    message = str(refused.value)
    assert f"root {root} is in use by {holder.describe()}" in message
    assert "locks on this filesystem are local to each machine" in message
    assert f"distckpt lease {root} --break" in message
    assert not (root / "step-00000001").exists()
    assert read_holder(root) == replace(holder, alive=None)  # the record is left as it was

    # An operator who knows that machine's job is dead breaks its lease: the root opens.
    broken = break_lease(root)
    assert broken is not None and broken.token == holder.token and broken.broken_utc
    # the break held the lock file (that machine's lock does not reach it here): kept, so
    # that a job waiting on it and a job opening it later lock the same file
    assert RootLayout(root).lease_lock_path.exists()
    with distckpt.CheckpointManager(root, timeout=STARTUP) as mgr:
        assert mgr.save(1, {"w": torch.zeros(2)}) is not None
        now = read_holder(root)
        assert now is not None and now.host == this_host() and now.generation == 4


#: a boot id no machine here has: the boot of another machine (or another boot of this one)
_ANOTHER_BOOT_ID = "00000000-0000-4000-8000-000000000000"


@pytest.mark.parametrize(
    ("host", "boot_id", "taken_over"),
    [
        (this_host, lambda: None, True),  # an older version's record: hostname, no boot id
        (this_host, _boot_id, True),
        (this_host, lambda: _ANOTHER_BOOT_ID, False),  # same name, another machine or boot
        (lambda: this_host() + "-node-b", _boot_id, False),
    ],
    ids=["older-writer", "this-machine", "other-boot", "other-hostname"],
)
def test_where_locks_are_local_a_dead_holder_is_taken_over_only_on_this_machine(
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    host: Callable[[], str],
    boot_id: Callable[[], str | None],
    taken_over: bool,
) -> None:
    """The lock of a holder whose record names this hostname and this boot (or no boot id, an
    older version's record) tells whether it lives: free, so it is dead and taken over. Any
    other machine's holder, even under this hostname, is refused: its lock is on its machine."""
    root.mkdir()
    holder = _record_as_another_machine(root, host=host(), boot_id=boot_id())
    # as in the test above: no mount with machine-local locks can be made here
    monkeypatch.setattr(distckpt.lease, "locks_local_to_machine", lambda path: True)
    if not taken_over:
        with pytest.raises(distckpt.RootInUse, match="local to each machine"):
            RootLease.acquire(root)
        return
    with RootLease.acquire(root) as lease:
        assert lease.generation == holder.generation + 1


@pytest.mark.parametrize(
    "record", [b"null", b"[]", b'"x"', b"3"], ids=["null", "list", "str", "int"]
)
def test_a_lease_record_that_is_json_but_no_object_is_unreadable_and_ignored(
    tmp_path: Path, record: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """ "An unreadable record is logged and ignored": valid JSON that is not an object names
    nobody either, so it blocks neither a job opening the root nor the CLI reading it."""
    from distckpt.cli import main

    root = tmp_path / "root"
    root.mkdir()
    (root / LEASE_RECORD_NAME).write_bytes(record)
    assert read_holder(root) is None
    assert any("unreadable lease record" in r.getMessage() for r in caplog.records)
    for command in ("ls", "lease"):
        assert main([command, str(root)], out=io.StringIO()) == 0, command
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        assert mgr.save(1, {"w": torch.ones(1)}).step == 1
        holder = read_holder(root)
        assert holder is not None and holder.pid == os.getpid()  # its own record replaced it


#: a line of ``/proc/self/mountinfo`` for an NFS mount whose locks stay on each machine
_LOCAL_LOCKS_MOUNT = (
    "4242 1 0:4242 / {mount_point} rw,relatime - nfs srv:/export "
    "rw,vers=3,nolock,local_lock=all,addr=10.0.0.1\n"
)


def _on_another_machine_named_like_this_one(mount_point: Path, scratch: Path) -> tuple[str, ...]:
    """A prefix that runs a command as if on another machine with this one's hostname (a pod
    recreated on another node), where ``mount_point`` is NFS mounted with machine-local locks:
    a PID namespace of its own (its pids name other processes than ours), a UTS namespace
    given this hostname, and a mount namespace in which its ``/proc/self/mountinfo`` says
    ``local_lock=all`` for ``mount_point`` and its boot id is another machine's. The mountinfo
    line and the boot id are the things not real: no NFS server nor second kernel can be made
    on the test machines; the unshared locks are (bindfs)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs unshare(1) for the namespaces of another machine")
    fake_mountinfo, fake_boot_id = scratch / "mountinfo", scratch / "boot_id"
    fake_boot_id.write_text(_ANOTHER_BOOT_ID + "\n")
    line = _LOCAL_LOCKS_MOUNT.format(mount_point=os.path.realpath(mount_point))
    script = (
        f'cat /proc/$$/mountinfo > {fake_mountinfo} && echo -n "{line}" >> {fake_mountinfo} '
        f"&& mount --bind {fake_mountinfo} /proc/$$/mountinfo && hostname {this_host()} "
        f"&& mount --bind {fake_boot_id} /proc/sys/kernel/random/boot_id "
        '&& exec "$0" "$@"'
    )
    # --kill-child: the command dies with unshare, which the test kills by its pid
    return (unshare, "--uts", "--pid", "--mount-proc", "--kill-child", "sh", "-c", script)


def test_a_live_holder_on_another_machine_with_the_same_hostname_is_not_taken_over(
    mounts: MountFactory, tmp_path: Path, holders: list[Holder]
) -> None:
    """Where locks stay on each machine, a holder whose record names another machine is
    refused, never taken over, even when that machine has this one's hostname: the record
    carries the boot id beside the hostname. Two machines here: this
    process's, on a directory, and another one's on a bindfs view of it, whose ``flock`` does
    not reach the directory (as two NFS clients' locks do not reach each other)."""
    bindfs = mounts.get("bindfs")
    assert bindfs.writable_source is not None
    here, there = bindfs.writable_source / "same-name", bindfs.path / "same-name"
    here.mkdir()
    first = _start(holders, here)
    assert first.line() == "held 1"
    record = json.loads((here / LEASE_RECORD_NAME).read_text())
    assert record["host"] == this_host() and record["boot_id"] == _boot_id()
    assert set(record) == {f.name for f in dataclass_fields(LeaseHolder)} - {"alive"}

    elsewhere = _on_another_machine_named_like_this_one(bindfs.path, tmp_path)
    second = _start(holders, there, prefix=elsewhere)
    refused = second.line()
    assert refused.startswith("refused RootInUse"), refused
    assert "locks on this filesystem are local to each machine" in refused
    assert f"pid {first.pid}" in refused
    assert first.ask("check") == "current"
