"""Nothing is ever lost: a fault at every step of the save protocol, and random kills.

Every fault point of :mod:`distckpt.faults` is tried in three modes:

* ``raise``: an exception on one rank (an :class:`~distckpt.errors.InjectedFault`);
* ``kill``: SIGKILL of one rank, the others live on;
* ``kill-job``: SIGKILL of every rank at the instant rank 0 reaches the point (a power cut, or
  a launcher that tears the whole job down).

The one-rank modes fire on rank 1 at the points every rank reaches while writing
(``after_shard_write``, ``before_agreement``, ``after_agreement``) and on rank 0 at the others,
which only rank 0 (the committing rank) reaches. ``kill-job`` always fires on rank 0, so what is
on disk at that instant does not depend on how far rank 1 got.

A 2-rank job with ``keep_last=2, monitor="loss"`` saves steps 1, 2, 3 with the fault armed (by
``nth``) to fire during the third save, so retention has step 1 to remove. Then:

* every ``step-*`` dir passes :func:`distckpt.verify`, and the committed steps are exactly what
  the point implies (the rename is the commit point);
* a surviving rank either raised a :class:`distckpt.CheckpointError` or returned a save that is
  really committed, and none hung (``run_ranks`` fails the test past its timeout);
* a restarted 2-rank job opens the root (which cleans ``.staging`` and ``.trash`` and repairs
  ``last`` / ``best``), resumes from the newest committed step with exactly the state saved at
  that step, and saves step 4.

With ``DISTCKPT_FAULT_REPORT=path`` set, each scenario appends its outcome as one JSON line to
``path``; ``scripts/gen_fault_table.py`` renders those lines as the table in ``docs/faults.md``.

The random-kill run (:func:`run_random_kills`, also driven by ``scripts/soak.py``) SIGKILLs a
job saving in a loop at random instants and checks the same after every kill.
"""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import json
import multiprocessing as mp
import os
import random
import signal
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import distckpt
from distckpt import checksums, faults
from distckpt.fsutil import read_link
from distckpt.layout import RootLayout, parse_step_dir_name, step_dir_name
from tests.ranks import init_gloo, rendezvous_file, run_ranks, values
from tests.waiting import after_rank_0_removals

TIMEOUT = 10  # manager collectives and the commit lock: a dead peer must not block for long
PG_TIMEOUT = 10
JOB_TIMEOUT = 30  # run_ranks: past this a job counts as hung and the test fails
REPORT_ENV = "DISTCKPT_FAULT_REPORT"

MODES = ("raise", "kill", "kill-job")
#: Points every rank reaches while writing: a one-rank fault fires on rank 1 there, the rank
#: that does not commit. Everywhere else only rank 0 reaches the point.
WRITE_SIDE = ("after_shard_write", "before_agreement", "after_agreement")
#: Which hit of the point fires, so that it is the third save's.
NTH = {
    "during_link_swap": 4,  # the manager's start repairs the links once, then once per commit
    "during_retention": 1,  # the third save is the first to remove a checkpoint (step 1)
    "during_delete": 1,  # see _faulted_job: after the third save, delete(3)
    "during_staging_cleanup": 1,  # see _faulted_job: the 2nd manager cleans a dead staging dir
}
#: Step 2 is the best: ``best`` and ``last`` differ once step 3 is committed.
LOSS = {1: 0.9, 2: 0.5, 3: 0.7, 4: 0.6}
#: The points at or after the commit (the rename of the staging dir to ``step-N``).
COMMITTED_FROM = "after_rename"
#: Crashes here leave the commit done but retention (removing step 1) not yet done.
BEFORE_RETENTION_DONE = ("after_rename", "during_link_swap", "during_retention")


