"""A preloading job server: a fresh interpreter that imports the heavy third-party modules a
job uses (torch, Lightning, torchdata, numpy) once, then runs each job it is asked for in a
forked child of its own, as ``python SCRIPT ARGS...`` would run it.

It imports neither distckpt nor the tests: each job imports those afresh, so what they do at
import (exit handlers they register, faults armed from the environment) happens in the job,
as in a fresh interpreter. A child leads a session of its own, has exactly the environment,
working directory and arguments of the request, writes its output to the request's log, has
the default signal handlers, runs the script as ``__main__`` and ends the way an interpreter
does (non-daemon threads joined, exit handlers run).

The protocol, one JSON object a line: the client writes ``{"argv", "env", "cwd", "log"}``;
the server answers ``{"started": PID}`` once the child leads its session (so that a SIGKILL of
its group reaches it), and ``{"exited": PID, "code": CODE}`` when it has reaped it (``CODE``
as ``subprocess.Popen.returncode`` gives it: minus the signal for a killed one). The server
ends when its input closes.

Run as a script (``python tests/job_server.py``): :mod:`tests.killing` starts and uses it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import runpy
import select
import signal
import sys
import threading
import warnings
from typing import Any

#: Imported once by the server; a job importing them finds them imported.
PRELOADED = ("numpy", "torch", "torchdata", "lightning")

#: How often the server looks for children that have ended, in seconds.
REAP_INTERVAL = 0.01


def _preload() -> list[warnings.WarningMessage]:
    """Import :data:`PRELOADED`, returning the warnings they raised (each job shows them again
    under its own filters, as its own imports would)."""
    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        for module in PRELOADED:
            # A job that needs a missing one fails at its own import, as it would anyway.
            with contextlib.suppress(ImportError):
                __import__(module)
    return raised


def _as_fresh_signals() -> None:
    """The signal handlers a fresh interpreter starts with."""
    for signum in (signal.SIGTERM, signal.SIGALRM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _exit_code(code: object) -> int:
    """The exit status ``sys.exit(code)`` gives a fresh interpreter."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _run_job(request: dict[str, Any], ready: int, imports: list[warnings.WarningMessage]) -> None:
    """In the forked child: become ``python ARGV...`` as ``request`` says, run it, exit."""
    os.setsid()
    os.write(ready, b"x")
    os.close(ready)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    output = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(output)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    _as_fresh_signals()
    argv: list[str] = request["argv"]
    script = os.path.abspath(argv[0])
    sys.argv = list(argv)
    sys.path.insert(0, os.path.dirname(script))  # as ``python SCRIPT`` puts it
    for raised in imports:
        warnings.warn_explicit(raised.message, raised.category, raised.filename, raised.lineno)
    interrupted = False
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as exit_request:
        code = _exit_code(exit_request.code)
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())  # type: ignore[arg-type]
        code, interrupted = 1, True
    except BaseException:
        sys.excepthook(*sys.exc_info())  # type: ignore[arg-type]
        code = 1
    # What an interpreter does at its end: wait for non-daemon threads, run exit handlers.
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    if interrupted:  # an uncaught Ctrl-C ends a fresh interpreter by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


def _send(message: dict[str, int]) -> None:
    """Write one report to the client (fd 1 directly: a child's own ``sys.stdout`` is its log)."""
    os.write(1, (json.dumps(message) + "\n").encode())


def _start(request: dict[str, Any], imports: list[warnings.WarningMessage]) -> None:
    """Fork a child running ``request``; answer with its pid once it leads its session."""
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_read)
        try:
            _run_job(request, ready_write, imports)
        finally:
            os._exit(1)  # never back into the server's loop
    os.close(ready_write)
    os.read(ready_read, 1)  # empty if the child died first: it is reported as exited then
    os.close(ready_read)
    _send({"started": pid})


def _reap() -> None:
    """Report every child that has ended since the last look."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send({"exited": pid, "code": os.waitstatus_to_exitcode(status)})


def serve() -> None:
    """Preload, then start the jobs asked for on stdin and report them until it closes."""
    imports = _preload()
    pending = b""
    while True:
        readable, _, _ = select.select([0], [], [], REAP_INTERVAL)
        _reap()
        if not readable:
            continue
        chunk = os.read(0, 65536)
        if not chunk:
            return
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            _start(json.loads(line), imports)


if __name__ == "__main__":
    # The server's own directory (``tests``) is no job's: each job's script puts its own first.
    sys.path.pop(0)
    serve()
