"""Jobs checkpointing to an ``s3://`` root on a real S3-protocol server (moto, a subprocess on
127.0.0.1), end to end: 2 ranks SIGKILLed at random instants of their save loop (once under
the real torchrun, agent and workers) and resumed, in both formats, one of them saving
asynchronously, with retention keeping ``best``; the server killed in the middle of a save;
two jobs on one prefix.

The jobs are ``tests/s3_job.py``: every step's state is known in advance (so every listed step
can be checked bit for bit) and every rank logs what happens to it in ``OUT/NAME-rank<r>.jsonl``.
Every process a test starts is killed when the test ends, as in ``tests/test_lease_jobs.py``.
"""

from __future__ import annotations

import contextlib
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt import events
from distckpt.errors import describe_error
from distckpt.layout import step_dir_name
from tests import killing
from tests.ranks import run_ranks
from tests.s3_job import WORLD_SIZE, expected_state, loss_at, template
from tests.s3server import S3Server
from tests.test_lease_jobs import Jobs, log, logged, pid_of, saved_steps
from tests.waiting import wait_until, wait_while_running

REPO = Path(__file__).resolve().parents[1]
S3_JOB = REPO / "tests" / "s3_job.py"
RANKS = range(WORLD_SIZE)
#: steps every job of the kill test trains to; with keep_last=2 and keep_best=1 on loss_at,
#: the root ends with the best step (3: the lowest loss up to 10) and the last two
STEPS = 8
KEPT = [3, STEPS - 1, STEPS]
BALLAST_MIB = 4
#: a SIGKILLed job cannot release the root's lease: the next job on this machine takes it over
#: at once (its holder's process is gone), and would otherwise wait for it to expire (30 s)
LEASE_WAIT = 180.0
STARTUP = 120.0 + LEASE_WAIT
#: the managers' timeout in the server-kill test: what bounds a failure there
SERVER_KILL_TIMEOUT = 30.0
#: how long the async test holds an upload open
UPLOAD_HOLD = 60.0


def job_options(server: S3Server, *options: str) -> list[str]:
    return ["--endpoint", server.endpoint, "--key", server.key, "--secret", server.secret, *options]


def under_torchrun(url: str, out: Path, run: str, *options: str) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [
        *launcher,
        "--nproc-per-node",
        str(WORLD_SIZE),
        str(S3_JOB),
        url,
        str(out),
        run,
        *options,
    ]


def forked(url: str, out: Path, run: str, *options: str) -> list[str]:
    """A job whose ranks tests/ranks.py forks: for the tests where torchrun is not the point.
    :class:`S3Jobs` runs it in a job server that has imported torch already."""
    return [sys.executable, str(S3_JOB), url, str(out), run, *options]


class S3Jobs(Jobs):
    """Jobs of tests/s3_job.py; every process they started is killed at the end."""

    script = S3_JOB
    own_process_rank = "s3_job"

    def close(self) -> None:
        self.kill_all()


@pytest.fixture
def jobs(tmp_path: Path) -> Iterator[S3Jobs]:
    with contextlib.closing(S3Jobs(tmp_path)) as started:
        yield started


def reader(url: str, server: S3Server, **options: Any) -> distckpt.CheckpointManager:
    """A manager that only reads the root (it takes no lease), in this plain process."""
    return distckpt.CheckpointManager(
        url, storage_options=server.storage_options(), read_only=True, **options
    )


def committed_steps(url: str, server: S3Server) -> list[int]:
    with reader(url, server) as mgr:
        return mgr.steps()


def resumed_steps(out: Path, run: str) -> list[Any]:
    """The step each rank of ``run`` resumed from (None: a fresh start); every rank's restore
    equalled that step's known state bit for bit."""
    found = []
    for rank in RANKS:
        (resumed,) = logged(out, run, rank, "resumed")
        assert resumed["exact"], (run, rank, resumed)
        found.append(resumed["step"])
    return found


