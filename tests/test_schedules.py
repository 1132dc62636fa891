"""Schedules, preemption, best/top-k retention through the manager, on real ranks."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

import distckpt
from distckpt.manifest import MANIFEST_CHECKSUM_KEY
from tests.monitor_jobs import restart_with_another_monitor
from tests.ranks import run_ranks, values


def _jumping_steps(rank: int, world_size: int, root: str) -> list[int]:
    saved = []
    with distckpt.CheckpointManager(root, every_n_steps=5, fsync=False, timeout=20) as mgr:
        for step in (1, 4, 6, 9, 11, 12, 20, 21):
            result = mgr.save(step, {"w": torch.full((2,), float(step))})
            if result is not None:
                saved.append(result.step)
    return saved


def test_steps_that_jump_over_multiples_still_save(tmp_path: Path) -> None:
    assert values(run_ranks(_jumping_steps, 2, str(tmp_path))) == [[6, 11, 20]] * 2
    assert distckpt.CheckpointManager(tmp_path).steps() == [6, 11, 20]


def _restart_continues(rank: int, world_size: int, root: str) -> tuple[int | None, list[int]]:
    saved = []
    with distckpt.CheckpointManager(root, every_n_steps=5, fsync=False, timeout=20) as mgr:
        ckpt = mgr.restore("last", missing_ok=True)
        start = ckpt.step if ckpt else 0
        for step in range(start + 1, start + 8):
            if mgr.save(step, {"s": step}) is not None:
                saved.append(step)
    return start, saved


def test_restart_continues_schedule_from_restored_step(tmp_path: Path) -> None:
    # First run saves at 5; a restart from 5 must not save at 6 at once, and must save at 10.
    first = values(run_ranks(_restart_continues, 2, str(tmp_path)))
    assert first == [(0, [5])] * 2
    second = values(run_ranks(_restart_continues, 2, str(tmp_path)))
    assert second == [(5, [10])] * 2


def test_a_scheduled_save_at_or_below_the_newest_step_found_at_the_start_is_not_due(
    tmp_path: Path,
) -> None:
    """A scheduled save never overwrites: a requeued job's schedule counts from the newest
    checkpoint it found, so a save of that step or an older one returns None (a forced one
    returns the committed checkpoint: test_forced_save_of_committed_step_...)."""
    with distckpt.CheckpointManager(tmp_path, every_n_steps=1, fsync=False) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"s": step})
    with distckpt.CheckpointManager(tmp_path, every_n_steps=1, fsync=False) as mgr:
        assert mgr.save(3, {"s": 30}) is None
        assert mgr.save(2, {"s": 20}) is None
        forced = mgr.save(3, {"s": 30}, force=True)
        assert forced is not None and forced.step == 3
        assert mgr.restore(3, state={"s": 0}).state["s"] == 3  # type: ignore[union-attr]
        assert mgr.steps() == [1, 2, 3]


def test_a_scheduled_save_after_restoring_an_older_step_returns_the_committed_checkpoints(
    tmp_path: Path,
) -> None:
    """The schedule counts from the step restored, here older than the newest: the scheduled
    saves of the committed steps above it are due, and return those checkpoints unchanged."""
    with distckpt.CheckpointManager(tmp_path, every_n_steps=1, fsync=False) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"s": step})
    with distckpt.CheckpointManager(tmp_path, every_n_steps=1, fsync=False) as mgr:
        assert mgr.restore(1, state={"s": 0}) is not None
        assert mgr.save(1, {"s": 10}) is None  # the step restored: not due
        for step in (2, 3):
            result = mgr.save(step, {"s": 10 * step})
            assert result is not None and result.step == step
        assert mgr.restore(3, state={"s": 0}).state["s"] == 3  # type: ignore[union-attr]
        assert mgr.steps() == [1, 2, 3]


def _forced_save_of_a_step_that_fails_its_check(root: Path, manifest_change: str) -> str:
    """The refusal of a forced save of committed step 2 whose manifest was changed: its
    ``format`` named one no version knows, or its checksum left wrong (damage)."""
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        mgr.save(1, {"s": 1})
        mgr.save(2, {"s": 2})
    manifest_path = root / "step-00000002" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if manifest_change == "format":
        manifest.pop(MANIFEST_CHECKSUM_KEY, None)  # so the format is what fails the check
        manifest["format"] = "a-format-of-a-later-version"
    else:
        manifest["epoch"] = 7  # the manifest's checksum no longer matches
    manifest_path.write_text(json.dumps(manifest))
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        with pytest.raises(distckpt.CorruptCheckpoint) as refused:
            mgr.save(2, {"s": 20}, force=True)
        assert mgr.steps() == [1, 2]
    assert refused.value.damaged == (manifest_change != "format")
    return str(refused.value)


def test_a_forced_save_of_a_step_in_an_unknown_format_names_no_delete(tmp_path: Path) -> None:
    message = _forced_save_of_a_step_that_fails_its_check(tmp_path, "format")
    assert "upgrade distckpt" in message and "import the plugin" in message, message
    assert "delete" not in message and "overwrite=True" not in message, message


def test_a_forced_save_of_a_damaged_step_names_delete_and_overwrite(tmp_path: Path) -> None:
    message = _forced_save_of_a_step_that_fails_its_check(tmp_path, "checksum")
    assert "manager.delete(2)" in message and "overwrite=True" in message, message
    assert "upgrade distckpt" not in message, message


class SteppedClock:
    """A monotonic clock the test moves: the real one plus an offset it adds to."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