@dataclass(frozen=True)
class Scenario:
    point: str
    mode: str

    @property
    def rank(self) -> int:
        """The rank the fault fires on."""
        if self.mode == "kill-job":
            return 0
        return 1 if self.point in WRITE_SIDE else 0

    @property
    def nth(self) -> int:
        return NTH.get(self.point, 3)

    @property
    def id(self) -> str:
        return f"{self.point}-{self.mode}"

    def commits_step_3(self) -> bool:
        """Whether the third save is committed: everything from the rename on, and a fault
        on rank 1 after the agreement (rank 0 commits what every rank agreed on)."""
        if self.point == "during_staging_cleanup":
            # A cleanup that fails is reported, never raised, so the manager opens and saves
            # step 3; a killed one never gets there.
            return self.mode == "raise"
        if self.point == "after_agreement":
            return self.rank == 1
        return faults.POINTS.index(self.point) >= faults.POINTS.index(COMMITTED_FROM)

    def steps_after_crash(self) -> list[int]:
        if not self.commits_step_3():
            return [1, 2]
        if self.point in BEFORE_RETENTION_DONE:
            return [1, 2, 3]
        return [2, 3]

    def killed_ranks(self, world_size: int = 2) -> set[int]:
        if self.mode == "kill":
            return {self.rank}
        if self.mode == "kill-job":
            return set(range(world_size))
        return set()


SCENARIOS = [Scenario(point, mode) for point in faults.POINTS for mode in MODES]


# ---------------------------------------------------------------------------------- helpers


def state_of(step: int, rank: int) -> dict[str, Any]:
    """What rank ``rank`` saves at ``step``: a deterministic function of both. The tensor's key
    names the rank, so a sharded format (DCP) keeps each rank's own values."""
    return {"step": step, f"rank{rank}": torch.full((4,), float(step * 10 + rank))}


def template_of(rank: int) -> dict[str, Any]:
    return {"step": -1, f"rank{rank}": torch.zeros(4)}


def state_matches(loaded: Any, template: dict[str, Any], step: int, rank: int) -> bool:
    """Whether a restore of ``step`` gave back what ``rank`` saved, both in the returned state
    and in the template loaded in place."""
    want = state_of(step, rank)
    key = f"rank{rank}"
    return (
        loaded["step"] == step
        and torch.equal(loaded[key], want[key])
        and torch.equal(template[key], want[key])
    )


def loss_of(step: int) -> float:
    """A loss for any step: ``LOSS`` for the fault scenarios, a scrambled one beyond (so that
    ``best`` moves around), never the same for two steps."""
    return LOSS.get(step, ((step * 7919) % 101) / 100 + 0.01 + step * 1e-9)


def entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory)) if directory.is_dir() else []


def leftovers(root: Path) -> dict[str, list[str]]:
    """What a crash can leave: staging dirs (and their lock files) and trash entries."""
    return {"staging": entries(root / ".staging"), "trash": entries(root / ".trash")}


def link_target(root: Path, name: str) -> str | None:
    return read_link(root / name)


def committed_steps(root: Path) -> list[int]:
    return RootLayout.at(root).committed_steps()


def broken_checkpoints(root: Path) -> list[str]:
    """Every ``step-*`` dir that fails verify, with its problems (empty when all pass)."""
    report = distckpt.verify(root)
    return [f"{c.path.name}: {'; '.join(c.problems)}" for c in report.checkpoints if not c.ok]


def link_problems(root: Path) -> list[str]:
    """``last`` must name the newest committed step, ``best`` the best by ``loss_of``; each
    must name a dir that exists and passes verify."""
    steps = committed_steps(root)
    if not steps:
        return []
    want = {"last": steps[-1], "best": min(steps, key=loss_of)}
    problems = []
    for name, step in want.items():
        target = link_target(root, name)
        if target != step_dir_name(step):
            problems.append(f"{name} -> {target}, expected {step_dir_name(step)}")
        elif not distckpt.verify(root / name).ok:
            problems.append(f"{name} -> {target} fails verify")
    return problems


def describe(exc: BaseException) -> dict[str, Any]:
    return {
        "error_type": type(exc).__name__,
        "checkpoint_error": isinstance(exc, distckpt.CheckpointError),
        "error": str(exc)[:500],
        "traceback": traceback.format_exc()[-3000:],
    }