def assert_every_step_restores_exactly(url: str, server: S3Server, fmt: str) -> None:
    """Each rank's part of every listed step, loaded in this process by ``load_checkpoint``,
    equals the state that rank saved at that step, bit for bit."""
    options = server.storage_options()
    for step in committed_steps(url, server):
        for rank in RANKS:
            state = template(rank, fmt, BALLAST_MIB)
            where = f"{url}/{step_dir_name(step)}"
            checkpoint = distckpt.load_checkpoint(
                where, rank=rank, state=state, storage_options=options
            )
            assert checkpoint.step == step
            killing.assert_equal(expected_state(step, rank, fmt, BALLAST_MIB), state, where)


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("fmt", "async_save", "second_launcher"),
    [
        ("torch", False, forked),
        # torchrun's part (its agent and workers killed, the workers' leftovers not in the
        # way of the next job) is the same in either format: one case pays for its start.
        pytest.param("dcp", True, under_torchrun, marks=pytest.mark.torchrun),
    ],
    ids=["torch-sync", "dcp-async"],
)
def test_jobs_killed_at_random_instants_resume_from_the_newest_committed_step(
    jobs: S3Jobs,
    s3_server: S3Server,
    s3_url: str,
    fmt: str,
    async_save: bool,
    second_launcher: Callable[..., list[str]],
) -> None:
    """SIGKILL of the whole job (every rank and its launcher) at seeded random instants of its
    save loop; a fresh job resumes from the newest committed step, exactly, on every rank. At
    the end retention has kept the best step and the last two, and every one of them restores
    bit for bit. In the "dcp" case the second killed job runs under the real torchrun (agent
    and workers killed, then a job resumes from what it committed); the other jobs fork their
    ranks (the same job and kill, without torchrun's seconds of startup). At least one kill
    lands inside a save, but which is not required: in the "dcp" case it may always be the
    forked job's, the torchrun job killed between saves."""
    out = jobs.out
    options = ["--format", fmt, "--steps", str(STEPS), "--ballast-mib", str(BALLAST_MIB)]
    options += ["--keep-last", "2", "--keep-best", "1", "--wait", str(LEASE_WAIT)]
    options += ["--async-save"] if async_save else []
    chooser = random.Random(fmt)
    newest: int | None = None  # the newest committed step when the next job starts
    inside_saves = 0  # kills that landed while rank 0 was in save()
    for attempt, launcher in enumerate((forked, second_launcher)):
        run = f"killed{attempt}"
        job = jobs.start(launcher(s3_url, out, run, *job_options(s3_server, *options)))
        saves = chooser.randint(1, 2)  # then a random instant within the next saves
        wait_while_running(
            [job],
            lambda run=run, saves=saves: len(saved_steps(out, run, 0)) >= saves,
            f"{run} saved {saves} time(s)",
            STARTUP,
        )
        time.sleep(chooser.uniform(0.0, 0.4))
        jobs.kill_all()  # SIGKILL: every rank and its launcher (the only job)
        inside_saves += log(out, run, 0)[-1]["event"] == "saving"
        assert resumed_steps(out, run) == [newest] * WORLD_SIZE
        newest = max(committed_steps(s3_url, s3_server), default=None)
        done = [entry["step"] for entry in logged(out, run, 0, "saved") if entry["done"]]
        assert not done or (newest is not None and newest >= max(done)), (done, newest)

    assert inside_saves >= 1, "no kill landed inside a save"
    final = jobs.start(forked(s3_url, out, "final", *job_options(s3_server, *options)))
    assert final.wait(STARTUP) == 0, final.output
    assert resumed_steps(out, "final") == [newest] * WORLD_SIZE
    for rank in RANKS:
        assert saved_steps(out, "final", rank) == list(range((newest or 0) + 1, STEPS + 1))
        assert logged(out, "final", rank, "closed"), log(out, "final", rank)
    with reader(s3_url, s3_server, monitor="loss") as mgr:
        assert mgr.steps() == KEPT
        assert mgr.latest_step() == STEPS
        assert mgr.best_step() == min(range(1, STEPS + 1), key=loss_at) == KEPT[0]
    storage = s3_server.storage_options()
    for link, step in (("last", STEPS), ("best", KEPT[0])):  # the pointer objects
        state = template(0, fmt, BALLAST_MIB)
        loaded = distckpt.load_checkpoint(f"{s3_url}/{link}", state=state, storage_options=storage)
        assert loaded.step == step
    assert distckpt.verify(s3_url, storage_options=storage).ok
    assert_every_step_restores_exactly(s3_url, s3_server, fmt)