def _one_rank_clock_ahead(rank: int, world_size: int, root: str, ahead: int) -> list[int]:
    clock = SteppedClock()
    # Only the decisions read this clock: no real clock of one forked rank moves alone.
    distckpt.decisions.time = clock  # type: ignore[attr-defined]
    saved = []
    with distckpt.CheckpointManager(root, every_seconds=3600, fsync=False, timeout=20) as mgr:
        if rank == ahead:
            # Far ahead once the schedule counts from the start (a clock moved before would put
            # that start ahead too): alone this rank would decide to save at every step.
            clock.offset += 10_000.0
        for step in range(1, 6):
            wanted = mgr.should_save(step)
            result = mgr.save(step, {"s": step})
            assert (result is not None) == wanted
            if result is not None:
                saved.append(step)
    return saved


@pytest.mark.parametrize(
    ("world_size", "ahead", "expected"),
    # the vote: an all-gather at 2 ranks, gathered to rank 0 at 3
    [(2, 0, [1]), (2, 1, []), (3, 0, [1]), (3, 2, [])],
    ids=["2 ranks, rank 0 ahead", "2 ranks, rank 1 ahead", "3 ranks, rank 0", "3 ranks, rank 2"],
)
def test_every_seconds_follows_rank_0s_clock_on_every_rank(
    tmp_path: Path, world_size: int, ahead: int, expected: list[int]
) -> None:
    """README: for ``every_seconds``, rank 0's clock decides, for every rank: neither any rank's
    clock nor every rank's."""
    results = values(run_ranks(_one_rank_clock_ahead, world_size, str(tmp_path), ahead))
    assert results == [expected] * world_size


def _time_schedule_fires(rank: int, world_size: int, root: str) -> list[int]:
    saved = []
    with distckpt.CheckpointManager(root, every_seconds=0.2, fsync=False, timeout=20) as mgr:
        for step in range(1, 4):
            time.sleep(0.25)
            if mgr.save(step, {"s": step}) is not None:
                saved.append(step)
    return saved


def test_time_schedule_fires_on_every_rank(tmp_path: Path) -> None:
    assert values(run_ranks(_time_schedule_fires, 2, str(tmp_path))) == [[1, 2, 3]] * 2


