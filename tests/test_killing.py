"""The kill harness itself (``tests/killing.py``): a killed job counts as gone only once every
process of its group has died, not merely its first process; each run is a fresh interpreter's,
and a run and the next do not share a hash seed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests import job_servers, killing, processes

#: A job whose first process starts a child of its own (as a job script starts its ranks), both
#: sleeping until killed.
_PARENT_AND_CHILD = (
    "import subprocess, sys, time; "
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
    "time.sleep(120)"
)


def test_a_killed_group_is_waited_for_until_its_last_process_has_died() -> None:
    job = subprocess.Popen([sys.executable, "-c", _PARENT_AND_CHILD], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(processes.live_group_members(job.pid)) < 2:
            assert time.monotonic() < deadline, "the job's child never started"
            time.sleep(0.02)
        stat = processes.proc_stat(job.pid)
        assert stat is not None and stat.group == job.pid and stat.live
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    processes.wait_until_group_is_gone(job.pid, timeout=30)
    assert processes.live_group_members(job.pid) == []


def test_each_run_is_a_fresh_interpreter_and_the_next_has_another_hash_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the test's process holds (its environment, an armed fault, a default dtype a test
    # left behind) reaches a run only as it would a fresh interpreter: through the environment.
    monkeypatch.setenv("PROBE_SETTING", "from the test")
    monkeypatch.setenv("DISTCKPT_FAULT", "after_rename:kill:0")
    torch.set_default_dtype(torch.float64)
    try:
        for _ in range(2):
            assert not killing.run(["tests/fresh_run_probe.py", str(tmp_path)], tmp_path)
    finally:
        torch.set_default_dtype(torch.float32)
    first, second = (json.loads(line) for line in (tmp_path / "probe.txt").read_text().splitlines())
    for found in (first, second):
        assert found["already_imported"] == []
        assert found["setting"] == "from the test"
        assert found["armed"] == ["after_rename"]
        assert found["default_dtype"] == "torch.float32"
    assert first["string_hash"] != second["string_hash"]
    # It ends as an interpreter does: exit handlers run with the script still ``__main__``,
    # then the shutdown collects what is left (finalizers run, unflushed files are written out).
    exited = json.loads((tmp_path / "exited.txt").read_text())
    assert exited == {"main_is_this_script": True, "pickled": True}
    assert (tmp_path / "finalized.txt").read_text() == "finalizer ran\n"
    assert (tmp_path / "unflushed.txt").read_text() == "written out at shutdown\n"


def test_a_run_whose_job_server_dies_fails_at_once_and_its_job_is_killed(tmp_path: Path) -> None:
    # The job kills the server it runs in (its parent), then waits to be killed itself.
    job = tmp_path / "kills_its_server.py"
    job.write_text(
        "import os, signal, sys, time\n"
        "open(sys.argv[1], 'w').write(str(os.getpid()))\n"
        "os.kill(os.getppid(), signal.SIGKILL)\n"
        "time.sleep(120)\n"
    )
    pid_file = tmp_path / "pid"
    # Without noticing the server's end, the run would wait out its timeout and fail otherwise.
    with (
        job_servers.servers_preloading_nothing(),
        pytest.raises(AssertionError, match=r"job server died \(status -9\)"),
    ):
        killing.run([str(job), str(pid_file)], tmp_path, timeout=120)
    processes.wait_until_group_is_gone(int(pid_file.read_text()), timeout=30)


def test_a_server_preloading_nothing_that_died_starts_again_preloading_nothing(
    tmp_path: Path,
) -> None:
    script = tmp_path / "imported.py"
    script.write_text("import sys\nprint('torch' in sys.modules)\n")
    log = tmp_path / "imported.log"
    with job_servers.servers_preloading_nothing():
        job_servers.job_server(0).stop()
        job = job_servers.job_server(0).start([str(script)], log)
        job.join()
    assert job.exitcode == 0, log.read_text()
    assert log.read_text() == "False\n"


def test_the_job_server_refuses_an_argument_it_does_not_know() -> None:
    # A misspelt --no-preload must not give a server that preloads all the same.
    server = job_servers.ROOT / "tests" / "job_server.py"
    refused = subprocess.run(
        [sys.executable, str(server), "--no-prelaod"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert "unrecognized arguments: --no-prelaod" in refused.stderr


def _reuse_pid_next(pid: int) -> bool:
    """Make ``pid`` the next pid the system gives (unless another process takes it first);
    False where that is not allowed."""
    try:
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
    except OSError:
        return False
    return True


def test_a_job_given_an_earlier_jobs_pid_is_not_reported_ended(tmp_path: Path) -> None:
    job = tmp_path / "sleeps.py"
    job.write_text("import sys, time\ntime.sleep(float(sys.argv[1]))\n")
    server = job_servers.job_server(0)
    first = server.start([str(job), "0"], tmp_path / "job.log")
    first.join()
    assert first.exitcode == 0
    # Other processes of the machine may take the pid first: try a few times.
    for _ in range(50):
        if not _reuse_pid_next(first.pid):
            pytest.skip("the next pid cannot be chosen here (needs CAP_SYS_ADMIN)")
        second = server.start([str(job), "60"], tmp_path / "job.log")
        if second.pid == first.pid:
            break
        os.killpg(second.pid, signal.SIGKILL)
        second.join()
    else:
        pytest.skip("other processes took the pid each time")
    try:
        assert second.exitcode is None  # still sleeping, whatever the first job's status
    finally:
        os.killpg(second.pid, signal.SIGKILL)
        second.join()
    assert second.exitcode == -signal.SIGKILL


def test_a_preloaded_job_has_the_environment_and_directory_it_is_given(tmp_path: Path) -> None:
    job = tmp_path / "where.py"
    job.write_text(
        "import json, os, time\n"
        "print(json.dumps({'cwd': os.getcwd(), 'env': dict(os.environ)}), flush=True)\n"
        "time.sleep(float(os.environ['SLEEP']))\n"
    )
    here = tmp_path / "here"
    here.mkdir()
    log = tmp_path / "job.log"
    env = {"GIVEN": "to this job only", "SLEEP": "0"}
    started = job_servers.start_preloaded([str(job)], log, env, here)
    assert started.wait(60) == 0, log.read_text()
    found = json.loads(log.read_text().splitlines()[0])
    assert found == {"cwd": str(here), "env": env}

    # It is waited for as a process is: a timeout raises, and the status says how it ended.
    sleeping = job_servers.start_preloaded([str(job)], log, {"SLEEP": "120"}, here)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            sleeping.wait(0.1)
        assert sleeping.poll() is None
    finally:
        os.killpg(sleeping.pid, signal.SIGKILL)
    assert sleeping.wait(60) == -signal.SIGKILL


#: A script that starts ``sleep`` leading a process group of its own (as a rank does) and
#: writes its own pid and the child's to ``argv[1]``, then sleeps ``argv[2]`` seconds.
_STARTS_A_CHILD_OF_ITS_OWN_GROUP = (
    "import os, subprocess, sys, time\n"
    "child = subprocess.Popen(['sleep', '300'], process_group=0)\n"
    "with open(sys.argv[1] + '.part', 'w') as pids:\n"
    "    pids.write(f'{os.getpid()} {child.pid}')\n"
    "os.rename(sys.argv[1] + '.part', sys.argv[1])\n"
    "time.sleep(float(sys.argv[2]))\n"
)


def _started_pids(pid_file: Path) -> tuple[int, int]:
    """The script's pid (its session's id) and its child's."""
    job, child = pid_file.read_text().split()
    return int(job), int(child)


