"""Nothing is ever lost, however a job dies: the random-kill run (:func:`run_random_kills`, also
driven by ``scripts/soak.py``) SIGKILLs a job saving in a loop at random instants, the whole of
it or one rank, and checks after every kill (as ``tests/test_faults.py`` does after each fault)
that every checkpoint verifies, nothing saved is lost, and the next start cleans up and resumes
from the newest step, exactly.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt import coord_health
from tests.fault_checks import (
    JOB_TIMEOUT,
    PG_TIMEOUT,
    TIMEOUT,
    broken_checkpoints,
    committed_steps,
    describe,
    leftovers,
    link_problems,
    loss_of,
    manager,
    state_matches,
    state_of,
    template_of,
)
from tests.ranks import init_gloo, rendezvous_file, run_ranks, values
from tests.waiting import after_rank_0_removals


def _note(path: Path, **event: Any) -> None:
    """One line of a rank's status file; it outlives a SIGKILL (the page cache keeps it)."""
    event["t"] = round(time.monotonic(), 4)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (json.dumps(event) + "\n").encode())
    finally:
        os.close(fd)


def _saving_loop(rank: int, world_size: int, root: str, status_dir: str, fmt: str) -> None:
    """A rank of a training job that resumes from ``last`` and saves every step, forever."""
    status = Path(status_dir) / f"rank{rank}.jsonl"
    phase = "init"
    try:
        torch.set_num_threads(1)
        init_gloo(rank, world_size, rendezvous_file(status_dir), PG_TIMEOUT)
        phase = "open"
        with manager(root, format=fmt) as mgr:
            if rank == 0:  # the root is open: leftovers cleaned, links repaired
                after_rank_0_removals(mgr)
                _note(
                    status,
                    event="opened",
                    leftovers=leftovers(Path(root)),
                    links=link_problems(Path(root)),
                )
            phase = "restore"
            template = template_of(rank)
            # strict=False: a "dcp" checkpoint also holds the other ranks' keys, not asked for.
            ckpt = mgr.restore("last", state=template, missing_ok=True, strict=False)
            step = 0 if ckpt is None else ckpt.step
            ok = ckpt is None or state_matches(ckpt.state, template, ckpt.step, rank)
            _note(status, event="resumed", step=None if ckpt is None else ckpt.step, ok=ok)
            phase = "save"
            while True:
                step += 1
                mgr.save(step, state_of(step, rank), metrics={"loss": loss_of(step)})
                _note(status, event="saved", step=step)
    except BaseException as exc:
        _note(status, event="error", phase=phase, **describe(exc))
    finally:
        os._exit(0)


def _read_status(status_dir: Path, rank: int) -> list[dict[str, Any]]:
    path = status_dir / f"rank{rank}.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    # A SIGKILL mid-write can cut the last line short.
    return [json.loads(line) for line in lines if line.endswith("}")]


@dataclass
class KillTally:
    """What a random-kill run did and found."""

    trials: int = 0
    job_kills: int = 0
    rank_kills: int = 0
    #: whole-job kills at any instant, start-up included (the others wait for the resume)
    anytime_kills: int = 0
    resumes_checked: int = 0
    committed: int = 0  # saves that returned
    newest: int | None = None
    survivor_errors: dict[str, int] = field(default_factory=dict)
    #: one message per error class survivors raised, and the longest a survivor took
    survivor_examples: dict[str, str] = field(default_factory=dict)
    slowest_survivor: float = 0.0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, world_size: int, fmt: str, seed: int) -> str:
        errors = ", ".join(f"{k} x{v}" for k, v in sorted(self.survivor_errors.items()))
        return (
            f"{self.trials} trials ({world_size} ranks, format {fmt}, seed {seed}): "
            f"{'OK' if not self.problems else f'{len(self.problems)} PROBLEMS'}; "
            f"{self.job_kills} whole-job kills ({self.anytime_kills} at any instant), "
            f"{self.rank_kills} one-rank kills; "
            f"{self.committed} saves returned (newest step {self.newest}); "
            f"{self.resumes_checked} resumes checked; survivors raised: {errors or 'nothing'} "
            f"(slowest after {self.slowest_survivor:.2f} s); "
            f"{self.seconds:.1f} s"
        )


