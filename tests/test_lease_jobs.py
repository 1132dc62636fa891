"""One writing job per root, end to end: real jobs (``tests/lease_job.py``, ranks forked by
run_ranks or started by the real torchrun) competing for one root, waiting for it, killed
while holding it, fenced after an operator broke their lease, orphaned by a killed torchrun
agent; operators and readers working next to a live holder.

Every process a test starts is killed when the test ends: the job's launcher with its
process group, a job run in a job server with its whole session (its forked ranks lead process
groups of their own in it), and torchrun's workers by the pids they logged (they run in
sessions of their own).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import distckpt
from distckpt.layout import LEASE_RECORD_NAME, RootLayout
from distckpt.lease import read_holder
from tests.cli_runner import run_cli
from tests.filesystems import MountFactory
from tests.lease_holders import (
    _on_another_host,
    _on_another_machine_named_like_this_one,
    in_a_pid_namespace_of_its_own,
)
from tests.test_launch import Job, _cmdline
from tests.waiting import wait_until, wait_while_running

REPO = Path(__file__).resolve().parents[1]
LEASE_JOB = REPO / "tests" / "lease_job.py"
STARTUP = 120.0  # a job importing torch on a loaded machine may take this long to get going
RANKS = (0, 1)


def plain(root: Path, out: Path, run: str, *options: str) -> list[str]:
    """A 2-rank job whose ranks run_ranks forks (``--world-size 1``: one plain process)."""
    return [sys.executable, str(LEASE_JOB), str(root), str(out), run, *options]


def under_torchrun(root: Path, out: Path, run: str, *options: str) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    job = [str(LEASE_JOB), str(root), str(out), run, *options]
    return [*launcher, "--nproc-per-node", "2", *job]


def log(out: Path, run: str, rank: int) -> list[dict[str, Any]]:
    path = out / f"{run}-rank{rank}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def logged(out: Path, run: str, rank: int, event: str) -> list[dict[str, Any]]:
    return [entry for entry in log(out, run, rank) if entry["event"] == event]


def pid_of(out: Path, run: str, rank: int) -> int:
    return int(logged(out, run, rank, "pid")[0]["pid"])


def saved_steps(out: Path, run: str, rank: int) -> list[int]:
    return [entry["step"] for entry in logged(out, run, rank, "saved")]


def runs_by_step(root: Path) -> list[tuple[int, str, str | None]]:
    """Every committed step with the run that saved it and that run's torchrun id."""
    found = []
    for step in RootLayout.at(root).committed_steps():
        metadata = distckpt.load_checkpoint(RootLayout.at(root).step_dir(step)).metadata
        found.append((step, metadata["run"], metadata["run_id"]))
    return found


def staged(root: Path) -> list[str]:
    staging = RootLayout.at(root).staging_root
    return sorted(p.name for p in staging.iterdir()) if staging.is_dir() else []


class Jobs:
    """Starts jobs and, at the end, kills every process they started (see the module doc)."""

    #: The job script: a job running it directly (its ranks forked) runs in a job server.
    script = LEASE_JOB
    #: What the command line of a rank that is a process of its own (torchrun's worker) holds,
    #: against reused pids. A forked rank shows its job server's: it dies with its job's session.
    own_process_rank = "lease_job"

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "ckpt"
        self.out = tmp_path / "out"
        self.out.mkdir()
        self.cwd = tmp_path
        self.started: list[Job] = []

    def start(self, argv: list[str]) -> Job:
        """Start ``argv``: ``python`` running this class's :attr:`script` directly (a job whose
        ranks are forked, as :func:`plain`) in a job server that has imported torch already
        (what these tests look at starts after the imports); one under torchrun or another
        host's namespaces as a fresh process, as it must be."""
        job = Job(argv, self.cwd, preloaded=argv[:2] == [sys.executable, str(self.script)])
        self.started.append(job)
        return job

    def kill_all(self) -> None:
        # Torchrun's workers first: an orphaned one still holds its launcher's output open.
        for path in self.out.glob("*.jsonl"):
            for line in path.read_text().splitlines():
                entry = json.loads(line) if line.endswith("}") else {}
                pid = entry.get("pid") if entry.get("event") == "pid" else None
                if pid and self.own_process_rank in (_cmdline(pid) or ""):  # not a reused pid
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        for job in self.started:
            job.__exit__(None, None, None)


@pytest.fixture
def jobs(tmp_path: Path) -> Iterator[Jobs]:
    started = Jobs(tmp_path)
    try:
        yield started
    finally:
        started.kill_all()


