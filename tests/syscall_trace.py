"""A snippet of Python run under ``strace`` (by a job server of ``tests.job_servers``, which
imported torch already, or by a fresh interpreter), and the calls it made on files: what the
kernel was asked, read from a real process. :func:`async_saves_traced` asks it whether an async
save on each of some file systems writes its rank file with direct I/O, all in one traced run
(the filesystem matrix, and ``scripts/direct_io_filesystems.py`` beside its timings: one run,
not one per file system)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests import job_servers
from tests.crashsim.syscalls import whole_calls
from tests.crashsim.trace import (
    ONLY_TRACED_CALLS_STOP,
    StraceUnavailable,
    ensure_strace,
    wait_until_traced,
)
from tests.filesystems import skip_or_fail

_CALL = re.compile(r"^(?:\[pid +\d+\] |\d+ +)?(\w+)\((.*)\)\s+=\s+(-?\d+)(?:<([^>]*)>)?")
_DESCRIPTOR = re.compile(r"^(?:-?\d+|AT_FDCWD)<([^>]*)>$")


@dataclass(frozen=True)
class FileCall:
    """One call on a file. ``path`` is the file it acted on: its descriptor's, or for an
    ``openat`` the file it opened; ``args`` are the arguments after the descriptor (after the
    directory and the name for ``openat``)."""

    name: str
    path: str
    args: list[str]
    result: int


def opened_direct(call: FileCall) -> bool:
    """Whether ``call`` is an ``openat`` asking for ``O_DIRECT``."""
    return call.name == "openat" and "O_DIRECT" in call.args[0].split("|")


def traced_file_calls(
    code: str, workdir: Path, calls: str, args: Sequence[str] = (), timeout: float = 180
) -> list[FileCall]:
    """The ``calls`` (strace's comma-separated names) on files that ``code``, run with
    ``workdir`` as its working directory and ``args`` as its command line, made, in order; only
    successful ``openat`` calls."""
    run_traced(code, workdir, calls, args, timeout)
    return parsed_calls(workdir / "strace.log")


#: what a part of :func:`trace_parts` raised, with its traceback, in the part's directory
PART_FAILED = "failed.txt"


def assert_part_ran(directory: Path) -> None:
    """Fails with the traceback a traced part wrote to ``directory`` if it raised."""
    failed = directory / PART_FAILED
    assert not failed.exists(), failed.read_text()


@dataclass(frozen=True)
class TracedParts:
    """The calls of one traced run that ran several parts, each in a directory of its
    own under ``workdir``."""

    workdir: Path
    calls: list[FileCall]

    def of(self, part: str) -> list[FileCall]:
        """The calls on files in ``part``'s directory, in order; fails with the part's own
        traceback if it raised (another part's failure does not touch this one's calls)."""
        assert_part_ran(self.workdir / part)
        # strace -y names a file by the path the kernel resolved it to
        prefix = f"{self.workdir.resolve()}/{part}/"
        return [call for call in self.calls if call.path.startswith(prefix)]


def trace_parts(parts: Mapping[str, str], workdir: Path, calls: str) -> TracedParts:
    """The ``calls`` (as :func:`traced_file_calls`) of one traced run (:func:`run_traced`)
    running each of ``parts`` (its directory's name: its code, run in a namespace of its own)
    with its own directory under ``workdir`` (made if missing) as its working directory, one
    after the other: a run and its trace are paid once. What a
    part raises is written to :data:`PART_FAILED` in its directory, and the next part runs all
    the same."""
    script = "import os, traceback\n"
    for part, code in parts.items():
        script += f"""
os.makedirs({part!r}, exist_ok=True)
os.chdir({part!r})
try:
    exec(compile({code!r}, {part!r}, "exec"), {{"__name__": "__main__"}})
except BaseException:
    with open({PART_FAILED!r}, "w") as failed:
        failed.write(traceback.format_exc())
os.chdir("..")
"""
    return TracedParts(workdir, traced_file_calls(script, workdir, calls))


#: Run by a job server (``python traced_run.py MARKER WORKLOAD ARGS...``): waits until strace
#: is attached to its process, makes the marker call (a ``chdir`` to the path ``MARKER``, which
#: does not exist), then runs the workload as ``python WORKLOAD ARGS...`` would.
_AFTER_ATTACH = """
import os, runpy, sys, time
from tests.crashsim.trace import tracer_of

deadline = time.monotonic() + 60
while tracer_of(os.getpid()) == 0:
    if time.monotonic() > deadline:
        sys.exit("strace did not attach within 60 s")
    time.sleep(0.005)
try:
    os.chdir(sys.argv[1])
except OSError:
    pass
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_traced(
    code: str,
    workdir: Path,
    calls: str,
    args: Sequence[str] = (),
    timeout: float = 180,
    *,
    preloaded: bool = True,
) -> None:
    """Run ``code`` (as ``workload.py`` in ``workdir``, its working directory) under strace,
    which logs the ``calls`` to ``strace.log`` there. With ``preloaded``, in a job server
    (``tests.job_servers``: torch imported already; a fresh interpreter spends seconds importing
    it, under strace longer still), strace attached to the run (it waits for its TracerPid)
    before the workload starts, and what it printed copied to this process's stderr at its end;
    the trace must then hold a marker call the run made before the workload (its ``chdir`` to a
    path that does not exist, traced as well), or the run fails as one strace may have missed
    calls of. The trace then also holds the runner's own calls from strace's attach on (the
    opens of its last imports, the marker): whoever reads it picks calls by path. Else in a
    fresh interpreter that strace starts. Raises CalledProcessError if it
    fails and TimeoutExpired if it outlives ``timeout``: then it and every process it started
    are killed first (a process group of their own: a traced interpreter left running would
    keep the files it has open, and a FUSE mount under them, busy)."""
    try:
        strace = ensure_strace()
    except StraceUnavailable as exc:
        skip_or_fail(f"the system calls are read from strace: {exc}")
    script = workdir / "workload.py"
    script.write_text(textwrap.dedent(code))
    trace_log = workdir / "strace.log"
    if preloaded:
        returncode, command = _run_traced_preloaded(strace, calls, trace_log, script, args, timeout)
    else:
        options = _strace_options(calls, trace_log)
        command = [strace, ONLY_TRACED_CALLS_STOP, *options, sys.executable, script, *args]
        with subprocess.Popen(command, cwd=workdir, start_new_session=True) as traced:
            try:
                returncode = traced.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(traced.pid, signal.SIGKILL)
                traced.wait()
                raise
    if returncode != 0:
        raise subprocess.CalledProcessError(returncode, command)


def _strace_options(calls: str, trace_log: Path) -> list[str]:
    return ["-f", "-y", "-qq", "-e", f"trace={calls}", "-o", os.fspath(trace_log)]


def _run_traced_preloaded(
    strace: str, calls: str, trace_log: Path, script: Path, args: Sequence[str], timeout: float
) -> tuple[int, list[str]]:
    """:func:`run_traced` in a job server: the run's exit status, and the command it stands
    for (``python WORKLOAD ARGS...``: a failure names the workload, not the strace beside it)."""
    runner = script.with_name("traced_run.py")
    runner.write_text(_AFTER_ATTACH)
    log = script.with_name("traced_run.log")
    marker = f"/nonexistent-strace-marker-{uuid.uuid4().hex}"
    job = job_servers.start_preloaded(
        [str(runner), marker, str(script), *args], log, cwd=script.parent
    )
    command = [strace, *_strace_options(f"{calls},chdir", trace_log), "-p", str(job.pid)]
    tracer = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until_traced(job.pid, tracer, timeout=30)
        returncode = job.wait(timeout)  # TimeoutExpired past it: killed below
        tracer.wait(timeout=30)  # strace ends once the traced tree has
        # a non-zero TracerPid shows strace seized the run, not that it traces its calls yet
        assert marker in trace_log.read_text(), (
            f"strace was not yet tracing {script.name} when it began (no marker call in "
            f"{trace_log}): calls of it may be missing"
        )
        return returncode, [sys.executable, os.fspath(script), *args]
    finally:
        # nothing here asks the job server first: it may be what failed (died)
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()
        job.end()
        sys.stderr.write(log.read_text(errors="replace") if log.exists() else "")


def parsed_calls(log: Path) -> list[FileCall]:
    """The calls on files in strace log ``log``, in order; only successful ``openat`` calls."""
    found_calls = []
    for line in whole_calls(log.read_text().splitlines()):
        found = _CALL.match(line)
        if found is None:
            continue
        name, raw_args, result, opened = found.groups()
        args = [part.strip() for part in raw_args.split(",")]
        if name == "openat":
            if opened is None:
                continue  # a failed open: nothing was opened
            found_calls.append(FileCall(name, opened, args[2:], int(result)))
            continue
        descriptor = _DESCRIPTOR.match(args[0])
        if descriptor is not None:
            found_calls.append(FileCall(name, descriptor.group(1), args[1:], int(result)))
    return found_calls


#: in each directory its command line names, one after the other: ``started.txt`` is written
#: there, then an async "torch" save into ``root`` there, its restore (bit for bit) and
#: ``verify``; what any of them raised (but CommitLost: fusefat empties the directory it renames,
#: nothing commits there) is written to ``failed.txt`` in that directory, ``finished.txt``
#: otherwise, and the next directory is saved into all the same
DIRECT_IO_SAVES = """
import sys, traceback
from pathlib import Path
import torch
import distckpt

def save_restore_verify(root):
    torch.manual_seed(0)
    state = {"w": torch.randn(3 << 20), "odd": torch.randn(700), "step": 1}  # 12 MiB, a part page
    try:
        with distckpt.CheckpointManager(root, async_save=True, timeout=60) as manager:
            manager.save(1, state)
            manager.wait()
            restored = manager.restore(1).state
    except distckpt.CommitLost:
        return
    for key in ("w", "odd"):
        assert torch.equal(restored[key].view(torch.int32), state[key].view(torch.int32)), key
    assert distckpt.verify(root).ok

for workdir in map(Path, sys.argv[1:]):
    (workdir / "started.txt").write_text("")
    try:
        save_restore_verify(workdir / "root")
    except Exception:
        (workdir / "failed.txt").write_text(traceback.format_exc())
    else:
        (workdir / "finished.txt").write_text("")
"""
#: the time one directory's save, restore and verify may take under strace, FUSE and load
SECONDS_PER_SAVE = 60


@dataclass(frozen=True)
class DirectIOSave:
    """One directory's part of :data:`DIRECT_IO_SAVES`: the calls on its rank file."""

    workdir: Path
    #: the rank file's openat (not a read's), ftruncate, fsync and sync_file_range calls
    rank_file_calls: list[FileCall]
    #: why this directory has no result, if the shared traced interpreter died or hung before
    #: it finished with it
    lost: str | None = None

    def written_direct(self, *, commits: bool) -> bool:
        """Whether the rank file was written with direct I/O (then asking no early writeback,
        and cutting the padded tail back with ftruncate before the fsync); asserts the save,
        restore and verify went through, and that the step was committed if ``commits``."""
        assert self.lost is None, self.lost
        assert_part_ran(self.workdir)
        opened = [call for call in self.rank_file_calls if call.name == "openat"]
        assert len(opened) == 1, self.rank_file_calls
        assert (self.workdir / "root" / "step-00000001").is_dir() is commits
        if not opened_direct(opened[0]):
            return False
        names = [call.name for call in self.rank_file_calls[1:]]
        assert names == ["ftruncate", "fsync"], self.rank_file_calls
        return True


def async_saves_traced(
    workdirs: Sequence[Path], scratch: Path, *, preloaded: bool = True
) -> dict[Path, DirectIOSave]:
    """Run :data:`DIRECT_IO_SAVES` once under strace (its log and script in ``scratch``) over
    ``workdirs``, each made now if missing; what each directory's save did to its rank file. If
    the interpreter dies or hangs (then it is killed after :func:`saves_timeout`), the
    directories it had not finished with say so in :attr:`DirectIOSave.lost`. ``preloaded``:
    as :func:`run_traced`."""
    for workdir in workdirs:
        workdir.mkdir(exist_ok=True)
    try:
        run_traced(
            DIRECT_IO_SAVES,
            scratch,
            "openat,ftruncate,fsync,sync_file_range",
            [str(workdir) for workdir in workdirs],
            timeout=saves_timeout(len(workdirs)),
            preloaded=preloaded,
        )
        run_failure = None
    except subprocess.CalledProcessError as exc:
        run_failure = f"died (exit status {exc.returncode})"
    except subprocess.TimeoutExpired as exc:
        run_failure = f"hung (killed after {exc.timeout:.0f} s)"
    calls = parsed_calls(scratch / "strace.log")
    found = {}
    for workdir in workdirs:
        lost = None
        if run_failure is not None and not (
            (workdir / "finished.txt").exists() or (workdir / PART_FAILED).exists()
        ):
            lost = (
                f"the shared traced run {run_failure} while saving on {workdir}"
                if (workdir / "started.txt").exists()
                else f"not reached: the shared traced run {run_failure} before {workdir}"
            )
        # strace -y names a file by the path the kernel resolved it to
        rank_file = f"{workdir.resolve()}/root/"
        found[workdir] = DirectIOSave(
            workdir,
            [
                call
                for call in calls
                if call.path.startswith(rank_file)
                and call.path.endswith("/rank-00000.pt")
                and not (call.name == "openat" and "O_RDONLY" in call.args[0])
            ],
            lost,
        )
    return found


def saves_timeout(directories: int) -> float:
    """The seconds :func:`async_saves_traced` gives its interpreter over ``directories``."""
    return 120 + SECONDS_PER_SAVE * directories