def test_every_seconds_at_the_newest_step_found_at_the_start_is_not_due(tmp_path: Path) -> None:
    """README: a call at a step the schedule already counts from returns None (that step is
    saved), also at a new step boundary (a job that resumed its state without ``restore``):
    returning that checkpoint would restart the interval, and the next step would not save."""
    with distckpt.CheckpointManager(tmp_path, fsync=False) as mgr:
        mgr.save(10, {"w": torch.zeros(2)})
    time.sleep(0.1)  # longer than the interval: the job waited in the queue
    with distckpt.CheckpointManager(tmp_path, every_seconds=0.05, fsync=False) as mgr:
        assert mgr.save(10, {"w": torch.zeros(2)}) is None
        saved = mgr.save(11, {"w": torch.zeros(2)})
        assert saved is not None and saved.step == 11


def test_deleting_the_newest_makes_the_schedule_count_from_the_newest_left(tmp_path: Path) -> None:
    """A ``delete`` of the step the schedule counts from moves the count to the newest step
    left: the multiple the deleted save covered is crossed again by the next step."""
    with distckpt.CheckpointManager(tmp_path, every_n_steps=5, fsync=False) as mgr:
        mgr.save(5, {"s": 5})
        mgr.save(10, {"s": 10})
        mgr.delete(10)
        saved = mgr.save(11, {"s": 11})
        assert saved is not None and saved.step == 11
        assert mgr.steps() == [5, 11]


def _forced_save_of_committed_step(rank: int, world_size: int, root: str) -> tuple[int, bool]:
    with distckpt.CheckpointManager(root, every_n_steps=10, fsync=False, timeout=20) as mgr:
        first = mgr.save(10, {"v": 1})
        again = mgr.save(10, {"v": 2}, force=True)
        state = mgr.restore(10).state
        return again.step, first.path == again.path and state["v"] == 1


def test_forced_save_of_committed_step_returns_it_without_overwriting(tmp_path: Path) -> None:
    assert values(run_ranks(_forced_save_of_committed_step, 2, str(tmp_path))) == [(10, True)] * 2


def _preempt_one_rank(rank: int, world_size: int, root: str) -> tuple[list[int], bool, bool]:
    # A forked rank inherits the test process's handler, which an earlier test in the same
    # process may have left other than the default: close must put back that one.
    before = signal.getsignal(signal.SIGUSR1)
    saved = []
    with distckpt.CheckpointManager(
        root, every_n_steps=100, save_on_signal=(signal.SIGUSR1,), fsync=False, timeout=20
    ) as mgr:
        for step in range(1, 10):
            if step == 4 and rank == 1:
                os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 is told
            if mgr.save(step, {"s": step}) is not None:
                saved.append(step)
            if mgr.preempted:
                break
        preempted = mgr.preempted
    restored_handler = signal.getsignal(signal.SIGUSR1) == before
    return saved, preempted, restored_handler


@pytest.mark.parametrize("world_size", [2, 3])  # the vote: an all-gather; gathered to rank 0
def test_signal_on_one_rank_makes_every_rank_save_and_report_preempted(
    tmp_path: Path, world_size: int
) -> None:
    results = values(run_ranks(_preempt_one_rank, world_size, str(tmp_path)))
    assert results == [([4], True, True)] * world_size


def _restore_best_mid_run(rank: int, world_size: int, root: str) -> tuple[list[int], int]:
    """``every_n_steps=5``; at step 11 the best checkpoint so far (step 5) is loaded into a
    separate evaluation model."""
    saved = []
    with distckpt.CheckpointManager(
        root, every_n_steps=5, monitor="loss", fsync=False, timeout=20
    ) as mgr:
        for step in range(1, 14):
            if step == 11:
                evaluated = mgr.restore("best", state={"s": -1}).step
            metrics = {"loss": 1.0 if step == 5 else 2.0}
            if mgr.save(step, {"s": step}, metrics=metrics) is not None:
                saved.append(step)
    return saved, evaluated


def test_restoring_an_older_checkpoint_mid_run_keeps_the_schedule(tmp_path: Path) -> None:
    """The schedule counts from the newest save: loading an older checkpoint does not make
    the next call save out of schedule."""
    results = values(run_ranks(_restore_best_mid_run, 2, str(tmp_path)))
    assert results == [([5, 10], 5)] * 2


