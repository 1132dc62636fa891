"""What the lease tests share: a holder of a root's lease as a process of its own, driven
through its stdin (``tests/test_lease.py``, ``tests/test_lease_break.py``), and prefixes that
run a command as if on another host or another machine.

A holder is forked from the test's process unless it asks for a ``python`` of its own (a
prefix, or ``fresh_interpreter``). A forked holder does not end as a real process does: it
ends with ``os._exit``, so no interpreter shutdown and none of distckpt's exit hooks run in it
(the test's process's hooks are not the holder's to run). A test that looks at how a holder
ends (its exit status, what it does at exit) starts that holder with ``fresh_interpreter``.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import pytest

from distckpt.fsutil import atomic_write_bytes
from distckpt.layout import RootLayout
from distckpt.lease import (
    LeaseHolder,
    this_host,
)
from tests.filesystems import skip_or_fail

STARTUP = 30.0  # a process that has not answered by then counts as hung (a loaded machine)

_HOLDER = textwrap.dedent(
    """
    import sys
    from distckpt.errors import CheckpointError
    from distckpt.lease import RootLease

    if sys.argv[3:] == ["announce"]:
        print("acquiring", flush=True)  # imports done: the acquire starts now
    try:
        if sys.argv[3:] == ["paused"]:
            # a claim slower than a break's probe between its lock and its record (a loaded
            # disk's fsync, a stopped process): the record is written at the line "go"
            from pathlib import Path
            from distckpt.lease import _lock_path, _read_record, _try_lock

            lock = _try_lock(_lock_path(Path(sys.argv[1])), float(sys.argv[2]))
            print("locked" if lock is not None else "refused", flush=True)
            sys.stdin.readline()
            lease = RootLease._claim(Path(sys.argv[1]), lock, _read_record(Path(sys.argv[1])))
        else:
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


class _ForkedHolder:
    """The holder script run in a child forked from this process, where a fresh interpreter
    would spend seconds importing torch: a process of its own (its own pid, its own lock's
    file descriptor), answering through pipes as :class:`subprocess.Popen` does, and holding
    no other descriptor of this process (so none of its locks, nor the pipes of the holders
    forked before it). It ends with ``os._exit``: see the module's docstring."""

    def __init__(
        self, argv: list[str], *, pid_namespace: bool = False, host: str | None = None
    ) -> None:
        """``pid_namespace``: it runs as pid 1 of a PID namespace of its own (see
        :func:`_become_pid_1_of_a_pid_namespace_of_its_own`) and first prints ``pid N``, its
        pid there. ``host``: it runs under that host name, in a UTS namespace of its own."""
        child_stdin, to_child = os.pipe()
        from_child, child_stdout = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            status = 1
            try:
                if host is not None:
                    _become_host(host)
                if pid_namespace:
                    _become_pid_1_of_a_pid_namespace_of_its_own()
                os.dup2(child_stdin, 0)
                os.dup2(child_stdout, 1)
                # the objects of this process that own a descriptor closed below must never
                # close it again: the number may by then be the holder's lock's
                gc.freeze()
                sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the child's whole life
                sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - the child's whole life
                sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 - the child's whole life
                # none of this process's descriptors, as Popen's child (which execs) holds
                # none: a copy of an earlier holder's stdin would keep that stdin open after
                # the test closed it, a copy of a lock's descriptor would share the lock
                os.closerange(3, os.sysconf("SC_OPEN_MAX"))
                sys.argv = argv
                if pid_namespace:
                    print("pid", os.getpid(), flush=True)
                exec(compile(_HOLDER, "<holder>", "exec"), {"__name__": "__main__"})
                status = 0
            except SystemExit as exc:
                status = _exit_status(exc)
            except BaseException:
                traceback.print_exc()
            finally:
                with contextlib.suppress(BaseException):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(status)
        os.close(child_stdin)
        os.close(child_stdout)
        self.pid = pid
        self.stdin: TextIO | None = open(to_child, "w")  # noqa: SIM115 - closed by kill()
        self.stdout: TextIO | None = open(from_child)  # noqa: SIM115 - closed by kill()
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int:
        """Its exit status (negative: the signal that ended it); raises TimeoutError when it
        has not ended within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while (status := self.poll()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"holder {self.pid} did not end within {timeout} s")
            time.sleep(0.01)
        return status

    def close(self) -> None:
        for pipe in (self.stdin, self.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):  # the child is gone: a write may be lost
                    pipe.close()


def _exit_status(exit: SystemExit) -> int:
    """The exit status Python gives a process ended by ``exit``: its code when an int, 0 for
    None, else 1 with the code written to stderr (as ``sys.exit("message")``)."""
    if exit.code is None:
        return 0
    if isinstance(exit.code, int):
        return exit.code & 0xFF
    print(exit.code, file=sys.stderr)
    return 1


class Holder:
    """A process that takes a root's lease and answers ``check`` and ``release``."""

    def __init__(
        self,
        root: Path,
        *,
        wait: float = 0.0,
        prefix: tuple[str, ...] = (),
        announce: bool = False,
        paused: bool = False,
        fresh_interpreter: bool = False,
        pid_namespace: bool = False,
        host: str | None = None,
    ) -> None:
        """``announce``: it first prints "acquiring", when its acquire starts. ``paused``: it
        takes the lease's lock (within ``wait`` seconds), prints "locked", and writes its
        record only once told "go" (a claimer that is slow between the two). Forked from this
        process (:class:`_ForkedHolder`) unless ``prefix`` runs it (another host, namespace or
        version) or ``fresh_interpreter`` is set: then a ``python`` of its own, which ends as
        a real process does (its interpreter's shutdown, distckpt's exit hooks).
        ``pid_namespace`` (a forked holder only): it is pid 1 of a PID namespace of its own and
        first prints ``pid 1``, as under ``unshare --pid --fork --mount-proc``. ``host`` (a
        forked holder only): it runs under that host name, as under ``unshare --uts`` given
        ``hostname HOST`` (another host: :func:`_on_another_host`'s, without its fresh
        ``python``)."""
        argv = [os.fspath(root), str(wait)] + (["announce"] if announce else [])
        argv += ["paused"] if paused else []
        self.proc: subprocess.Popen[str] | _ForkedHolder
        if prefix or fresh_interpreter:
            assert not pid_namespace and host is None, "a forked holder's options"
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-c", _HOLDER, *argv],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        else:
            self.proc = _ForkedHolder(["-c", *argv], pid_namespace=pid_namespace, host=host)

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
        if isinstance(self.proc, _ForkedHolder):
            self.proc.close()