#: Runs the command lines of each JSON list it reads on stdin, in turn, and prints a JSON line
#: per list: each command's exit status and what it wrote to stdout and to stderr (a failing
#: command's reasons are on its stderr).
_CLI_RUNS = """
import contextlib, io, json, sys
from distckpt.cli import main
for batch in sys.stdin:
    results = []
    for arguments in json.loads(batch):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err):
            status = main(arguments, out=out)
        results.append([status, out.getvalue(), err.getvalue()])
    print(json.dumps(results), flush=True)
"""


def decided(out: Path, run: str) -> bool:
    return all(logged(out, run, r, "opened") or logged(out, run, r, "refused") for r in RANKS)


@pytest.mark.timeout(400)
def test_two_jobs_at_once_one_holds_the_root_the_other_is_refused_or_waits(jobs: Jobs) -> None:
    root, out = jobs.root, jobs.out
    started = {run: jobs.start(plain(root, out, run, "--hold-open")) for run in ("p", "q")}
    wait_while_running(
        list(started.values()),
        lambda: decided(out, "p") and decided(out, "q"),
        "both jobs opened or refused",
        STARTUP,
    )
    winner = next(run for run in started if logged(out, run, 0, "opened"))
    loser = "q" if winner == "p" else "p"
    holder_pid = pid_of(out, winner, 0)
    for rank in RANKS:
        assert logged(out, winner, rank, "opened"), log(out, winner, rank)
        (refusal,) = logged(out, loser, rank, "refused")
        assert refusal["type"] == "RootInUse" and refusal["holder"] == holder_pid, refusal
        assert "is in use by a job without a job id on host" in refusal["error"]
        assert f"pid {holder_pid}" in refusal["error"], refusal
    assert started[loser].wait(60) == 0, started[loser].output
    assert logged(out, loser, 0, "saved") == []

    # A third job waits for the winner to close instead of failing.
    wait_until(lambda: saved_steps(out, winner, 0) == [1, 2], "the winner saved", STARTUP)
    waiting = jobs.start(plain(root, out, "r", "--wait", "200"))
    # rank 0's word that it found the root held and waits: from here on it is in its wait
    held = rf"root {re.escape(str(root))} is held by .*, pid {holder_pid}, .*: waiting up to 200 s"
    waiting.wait_for(held, STARTUP)
    assert not logged(out, "r", 0, "opened"), "it opened a root another job holds"
    assert not logged(out, "r", 0, "refused"), "it was refused instead of waiting"
    (out / f"{winner}.release").touch()
    assert waiting.wait(STARTUP) == 0, waiting.output
    assert started[winner].wait(60) == 0, started[winner].output
    for rank in RANKS:
        assert saved_steps(out, "r", rank) == [3, 4]  # resumed from the winner's last step
    assert [run for _, run, _ in runs_by_step(root)] == [winner, winner, "r", "r"]
    assert distckpt.verify(root).ok
    holder = json.loads((root / LEASE_RECORD_NAME).read_text())
    assert holder["generation"] == 2 and holder["released_utc"] is not None
    assert read_holder(root) is None


@pytest.mark.timeout(300)
def test_a_sigkilled_holder_job_blocks_nobody(jobs: Jobs) -> None:
    root, out = jobs.root, jobs.out
    killed = jobs.start(plain(root, out, "a", "--saves", "1", "--hold-open"))
    wait_until(lambda: saved_steps(out, "a", 1) == [1], "the first job saved", STARTUP)
    killed.kill()  # the whole job: launcher and ranks, as a machine failure would
    killed.process.wait(30)
    killed.wait_until_dead(60)  # until then rank 0, still exiting, may hold the lease's lock
    holder = read_holder(root)
    assert holder is not None and holder.pid == pid_of(out, "a", 0) and holder.alive is False

    after = jobs.start(plain(root, out, "b", "--saves", "1"))
    assert after.wait(STARTUP) == 0, after.output
    for rank in RANKS:
        (opened,) = logged(out, "b", rank, "opened")
        # opened with wait_for_root=0: a holder taken for alive would have been RootInUse
        assert opened["event"] == "opened", opened
        assert saved_steps(out, "b", rank) == [2]
    record = json.loads((root / LEASE_RECORD_NAME).read_text())
    assert record["generation"] == 2 and record["released_utc"] is not None


