"""Recording the file-system system calls of a workload with ``strace``."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

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
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise StraceUnavailable("strace is not installed (apt-get install strace, as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "strace"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise StraceUnavailable(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")
    found = shutil.which("strace")
    if not found:
        raise StraceUnavailable("apt-get installed strace but it is not on PATH")
    return found


def record(
    command: Sequence[str], trace_file: Path, *, cwd: Path, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` (and every process it starts) under strace, writing the trace to
    ``trace_file``. Returns the finished process; raises if the workload failed."""
    strace = ensure_strace()
    traced = [
        strace,
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
        *command,
    ]
    done = subprocess.run(
        traced, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"traced workload {' '.join(command)} exited with {done.returncode}:\n"
            f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        )
    return done