def manager(root: str, **options: Any) -> distckpt.CheckpointManager:
    options.setdefault("keep_last", 2)
    options.setdefault("monitor", "loss")
    options.setdefault("timeout", TIMEOUT)
    return distckpt.CheckpointManager(root, **options)


def append_json_line(path: str, record: dict[str, Any]) -> None:
    """Append one JSON line, under an flock: xdist workers share the report file."""
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------- scenarios


def _gather_pids() -> list[int]:
    pids: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(pids, os.getpid())
    return pids


def _arm(scenario: Scenario, rank: int, pids: list[int], fired: list[str]) -> None:
    """Arm the scenario's fault; ``fired`` gets the point's name when it fires on this rank
    (a raised fault may be caught by the library: after the rename, a failed link swap or
    retention is logged, not raised)."""
    action = "raise" if scenario.mode == "raise" else "kill"
    # DISTCKPT_FAULT's syntax (the variable itself is read only when distckpt is imported).
    faults.parse(f"{scenario.point}:{action}:{scenario.rank}:{scenario.nth}")
    if rank != scenario.rank:
        return
    real_hit, hits = faults.hit, [0]

    def hit(point: str, at_rank: int) -> None:
        if point == scenario.point and at_rank == scenario.rank:
            hits[0] += 1
            if hits[0] == scenario.nth:
                fired.append(point)
                if scenario.mode == "kill-job":
                    # The whole job dies at this instant: SIGKILL the other ranks, then the
                    # library's own fault kills this one.
                    for pid in pids:
                        if pid != os.getpid():
                            os.kill(pid, signal.SIGKILL)
        real_hit(point, at_rank)

    faults.hit = hit  # the manager calls faults.hit through the module: this reaches it


def plant_dead_staging(root: str, step: int, world_size: int) -> Path:
    """What a SIGKILLed save of ``step`` leaves: a staging dir with partial rank files, and
    the writer's lock file, which no process holds any more."""
    staging = Path(root) / ".staging" / f"{step_dir_name(step)}.deadbeef0000-1"
    staging.mkdir(parents=True)
    for rank in range(world_size):
        (staging / f"rank-{rank:05d}.pt").write_bytes(b"partial")
    staging.with_name(staging.name + ".lock").touch()
    return staging


def _faulted_job(rank: int, world_size: int, root: str, scenario: Scenario) -> dict[str, Any]:
    out: dict[str, Any] = {"saved": [], "error_type": None, "checkpoint_error": None}
    out["fired"] = []
    _arm(scenario, rank, _gather_pids(), out["fired"])
    started = time.monotonic()
    try:
        if scenario.point == "during_staging_cleanup":
            # Cleanup runs when a manager opens a root holding a dead writer's staging dir:
            # save 1 and 2, leave the dead staging of a killed save of step 3, open again.
            with manager(root) as mgr:
                for step in (1, 2):
                    mgr.save(step, state_of(step, rank), metrics={"loss": loss_of(step)})
                    out["saved"].append(step)
            if rank == 0:
                plant_dead_staging(root, 3, world_size)
            started = time.monotonic()
            with manager(root) as mgr:
                mgr.save(3, state_of(3, rank), metrics={"loss": loss_of(3)})
                out["saved"].append(3)
        else:
            with manager(root) as mgr:
                for step in (1, 2, 3):
                    started = time.monotonic()
                    mgr.save(step, state_of(step, rank), metrics={"loss": loss_of(step)})
                    out["saved"].append(step)
                if scenario.point == "during_delete":
                    # The links are moved off step 3 first; a crash before it reaches the
                    # trash leaves it committed, and `last` naming step 2 (stale, not dangling).
                    started = time.monotonic()
                    mgr.delete(3)
    except Exception as exc:
        out.update(describe(exc))
    out["seconds"] = round(time.monotonic() - started, 3)
    return out