def _save_through_a_server_kill(
    rank: int, world_size: int, url: str, options: dict[str, Any], out: Path, async_save: bool
) -> dict[str, Any]:
    """Save step 1, then step 2 with the server killed once rank 0 has written its part (rank 0
    waits in its write phase until the test has killed it). What each rank saw, and when."""

    def hold_after_writing(event: events.PhaseEvent) -> None:
        if event.phase == "save.write" and event.rank == 0 and event.step == 2:
            (out / "written").touch()
            wait_until((out / "killed").exists, "the server was killed", 60)

    events.add_listener(hold_after_writing)
    mgr = distckpt.CheckpointManager(
        url, storage_options=options, timeout=SERVER_KILL_TIMEOUT, async_save=async_save
    )
    state = {"w": torch.full((1024,), float(rank))}
    mgr.save(1, state)
    mgr.wait()
    report: dict[str, Any] = {}
    began = time.monotonic()
    try:
        mgr.save(2, state)
        mgr.wait()  # where an async save's failure is raised
    except Exception as exc:
        report["error"] = describe_error(exc)
        report["checkpoint_error"] = isinstance(exc, distckpt.CheckpointError)
    report["seconds"] = time.monotonic() - began
    began = time.monotonic()
    with contextlib.suppress(distckpt.CheckpointError):  # its lease cannot be released
        mgr.close()
    report["close_seconds"] = time.monotonic() - began
    return report


@pytest.mark.timeout(300)
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_the_server_killed_mid_save_fails_the_save_on_every_rank(
    tmp_path: Path, async_save: bool
) -> None:
    """The server is SIGKILLed once rank 0 has written its part of step 2, before the commit:
    every rank raises StoreUnavailable naming the store, within the manager's timeout, and
    closing the manager does not hang either. Step 2 is not reported saved on any rank."""
    server = S3Server().start()
    try:
        url = f"s3://{server.create_bucket()}/ckpt"

        def kill_when_written() -> None:
            wait_until((tmp_path / "written").exists, "rank 0 wrote step 2", 120)
            server.kill()
            (tmp_path / "killed").touch()

        killer = threading.Thread(target=kill_when_written, daemon=True)
        killer.start()
        results = run_ranks(
            _save_through_a_server_kill,
            WORLD_SIZE,
            url,
            # 3 attempts per request, not 5: each failed request then gives up in seconds,
            # not ~8 s; the bound under test is the manager's timeout, not the client's.
            server.storage_options(retries=3),
            tmp_path,
            async_save,
            timeout=4 * SERVER_KILL_TIMEOUT,
            pg_timeout=2 * SERVER_KILL_TIMEOUT,
        )
        killer.join(10)
        reports = [result.unwrap() for result in results]
        endpoint = f"127.0.0.1:{server.port}"
        for rank, report in enumerate(reports):
            assert "error" in report, f"rank {rank} saved step 2 without its server: {report}"
            assert report["checkpoint_error"], report
            assert report["error"].startswith("StoreUnavailable: "), report
            assert endpoint in report["error"], report  # it names the store it could not reach
            assert report["seconds"] < SERVER_KILL_TIMEOUT + 10, report
            assert report["close_seconds"] < SERVER_KILL_TIMEOUT + 10, report
        # Not restarted to look for step 2: a restarted moto server is empty. That no rank
        # reported step 2 saved, and each raised, is the evidence that it was not committed.
    finally:
        server.stop()


