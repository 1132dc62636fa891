"""The distckpt command line run in the test's process, as the tests of the command line and
of the lease run it, or in a process of its own that has imported torch already."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

from tests import job_servers


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``distckpt *args`` run in this process (a process of its own would spend seconds
    importing torch; ``test_python_dash_m_runs_the_real_entry_point`` covers the real entry
    point), in ``cwd`` when given: its exit status and what it wrote to stdout and to stderr.
    What it judges of a lease's holder is what a process of its own judges: a lease's lock is
    taken through a file descriptor of its own, which another of this process's descriptors
    holding the lock excludes too."""
    from distckpt.cli import main

    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stderr(err):
            status = main(list(args), out=out)
    finally:
        os.chdir(previous)
    return subprocess.CompletedProcess(["distckpt", *args], status, out.getvalue(), err.getvalue())


class _CurrentStderr(logging.Handler):
    """Writes a record to whatever ``sys.stderr`` is when the record comes (a redirect made
    after this handler was attached included), as Python's last-resort handler does."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


def report_as_a_fresh_process() -> None:
    """In a forked child of pytest, before :func:`run_cli`: what a fresh ``python -m distckpt``
    writes to its stderr lands in ``run_cli``'s stderr here too. pytest's hooks, inherited by
    the fork, would otherwise swallow a background thread's crash (its ``threading.excepthook``)
    and distckpt's log records (its root logger's handlers)."""
    threading.excepthook = threading.__excepthook__
    logging.getLogger("distckpt").addHandler(_CurrentStderr())


#: ``python -m distckpt ARGS...`` as a script whose one argument is the JSON list of ARGS: the
#: ``__main__`` of the distckpt first on its ``sys.path``, run as ``-m`` runs it.
DISTCKPT_COMMAND_LINE = """
import json, runpy, sys
sys.argv = ["-m", *json.loads(sys.argv[1])]
runpy.run_module("distckpt", run_name="__main__", alter_sys=True)
"""


def run_cli_in_a_process(
    *args: str, scratch: Path, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m distckpt *args`` in a process of its own, with ``extra_env`` on top of a
    subprocess's environment: a job server's child (:mod:`tests.job_servers`), which imported
    torch before it forked (a fresh interpreter takes seconds over it) but imports distckpt
    afresh. Its script is written in ``scratch``; it runs in the repository's root, within
    ``job_servers.PRELOADED_TIMEOUT``; ``extra_env`` reaches ``os.environ`` only (not the
    interpreter's start: ``PYTHONPATH``, the hash seed). Its exit status, stdout and stderr
    apart."""
    return job_servers.run_script_preloaded(
        DISTCKPT_COMMAND_LINE,
        [json.dumps(list(args))],
        scratch,
        stderr_apart=True,
        extra_env=extra_env,
    )
