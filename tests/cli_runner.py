"""The distckpt command line run in the test's process, as the tests of the command line and
of the lease run it."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path


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