def _restarted_job(rank: int, world_size: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with manager(root) as mgr:
        if rank == 0:  # rank 0 opened the root: cleanup and link repair are done
            after_rank_0_removals(mgr)
            out["leftovers"] = leftovers(Path(root))
            out["links"] = {name: link_target(Path(root), name) for name in ("last", "best")}
            out["link_problems"] = link_problems(Path(root))
        template = template_of(rank)
        ckpt = mgr.restore("last", state=template)
        out["restored"] = ckpt.step
        out["state_ok"] = state_matches(ckpt.state, template, ckpt.step, rank)
        out["next"] = mgr.save(4, state_of(4, rank), metrics={"loss": loss_of(4)}).step
    return out


def outcome_text(result: dict[str, Any] | None) -> str:
    """ "killed", "ok" (every save returned) or the class of the error the rank raised."""
    if result is None:
        return "killed"
    return "ok" if result["error_type"] is None else str(result["error_type"])


def run_scenario(root: Path, scenario: Scenario) -> dict[str, Any]:
    """Run the faulted job, check the root, restart, check again; returns the record."""
    results = run_ranks(
        _faulted_job,
        2,
        str(root),
        scenario,
        timeout=JOB_TIMEOUT,
        pg_timeout=PG_TIMEOUT,
        expect_killed=True,
    )
    by_rank = {r.rank: values([r])[0] for r in results}
    record: dict[str, Any] = {
        "point": scenario.point,
        "mode": scenario.mode,
        "fault_rank": scenario.rank,
        "nth": scenario.nth,
        "outcomes": {str(rank): outcome_text(by_rank.get(rank)) for rank in range(2)},
        "seconds": {str(rank): out["seconds"] for rank, out in by_rank.items()},
        "errors": {str(rank): out.get("error") for rank, out in by_rank.items()},
        "raw_errors": [
            f"rank {rank}: {out['error_type']}: {out['error']}"
            for rank, out in by_rank.items()
            if out["error_type"] is not None and not out["checkpoint_error"]
        ],
        "saved": {str(rank): out["saved"] for rank, out in by_rank.items()},
        "fired": any(out["fired"] for out in by_rank.values()) or len(by_rank) < 2,
        "steps_after_crash": committed_steps(root),
        "committed3": (root / step_dir_name(3)).is_dir(),
        "last_after_crash": link_target(root, "last"),
        "best_after_crash": link_target(root, "best"),
        "broken_after_crash": broken_checkpoints(root),
        "leftovers_after_crash": leftovers(root),
    }
    restarted = values(
        run_ranks(_restarted_job, 2, str(root), timeout=JOB_TIMEOUT, pg_timeout=PG_TIMEOUT)
    )
    record.update(
        restored=[out["restored"] for out in restarted],
        state_ok=[out["state_ok"] for out in restarted],
        next=[out["next"] for out in restarted],
        leftovers_after_restart=restarted[0]["leftovers"],
        links_after_restart=restarted[0]["links"],
        link_problems_after_restart=restarted[0]["link_problems"],
        final_steps=committed_steps(root),
        final_ok=distckpt.verify(root).ok,
    )
    if os.environ.get(REPORT_ENV):
        append_json_line(os.environ[REPORT_ENV], record)
    return record


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.id)
def test_fault_point(root: Path, scenario: Scenario) -> None:
    record = run_scenario(root, scenario)
    killed = scenario.killed_ranks()
    reported = {int(rank) for rank, text in record["outcomes"].items() if text != "killed"}
    assert reported == {0, 1} - killed, record  # exactly the ranks meant to die died

    # Saves 1 and 2 went through; the third raised a distckpt error or really committed.
    assert record["raw_errors"] == [], record
    for rank in reported:
        assert record["saved"][str(rank)][:2] == [1, 2], record
        if record["outcomes"][str(rank)] == "ok":
            assert record["committed3"], f"rank {rank}'s save(3) returned but it is not committed"
    assert record["fired"], f"the fault never fired: {record}"
    for rank in reported:  # a survivor that failed did so promptly, not at the timeout
        assert record["seconds"][str(rank)] < TIMEOUT / 2, record

    # Nothing lost: exactly the steps the point implies, each one intact.
    assert record["broken_after_crash"] == [], record
    assert record["steps_after_crash"] == scenario.steps_after_crash(), record
    assert record["committed3"] == scenario.commits_step_3(), record
    for name in ("last", "best"):  # a link may lag until the next start, never dangle
        target = record[f"{name}_after_crash"]
        assert target is not None and parse_step_dir_name(target) in record["steps_after_crash"]

    # The restart cleaned up, repaired the links and resumed from the newest step, exactly.
    newest = scenario.steps_after_crash()[-1]
    assert record["leftovers_after_restart"] == {"staging": [], "trash": []}, record
    assert record["link_problems_after_restart"] == [], record
    assert record["restored"] == [newest, newest], record
    assert record["state_ok"] == [True, True], record
    assert record["next"] == [4, 4], record
    assert record["final_ok"], distckpt.verify(root)
    assert record["final_steps"] == ([2, 3, 4] if newest == 3 else [2, 4]), record