def _fine_tune_from_another_root(rank: int, world_size: int, root: str) -> list[int]:
    """A fine-tuning run on a fresh root with ``every_n_steps=10``: it first loads a
    pretrained checkpoint of step 100000 from another root by path, and mid-run the same
    checkpoint again as a teacher's."""
    pretrained = os.path.join(root, "pretrained", "step-00100000")
    with distckpt.CheckpointManager(os.path.dirname(pretrained), fsync=False, timeout=20) as mgr:
        mgr.save(100000, {"w": torch.ones(2)})
    saved = []
    with distckpt.CheckpointManager(
        os.path.join(root, "fine-tune"), every_n_steps=10, fsync=False, timeout=20
    ) as mgr:
        mgr.restore(pretrained, state={"w": torch.zeros(2)})
        saved += [s for s in range(1, 21) if mgr.save(s, {"w": torch.zeros(2)})]
        mgr.restore(pretrained, state={"w": torch.zeros(2)})  # a teacher, loaded mid-run
        saved += [s for s in range(21, 31) if mgr.save(s, {"w": torch.zeros(2)})]
    return saved


def test_a_checkpoint_of_another_root_does_not_move_the_schedule(tmp_path: Path) -> None:
    """Loading another root's checkpoint by path (a pretrained model, a teacher) leaves the
    schedule counting this run's own steps: it saves at 10, 20, 30 as on a fresh root."""
    results = values(run_ranks(_fine_tune_from_another_root, 2, str(tmp_path)))
    assert results == [[10, 20, 30]] * 2


def test_a_resume_through_a_symlink_to_the_root_moves_the_schedule(tmp_path: Path) -> None:
    """The resume may name this root's checkpoint by a path through a symlink: still its own,
    so the schedule counts from the step it loads, unlike the same step of a copy of the root
    (another root's)."""
    root, linked, copy = tmp_path / "root", tmp_path / "linked", tmp_path / "copy"
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        for step in (10, 20):
            mgr.save(step, {"w": torch.ones(2)})
    linked.symlink_to(root)
    shutil.copytree(root, copy, symlinks=True)
    due_at_20 = {}
    for name, path in (("through the symlink", linked), ("another root", copy)):
        with distckpt.CheckpointManager(root, every_n_steps=10, fsync=False) as mgr:
            assert mgr.restore(path / "step-00000010").step == 10
            due_at_20[name] = mgr.should_save(20)  # counted from 10, or still from 20
    assert due_at_20 == {"through the symlink": True, "another root": False}


def _preempt_at_a_committed_step(
    rank: int, world_size: int, root: str, schedule: dict[str, int]
) -> list[tuple[int, int | None, bool]]:
    """Gradient accumulation 4 (``save(step)`` after every micro-batch), with the signal
    reaching rank 1 just after the save of step 500 committed (scheduled, or explicit)."""
    calls = []
    with distckpt.CheckpointManager(
        root, **schedule, save_on_signal=(signal.SIGUSR1,), fsync=False, timeout=20
    ) as mgr:
        for micro, step in enumerate([500, 500, 500, 500, 501, 501, 501, 501, 502]):
            if micro == 1 and rank == 1:
                os.kill(os.getpid(), signal.SIGUSR1)
            result = mgr.save(step, {"s": step})
            calls.append((step, result and result.step, mgr.preempted))
            if mgr.preempted:
                break
    return calls


@pytest.mark.parametrize(
    "schedule", [{"every_n_steps": 500}, {}], ids=["every_n_steps", "no_schedule"]
)
def test_a_preemption_save_of_a_committed_step_reports_preempted(
    tmp_path: Path, schedule: dict[str, int]
) -> None:
    """The step the signal finds is committed already: that checkpoint is the preemption save,
    and the job stops there instead of running another step. Without a schedule too, where a
    plain save of a committed step raises: a preemption save is not an explicit one."""
    results = values(run_ranks(_preempt_at_a_committed_step, 2, str(tmp_path), schedule))
    assert results == [[(500, 500, False), (500, 500, True)]] * 2
    assert distckpt.CheckpointManager(tmp_path, read_only=True).steps() == [500]


