"""Installing the Debian packages of the system tools some tests run (mount tools, strace, gdb).

Both xdist workers, and a test's own subprocesses, may find the same tool missing at the same
moment. apt cannot be run twice at once: ``DPkg::Lock::Timeout`` makes ``apt-get install`` wait
for the dpkg lock, but ``apt-get update`` takes the lock of the package lists without waiting
and fails at once. So every use of apt here holds one file lock shared by all processes of the
machine, looks again under it for the tools (the process that held it before may have installed
them), retries a failed update a few times, and reports apt's own output when it gives up.

``python -m tests.apt`` installs every tool the tests use up front, with time enough for a slow
mirror (:data:`UP_FRONT_BUDGET_SECONDS`): ``scripts/test.sh`` runs it before the suite, where no
per-test timeout applies, and that is where CI really installs them. It does nothing where this
process is not root or has no apt-get, where the tests then skip with the reason.

Inside a test, apt only gets :data:`IN_TEST_BUDGET_SECONDS` in all (waiting for another
process's apt run, every try of the update, the install), well within the suite's per-test
timeout: pytest-timeout would otherwise end the test inside apt, killing it (an install killed
midway can leave dpkg's packages half-configured) and losing the reason. What apt could not do
in that time is an :class:`AptFailed` (:class:`AptOutOfTime`) saying why, like any failure of
apt. apt runs in a session of its own, so no signal meant for the test reaches it: an update
out of time is stopped (it only fetches package lists), an install out of time is left to
finish, never stopped midway.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from filelock import FileLock, Timeout

#: tools tests run outside the filesystem matrix (``tests.filesystems.TOOL_PACKAGES``), and the
#: Debian package that provides each
OTHER_TOOL_PACKAGES = {"strace": "strace", "gdb": "gdb", "jq": "jq", "node": "nodejs"}

#: one lock for every process of the machine that runs apt for the tests
LOCK_FILE = Path(tempfile.gettempdir()) / "distckpt-tests-apt.lock"
#: how long apt may take inside a test, from the moment the test asks for a tool to the end of
#: the install: half the suite's per-test timeout (pyproject.toml), the rest left for the test
IN_TEST_BUDGET_SECONDS = 60.0
#: how long ``python -m tests.apt`` may take (another process's apt run, then an update and an
#: install on a fresh machine: a minute or two each on a slow mirror)
UP_FRONT_BUDGET_SECONDS = 900.0
#: how long before the end of its budget an apt run is given up on, and how long a stopped
#: ``apt-get update`` has to exit after SIGTERM before it is killed
STOP_GRACE_SECONDS = 5.0
UPDATE_ATTEMPTS = 3
UPDATE_RETRY_PAUSE_SECONDS = 5.0
#: how much of apt's output a failure quotes (its last lines say what went wrong)
OUTPUT_TAIL_CHARS = 2000

# Wait for the dpkg lock rather than fail: a process that is not a test (someone's own apt
# run) does not take LOCK_FILE.
_APT = ["apt-get", "-o", "DPkg::Lock::Timeout=300"]
_INSTALL = ["install", "-y", "--no-install-recommends"]

_updated_in_this_process = False


class AptFailed(RuntimeError):
    """An apt-get command failed or was not done; ``output`` is the end of what it printed
    (empty when it did not run), ``returncode`` its exit status (None when it did not end)."""

    def __init__(
        self,
        command: list[str],
        returncode: int | None,
        output: str,
        attempts: int,
        why: str | None = None,
    ) -> None:
        self.command = command
        self.returncode = returncode
        self.output = output
        self.attempts = attempts
        if why is None:
            tries = f" ({attempts} attempts)" if attempts > 1 else ""
            why = f"failed with {returncode}{tries}"
        super().__init__(f"{' '.join(command)} {why}" + (f":\n{output}" if output else ""))


class AptOutOfTime(AptFailed):
    """apt was not done within ``budget_seconds``; ``waited_for`` says what took the time and
    what became of the command."""

    def __init__(
        self,
        command: list[str],
        budget_seconds: float,
        waited_for: str,
        *,
        attempts: int,
        returncode: int | None = None,
        output: str = "",
    ) -> None:
        self.budget_seconds = budget_seconds
        self.waited_for = waited_for
        why = (
            f"was not done within the {budget_seconds:g} s given to apt ({waited_for}); "
            "scripts/test.sh installs the test tools before the suite, with no per-test timeout"
        )
        super().__init__(command, returncode, output, attempts, why)


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


def install_missing_tools(tools: Mapping[str, str], budget_seconds: float | None = None) -> None:
    """Install the Debian package of each tool of ``tools`` (tool name: package name) that is
    not on PATH, holding :data:`LOCK_FILE`, all within ``budget_seconds`` (by default
    :data:`IN_TEST_BUDGET_SECONDS`, read at each call); raises :class:`AptFailed` with apt's
    output, :class:`AptOutOfTime` when the time ran out."""
    if not missing_packages(tools):
        return
    if budget_seconds is None:
        budget_seconds = IN_TEST_BUDGET_SECONDS
    deadline = time.monotonic() + budget_seconds
    lock = FileLock(LOCK_FILE)
    try:
        lock.acquire(timeout=_time_left(deadline))
    except Timeout as exc:
        command = [*_APT, *_INSTALL, *missing_packages(tools)]
        waited_for = "another process's apt run held the lock all that time"
        raise AptOutOfTime(command, budget_seconds, waited_for, attempts=0) from exc
    try:
        missing = missing_packages(tools)  # the lock's previous holder may have installed them
        if not missing:
            return
        _update_once(deadline, budget_seconds)
        _run_apt([*_INSTALL, *missing], deadline, budget_seconds, stoppable=False)
    finally:
        lock.release()


def _update_once(deadline: float, budget_seconds: float) -> None:
    """``apt-get update`` once per process, retried when it fails (a mirror's hiccup, or an
    apt run outside the lock holding the lists); it counts as done only when it succeeded."""
    global _updated_in_this_process
    if _updated_in_this_process:
        return
    _run_apt(["update"], deadline, budget_seconds, stoppable=True, attempts=UPDATE_ATTEMPTS)
    _updated_in_this_process = True


def _run_apt(
    arguments: list[str],
    deadline: float,
    budget_seconds: float,
    *,
    stoppable: bool,
    attempts: int = 1,
) -> None:
    """Run apt-get with ``arguments`` up to ``attempts`` times until it succeeds, giving up
    when its time is over (:func:`_time_left`): a ``stoppable`` command is then stopped, any
    other left running to its end."""
    command = [*_APT, *arguments]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for attempt in range(1, attempts + 1):
        if _time_left(deadline) <= 0:
            waited_for = "no time was left to run it"
            raise AptOutOfTime(command, budget_seconds, waited_for, attempts=attempt - 1)
        # A file, not a pipe, takes apt's output: an install left running must not block on a
        # full pipe, nor fail writing to one nobody reads any more.
        with tempfile.TemporaryFile("w+", errors="replace") as output_file:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # out of reach of the signals meant for the test
            )
            try:
                returncode = process.wait(timeout=_time_left(deadline))
            except subprocess.TimeoutExpired:
                raise _out_of_time(
                    process, command, output_file, attempt, budget_seconds, stoppable
                ) from None
            output = _tail(output_file)
        if returncode == 0:
            return
        pause = UPDATE_RETRY_PAUSE_SECONDS * attempt
        if attempt == attempts or pause >= _time_left(deadline):
            raise AptFailed(command, returncode, output, attempt)
        time.sleep(pause)


def _time_left(deadline: float) -> float:
    """How long an apt run may still take: until :data:`STOP_GRACE_SECONDS` before
    ``deadline`` (a monotonic time), which leaves the time to stop it and report; 0 when that
    is past (never negative: a negative timeout means no timeout to FileLock)."""
    return max(0.0, deadline - time.monotonic() - STOP_GRACE_SECONDS)


def _out_of_time(
    process: subprocess.Popen[bytes],
    command: list[str],
    output_file: IO[str],
    attempt: int,
    budget_seconds: float,
    stoppable: bool,
) -> AptOutOfTime:
    """What to raise for an apt run still going at the end of its time, once a ``stoppable``
    one is stopped (SIGTERM to its session, SIGKILL after :data:`STOP_GRACE_SECONDS`)."""
    if not stoppable:
        waited_for = (
            f"it still runs, as pid {process.pid}, and is left to finish: stopped midway, "
            "it could leave packages half-configured"
        )
        output = _tail(output_file)
        return AptOutOfTime(command, budget_seconds, waited_for, attempts=attempt, output=output)
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    output = _tail(output_file)
    return AptOutOfTime(
        command,
        budget_seconds,
        "it was stopped",
        attempts=attempt,
        returncode=process.returncode,
        output=output,
    )


def _tail(output_file: IO[str]) -> str:
    """The end of what apt has written to ``output_file`` so far."""
    output_file.seek(0)
    return output_file.read().strip()[-OUTPUT_TAIL_CHARS:]


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
        install_missing_tools(tools, budget_seconds=UP_FRONT_BUDGET_SECONDS)
    except AptFailed as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
