"""What ``/proc`` says of the processes a test starts: their parents, states, process groups,
sessions and start times, and whether a killed job's processes have all died."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: How long the processes of a killed job may take to be gone (a rank in uninterruptible sleep,
#: an fsync on a loaded disk, dies only once that returns).
GROUP_EXIT_SECONDS = 60.0


@dataclass(frozen=True)
class ProcStat:
    """What ``/proc/PID/stat`` says of a process: its parent, state letter, process group,
    session and start time (in clock ticks since boot: with the pid, it names one process, even
    after the pid is reused)."""

    ppid: int
    state: str
    group: int
    session: int
    started: int

    @property
    def live(self) -> bool:
        """Not a zombie (dead, waiting to be reaped) or being torn down."""
        return self.state not in _DEAD_STATES


_DEAD_STATES = ("Z", "X")


def _stat_fields(stat_file: Path) -> list[str] | None:
    try:
        stat = stat_file.read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may hold spaces or parentheses: the fields start after its last ")".
    return stat[stat.rindex(")") + 2 :].split()


def _live_thread_state(pid: int) -> str | None:
    """The state of a thread of process ``pid`` that has not exited yet, if any."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return None
    for task in tasks:
        fields = _stat_fields(task / "stat")
        if fields is not None and fields[0] not in _DEAD_STATES:
            return fields[0]
    return None


def proc_stat(pid: int) -> ProcStat | None:
    """The ``/proc`` stat of process ``pid``; None once it is gone. A killed process's main
    thread may show as a zombie while its other threads are still exiting, and those still hold
    its files and their locks (rank 0: the root's lease): its state is then a live thread's."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    if fields is None:
        return None
    state, ppid, group, session = fields[:4]
    if state in _DEAD_STATES:
        state = _live_thread_state(pid) or state
    # fields[19] is field 22 of the file, starttime.
    return ProcStat(int(ppid), state, int(group), int(session), int(fields[19]))


def thread_state(pid: int, tid: int) -> str | None:
    """The state letter of thread ``tid`` of process ``pid`` alone; None once it is gone."""
    fields = _stat_fields(Path(f"/proc/{pid}/task/{tid}/stat"))
    return None if fields is None else fields[0]


def _live_processes(belongs: Callable[[ProcStat], bool]) -> list[int]:
    """Pids of the processes that have not died yet and of which ``belongs`` holds."""
    pids = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    stats = {pid: proc_stat(pid) for pid in pids}
    return [pid for pid, stat in stats.items() if stat and stat.live and belongs(stat)]


def live_group_members(group: int) -> list[int]:
    """Pids of the processes of process group ``group`` that have not died yet."""
    return _live_processes(lambda stat: stat.group == group)


def session_members(session: int) -> list[int]:
    """Pids of the processes of session ``session`` that have not died yet: a job that leads
    its session (``setsid``) and every process it started, also those leading process groups of
    their own (as ranks do), unless they left for a session of their own (torchrun's workers)."""
    return _live_processes(lambda stat: stat.session == session)


def kill_session(session: int, timeout: float = GROUP_EXIT_SECONDS) -> None:
    """SIGKILL every process of session ``session`` until none is left alive (one forked while
    it kills is killed at the next look); AssertionError if some still live after ``timeout``
    (see :func:`wait_until_group_is_gone`). A session's id, as a group's, is not handed out
    again while any member lives."""
    deadline = time.monotonic() + timeout
    while members := session_members(session):
        for pid in members:
            with contextlib.suppress(ProcessLookupError):  # it died meanwhile
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise AssertionError(
                f"processes {members} of killed session {session} still live after {timeout:g} s"
            )
        time.sleep(0.02)


def wait_until_group_is_gone(group: int, timeout: float = GROUP_EXIT_SECONDS) -> None:
    """Wait until every process of the SIGKILLed process group ``group`` has died. The job's
    own process ends first; a rank still in uninterruptible sleep dies later and holds what it
    held (the root's lease) until then, so a job started again at once would find the root in
    use."""
    deadline = time.monotonic() + timeout
    while members := live_group_members(group):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"processes {members} of killed process group {group} still live after "
                f"{timeout:g} s"
            )
        time.sleep(0.02)


def signal_pending(pid: int, signum: int) -> bool:
    """Whether signal ``signum`` waits to be delivered to process ``pid`` (``/proc``'s
    ``SigPnd``: its main thread's, ``ShdPnd``: the whole process's), as it does on a stopped
    process until it is continued; False once the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    masks = (line.split(":", 1) for line in status.splitlines())
    pending = [int(mask, 16) for name, mask in masks if name in ("SigPnd", "ShdPnd")]
    return any(mask >> (signum - 1) & 1 for mask in pending)
