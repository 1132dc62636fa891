"""A preloading job server: a fresh interpreter that imports the heavy third-party modules a
job uses (torch, Lightning, torchdata, numpy) once, then runs each job it is asked for in a
forked child of its own, as ``python SCRIPT ARGS...`` would run it.

It imports neither distckpt nor the tests: each job imports those afresh, so what they do at
import (exit handlers they register, faults armed from the environment) happens in the job, as
in a fresh interpreter. A child leads a session of its own, has exactly the environment, working
directory and arguments of the request, writes its output to the request's log (its stderr to a
log of its own if the request names one), has the default signal handlers, runs the script as
``__main__`` (a module of its own, which stays ``__main__`` to the end) and ends through the
interpreter's own shutdown, as a fresh one does (non-daemon threads joined, exit handlers and
finalizers run, buffered output written out).

The protocol, one JSON object a line: the server first says ``{"ready": PID}`` once it has
preloaded (a cold start under load takes a minute or more); then the client writes
``{"id", "argv", "env", "cwd", "log"}`` (and ``"stderr_log"`` for stderr apart); the server
answers ``{"id": ID, "started": PID}`` once the child leads its session (so that a SIGKILL of its
group reaches it; the child starts the job only after this answer), and
``{"id": ID, "exited": PID, "code": CODE}`` when it has reaped it (``CODE`` as
``subprocess.Popen.returncode`` gives it: minus the signal for a killed one). Each answer echoes
its request's ``ID``: a pid names a job only while it runs (the system gives it to another
process afterwards), the id for good. The server ends when its input closes.

Run as a script (``python tests/job_server.py``): :mod:`tests.job_servers` starts and uses it.
``--no-preload`` makes a server that imports nothing beforehand, cheap to start, for a test
that kills its server (:func:`tests.job_servers.servers_preloading_nothing`).
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import gc
import json
import os
import select
import signal
import sys
import types
import warnings
from dataclasses import dataclass
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


def _run_job(
    request: dict[str, Any], ready: int, go: int, imports: list[warnings.WarningMessage]
) -> BaseException | None:
    """In the forked child: become ``python ARGV...`` as ``request`` says and run the script;
    returns the exception it ended with (None if it ran to its end), for the server's top level
    to raise, so that the child ends the way an interpreter does (see :func:`serve`).

    It says on ``ready`` that it leads its session, and waits on ``go`` until the server has
    reported it started: the client knows the pid of any job that has done anything (to kill
    its group), even of one that kills the server."""
    os.setsid()
    os.write(ready, b"x")
    os.close(ready)
    told_to_go = os.read(go, 1)
    os.close(go)
    if not told_to_go:  # the server died before reporting it: no one knows of this job
        os._exit(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    output = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(output)
    if "stderr_log" in request:
        errors = os.open(request["stderr_log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(errors, 2)
        os.close(errors)
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
    with open(script, "rb") as source:
        code = compile(source.read(), script, "exec")
    # A module of its own, left in place after the script's body returns (unlike
    # ``runpy.run_path``, which puts the server's back): its threads and exit handlers still
    # find the script's classes in ``__main__``, to pickle them.
    main = types.ModuleType("__main__")
    main.__file__ = script
    main.__cached__ = None  # type: ignore[attr-defined]
    main.__builtins__ = builtins  # type: ignore[attr-defined]
    sys.modules["__main__"] = main
    try:
        exec(code, main.__dict__)
    except BaseException as error:  # raised again at the top level, as it is
        # Without the server's frames between its top level and the script's, as far as can be.
        assert error.__traceback__ is not None
        return error.with_traceback(error.__traceback__.tb_next)
    finally:
        # As ``python SCRIPT`` does once the script's body has returned.
        main.__dict__.pop("__file__", None)
    return None


def _send(message: dict[str, int]) -> None:
    """Write one report to the client (fd 1 directly: a child's own ``sys.stdout`` is its log)."""
    os.write(1, (json.dumps(message) + "\n").encode())


@dataclass
class _JobEnd:
    """What a job's child takes out of :func:`serve`: the exception its script ended with."""

    error: BaseException | None


def _start(
    request: dict[str, Any], imports: list[warnings.WarningMessage], jobs: dict[int, int]
) -> _JobEnd | None:
    """Fork a child running ``request``; answer with its pid once it leads its session, and
    record it in ``jobs`` (pid: request id). In the child, returns how its script ended."""
    ready_read, ready_write = os.pipe()
    go_read, go_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_read)
        os.close(go_write)
        return _JobEnd(_run_job(request, ready_write, go_read, imports))
    os.close(ready_write)
    os.close(go_read)
    jobs[pid] = request["id"]
    os.read(ready_read, 1)  # empty if the child died first: it is reported as exited then
    os.close(ready_read)
    _send({"id": request["id"], "started": pid})
    with contextlib.suppress(BrokenPipeError):  # a child that died first has no use for it
        os.write(go_write, b"x")
    os.close(go_write)
    return None


def _reap(jobs: dict[int, int]) -> None:
    """Report every child of ``jobs`` that has ended since the last look, and forget it."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = os.waitstatus_to_exitcode(status)
        _send({"id": jobs.pop(pid), "exited": pid, "code": code})


def serve(*, preload: bool = True) -> _JobEnd | None:
    """Preload (unless not ``preload``), say it is ready, then start the jobs asked for on stdin
    and report them until it closes.

    Returns None in the server. In a job's child it returns too, with how the job's script
    ended, instead of going on in the server's loop: the top level raises the script's
    exception, if any, and the child then ends through the interpreter's own shutdown as
    ``python SCRIPT`` would (non-daemon threads joined, exit handlers and finalizers run, files
    and C-level buffers flushed, ``sys.exit``'s status, a traceback or a Ctrl-C's SIGINT). The
    server registers no exit handler and starts no thread, so a child runs none of its own.
    """
    imports = _preload() if preload else []
    # What the imports made stays alive in every child: frozen, the children's collections
    # (the last at their shutdown among them) do not walk it, writing to every page of it and
    # so copying pages the fork shared (seconds per job on a loaded machine).
    gc.collect()
    gc.freeze()
    _send({"ready": os.getpid()})
    jobs: dict[int, int] = {}
    pending = b""
    while True:
        readable, _, _ = select.select([0], [], [], REAP_INTERVAL)
        _reap(jobs)
        if not readable:
            continue
        chunk = os.read(0, 65536)
        if not chunk:
            return None
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            job_end = _start(json.loads(line), imports, jobs)
            if job_end is not None:
                return job_end


if __name__ == "__main__":
    # The server's own directory (``tests``) is no job's: each job's script puts its own first.
    sys.path.pop(0)
    parser = argparse.ArgumentParser(description="A preloading job server (see its doc).")
    parser.add_argument(
        "--no-preload", action="store_true", help="import nothing before the first job"
    )
    job_end = serve(preload=not parser.parse_args().no_preload)
    if job_end is not None and job_end.error is not None:
        raise job_end.error
