"""Recording the file-system system calls of a workload with ``strace``."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.apt import OTHER_TOOL_PACKAGES, AptFailed, apt_unavailable_reason, install_missing_tools

# Every call that changes what a power loss may leave, plus what is needed to follow file
# offsets (openat, lseek, close). -y prints each descriptor's path; -xx prints every string
# (paths and written bytes) in hex, so nothing is ambiguous; -s makes written data complete.
TRACED_CALLS = (
    "openat,creat,open,write,pwrite64,writev,pwritev,pwritev2,lseek,close,ftruncate,truncate,"
    "fsync,fdatasync,mkdir,mkdirat,rename,renameat,renameat2,unlink,unlinkat,rmdir,"
    "symlink,symlinkat,link,linkat"
)
MAX_STRING_BYTES = 1 << 24


class StraceUnavailable(RuntimeError):
    """strace is missing and could not be installed here."""


def ensure_strace() -> str:
    """The path of ``strace``, installed from the Debian packages when missing and running as
    root; raises :class:`StraceUnavailable` saying why otherwise."""
    found = shutil.which("strace")
    if found:
        return found
    if apt_unavailable_reason() is not None:
        raise StraceUnavailable("strace is not installed (apt-get install strace, as root)")
    try:
        install_missing_tools({"strace": OTHER_TOOL_PACKAGES["strace"]})
    except AptFailed as exc:
        raise StraceUnavailable(str(exc)) from exc
    found = shutil.which("strace")
    if not found:
        raise StraceUnavailable("apt-get installed strace but it is not on PATH")
    return found


#: Stops a process strace starts only at the calls it traces (a seccomp filter), not at every
#: call to filter them itself: an interpreter importing torch makes tens of thousands. strace
#: takes it only for a command it starts (a process attached with ``-p`` is stopped at every
#: call); what it logs is the same. The traced processes then run with NoNewPrivs (set to
#: install the filter, inherited by all they start): a set-user-id program gains nothing there.
ONLY_TRACED_CALLS_STOP = "--seccomp-bpf"


def _strace_options(trace_file: Path, *, attach: bool = False) -> list[str]:
    """strace and its options, writing the file-system calls of a process tree to
    ``trace_file``; the process to trace (a command, or ``-p PID`` with ``attach``) goes after
    them."""
    return [
        ensure_strace(),
        *([] if attach else [ONLY_TRACED_CALLS_STOP]),
        "-f",
        "-y",
        "-qq",
        "-xx",
        "-s",
        str(MAX_STRING_BYTES),
        "-e",
        f"trace={TRACED_CALLS}",
        "-o",
        os.fspath(trace_file),
    ]


def record(
    command: Sequence[str], trace_file: Path, *, cwd: Path, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` (and every process it starts) under strace, writing the trace to
    ``trace_file``. Returns the finished process; raises if the workload failed. Explorations
    run side by side (``scripts/crash_explore.py --jobs`` above 1) trace through this; the
    tests' go through :func:`record_forked`."""
    traced = [*_strace_options(trace_file), *command]
    done = subprocess.run(
        traced, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"traced workload {' '.join(command)} exited with {done.returncode}:\n"
            f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        )
    return done


def record_forked(
    workload: Callable[[], None], trace_file: Path, *, cwd: Path, timeout: float
) -> None:
    """Run ``workload`` in a child forked from this process (and so with torch imported
    already: a new interpreter spends seconds importing it, under strace longer still), traced
    from its first call by strace attached to the waiting child. Raises if the workload
    failed or did not finish within ``timeout`` seconds."""
    go_read, go_write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's exit code says how it went
        code = 1
        try:
            os.close(go_write)
            os.read(go_read, 1)  # until strace is attached
            os.chdir(cwd)
            workload()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(go_read)
    tracer = subprocess.Popen(
        [*_strace_options(trace_file, attach=True), "-p", str(child)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until_traced(child, tracer, timeout=30)
        os.write(go_write, b"go")
        _, status = _wait_for_child(child, timeout)
        tracer.wait(timeout=30)  # strace ends once the traced tree has
    finally:
        os.close(go_write)
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        raise RuntimeError(f"traced workload failed (wait status {status}): its traceback is above")


def wait_until_traced(child: int, tracer: subprocess.Popen[str], *, timeout: float) -> None:
    """Return once process ``child`` has a tracer (its ``TracerPid``: strace seized it, which
    does not yet mean it traces its calls); :class:`StraceUnavailable` if ``tracer`` (the
    strace attaching, its stderr piped) ended first, or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tracer.poll() is not None:
            why = tracer.stderr.read() if tracer.stderr else ""
            raise StraceUnavailable(f"strace could not attach: {why}")
        if tracer_of(child) != 0:
            return
        time.sleep(0.005)
    raise StraceUnavailable(f"strace did not attach to process {child} within {timeout} s")


def tracer_of(pid: int) -> int:
    """The pid of the process tracing ``pid`` (0: none), from ``/proc``."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return 0


def _wait_for_child(child: int, timeout: float) -> tuple[int, int]:
    deadline = time.monotonic() + timeout
    while True:
        pid, status = os.waitpid(child, os.WNOHANG)
        if pid:
            return pid, status
        if time.monotonic() > deadline:
            os.kill(child, 9)
            os.waitpid(child, 0)
            raise TimeoutError(f"traced workload did not finish within {timeout} s (a hang)")
        time.sleep(0.02)