@pytest.mark.timeout(300)
def test_an_exception_in_the_loop_releases_the_root_at_exit(jobs: Jobs) -> None:
    """The training loop raises with an async save in flight: the process ends, the save is
    finished by the exit hook, and then the lease is released (the kernel would drop the
    lock anyway; the record says so too)."""
    root, out = jobs.root, jobs.out
    options = ("--world-size", "1", "--saves", "3", "--crash-after", "1", "--async-save")
    crashed = jobs.start(plain(root, out, "c", *options))
    assert crashed.wait(STARTUP) == 1, crashed.output
    assert "ZeroDivisionError: the training loop failed" in crashed.output
    assert logged(out, "c", 0, "saved") == [{"event": "saved", "step": 1, "done": False}]
    assert logged(out, "c", 0, "closed") == []
    assert RootLayout.at(root).committed_steps() == [1]  # finished at exit
    record = json.loads((root / LEASE_RECORD_NAME).read_text())
    assert record["pid"] == crashed.process.pid and record["released_utc"] is not None
    assert read_holder(root) is None
    with distckpt.CheckpointManager(root) as mgr:  # wait_for_root=0: RootInUse if not released
        holder = read_holder(root)
        assert holder is not None and holder.pid == os.getpid() and holder.generation == 2
        assert mgr.latest_step() == 1


@pytest.mark.timeout(400)
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_save_in_progress_keeps_the_root_and_operators_work_beside_it(
    jobs: Jobs, async_save: bool
) -> None:
    """While the holder's second save is held mid-way (rank 0 stops after writing; an async
    save is then in flight): the lease is held, another job is refused, ``ls`` names the
    holder, ``gc`` leaves the live staging alone, ``prune`` takes the commit lock and works,
    and readers read. Then the save commits and close() releases the root."""
    root, out = jobs.root, jobs.out
    # A long timeout: rank 1 waits in the agreement while rank 0 is held.
    options = ["--saves", "2", "--hold-in-save", "2", "--timeout", "300"]
    options += ["--async-save"] if async_save else []
    holding = jobs.start(plain(root, out, "h", *options))
    wait_until((out / "h.held").exists, "the second save reached its hold", STARTUP)
    holder_pid = pid_of(out, "h", 0)
    if async_save:  # save() returned: the save is in flight in the background
        assert logged(out, "h", 0, "saved")[-1] == {"event": "saved", "step": 2, "done": False}
    holder = read_holder(root)
    assert holder is not None and holder.alive and holder.pid == holder_pid

    intruder = jobs.start(plain(root, out, "i", "--saves", "1"))
    assert intruder.wait(STARTUP) == 0, intruder.output
    for rank in RANKS:
        (refusal,) = logged(out, "i", rank, "refused")
        assert refusal["type"] == "RootInUse" and refusal["holder"] == holder_pid

    listed = run_cli("ls", str(root))
    assert f"pid {holder_pid}" in listed.stdout and "(alive)" in listed.stdout, listed.stdout
    assert "(writer alive)" in listed.stdout, listed.stdout
    live_staging = staged(root)
    assert len([name for name in live_staging if not name.endswith(".lock")]) == 1
    collected = run_cli("gc", str(root))
    assert collected.returncode == 0 and "writer alive" in collected.stdout, collected
    assert staged(root) == live_staging
    pruned = run_cli("prune", str(root), "--keep-last", "1")
    assert pruned.returncode == 0 and "kept steps:    1" in pruned.stdout, pruned
    assert distckpt.load_checkpoint(root).step == 1  # readers take no lease
    assert distckpt.verify(root).ok

    (out / "h.resume").touch()
    assert holding.wait(STARTUP) == 0, holding.output
    for rank in RANKS:
        assert saved_steps(out, "h", rank) == [1, 2] and logged(out, "h", rank, "closed")
    assert RootLayout.at(root).committed_steps() == [1, 2] and staged(root) == []
    record = json.loads((root / LEASE_RECORD_NAME).read_text())
    assert record["pid"] == holder_pid and record["released_utc"] is not None
    assert read_holder(root) is None