def _gen_fault_table() -> Any:
    path = Path(__file__).resolve().parent.parent / "scripts" / "gen_fault_table.py"
    spec = importlib.util.spec_from_file_location("gen_fault_table", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_scenario_is_in_the_doc_table() -> None:
    """docs/faults.md's generated table lists every fault point in every mode."""
    listed = _gen_fault_table().rows_in_doc()
    missing = [(p, m) for p in faults.POINTS for m in MODES if (p, m) not in listed]
    assert not missing, f"docs/faults.md lacks {missing}: run scripts/gen_fault_table.py --write"


# ---------------------------------------------------------------------------------- disk errors


def _disk_error_job(rank: int, world_size: int, root: str, code: int) -> dict[str, Any]:
    """Save steps 1 and 2, then step 3 with rank 1's writes failing with ``code`` after 100
    bytes (a full disk, a dying one); then once the disk is fine again, step 3 once more."""
    out: dict[str, Any] = {"error_type": None}
    with manager(root) as mgr:
        for step in (1, 2):
            mgr.save(step, state_of(step, rank), metrics={"loss": loss_of(step)})
        real_write = checksums.ChecksumWriter._write_all
        landed: dict[int, int] = {}

        def failing_write(self: checksums.ChecksumWriter, view: memoryview) -> None:
            # The disk itself fails after 100 bytes of a file (full, or dying).
            room = 100 - landed.get(id(self), 0)
            if view.nbytes <= room:
                landed[id(self)] = landed.get(id(self), 0) + view.nbytes
                return real_write(self, view)
            if room > 0:
                real_write(self, view[:room])  # part of it lands, as on a real full disk
                landed[id(self)] = 100
            raise OSError(code, os.strerror(code), os.fspath(self.path))

        if rank == 1:
            checksums.ChecksumWriter._write_all = failing_write  # type: ignore[method-assign]
        try:
            mgr.save(3, state_of(3, rank), metrics={"loss": loss_of(3)})
        except Exception as exc:
            out.update(describe(exc))
        finally:
            checksums.ChecksumWriter._write_all = real_write  # type: ignore[method-assign]
        if rank == 0:
            out["steps"] = mgr.steps()
            out["leftovers"] = leftovers(Path(root))
            out["last"] = link_target(Path(root), "last")
            out["broken"] = broken_checkpoints(Path(root))
        out["retry"] = mgr.save(3, state_of(3, rank), metrics={"loss": loss_of(3)}).step
    return out


# EIO only: a full disk is real in tests/test_filesystems.py (a small ext4 filled by another
# process mid-save); no disk here fails with EIO on demand, so this write failure is injected.
@pytest.mark.parametrize("code", [errno.EIO], ids=errno.errorcode.get)
def test_disk_error_on_one_rank(root: Path, code: int) -> None:
    out = values(run_ranks(_disk_error_job, 2, str(root), code, timeout=JOB_TIMEOUT))
    assert out[0]["steps"] == [1, 2]  # no partial checkpoint, the earlier ones intact
    assert out[0]["broken"] == []
    assert out[0]["last"] == step_dir_name(2)
    assert [d for d in out[0]["leftovers"]["staging"] if not d.endswith(".lock")] == []
    assert [rank_out["retry"] for rank_out in out] == [3, 3]  # and the job goes on
    assert distckpt.verify(root).ok
    for rank, rank_out in enumerate(out):
        assert rank_out["checkpoint_error"], rank_out  # a distckpt error, on every rank
        message = rank_out["error"]
        assert "rank 1" in message, f"rank {rank}'s error does not name rank 1: {message}"
        assert os.strerror(code) in message, f"rank {rank}'s error hides the cause: {message}"


# ---------------------------------------------------------------------------------- random kills


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
            f"{self.job_kills} whole-job kills, {self.rank_kills} one-rank kills; "
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
        if mode == "job" and rng.random() < 0.25:
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


@pytest.mark.parametrize(("fmt", "trials"), [("torch", 16), ("dcp", 10)])
def test_random_kills(root: Path, fmt: str, trials: int) -> None:
    """At least 10 random SIGKILLs (of the whole job, or of one rank) of a job saving in a
    loop: after each, every checkpoint verifies, nothing saved is lost, and the next start
    cleans up and resumes from the newest step, exactly. Both formats."""
    seed = int(os.environ.get("DISTCKPT_KILL_SEED", "0"))
    tally = run_random_kills(root, trials=trials, seed=seed, max_seconds=40, fmt=fmt)
    print(tally.summary(2, fmt, seed))
    assert tally.problems == [], "\n".join(tally.problems)
    assert tally.trials >= 10, tally.summary(2, fmt, seed)
    assert tally.job_kills and tally.rank_kills and tally.resumes_checked >= 8


# ---------------------------------------------------------------------------------- commit lost


def _save_shortened_in_the_rename(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """Save step 1 and 2; step 2's rank 1 file loses half its bytes as rank 0 renames it into
    place (after the staged files were checked, before the committed dir is)."""
    if rank == 0:
        real_hit = faults.hit

        def shorten_in_the_rename(point: str, at_rank: int) -> None:
            # No filesystem here shortens a file it renames (fusefat empties whole dirs, tested
            # in tests/test_filesystems.py), so this one is shortened just before the rename.
            staged = list(Path(root, ".staging").glob("step-00000002.*/rank-00001.pt"))
            if point == "before_rename" and staged:
                os.truncate(staged[0], staged[0].stat().st_size // 2)
            real_hit(point, at_rank)

        faults.hit = shorten_in_the_rename  # the manager calls it through the module
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, fsync=False, timeout=TIMEOUT) as mgr:
        mgr.save(1, state_of(1, rank))
        try:
            mgr.save(2, state_of(2, rank))
        except distckpt.CheckpointError as exc:
            out["error"] = (type(exc).__name__, str(exc), exc.step, exc.path)
        out["steps"] = mgr.steps()
        out["restored"] = mgr.restore("last").step
    return out


def test_a_file_shortened_in_the_commit_rename_is_commit_lost_on_every_rank(root: Path) -> None:
    out = values(run_ranks(_save_shortened_in_the_rename, 2, str(root), timeout=JOB_TIMEOUT))
    committed = root / step_dir_name(2)
    for rank_out in out:
        kind, message, step, path = rank_out["error"]
        assert (kind, step, path) == ("CommitLost", 2, os.fspath(committed / "rank-00001.pt"))
        assert "lost step 2 when renaming it into place: rank-00001.pt has" in message
        assert "bytes instead of" in message and "nothing was committed" in message
        assert rank_out["steps"] == [1] and rank_out["restored"] == 1
    assert not committed.exists()
    assert link_target(root, "last") == step_dir_name(1)
    # What the rename left went to the trash, not under a step's name; the next start empties it.
    (lost,) = leftovers(root)["trash"]
    assert parse_step_dir_name(lost) is None and lost.startswith(step_dir_name(2))
    with manager(str(root)) as mgr:
        assert mgr.steps() == [1]
    assert leftovers(root) == {"staging": [], "trash": []}