def start_holder(holders: list[Holder], root: Path, **options: object) -> Holder:
    """A :class:`Holder` of ``root``'s lease, added to ``holders`` (the ``holders`` fixture
    kills each when the test ends)."""
    holder = Holder(root, **options)  # type: ignore[arg-type]
    holders.append(holder)
    return holder


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


#: a boot id no machine here has: the boot of another machine (or another boot of this one)
_ANOTHER_BOOT_ID = "00000000-0000-4000-8000-000000000000"


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


#: unshare(2)'s flags for namespaces of the caller's own (linux/sched.h): mounts, host name, pids
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWPID = 0x20000000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
_PR_SET_PDEATHSIG = 1


def _become_host(name: str) -> None:
    """Run under host name ``name`` from now on, in a UTS namespace of this process's own."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUTS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUTS)")
    socket.sethostname(name)


def _unshare_mount_and_pid_namespaces(libc: ctypes.CDLL) -> None:
    """Give this process a mount namespace of its own (mounts made in it stay in it) and its
    next child a PID namespace of its own, of which that child is the first process, pid 1."""
    # the mount namespace first: /proc is mounted anew in it, for the new PID one
    if libc.unshare(CLONE_NEWNS | CLONE_NEWPID) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS | CLONE_NEWPID)")
    if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /")


def _mount_proc_of_this_pid_namespace(libc: ctypes.CDLL) -> None:
    """In the first process of a PID namespace: a ``/proc`` that shows that namespace."""
    if libc.mount(b"proc", b"/proc", b"proc", 0, None) != 0:
        raise OSError(ctypes.get_errno(), "mount -t proc proc /proc")


def _become_pid_1_of_a_pid_namespace_of_its_own() -> None:
    """In a forked child, as ``unshare --pid --fork --mount-proc --kill-child`` runs a command:
    returns in the first process (pid 1) of a PID namespace of its own, with a ``/proc`` of its
    own, which dies with this child; this child waits for it and ends with its status."""
    libc = ctypes.CDLL(None, use_errno=True)
    _unshare_mount_and_pid_namespaces(libc)
    inner = os.fork()
    if inner != 0:
        # none of the pipes: the holder's end closes them for whoever reads them
        os.closerange(0, os.sysconf("SC_OPEN_MAX"))
        _, status = os.waitpid(inner, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    _mount_proc_of_this_pid_namespace(libc)


def in_a_pid_namespace_of_its_own(call: Callable[[], str]) -> str:
    """What ``call`` returns, or "raised <its exception's type>: <message>", run in a process
    forked from this one into a PID namespace of its own with a ``/proc`` of its own, as
    ``unshare --pid --fork --mount-proc`` runs a command (a fresh interpreter would spend
    seconds importing torch): its ``/proc/locks`` hides the locks of every process outside
    that namespace. Fails (skips outside CI) where namespaces cannot be made."""
    libc = ctypes.CDLL(None, use_errno=True)
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(reader)
        with os.fdopen(writer, "w") as report:
            try:
                _unshare_mount_and_pid_namespaces(libc)
                inner = os.fork()  # the namespace's first process, its pid 1
                if inner == 0:
                    try:
                        _mount_proc_of_this_pid_namespace(libc)
                        report.write("ok " + call())
                    except BaseException as exc:
                        report.write(f"raised {type(exc).__name__}: {exc}")
                    finally:
                        report.flush()
                        os._exit(0)
                os.waitpid(inner, 0)
            except BaseException as exc:
                report.write(f"no namespace: {exc}")
            finally:
                report.flush()
                os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as report:
        said = report.read()
    os.waitpid(pid, 0)
    if said.startswith("no namespace: "):
        skip_or_fail(f"cannot make a PID namespace here: {said.removeprefix('no namespace: ')}")
    return said.removeprefix("ok ")


def _took_a_host_name() -> str:
    _become_host("node-probe")
    return "ok"


def require_namespaces() -> None:
    """Skip (in CI: fail), saying why, where a forked holder cannot run under a host name of
    its own or as pid 1 of a PID namespace with a ``/proc`` of its own: its child would
    otherwise fail with nothing but a traceback in its stderr."""
    said = in_a_pid_namespace_of_its_own(_took_a_host_name)  # skips or fails without one
    if said != "ok":
        skip_or_fail(f"cannot give a process a host name or a /proc of its own here: {said}")
