"""A closed manager's signal handler, kept by another library (as Lightning's signal connector
keeps it) and put back after the manager closed: the signal goes to whatever handler the
manager had replaced, as if that one were installed. Each case in a forked process of its own,
as the default action ends it."""

from __future__ import annotations

import os
import signal
import time

import pytest

from distckpt.decisions import SignalFlag


def _kept_handler_gets_signal(kind: str) -> str:
    """Installs the handler ``kind`` names, a manager's flag (two nested for ``nested-*``)
    over it, keeps the manager's handler past its restore and puts it back, then sends the
    signal; what became of it."""
    sig = signal.SIGINT if kind == "default_int_handler" else signal.SIGUSR1
    got: list[int] = []
    if kind in ("SIG_IGN", "SIG_DFL"):
        signal.signal(sig, getattr(signal, kind))
    elif kind == "default_int_handler":
        signal.signal(sig, signal.default_int_handler)
    else:
        signal.signal(sig, lambda signum, frame: got.append(signum))
    outer = SignalFlag((sig,))
    outer.install()
    if kind.startswith("nested"):
        inner = SignalFlag((sig,))
        inner.install()
        kept = signal.getsignal(sig)
        inner.restore()
        if kind == "nested-both-closed":
            outer.restore()
    else:
        kept = signal.getsignal(sig)
        outer.restore()
    signal.signal(sig, kept)  # the other library's teardown puts back what it had replaced
    try:
        os.kill(os.getpid(), sig)
        time.sleep(0.2)  # Python runs the handler at its next check, in this (main) thread
    except KeyboardInterrupt:
        return "KeyboardInterrupt"
    return f"program's handler got {len(got)}, outer flag set {outer.is_set()}"


def _in_forked_child(kind: str) -> tuple[int | None, str]:
    """The signal that ended the child (None if it exited) and what it reported."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: reports through the pipe, never returns into pytest
        os.close(read_end)
        try:
            os.write(write_end, _kept_handler_gets_signal(kind).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reading:
        reported = reading.read().decode()
    _, status = os.waitpid(pid, 0)
    return (os.WTERMSIG(status) if os.WIFSIGNALED(status) else None), reported


@pytest.mark.parametrize(
    ("replaced", "ended_by", "reported"),
    [
        ("callable", None, "program's handler got 1, outer flag set False"),
        ("SIG_IGN", None, "program's handler got 0, outer flag set False"),
        ("SIG_DFL", signal.SIGUSR1, ""),
        ("default_int_handler", None, "KeyboardInterrupt"),
        ("nested-inner-closed", None, "program's handler got 0, outer flag set True"),
        ("nested-both-closed", None, "program's handler got 1, outer flag set False"),
    ],
)
def test_a_closed_managers_handler_hands_the_signal_to_the_one_it_replaced(
    replaced: str, ended_by: int | None, reported: str
) -> None:
    """Ignored stays ignored, the default action ends the process by that signal, Ctrl-C
    raises KeyboardInterrupt, and of nested managers the inner one's hands it to the outer
    one's while that is open, to the program's once both closed."""
    assert _in_forked_child(replaced) == (ended_by, reported)