@pytest.mark.timeout(400)
def test_gc_on_another_machine_keeps_a_live_writers_staging_where_locks_are_local(
    jobs: Jobs, mounts: MountFactory, tmp_path: Path
) -> None:
    """README: gc never removes a live writer's staging, also when run on a second machine of
    a filesystem whose locks are local to each machine (Lustre ``-o localflock``, NFS
    ``local_lock``), where the writer's lock looks free. The job writes through a directory;
    gc runs as "another machine" through a bindfs view of it, whose ``flock`` does not reach
    the directory's. gc keeps the staging, saying why, and the save commits. ``gc --force``
    removes it (what an operator does only when no job runs): the save then fails saying its
    staging dir was removed, not that the root is not shared."""
    bindfs = mounts.get("bindfs")
    assert bindfs.writable_source is not None
    root = bindfs.writable_source / "gc-elsewhere"
    seen_elsewhere = bindfs.path / "gc-elsewhere"
    elsewhere = _on_another_machine_named_like_this_one(bindfs.path, tmp_path)

    # One python there runs every command line of the test: each python spends seconds
    # importing torch. Its stderr goes to a file, which no amount of warnings fills up.
    errors_there = tmp_path / "cli-elsewhere.stderr"
    with errors_there.open("w") as stderr:
        there = subprocess.Popen(
            [*elsewhere, sys.executable, "-c", _CLI_RUNS],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        _gc_elsewhere_keeps_a_live_writers_staging(jobs, root, there, seen_elsewhere)
        assert there.stdin is not None
        there.stdin.close()
        assert there.wait(STARTUP) == 0, errors_there.read_text()
    finally:
        there.kill()
        there.wait()


def _gc_elsewhere_keeps_a_live_writers_staging(
    jobs: Jobs, root: Path, there: subprocess.Popen[str], seen_elsewhere: Path
) -> None:
    out = jobs.out

    def cli_elsewhere(*commands: tuple[str, ...]) -> list[tuple[int, str, str]]:
        """Each command line, on the root seen from there, run by the python ``there`` in
        turn: its exit status and what it wrote to stdout and to stderr."""
        runs = [[*command, str(seen_elsewhere)] for command in commands]
        assert there.stdin is not None and there.stdout is not None
        there.stdin.write(json.dumps(runs) + "\n")
        there.stdin.flush()
        line = there.stdout.readline()
        assert line, f"the python there ended with status {there.wait(STARTUP)}"
        return [
            (int(status), str(output), str(errors)) for status, output, errors in json.loads(line)
        ]

    held = ["--world-size", "1", "--timeout", "300"]
    holding = jobs.start(plain(root, out, "h", "--saves", "2", "--hold-in-save", "2", *held))
    wait_until((out / "h.held").exists, "the second save reached its hold", STARTUP)
    live_staging = staged(root)
    assert len([name for name in live_staging if not name.endswith(".lock")]) == 1
    collected, said, listed = cli_elsewhere(("gc", "--json"), ("gc",), ("ls",))
    assert collected[0] == 0, collected
    report = json.loads(collected[1])
    assert report["removed"] == [], report
    left = {Path(item["path"]).name: item for item in report["left"]}
    assert set(left) == {name for name in live_staging if not name.endswith(".lock")}
    for item in left.values():
        assert not item["writer_alive"]  # its lock looks free from there
        assert f"pid {pid_of(out, 'h', 0)}" in item["kept_because"]
        assert "local to each machine" in item["kept_because"]
    assert said[0] == 0 and "(kept: the lease holder" in said[1], said
    assert listed[0] == 0 and "(gc keeps it: the lease holder" in listed[1], listed
    assert staged(root) == live_staging
    (out / "h.resume").touch()
    assert holding.wait(STARTUP) == 0, holding.output
    assert saved_steps(out, "h", 0) == [1, 2]

    forced = jobs.start(plain(root, out, "f", "--saves", "1", "--hold-in-save", "1", *held))
    wait_until((out / "f.held").exists, "the third save reached its hold", STARTUP)
    ((status, printed, errors),) = cli_elsewhere(("gc", "--json", "--force"))
    assert status == 0, (printed, errors)
    removed = json.loads(printed)["removed"]
    assert [Path(path).name.split(".")[0] for path in removed] == ["step-00000003"], removed
    (out / "f.resume").touch()
    assert forced.wait(STARTUP) == 0, forced.output
    (failure,) = logged(out, "f", 0, "failed")
    assert failure["type"] == "StagedFileMismatch", failure
    assert "was removed while this save wrote it" in failure["error"], failure
    assert "shared by every rank" not in failure["error"], failure
    assert RootLayout.at(root).committed_steps() == [1, 2]


@pytest.mark.timeout(400)
def test_a_fenced_job_commits_nothing(jobs: Jobs) -> None:
    """A job on another host (a UTS namespace of its own) loses its lease: an operator breaks
    it (``distckpt lease --break``), then another job takes the root. Its saves fail on every
    rank with LeaseLost, and nothing of them becomes visible."""
    root, out = jobs.root, jobs.out
    fenced = jobs.start([*_on_another_host(), *plain(root, out, "f", "--saves", "3", "--gate")])
    (out / "f.go-1").touch()
    wait_until(lambda: all(saved_steps(out, "f", r) == [1] for r in RANKS), "step 1 saved", STARTUP)
    holder = read_holder(root)
    assert holder is not None and holder.host == "node-a" and holder.generation == 1

    def the_break() -> str:
        broke = run_cli("lease", "--break", str(root))
        return f"{broke.returncode} {broke.stdout} {broke.stderr}"

    # The job's lock is in every /proc/locks of this machine, and a lock held here is a live
    # claimer's: the break runs where the job's is hidden, as on another machine.
    broke = in_a_pid_namespace_of_its_own(the_break)
    assert broke.startswith("0 ") and "broke the lease of" in broke, broke
    (out / "f.go-2").touch()
    wait_until(lambda: all(logged(out, "f", r, "failed") for r in RANKS), "save 2 failed", STARTUP)
    for rank in RANKS:
        (failure,) = logged(out, "f", rank, "failed")
        assert failure["type"] == "LeaseLost" and "an operator broke it" in failure["error"]
    assert RootLayout.at(root).committed_steps() == [1] and staged(root) == []

    with distckpt.CheckpointManager(root) as taker:  # another job takes the root
        (out / "f.go-3").touch()
        wait_until(
            lambda: all(len(logged(out, "f", r, "failed")) == 2 for r in RANKS), "3", STARTUP
        )
        for rank in RANKS:
            failure = logged(out, "f", rank, "failed")[-1]
            assert failure["type"] == "LeaseLost" and f"pid {os.getpid()}" in failure["error"]
        assert taker.steps() == [1] and staged(root) == []
        assert taker.save(2, {"w": 2}).step == 2
    assert fenced.wait(STARTUP) == 0, fenced.output
    record = json.loads((root / LEASE_RECORD_NAME).read_text())
    assert record["pid"] == os.getpid() and record["generation"] == 2
    assert record["released_utc"] is not None  # the fenced job's close left it alone
    assert distckpt.verify(root).ok


@pytest.mark.torchrun
@pytest.mark.timeout(500)
def test_orphans_of_a_killed_torchrun_agent_stop_committing(jobs: Jobs) -> None:
    """Only job A's torchrun agent is SIGKILLed: its workers live on (sessions of their own)
    and keep saving. Each notices its launcher is gone at its next save, which fails on every
    rank with LauncherGone; A's rank 0 gives the root up, and job B, waiting for it, resumes
    from A's last checkpoint. Steps only grow; no step of A comes after B's first."""
    root, out = jobs.root, jobs.out
    first = jobs.start(under_torchrun(root, out, "a", "--saves", "100000", "--pause", "0.2"))
    wait_until(lambda: len(saved_steps(out, "a", 0)) >= 2, "job A saved twice", STARTUP)
    second = jobs.start(under_torchrun(root, out, "b", "--saves", "3", "--wait", "300"))
    wait_until(lambda: all(logged(out, "b", r, "opening") for r in RANKS), "job B began", STARTUP)
    assert not logged(out, "b", 0, "opened"), "B opened a root A holds"

    orphans = [pid_of(out, "a", rank) for rank in RANKS]
    os.kill(first.process.pid, signal.SIGKILL)  # the agent alone
    first.process.wait(30)
    assert second.wait(300) == 0, second.output
    assert all(_cmdline(pid) for pid in orphans), "the orphans should still be running"
    (out / "a.stop").touch()

    for rank in RANKS:
        entries = [e for e in log(out, "a", rank) if e["event"] in ("saved", "failed")]
        first_failure = next(i for i, e in enumerate(entries) if e["event"] == "failed")
        after = entries[first_failure:]
        assert {e["event"] for e in after} == {"failed"}, after  # nothing saved after that
        assert {e["type"] for e in after} == {"LauncherGone"}, after
        assert "is gone" in after[0]["error"] and "orphan" in after[0]["error"]
        assert len(saved_steps(out, "b", rank)) == 3
    committed = runs_by_step(root)
    runs = [run for _, run, _ in committed]
    assert runs == sorted(runs) and runs[-3:] == ["b"] * 3, committed  # all of A, then B
    a_ids = {run_id for _, run, run_id in committed if run == "a"}
    b_ids = {run_id for _, run, run_id in committed if run == "b"}
    assert len(a_ids) == len(b_ids) == 1 and a_ids != b_ids and None not in a_ids | b_ids
    steps = [step for step, _, _ in committed]
    assert steps == list(range(1, len(steps) + 1))  # B resumed from A's last step
    assert distckpt.verify(root).ok
    wait_until(lambda: staged(root) == [], "the orphans' failed saves left no staging", 30)