def _best_and_top_k(rank: int, world_size: int, root: str, losses: list[float]) -> dict:
    kwargs = dict(keep_last=2, keep_best=1, monitor="val_loss", mode="min", fsync=False)
    with distckpt.CheckpointManager(root, timeout=20, **kwargs) as mgr:
        for step, loss in enumerate(losses, start=1):
            # Rank 1 reports nonsense: rank 0's metrics are the ones that count.
            metrics = {"val_loss": torch.tensor(loss if rank == 0 else -1.0)}
            mgr.save(step, {"s": step}, metrics=metrics)
        mgr.save(len(losses) + 1, {"s": 0})  # unranked: no metrics at all
    with distckpt.CheckpointManager(root, timeout=20, **kwargs) as again:  # a restart
        return {
            "steps": again.steps(),
            "best": again.best_step(),
            "best_restored": again.restore("best").step,
            "last": again.latest_step(),
        }


def test_keep_last_with_keep_best_keeps_an_old_best(tmp_path: Path) -> None:
    losses = [3.0, 1.0, 2.0, math.nan, 5.0, 4.0]
    out = values(run_ranks(_best_and_top_k, 2, str(tmp_path), losses))
    # Best is step 2 (NaN at step 4 never wins); newest two are 6 and 7 (7 unranked).
    assert out == [{"steps": [2, 6, 7], "best": 2, "best_restored": 2, "last": 7}] * 2
    assert os.readlink(tmp_path / "best") == "step-00000002"
    assert os.readlink(tmp_path / "last") == "step-00000007"


def test_best_is_rebuilt_from_disk_when_the_link_is_lost(tmp_path: Path) -> None:
    values(run_ranks(_best_and_top_k, 1, str(tmp_path), [2.0, 1.0, 3.0]))
    (tmp_path / "best").unlink()
    with distckpt.CheckpointManager(tmp_path, monitor="val_loss", fsync=False) as mgr:
        assert os.readlink(tmp_path / "best") == "step-00000002"  # repaired on start
        assert mgr.restore("best").step == 2


def test_a_monitor_that_ranks_none_leaves_no_best(tmp_path: Path) -> None:
    """After a restart with another ``monitor``, the old metric's best is no best: ``best``
    is removed at the start and retention no longer keeps that step."""
    out = restart_with_another_monitor(tmp_path, fsync=False)
    assert out == {"no monitor": 1, "best_step": None, "steps": [7, 8]}
    assert not os.path.lexists(tmp_path / "best")


def test_retention_without_a_monitor_keeps_the_checkpoint_best_names(tmp_path: Path) -> None:
    """README: a checkpoint stays if it is the target of ``best``, and a manager without
    ``monitor`` leaves ``best`` as it is: its ``keep_last`` must not remove that step, or
    ``best`` would name nothing."""
    state = {"w": torch.zeros(2)}
    with distckpt.CheckpointManager(tmp_path, monitor="loss", fsync=False) as mgr:
        mgr.save(1, state, metrics={"loss": 0.1})
        mgr.save(2, state, metrics={"loss": 0.5})
    with distckpt.CheckpointManager(tmp_path, keep_last=1, fsync=False) as mgr:
        mgr.save(3, state)
        mgr.save(4, state)
        assert mgr.steps() == [1, 4]
    assert os.readlink(tmp_path / "best") == "step-00000001"


def test_milestones_are_kept(tmp_path: Path) -> None:
    with distckpt.CheckpointManager(
        tmp_path, keep_last=1, keep_every_n_steps=10, fsync=False
    ) as mgr:
        for step in range(5, 40, 5):
            mgr.save(step, {"s": step})
        assert mgr.steps() == [10, 20, 30, 35]