def test_a_preloaded_run_fails_when_its_script_leaves_a_process_running(tmp_path: Path) -> None:
    """A script that exits 0 but leaves a process behind fails the run (as subprocess.run
    waiting for its output's end would), and the process is killed."""
    script = tmp_path / "leaves_a_child.py"
    script.write_text(_STARTS_A_CHILD_OF_ITS_OWN_GROUP)
    pid_file = tmp_path / "pids"
    # The run waits this long for the child to end before it fails, and the test waits all of
    # it: still far beyond the few hundredths of a second the script itself takes.
    with pytest.raises(AssertionError, match=r"exited 0 but left processes \[\d+\] running"):
        job_servers.run_preloaded([str(script), str(pid_file), "0"], tmp_path / "log", timeout=4)
    job, child = _started_pids(pid_file)
    assert processes.session_members(job) == []
    assert not ((stat := processes.proc_stat(child)) and stat.live)


class _Stopped(Exception):
    """What the test raises into a waiting run, as pytest's own timeout does."""


def test_a_preloaded_run_stopped_from_outside_leaves_no_process_of_its_script(
    tmp_path: Path,
) -> None:
    """Stopped while it waits for its script (pytest's timeout raises in the test's thread, from
    a SIGALRM handler), the run kills every process of the script's session, a child leading
    a process group of its own too."""
    script = tmp_path / "hangs.py"
    script.write_text(_STARTS_A_CHILD_OF_ITS_OWN_GROUP)
    pid_file = tmp_path / "pids"
    test_thread = threading.get_ident()
    run_over = threading.Event()

    def stop_once_started() -> None:
        while not pid_file.exists():
            if run_over.wait(0.02):
                return
        signal.pthread_kill(test_thread, signal.SIGUSR1)

    def stop(signum: int, frame: object) -> None:
        raise _Stopped

    # SIGUSR1 as pytest-timeout's SIGALRM: raised in the waiting thread, at a known moment.
    previous = signal.signal(signal.SIGUSR1, stop)
    stopper = threading.Thread(target=stop_once_started, daemon=True)
    try:
        stopper.start()
        with pytest.raises(_Stopped):
            job_servers.run_preloaded([str(script), str(pid_file), "300"], tmp_path / "log")
    finally:
        run_over.set()
        stopper.join()
        signal.signal(signal.SIGUSR1, previous)
    job, child = _started_pids(pid_file)
    assert processes.session_members(job) == []
    assert not ((stat := processes.proc_stat(child)) and stat.live)


def test_a_preloaded_runs_stderr_is_apart_only_when_asked(tmp_path: Path) -> None:
    job = tmp_path / "prints.py"
    job.write_text("import sys\nprint('to stdout')\nprint('to stderr', file=sys.stderr)\n")
    apart = job_servers.run_preloaded(
        [str(job)], tmp_path / "apart.log", stderr_log=tmp_path / "apart.err"
    )
    assert (apart.returncode, apart.stdout, apart.stderr) == (0, "to stdout\n", "to stderr\n")
    together = job_servers.run_preloaded([str(job)], tmp_path / "together.log")
    assert together.stderr is None
    assert sorted(together.stdout.splitlines()) == ["to stderr", "to stdout"]
