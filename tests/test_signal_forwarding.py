"""A closed manager's signal handler, kept by another library (as Lightning's signal connector
keeps it) and put back after the manager closed, or left installed by a close outside the main
thread: the signal goes to whatever handler the manager had replaced, as if that one were
installed. Each case in a forked process of its own, as the default action ends it."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import distckpt
from distckpt.decisions import SignalFlag

#: what a forked child runs: it reports through the function it is given, as it goes (the
#: signal may end it), and what it returns is reported last
ChildRun = Callable[[Callable[[str], None]], str]
#: the signal of the tests with a manager: its default action ends the process
SIGNAL = signal.SIGUSR1


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


def _in_forked_child(run: ChildRun) -> tuple[int | None, str]:
    """The signal that ended the child (None if it exited) and what it reported."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: reports through the pipe, never returns into pytest
        os.close(read_end)
        try:

            def say(said: str) -> None:
                os.write(write_end, said.encode())

            say(run(say))
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
    assert _in_forked_child(lambda say: _kept_handler_gets_signal(replaced)) == (ended_by, reported)


def _left_installed_off_the_main_thread(
    root: Path, replaced: str, say: Callable[[str], None]
) -> str:
    """A manager closed in another thread leaves its handler over the one ``replaced`` names;
    a second manager, made and closed in the main thread, installs its own over it, saves on
    the signal and puts the leftover back; then the signal is sent again."""
    got: list[int] = []
    if replaced == "callable":
        signal.signal(SIGNAL, lambda signum, frame: got.append(signum))
    first = distckpt.CheckpointManager(root, save_on_signal=(SIGNAL,), fsync=False)
    leftover = signal.getsignal(SIGNAL)
    closing = threading.Thread(target=first.close)
    closing.start()
    closing.join()
    # Step 1 is off the schedule: only the signal makes save(1) write it.
    second = distckpt.CheckpointManager(
        root, save_on_signal=(SIGNAL,), every_n_steps=100, fsync=False
    )
    installed_over = signal.getsignal(SIGNAL) is not leftover
    os.kill(os.getpid(), SIGNAL)  # Python runs the handler in this thread, before save() does
    second.save(1, {"w": torch.ones(1)})
    second.close()
    say(
        f"second installed its own {installed_over}, saved {second.preempted}, "
        f"steps {second.steps()}, leftover back {signal.getsignal(SIGNAL) is leftover}, "
        f"program's handler got {len(got)}; "
    )
    os.kill(os.getpid(), SIGNAL)
    return f"after: program's handler got {len(got)}"


@pytest.mark.parametrize(
    ("replaced", "ended_by", "after"),
    [("SIG_DFL", SIGNAL, ""), ("callable", None, "after: program's handler got 1")],
)
def test_a_handler_left_by_a_close_off_the_main_thread_stays_out_of_the_way(
    tmp_path: Path, replaced: str, ended_by: int | None, after: str
) -> None:
    """While a later manager is open, its own handler takes the signal (a preemption save by
    it, none by the closed one); once it closed, the leftover handler is back and hands the
    signal on: the default action ends the process by that signal, a program's handler gets
    it."""
    ended, reported = _in_forked_child(
        lambda say: _left_installed_off_the_main_thread(tmp_path / "root", replaced, say)
    )
    assert ended == ended_by
    assert reported == (
        "second installed its own True, saved True, steps [1], leftover back True, "
        f"program's handler got 0; {after}"
    )