def test_missing_monitored_metric_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with distckpt.CheckpointManager(tmp_path, monitor="val_loss", fsync=False) as mgr:
        mgr.save(1, {}, metrics={"train_loss": 1.0})
        mgr.save(2, {}, metrics={"train_loss": 0.5})
        assert mgr.best_step() is None
    warnings = [r for r in caplog.records if "val_loss" in r.getMessage()]
    assert len(warnings) == 1


def _tracked_steps(rank: int, world_size: int, root: str) -> list[int]:
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    tracker = distckpt.StepTracker(optimizer)
    saved = []
    with distckpt.CheckpointManager(root, every_n_steps=2, fsync=False, timeout=20) as mgr:
        for micro_batch in range(16):
            model(torch.ones(1, 2)).sum().backward()
            if micro_batch % 4 == 3:  # 4 micro-batches per optimizer step
                optimizer.step()
                optimizer.zero_grad()
            result = mgr.save(tracker.step, {"model": model, "steps": tracker})
            if result is not None:
                saved.append(result.step)
    return saved


def test_gradient_accumulation_saves_on_optimizer_steps(tmp_path: Path) -> None:
    assert values(run_ranks(_tracked_steps, 2, str(tmp_path))) == [[2, 4]] * 2


def _decision_reused(rank: int, world_size: int, root: str) -> dict[str, object]:
    clock = SteppedClock()
    # Only the decisions read this clock: nothing else in the rank sees time jump.
    distckpt.decisions.time = clock  # type: ignore[attr-defined]
    out: dict[str, object] = {}
    with distckpt.CheckpointManager(root, every_seconds=100, fsync=False, timeout=20) as mgr:
        out["should_save(1)"] = mgr.should_save(1)  # 100 s have not passed since the start
        clock.offset += 200  # now they have: deciding again would save
        out["save(1)"] = mgr.save(1, {"s": 1})
        # Used once: the next save decides for itself (and its step differs anyway).
        out["save(2)"] = getattr(mgr.save(2, {"s": 2}), "step", None)
        out["steps"] = mgr.steps()
    return out


def test_save_reuses_the_decision_should_save_took_for_that_step(tmp_path: Path) -> None:
    expected = {
        "should_save(1)": False,
        "save(1)": None,
        "save(2)": 2,
        "steps": [2],
    }
    assert values(run_ranks(_decision_reused, 2, str(tmp_path))) == [expected] * 2


def test_save_decides_again_for_another_epoch_than_should_saves(tmp_path: Path) -> None:
    with distckpt.CheckpointManager(tmp_path, every_n_epochs=1, fsync=False) as mgr:
        mgr.save(1, {"s": 1}, epoch=0)
        assert not mgr.should_save(2, epoch=0)
        assert mgr.save(2, {"s": 2}, epoch=1) is not None  # epoch 1 is due


def _throttled(rank: int, world_size: int, root: str, over: int) -> list[int | None]:
    clock = SteppedClock()
    # Only the decisions read this clock: no real clock of one forked rank moves alone.
    distckpt.decisions.time = clock  # type: ignore[attr-defined]
    options = {"min_seconds_between_saves": 100, "fsync": False, "timeout": 20}
    with distckpt.CheckpointManager(root, **options) as mgr:
        first = mgr.save(1, {"s": 1})
        if rank == over:
            clock.offset += 200  # this rank's wait is over; the other's has barely begun
        second = mgr.save(2, {"s": 2})
    return [getattr(result, "step", None) for result in (first, second)]


@pytest.mark.parametrize(
    ("over", "expected"), [(0, [1, 2]), (1, [1, None])], ids=["rank 0's over", "rank 1's over"]
)
def test_the_throttle_follows_rank_0s_clock_on_every_rank(
    tmp_path: Path, over: int, expected: list[int | None]
) -> None:
    """README: for ``min_seconds_between_saves``, rank 0's clock decides, for every rank."""
    assert values(run_ranks(_throttled, 2, str(tmp_path), over)) == [expected] * 2
