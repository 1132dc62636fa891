"""Runs of ``python SCRIPT ARGS...`` in the preloading job servers of this test process.

A run (of :mod:`tests.killing`, or of a test's script) is a child of a job server
(``tests/job_server.py``): a fresh interpreter, started once
per test process and reused, that has imported torch, Lightning, torchdata and numpy (a fresh
interpreter would take 2 to 6 s over them at every run) but neither distckpt nor the tests,
and forks each run from itself. The run then does what ``python SCRIPT ARGS...`` does: it
leads a process group of its own, has the test's whole environment (as a subprocess would),
imports distckpt afresh, runs the script as ``__main__`` and its exit handlers at its end.

There are two servers, each with its own random hash seed (``PYTHONHASHSEED``, drawn per test
process), and runs take turns between them: a killed run and the run resuming it never share
a hash seed, as a user's re-run of the same command does not, so a job whose results depend
on ``hash()`` of a string does not resume bit for bit here either.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.processes import (
    GROUP_EXIT_SECONDS,
    kill_session,
    session_members,
)

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


#: How long a job server may take to preload and say it is ready, apart from any job's own
#: budget: a cold start imports torch, Lightning, torchdata and numpy, over a minute when other
#: interpreters import them at the same time.
SERVER_READY_SECONDS = 300.0


class _JobServer:
    """A running ``tests/job_server.py`` (see there), started with hash seed ``hash_seed``:
    sends it jobs and collects what it reports of them (a thread reads its answers). Jobs are
    known by the id of their request, never by pid: the system gives a pid to another process
    once its job has ended."""

    def __init__(self, hash_seed: int, *, preload: bool = True) -> None:
        #: Whether it imports torch and the rest beforehand (a server started again in its
        #: place does as it did).
        self.preload = preload
        env = _env()
        env["PYTHONHASHSEED"] = str(hash_seed)
        options = [] if preload else ["--no-preload"]
        self._process = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "job_server.py"), *options],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._request_ids = itertools.count()
        #: By request id, what the server has reported: each job's pid, each ended one's status.
        self._pids: dict[int, int] = {}
        self._exit_codes: dict[int, int] = {}
        #: The server's exit status, once its output has ended.
        self._ended_with: int | None = None
        self._ready = False
        #: Set once the server has failed to get ready in time: no one waits for it again.
        self._gave_up = False
        self._reported = threading.Condition()
        self._requesting = threading.Lock()
        threading.Thread(target=self._read_reports, daemon=True).start()

    def _read_reports(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            report = json.loads(line)
            with self._reported:
                if "ready" in report:
                    self._ready = True
                elif "started" in report:
                    self._pids[report["id"]] = report["started"]
                else:
                    self._exit_codes[report["id"]] = report["code"]
                self._reported.notify_all()
        status = self._process.wait()
        with self._reported:  # whoever waits for a report now waits in vain: wake them
            self._ended_with = status
            self._reported.notify_all()

    @property
    def alive(self) -> bool:
        return self._process.poll() is None

    def wait_until_ready(self) -> None:
        """Return once the server has preloaded, waiting up to :data:`SERVER_READY_SECONDS`
        (once only: a server that was not ready by then fails every later wait at once);
        raises AssertionError if it is not ready by then or died first."""
        with self._reported:
            if not self._gave_up:
                self._reported.wait_for(
                    lambda: self._ready or self._ended_with is not None, SERVER_READY_SECONDS
                )
            if self._ready:
                return
            if self._ended_with is not None:
                raise AssertionError(f"job server died before it was ready ({self._ended_with})")
            self._gave_up = True
            raise AssertionError(f"the job server was not ready in {SERVER_READY_SECONDS:g} s")

    def _report(
        self, reports: dict[int, int], request_id: int, timeout: float | None
    ) -> int | None:
        """``reports[request_id]`` once the server has reported it, waiting up to ``timeout``;
        None if it has not by then. Raises AssertionError once the server has died without
        reporting it (reports come in order: a report is in before the server's end is)."""
        with self._reported:
            self._reported.wait_for(
                lambda: request_id in reports or self._ended_with is not None, timeout
            )
            if request_id in reports:
                return reports[request_id]
            if self._ended_with is not None:
                raise AssertionError(f"job server died (status {self._ended_with})")
            return None

    def start(
        self,
        command: Sequence[str],
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
        stderr_log: Path | None = None,
    ) -> PreloadedJob:
        """Start ``python *command`` in the server, in ``cwd``, with environment ``env`` (by
        default the one a subprocess of the test would get), its output in ``log`` (its stderr
        in ``stderr_log`` if given); returns once the job leads its process group. The job's
        start budget counts from the server's readiness, not from the server's own start."""
        self.wait_until_ready()
        with self._requesting:
            request_id = next(self._request_ids)
            request = {
                "id": request_id,
                "argv": list(command),
                "env": dict(_env() if env is None else env),
                "cwd": str(cwd),
                "log": str(log),
            }
            if stderr_log is not None:
                request["stderr_log"] = str(stderr_log)
            assert self._process.stdin is not None
            self._process.stdin.write((json.dumps(request) + "\n").encode())
            self._process.stdin.flush()
        pid = self._report(self._pids, request_id, GROUP_EXIT_SECONDS)
        assert pid is not None, f"the job server started no job in {GROUP_EXIT_SECONDS:g} s"
        return PreloadedJob(self, request_id, pid)

    def exit_code(self, request_id: int, timeout: float | None) -> int | None:
        """The exit status of the job of request ``request_id`` once the server reaped it,
        waiting up to ``timeout``; raises AssertionError if the server died first."""
        return self._report(self._exit_codes, request_id, timeout)

    def reported_exit(self, request_id: int) -> bool:
        """Whether the server has reported the job of request ``request_id`` ended (never
        raises: for cleanup, whether the server lives or not)."""
        with self._reported:
            return request_id in self._exit_codes

    def stop(self) -> None:
        self._process.kill()
        self._process.wait()


@dataclass(frozen=True)
class PreloadedJob:
    """A job a :class:`_JobServer` runs for request ``request_id`` (with ``pid``, ``poll``,
    ``wait``, ``send_signal``, ``exitcode`` and ``join`` as a process has)."""

    server: _JobServer
    request_id: int
    pid: int

    @property
    def exitcode(self) -> int | None:
        return self.server.exit_code(self.request_id, timeout=0)

    def poll(self) -> int | None:
        """As ``subprocess.Popen.poll``: the exit status, None while the job runs."""
        return self.exitcode

    def wait(self, timeout: float | None = None) -> int:
        """As ``subprocess.Popen.wait``: the exit status once the job's own process has ended;
        raises ``subprocess.TimeoutExpired`` if it has not within ``timeout``."""
        code = self.server.exit_code(self.request_id, timeout)
        if code is None:
            assert timeout is not None
            raise subprocess.TimeoutExpired(f"job {self.pid}", timeout)
        return code

    def send_signal(self, signum: int) -> None:
        """As ``subprocess.Popen.send_signal``: to the job's own process, not its group."""
        os.kill(self.pid, signum)

    def join(self) -> None:
        """Wait until the job's own process has ended (it was killed, or is ending)."""
        code = self.server.exit_code(self.request_id, timeout=GROUP_EXIT_SECONDS)
        assert code is not None, f"job {self.pid} still running {GROUP_EXIT_SECONDS:g} s on"

    def end(self) -> None:
        """Kill whatever of the job's session still runs, and wait for its server to report the
        job's end unless the server died (for cleanup: also after a failed wait)."""
        kill_session(self.pid)
        if self.server.alive:
            self.join()


#: The two job servers (started at their first use), with different hash seeds.
_servers: list[_JobServer] = []
#: How many runs have started: the servers take turns by it.
_runs_started = 0


#: The servers' two different random hash seeds, for this test process (a server started
#: again keeps its own); ``PYTHONHASHSEED`` is 1 to 2**32 - 1 (0 turns randomization off).
_FIRST_SEED = int.from_bytes(os.urandom(4), "little") % (2**32 - 1) + 1
_HASH_SEEDS = (_FIRST_SEED, _FIRST_SEED % (2**32 - 1) + 1)


def _stop_servers() -> None:
    for server in _servers:
        server.stop()


@contextlib.contextmanager
def servers_preloading_nothing() -> Iterator[None]:
    """Runs started within go to two job servers of their own that import nothing beforehand
    (a job imports what it needs itself), stopped at the end: for a test that kills the server
    of its run. The servers every other run shares, with torch imported, stay up, and no later
    test starts one again (seconds of imports)."""
    global _servers
    shared = _servers
    _servers = [_JobServer(seed, preload=False) for seed in _HASH_SEEDS]
    try:
        yield
    finally:
        for server in _servers:
            server.stop()
        _servers = shared


def start_preloaded(
    command: Sequence[str],
    log: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path = ROOT,
    *,
    stderr_log: Path | None = None,
) -> PreloadedJob:
    """Start ``python *command`` (a script and its arguments) in the next job server by turns
    (see the module doc), in ``cwd``, with environment ``env`` (by default a subprocess's),
    its output going to ``log`` (its stderr to ``stderr_log`` if given); returns once the job
    leads its own process group."""
    global _runs_started
    _runs_started += 1
    server = job_server((_runs_started - 1) % len(_HASH_SEEDS))
    return server.start(command, log, env, cwd, stderr_log)


def ready_job_servers() -> None:
    """Start this process's job servers if they are not running, and wait until both are ready
    (see :meth:`_JobServer.wait_until_ready`): ``tests/conftest.py`` calls it before a test
    that uses them starts, so that their cold start does not count in the test's timeout."""
    for turn in range(len(_HASH_SEEDS)):
        job_server(turn)
    for server in _servers:
        server.wait_until_ready()


def job_server(turn: int) -> _JobServer:
    """Job server ``turn`` (0 or 1) of this process: both start at the first call, one that
    died starts again, preloading as it did (within :func:`servers_preloading_nothing`, a
    server that imports nothing)."""
    if not _servers:
        _servers.extend(_JobServer(seed) for seed in _HASH_SEEDS)
        atexit.register(_stop_servers)
    if not _servers[turn].alive:
        _servers[turn] = _JobServer(_HASH_SEEDS[turn], preload=_servers[turn].preload)
    return _servers[turn]


#: How long :func:`run_preloaded` lets a script run unless told: well below the timeout pytest
#: gives a test (pyproject.toml), so that the run fails itself, with the script's output, rather
#: than pytest in the middle of it. The job servers' start is not in it, nor in the test's
#: timeout: ``tests/conftest.py`` waits until they are ready before the test starts.
PRELOADED_TIMEOUT = 90.0


def run_script_preloaded(
    source: str,
    args: Sequence[str],
    scratch: Path,
    timeout: float = PRELOADED_TIMEOUT,
    *,
    stderr_apart: bool = False,
    extra_env: Mapping[str, str] | None = None,
    cwd: Path = ROOT,
) -> subprocess.CompletedProcess[str]:
    """:func:`run_preloaded` of ``source``, written into a script in ``scratch`` (first on its
    ``sys.path``, as ``python SCRIPT`` puts a script's directory), in ``cwd``, with
    ``extra_env``: its exit status and its output, stdout and stderr together in ``stdout``
    unless ``stderr_apart``."""
    descriptor, name = tempfile.mkstemp(suffix=".py", dir=scratch)
    os.close(descriptor)
    script = Path(name)
    script.write_text(source)
    stderr_log = script.with_suffix(".err") if stderr_apart else None
    return run_preloaded(
        [str(script), *args],
        script.with_suffix(".log"),
        timeout,
        stderr_log=stderr_log,
        extra_env=extra_env,
        cwd=cwd,
    )


def run_preloaded(
    command: Sequence[str],
    log: Path,
    timeout: float = PRELOADED_TIMEOUT,
    *,
    stderr_log: Path | None = None,
    extra_env: Mapping[str, str] | None = None,
    cwd: Path = ROOT,
) -> subprocess.CompletedProcess[str]:
    """Run ``python *command`` in a job server (see :func:`start_preloaded`), in ``cwd``, with
    ``extra_env`` set on top of a subprocess's environment; its exit status and its output once
    it has ended and every process it started too (``subprocess.run`` reading its output waited
    for every process holding the pipe). The run fails if they have not within ``timeout``.
    However the run ends (a failure, pytest's own timeout), nothing of the job's session
    outlives it: not the script, nor a process leading a group of its own (a rank).

    Its output is also in ``log``: ``stdout`` holds stdout and stderr together and ``stderr`` is
    None, as ``subprocess.run(stderr=STDOUT)`` gives them, unless ``stderr_log`` is given:
    stderr then goes there, and ``stderr`` holds it.

    ``extra_env`` reaches only the job's ``os.environ`` (read by what the job imports afresh);
    what the interpreter or torch reads as it starts (``PYTHONPATH``, ``PYTHONHASHSEED``,
    ``PYTHONWARNINGS``, ``OMP_NUM_THREADS``) comes from the job server's own start."""
    env = {**_env(), **(extra_env or {})}
    job = start_preloaded(command, log, env, cwd, stderr_log=stderr_log)
    deadline = time.monotonic() + timeout
    try:
        code = job.wait(timeout)
        while left := session_members(job.pid):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{command[0]} exited {code} but left processes {left} running after "
                    f"{timeout:g} s:\n{log.read_text()}"
                )
            time.sleep(0.02)
    except subprocess.TimeoutExpired:
        output = log.read_text()
        raise AssertionError(f"{command[0]} still ran after {timeout:g} s:\n{output}") from None
    finally:
        job.end()
    stderr = None if stderr_log is None else stderr_log.read_text()
    return subprocess.CompletedProcess(list(command), code, log.read_text(), stderr)
