"""Nothing is ever lost: a fault at every step of the save protocol, and random kills.

Every fault point of :mod:`distckpt.faults` is tried in three modes:

* ``raise``: an exception on one rank (an :class:`~distckpt.errors.InjectedFault`);
* ``kill``: SIGKILL of one rank, the others live on;
* ``kill-job``: SIGKILL of every rank at the instant rank 0 reaches the point (a power cut, or
  a launcher that tears the whole job down).

The one-rank modes fire on rank 1 at the points every rank reaches while writing
(``before_shard_write``, ``after_shard_write``, ``before_agreement``, ``after_agreement``) and on
rank 0 at the others, which only rank 0 (the committing rank) reaches. ``kill-job`` always
fires on rank 0, so what is on disk at that instant does not depend on how far rank 1 got.

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

The random-kill run is in ``tests/test_random_kills.py``.
"""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import distckpt
from distckpt import checksums, events, faults
from distckpt.layout import parse_step_dir_name, step_dir_name
from tests.fault_checks import (
    JOB_TIMEOUT,
    PG_TIMEOUT,
    TIMEOUT,
    broken_checkpoints,
    committed_steps,
    describe,
    leftovers,
    link_problems,
    link_target,
    loss_of,
    manager,
    state_matches,
    state_of,
    template_of,
)
from tests.ranks import run_ranks, values
from tests.waiting import after_rank_0_removals

REPORT_ENV = "DISTCKPT_FAULT_REPORT"

MODES = ("raise", "kill", "kill-job")
#: Points every rank reaches while writing: a one-rank fault fires on rank 1 there, the rank
#: that does not commit. Everywhere else only rank 0 reaches the point.
WRITE_SIDE = ("before_shard_write", "after_shard_write", "before_agreement", "after_agreement")
#: Which hit of the point fires, so that it is the third save's.
NTH = {
    "during_link_swap": 4,  # the manager's start repairs the links once, then once per commit
    "during_retention": 1,  # the third save is the first to remove a checkpoint (step 1)
    "during_delete": 1,  # see _faulted_job: after the third save, delete(3)
    "during_staging_cleanup": 1,  # see _faulted_job: the 2nd manager cleans a dead staging dir
}
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


# EIO only: a full disk is real in tests/test_filesystems_space.py (a small ext4 filled by another
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
        # The removals after the start and step 1's commit run in the background: done before
        # step 2, or a late one would empty the trash step 2's failed rename fills.
        after_rank_0_removals(mgr)
        try:
            mgr.save(2, state_of(2, rank))
        except distckpt.CheckpointError as exc:
            out["error"] = (type(exc).__name__, str(exc), exc.step, exc.path)
        out["steps"] = mgr.steps()
        out["restored"] = mgr.restore("last").step
    return out


def _assert_step_2_lost_in_the_rename_is_trashed_until_the_next_start(root: Path) -> None:
    """``last`` still names step 1; what the rename of step 2 left went to the trash, not under a
    step's name, and the next start empties it."""
    assert link_target(root, "last") == step_dir_name(1)
    (lost,) = leftovers(root)["trash"]
    assert parse_step_dir_name(lost) is None and lost.startswith(step_dir_name(2))
    with manager(str(root)) as mgr:
        assert mgr.steps() == [1]
    assert leftovers(root) == {"staging": [], "trash": []}


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
    _assert_step_2_lost_in_the_rename_is_trashed_until_the_next_start(root)


def test_a_manifest_lost_in_the_commit_rename_fails_the_save(root: Path) -> None:
    """The check after the rename covers the manifest too: a rename that kept every shard but
    lost ``manifest.json`` left no checkpoint, so the save must not return as committed; what
    the rename left goes to the trash, which the next start empties. The staged manifest is
    removed as the commit's manifest phase ends, just before the rename, through the library's
    own phase listeners (no filesystem here loses one file of a dir it renames)."""

    def lose_the_manifest(event: events.PhaseEvent) -> None:
        if event.phase == "commit.manifest" and event.step == 2:
            (staged,) = root.glob(".staging/step-00000002.*/manifest.json")
            staged.unlink()

    with distckpt.CheckpointManager(root, fsync=False, timeout=TIMEOUT) as mgr:
        mgr.save(1, {"w": torch.zeros(2)})
        after_rank_0_removals(mgr)  # as in _save_shortened_in_the_rename
        stop_losing = events.add_listener(lose_the_manifest)
        try:
            with pytest.raises(distckpt.CheckpointError):
                mgr.save(2, {"w": torch.ones(2)})
        finally:
            stop_losing()
        assert mgr.steps() == [1] and mgr.restore("last").step == 1
    _assert_step_2_lost_in_the_rename_is_trashed_until_the_next_start(root)
