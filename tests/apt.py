"""Installing the Debian packages of the system tools some tests run (mount tools, strace, gdb).

Both xdist workers, and a test's own subprocesses, may find the same tool missing at the same
moment. apt cannot be run twice at once: ``DPkg::Lock::Timeout`` makes ``apt-get install`` wait
for the dpkg lock, but ``apt-get update`` takes the lock of the package lists without waiting
and fails at once. So every use of apt here holds one file lock shared by all processes of the
machine, looks again under it for the tools (the process that held it before may have installed
them), retries a failed update a few times, and reports apt's own output when it gives up.

``python -m tests.apt`` installs every tool the tests use up front (``scripts/test.sh`` does,
so that the tests rarely need apt at all); it does nothing where this process is not root or
has no apt-get, where the tests then skip with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from filelock import FileLock

#: tools tests run outside the filesystem matrix (``tests.filesystems.TOOL_PACKAGES``), and the
#: Debian package that provides each
OTHER_TOOL_PACKAGES = {"strace": "strace", "gdb": "gdb"}

#: one lock for every process of the machine that runs apt for the tests
LOCK_FILE = Path(tempfile.gettempdir()) / "distckpt-tests-apt.lock"
#: how long to wait for another process's apt run (an update and an install on a fresh machine
#: take a minute or two on a slow mirror)
LOCK_TIMEOUT_SECONDS = 900.0
UPDATE_ATTEMPTS = 3
UPDATE_RETRY_PAUSE_SECONDS = 5.0
#: how much of apt's output a failure quotes (its last lines say what went wrong)
OUTPUT_TAIL_CHARS = 2000

# Wait for the dpkg lock rather than fail: a process that is not a test (someone's own apt
# run) does not take LOCK_FILE.
_APT = ["apt-get", "-o", "DPkg::Lock::Timeout=300"]

_updated_in_this_process = False


class AptFailed(RuntimeError):
    """An apt-get command failed; ``output`` is the end of what it printed."""

    def __init__(self, command: list[str], returncode: int, output: str, attempts: int) -> None:
        self.command = command
        self.returncode = returncode
        self.output = output
        self.attempts = attempts
        tries = f" ({attempts} attempts)" if attempts > 1 else ""
        super().__init__(f"{' '.join(command)} failed with {returncode}{tries}:\n{output}")


def apt_unavailable_reason() -> str | None:
    """Why this process cannot install packages, or None when it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return f"installing packages needs root (running as uid {os.getuid()})"
    if shutil.which("apt-get") is None:
        return "there is no apt-get to install packages with"
    return None


def missing_packages(tools: Mapping[str, str]) -> list[str]:
    """The packages (values of ``tools``) of the tools (its keys) that are not on PATH."""
    return sorted({package for tool, package in tools.items() if shutil.which(tool) is None})


def install_missing_tools(tools: Mapping[str, str]) -> None:
    """Install the Debian package of each tool of ``tools`` (tool name: package name) that is
    not on PATH, holding :data:`LOCK_FILE`; raises :class:`AptFailed` with apt's output."""
    if not missing_packages(tools):
        return
    with FileLock(LOCK_FILE, timeout=LOCK_TIMEOUT_SECONDS):
        missing = missing_packages(tools)  # the lock's previous holder may have installed them
        if not missing:
            return
        _update_once()
        _run_apt(["install", "-y", "--no-install-recommends", *missing])


def _update_once() -> None:
    """``apt-get update`` once per process, retried when it fails (a mirror's hiccup, or an
    apt run outside the lock holding the lists); it counts as done only when it succeeded."""
    global _updated_in_this_process
    if _updated_in_this_process:
        return
    _run_apt(["update"], attempts=UPDATE_ATTEMPTS)
    _updated_in_this_process = True


def _run_apt(arguments: list[str], attempts: int = 1) -> None:
    command = [*_APT, *arguments]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for attempt in range(1, attempts + 1):
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, check=False
        )
        if done.returncode == 0:
            return
        if attempt < attempts:
            time.sleep(UPDATE_RETRY_PAUSE_SECONDS * attempt)
    output = (done.stdout + done.stderr).strip()[-OUTPUT_TAIL_CHARS:]
    raise AptFailed(command, done.returncode, output, attempts)


def every_test_tool() -> dict[str, str]:
    """Every tool the tests may run that apt can install, with its package."""
    from tests.filesystems import TOOL_PACKAGES

    return {**TOOL_PACKAGES, **OTHER_TOOL_PACKAGES}


def main() -> int:
    """Install every test tool that is missing; 0 when done or when this machine cannot
    install (the tests then skip, or in CI fail, with the reason), 1 when apt failed."""
    tools = every_test_tool()
    missing = missing_packages(tools)
    if not missing:
        return 0
    reason = apt_unavailable_reason()
    if reason is not None:
        print(f"not installing {', '.join(missing)}: {reason}", file=sys.stderr)
        return 0
    print(f"installing the test tools' packages: {', '.join(missing)}", file=sys.stderr)
    try:
        install_missing_tools(tools)
    except AptFailed as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