def _wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def _kill_trial(
    root: Path,
    trial: int,
    rng: random.Random,
    tally: KillTally,
    *,
    world_size: int,
    fmt: str,
    modes: tuple[str, ...],
) -> list[str]:
    """Start a job that resumes and saves in a loop, SIGKILL it (all ranks, or one) at a
    random instant, and check the root. Returns the problems found."""
    problems: list[str] = []
    newest_before = tally.newest
    status_dir = root.parent / "status" / f"trial-{trial:05d}"
    status_dir.mkdir(parents=True)
    ctx = mp.get_context("fork")
    procs = [
        ctx.Process(
            target=_saving_loop,
            args=(rank, world_size, str(root), str(status_dir), fmt),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    mode = rng.choice(modes)

    def resumed() -> bool:
        return any(e["event"] in ("resumed", "error") for e in _read_status(status_dir, 0))

    try:
        # The first whole-job kill of a run is always at any instant, so that a short run
        # kills during start-up too whatever the seed; a quarter of the later ones are.
        if mode == "job" and (tally.anytime_kills == 0 or rng.random() < 0.25):
            tally.anytime_kills += 1
            time.sleep(rng.uniform(0, 1.0))  # any instant, start-up included
        else:  # mostly mid-save: a random instant after the job resumed
            if not _wait_for(resumed, JOB_TIMEOUT):
                problems.append("the job did not start within the timeout")
            time.sleep(rng.uniform(0, 0.5))
        killed_at = time.monotonic()  # CLOCK_MONOTONIC: the same clock in every process
        if mode == "job":
            tally.job_kills += 1
            for proc in procs:
                os.kill(proc.pid, signal.SIGKILL)
            victims = set(range(world_size))
        else:
            tally.rank_kills += 1
            victim = rng.randrange(world_size)
            os.kill(procs[victim].pid, signal.SIGKILL)
            victims = {victim}
            for rank, proc in enumerate(procs):
                proc.join(TIMEOUT * 1.5)
                if proc.is_alive():
                    problems.append(f"rank {rank} still running {TIMEOUT * 1.5:g} s after the kill")
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(5)

    events = {rank: _read_status(status_dir, rank) for rank in range(world_size)}
    for rank in set(range(world_size)) - victims:  # survivors: a distckpt error, no hang
        last = events[rank][-1] if events[rank] else {}
        if last.get("event") != "error":
            problems.append(f"survivor rank {rank} ended without an error: {last}")
        elif last["phase"] != "init" and not last["checkpoint_error"]:
            problems.append(f"survivor rank {rank} raised a raw {last['error_type']}: {last}")
        else:
            name = last["error_type"]
            tally.survivor_errors[name] = tally.survivor_errors.get(name, 0) + 1
            tally.survivor_examples.setdefault(name, last["error"])
            tally.slowest_survivor = max(tally.slowest_survivor, last["t"] - killed_at)
    for rank, rank_events in events.items():
        for event in rank_events:
            if event["event"] == "error" and event["t"] < killed_at:
                problems.append(f"rank {rank} failed before any kill: {event}")
            if event["event"] == "opened":
                if event["leftovers"]["trash"] or event["leftovers"]["staging"]:
                    problems.append(f"leftovers after the root was opened: {event['leftovers']}")
                if event["links"]:
                    problems.append(f"links after the root was opened: {event['links']}")
            if event["event"] == "resumed":
                tally.resumes_checked += 1
                if event["step"] != newest_before or not event["ok"]:
                    problems.append(
                        f"rank {rank} resumed from step {event['step']} (state ok: "
                        f"{event['ok']}), but the newest committed step was {newest_before}"
                    )

    # A job killed during its start-up, before it created the root, leaves none to verify; a
    # root gone after it existed shows below as the newest step going back.
    if root.exists():
        problems += [f"after the kill: {p}" for p in broken_checkpoints(root)]
    steps = committed_steps(root)
    newest = steps[-1] if steps else None
    saved = [
        e["step"] for rank_events in events.values() for e in rank_events if e["event"] == "saved"
    ]
    if saved and (newest is None or newest < max(saved)):
        problems.append(f"step {max(saved)} was saved (save returned) but the newest is {newest}")
    if newest_before is not None and (newest is None or newest < newest_before):
        problems.append(f"the newest step went from {newest_before} back to {newest}")
    for step in saved:
        if step not in steps and step >= (newest or 0) - 1:
            problems.append(f"step {step} was saved but is gone (retention keeps the last two)")
    tally.committed += len(set(saved))
    tally.newest = newest
    tally.trials += 1
    return [f"trial {trial} ({mode} kill): {p}" for p in problems]


def _final_check(rank: int, world_size: int, root: str, fmt: str) -> dict[str, Any]:
    with manager(root, format=fmt) as mgr:
        out: dict[str, Any] = {}
        if rank == 0:
            after_rank_0_removals(mgr)
            out["leftovers"] = leftovers(Path(root))
            out["links"] = link_problems(Path(root))
        template = template_of(rank)
        # strict=False: a "dcp" checkpoint also holds the other ranks' keys, not asked for.
        ckpt = mgr.restore("last", state=template, missing_ok=True, strict=False)
        out["restored"] = None if ckpt is None else ckpt.step
        out["ok"] = ckpt is None or state_matches(ckpt.state, template, ckpt.step, rank)
        return out


def run_random_kills(
    root: Path,
    *,
    trials: int,
    world_size: int = 2,
    fmt: str = "torch",
    seed: int = 0,
    modes: tuple[str, ...] = ("job", "rank"),
    max_seconds: float | None = None,
    progress: Any = None,
) -> KillTally:
    """Kill a job saving into ``root`` ``trials`` times at random instants (``modes``: "job"
    kills every rank, "rank" one of them), checking the root after each kill and once more
    with a clean restart at the end. Stops early after ``max_seconds``."""
    rng = random.Random(seed)
    tally = KillTally()
    started = time.monotonic()
    for trial in range(trials):
        if max_seconds is not None and time.monotonic() - started > max_seconds:
            break
        found = _kill_trial(root, trial, rng, tally, world_size=world_size, fmt=fmt, modes=modes)
        tally.problems += found
        if progress is not None:
            progress(trial, tally, found)
    final = values(
        run_ranks(
            _final_check, world_size, str(root), fmt, timeout=JOB_TIMEOUT, pg_timeout=PG_TIMEOUT
        )
    )
    for rank, out in enumerate(final):
        if out["restored"] != tally.newest or not out["ok"]:
            tally.problems.append(f"final restart: rank {rank} restored {out['restored']}")
    if final[0]["leftovers"] != {"staging": [], "trash": []} or final[0]["links"]:
        tally.problems.append(f"final restart: {final[0]['leftovers']} {final[0]['links']}")
    if not distckpt.verify(root).ok:
        tally.problems.append(f"final verify: {distckpt.verify(root)}")
    tally.seconds = time.monotonic() - started
    return tally


#: Random kills per format: what the test asserts at least (scripts/soak.py runs more).
TRIALS = 10

#: Added to the seed per format, so that the dcp case does not replay the torch schedule.
FORMAT_SEED_OFFSET = {"torch": 0, "dcp": 1}

#: How long a survivor here waits for the report of a peer killed between two saves.
DEAD_PEER_REPORT_WAIT = 0.1


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_random_kills(root: Path, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """At least 10 random SIGKILLs (of the whole job, or of one rank) of a job saving in a
    loop: after each, every checkpoint verifies, nothing saved is lost, and the next start
    cleans up and resumes from the newest step, exactly. Both formats."""
    # A survivor of a peer killed between two saves waits PEER_REPORT_WAIT (2 s) for the peer's
    # failure report before raising. A SIGKILLed rank never writes one, and no other peer is
    # left to (2 ranks), so the wait only adds seconds to each one-rank kill; no setting of the
    # manager shortens it alone. The forked ranks inherit this one. How long a survivor takes
    # is test_coord_failures's to check, with the real wait.
    monkeypatch.setattr(coord_health, "PEER_REPORT_WAIT", DEAD_PEER_REPORT_WAIT)
    seed = int(os.environ.get("DISTCKPT_KILL_SEED", "0")) + FORMAT_SEED_OFFSET[fmt]
    tally = run_random_kills(root, trials=TRIALS, seed=seed, max_seconds=40, fmt=fmt)
    print(tally.summary(2, fmt, seed))
    assert tally.problems == [], "\n".join(tally.problems)
    assert tally.trials >= 10, tally.summary(2, fmt, seed)
    assert tally.job_kills and tally.rank_kills and tally.resumes_checked >= 8
    assert tally.anytime_kills >= 1, tally.summary(2, fmt, seed)