@pytest.mark.timeout(300)
def test_an_async_save_returns_before_its_upload_ends(s3_server: S3Server, s3_url: str) -> None:
    """``save`` of an async manager returns while its write phase (the format's files written
    and uploaded) is held open by a phase listener: the blocking part of an async save does
    not wait for the upload, however long that takes. Let go, the save commits."""
    let_go = threading.Event()

    def hold_the_write(event: events.PhaseEvent) -> None:
        if event.phase == "save.write" and event.step == 2:
            let_go.wait(UPLOAD_HOLD)  # bounded: a save() that waited for it fails, not hangs

    state = {"w": torch.arange(2**18, dtype=torch.float32)}
    options = s3_server.storage_options()
    stop_listening = events.add_listener(hold_the_write)
    try:
        with distckpt.CheckpointManager(s3_url, storage_options=options, async_save=True) as mgr:
            mgr.save(1, state)
            mgr.wait()
            began = time.monotonic()
            result = mgr.save(2, state)
            blocking = time.monotonic() - began
            let_go.set()
            assert blocking < UPLOAD_HOLD / 2 and result is not None and not result.done
            committed = mgr.wait()
            assert committed is not None and committed.step == 2
            assert mgr.steps() == [1, 2]
    finally:
        let_go.set()
        stop_listening()


@pytest.mark.timeout(600)
def test_two_jobs_on_one_prefix_one_holds_it_the_other_is_refused_or_waits(
    jobs: S3Jobs, s3_server: S3Server, s3_url: str
) -> None:
    """Two jobs started at once on one prefix: one opens it, the other is refused on every rank
    with RootInUse. A third job waits for it instead, and resumes from the holder's last step
    once it closes. Every step is committed by exactly one job."""
    out = jobs.out
    holding = job_options(s3_server, "--steps", "2", "--hold-open")
    started = {run: jobs.start(forked(s3_url, out, run, *holding)) for run in ("p", "q")}

    def decided(run: str) -> bool:
        return all(logged(out, run, r, "opened") or logged(out, run, r, "refused") for r in RANKS)

    both = list(started.values())
    wait_while_running(
        both, lambda: decided("p") and decided("q"), "both opened or were refused", STARTUP
    )
    winner = next(run for run in started if logged(out, run, 0, "opened"))
    loser = "q" if winner == "p" else "p"
    for rank in RANKS:
        assert logged(out, winner, rank, "opened"), log(out, winner, rank)
        (refusal,) = logged(out, loser, rank, "refused")
        assert refusal["type"] == "RootInUse", refusal
        assert f"pid {pid_of(out, winner, 0)}" in refusal["error"], refusal  # names the holder
    assert started[loser].wait(60) == 0, started[loser].output
    assert all(saved_steps(out, loser, rank) == [] for rank in RANKS)

    holder = [started[winner]]
    wait_while_running(
        holder, lambda: saved_steps(out, winner, 1) == [1, 2], "the winner saved", STARTUP
    )
    waiting = jobs.start(
        forked(s3_url, out, "r", *job_options(s3_server, "--steps", "4", "--wait", "200"))
    )
    holder_pid = pid_of(out, winner, 0)
    # rank 0's word that it found the prefix held and waits: from here on it is in its wait
    held = rf"root {re.escape(s3_url)} is held by .*, pid {holder_pid}, .*: waiting up to 200 s"
    waiting.wait_for(held, STARTUP)
    assert not logged(out, "r", 0, "opened"), "it opened a prefix another job holds"
    assert not logged(out, "r", 0, "refused"), "it was refused instead of waiting"
    (out / f"{winner}.release").touch()
    assert started[winner].wait(60) == 0, started[winner].output
    assert waiting.wait(STARTUP) == 0, waiting.output
    assert resumed_steps(out, "r") == [2] * WORLD_SIZE
    for rank in RANKS:
        assert saved_steps(out, "r", rank) == [3, 4]
    options = s3_server.storage_options()
    runs = []
    for step in committed_steps(s3_url, s3_server):
        where = f"{s3_url}/{step_dir_name(step)}"
        runs.append(distckpt.load_checkpoint(where, storage_options=options).metadata["run"])
    assert runs == [winner, winner, "r", "r"]
