"""Save schedules, retention and metric normalization: pure functions, no I/O."""

from __future__ import annotations

import ast
import importlib
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from distckpt.errors import CheckpointError, InvalidArgument
from distckpt.metrics import normalize_metrics
from distckpt.policy import (
    CheckpointRecord,
    RetentionPolicy,
    SaveSchedule,
    best_step,
    crossed_multiple,
    metric_value,
    missing_monitor,
    rank_by_metric,
    steps_to_keep,
    steps_to_remove,
)


def run_steps(schedule: SaveSchedule, steps: list[int], last_step: int | None = None) -> list[int]:
    """Feed ``steps`` to the step schedule; each save moves ``last_step`` to that step."""
    saved = []
    for step in steps:
        if schedule.due_by_counters(step, None, last_step=last_step, last_epoch=None):
            saved.append(step)
            last_step = step
    return saved


def rec(step: int, epoch: int | None = None, **metrics: float) -> CheckpointRecord:
    return CheckpointRecord(step=step, epoch=epoch, metrics=metrics)


# --------------------------------------------------------------------------------------------
# Save schedules


def test_crossed_multiple_sequence_never_skips_a_save() -> None:
    saved = []
    last: int | None = None
    for step in [1, 4, 6, 9, 11, 12, 20, 21]:
        if crossed_multiple(step, last, 5):
            saved.append(step)
            last = step
    assert saved == [6, 11, 20]


def test_step_schedule_matches_crossed_multiple() -> None:
    assert run_steps(SaveSchedule(every_n_steps=5), [1, 4, 6, 9, 11, 12, 20, 21]) == [6, 11, 20]


def test_crossed_multiple_basics() -> None:
    assert not crossed_multiple(0, None, 5)
    assert crossed_multiple(5, None, 5)
    assert not crossed_multiple(5, 5, 5)
    # A jump over several multiples fires once.
    assert crossed_multiple(17, 3, 5)
    # Going backwards never fires.
    assert not crossed_multiple(3, 12, 5)
    with pytest.raises(InvalidArgument):
        crossed_multiple(3, None, 0)


def test_every_step_saves_every_step() -> None:
    assert run_steps(SaveSchedule(every_n_steps=1), [1, 2, 3, 5]) == [1, 2, 3, 5]


def test_restart_continues_from_restored_step() -> None:
    schedule = SaveSchedule(every_n_steps=5)
    # Resumed from a checkpoint at step 10: no extra save right away, the next one at 15.
    assert run_steps(schedule, [11, 12, 13, 14, 15, 16], last_step=10) == [15]
    # Resumed from an off-schedule checkpoint (say a final save at 12): 15 still fires.
    assert run_steps(schedule, [13, 14, 15], last_step=12) == [15]
    # Resumed from step 10 and the counter jumps past 15: the save is not lost.
    assert run_steps(schedule, [11, 17], last_step=10) == [17]


def test_epoch_schedule() -> None:
    schedule = SaveSchedule(every_n_epochs=2)
    assert not schedule.due_by_counters(100, 1, last_step=None, last_epoch=None)
    assert schedule.due_by_counters(100, 2, last_step=None, last_epoch=None)
    assert not schedule.due_by_counters(101, 2, last_step=100, last_epoch=2)
    assert not schedule.due_by_counters(150, 3, last_step=100, last_epoch=2)
    assert schedule.due_by_counters(200, 4, last_step=100, last_epoch=2)
    # Without an epoch the epoch schedule never fires, and steps alone do not trigger it.
    assert not schedule.due_by_counters(10_000, None, last_step=None, last_epoch=None)


def test_counter_schedules_combine_with_any() -> None:
    schedule = SaveSchedule(every_n_steps=10, every_n_epochs=1)
    # The step schedule alone.
    assert schedule.due_by_counters(10, 0, last_step=0, last_epoch=0)
    # The epoch schedule alone.
    assert schedule.due_by_counters(7, 1, last_step=0, last_epoch=0)
    # Neither.
    assert not schedule.due_by_counters(7, 0, last_step=0, last_epoch=0)
    # Both.
    assert schedule.due_by_counters(10, 1, last_step=0, last_epoch=0)


def test_no_counter_schedule_is_never_due() -> None:
    schedule = SaveSchedule(every_seconds=60.0)
    assert not schedule.due_by_counters(1000, 1000, last_step=None, last_epoch=None)
    assert not SaveSchedule().due_by_counters(1000, 1000, last_step=None, last_epoch=None)
    assert not SaveSchedule().due_by_time(1e9, last_time=0.0)


def test_time_schedule() -> None:
    schedule = SaveSchedule(every_seconds=30)
    assert not schedule.due_by_time(129.9, last_time=100.0)
    assert schedule.due_by_time(130.0, last_time=100.0)
    assert schedule.due_by_time(500.0, last_time=100.0)
    assert not SaveSchedule(every_n_steps=1).due_by_time(1e9, last_time=0.0)


def test_schedule_flags() -> None:
    assert not SaveSchedule().is_set
    assert SaveSchedule(every_n_steps=3).is_set
    assert SaveSchedule(every_n_epochs=3).is_set
    assert SaveSchedule(every_seconds=3).is_set
    assert not SaveSchedule(every_n_steps=3, every_n_epochs=1).needs_agreement
    assert SaveSchedule(every_seconds=0.5).needs_agreement


@pytest.mark.parametrize(
    "kwargs",
    [
        {"every_n_steps": 0},
        {"every_n_steps": -5},
        {"every_n_steps": 2.0},
        {"every_n_steps": True},
        {"every_n_steps": "10"},
        {"every_n_epochs": 0},
        {"every_n_epochs": 1.5},
        {"every_seconds": 0},
        {"every_seconds": -1.0},
        {"every_seconds": math.nan},
        {"every_seconds": math.inf},
        {"every_seconds": "60"},
    ],
)
def test_schedule_validation(kwargs: dict[str, object]) -> None:
    name = next(iter(kwargs))
    with pytest.raises(InvalidArgument, match=name):
        SaveSchedule(**kwargs)  # type: ignore[arg-type]


def test_invalid_argument_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        SaveSchedule(every_n_steps=0)
    with pytest.raises(CheckpointError):
        SaveSchedule(every_n_steps=0)


# --------------------------------------------------------------------------------------------
# Ranking


def test_rank_min_and_max() -> None:
    records = [rec(1, loss=0.5), rec(2, loss=0.2), rec(3, loss=0.9)]
    assert [r.step for r in rank_by_metric(records, "loss", "min")] == [2, 1, 3]
    assert [r.step for r in rank_by_metric(records, "loss", "max")] == [3, 1, 2]
    assert best_step(records, "loss", "min") == 2
    assert best_step(records, "loss", "max") == 3


def test_ties_go_to_the_earlier_step() -> None:
    records = [rec(30, acc=0.9), rec(10, acc=0.9), rec(20, acc=0.8)]
    assert [r.step for r in rank_by_metric(records, "acc", "max")] == [10, 30, 20]
    assert best_step(records, "acc", "max") == 10
    assert best_step(records, "acc", "min") == 20
    # A later checkpoint must strictly improve to become best.
    assert best_step([*records, rec(40, acc=0.9)], "acc", "max") == 10
    assert best_step([*records, rec(40, acc=0.91)], "acc", "max") == 40


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_are_never_best(mode: str, bad: float) -> None:
    records = [rec(1, loss=bad), rec(2, loss=1.0), rec(3, loss=bad)]
    assert [r.step for r in rank_by_metric(records, "loss", mode)] == [2]  # type: ignore[arg-type]
    assert best_step(records, "loss", mode) == 2  # type: ignore[arg-type]
    assert best_step([rec(1, loss=bad)], "loss", mode) is None  # type: ignore[arg-type]


def test_metric_value() -> None:
    assert metric_value(rec(1, loss=0.25), "loss") == 0.25
    assert metric_value(rec(1, loss=3), "loss") == 3.0
    assert metric_value(rec(1, acc=1.0), "loss") is None
    assert metric_value(rec(1, loss=math.nan), "loss") is None
    assert metric_value(rec(1, loss=-math.inf), "loss") is None


def test_unranked_records_are_never_best() -> None:
    records = [rec(1), rec(2, acc=0.5), rec(3, loss=0.1), rec(4, loss=0.3)]
    assert [r.step for r in rank_by_metric(records, "loss", "min")] == [3, 4]
    assert best_step(records, "loss", "min") == 3
    assert best_step(records, None, "min") is None
    assert best_step([rec(1), rec(2)], "loss", "min") is None
    assert best_step([], "loss", "min") is None


def test_rank_rejects_bad_mode() -> None:
    with pytest.raises(InvalidArgument):
        rank_by_metric([rec(1, loss=1.0)], "loss", "lowest")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Retention


def test_retention_validation() -> None:
    with pytest.raises(InvalidArgument, match="keep_last"):
        RetentionPolicy(keep_last=0)
    with pytest.raises(InvalidArgument, match="keep_last"):
        RetentionPolicy(keep_last=True)
    with pytest.raises(InvalidArgument, match="keep_best"):
        RetentionPolicy(keep_best=-1, monitor="loss")
    with pytest.raises(InvalidArgument, match="keep_every_n_steps"):
        RetentionPolicy(keep_every_n_steps=2.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="mode"):
        RetentionPolicy(monitor="loss", mode="lowest")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="keep_best needs monitor"):
        RetentionPolicy(keep_best=1)
    with pytest.raises(InvalidArgument, match="monitor"):
        RetentionPolicy(monitor="")
    # monitor alone is fine: it only names the best checkpoint.
    RetentionPolicy(monitor="loss", mode="max")


def test_keeps_everything() -> None:
    records = [rec(step, loss=1.0 / step) for step in (1, 2, 3, 4)]
    assert RetentionPolicy().keeps_everything
    assert RetentionPolicy(monitor="loss").keeps_everything
    assert not RetentionPolicy(keep_last=1).keeps_everything
    assert not RetentionPolicy(keep_every_n_steps=10).keeps_everything
    assert steps_to_keep(records, RetentionPolicy()) == {1, 2, 3, 4}
    assert steps_to_remove(records, RetentionPolicy(monitor="loss")) == []


def test_keep_last() -> None:
    records = [rec(step) for step in (30, 10, 50, 20, 40)]
    policy = RetentionPolicy(keep_last=2)
    assert steps_to_keep(records, policy) == {40, 50}
    assert steps_to_remove(records, policy) == [10, 20, 30]


def test_keep_last_two_and_best_one_keeps_an_old_best() -> None:
    records = [rec(1, loss=0.9), rec(2, loss=0.1), rec(3, loss=0.5), rec(4, loss=0.6), rec(5)]
    policy = RetentionPolicy(keep_last=2, keep_best=1, monitor="loss")
    assert steps_to_keep(records, policy) == {2, 4, 5}
    assert steps_to_remove(records, policy) == [1, 3]


def test_keep_best_alone_keeps_best_and_newest() -> None:
    records = [rec(1, loss=0.9), rec(2, loss=0.1), rec(3, loss=0.5), rec(4, loss=0.6)]
    policy = RetentionPolicy(keep_best=1, monitor="loss")
    assert steps_to_keep(records, policy) == {2, 4}
    assert steps_to_remove(records, policy) == [1, 3]


def test_keep_best_several_max_mode() -> None:
    records = [rec(1, acc=0.5), rec(2, acc=0.9), rec(3, acc=0.7), rec(4, acc=0.8), rec(5, acc=0.1)]
    policy = RetentionPolicy(keep_best=2, monitor="acc", mode="max")
    assert steps_to_keep(records, policy) == {2, 4, 5}


def test_unranked_records_kept_only_by_other_rules() -> None:
    records = [rec(1, loss=0.5), rec(2), rec(3, loss=math.nan), rec(4, loss=0.7), rec(5)]
    policy = RetentionPolicy(keep_best=3, monitor="loss")
    # Only two records are ranked; keep_best=3 does not pull in unranked ones.
    assert steps_to_keep(records, policy) == {1, 4, 5}
    # keep_last keeps unranked records like any other.
    policy = RetentionPolicy(keep_last=3, keep_best=1, monitor="loss")
    assert steps_to_keep(records, policy) == {1, 3, 4, 5}


def test_best_step_always_kept_when_monitored() -> None:
    records = [rec(1, loss=0.1), rec(2, loss=0.5), rec(3, loss=0.4)]
    policy = RetentionPolicy(keep_last=1, monitor="loss")
    assert steps_to_keep(records, policy) == {1, 3}


def test_milestones() -> None:
    records = [rec(step) for step in range(100, 1100, 100)]
    policy = RetentionPolicy(keep_last=1, keep_every_n_steps=500)
    assert steps_to_keep(records, policy) == {500, 1000}
    policy = RetentionPolicy(keep_every_n_steps=300)
    assert steps_to_keep(records, policy) == {300, 600, 900, 1000}
    assert steps_to_remove(records, policy) == [100, 200, 400, 500, 700, 800]


def test_protected_steps_kept() -> None:
    records = [rec(step) for step in (1, 2, 3, 4, 5)]
    policy = RetentionPolicy(keep_last=1)
    # 99 has no record, so it is not reported as kept.
    assert steps_to_keep(records, policy, protected={2, 99}) == {2, 5}
    assert steps_to_remove(records, policy, protected=[2, 99]) == [1, 3, 4]


def test_retention_edge_cases() -> None:
    policy = RetentionPolicy(keep_last=1, keep_best=1, monitor="loss")
    assert steps_to_keep([], policy) == set()
    assert steps_to_remove([], policy) == []
    assert steps_to_keep([rec(7)], policy) == {7}
    # Records may come from a generator.
    assert steps_to_remove((rec(step) for step in (3, 1, 2)), policy) == [1, 2]


# --------------------------------------------------------------------------------------------
# Metrics from the user


def test_normalize_python_numbers() -> None:
    out = normalize_metrics({"a": 1, "b": 2.5, "c": True, "d": Fraction(1, 4)})
    assert out == {"a": 1.0, "b": 2.5, "c": 1.0, "d": 0.25}
    assert all(type(value) is float for value in out.values())
    assert normalize_metrics(None) == {}
    assert normalize_metrics({}) == {}


def test_normalize_keeps_nan_and_inf() -> None:
    out = normalize_metrics({"nan": math.nan, "inf": math.inf})
    assert math.isnan(out["nan"])
    assert out["inf"] == math.inf


def test_normalize_torch_tensors() -> None:
    loss = torch.tensor(0.5, requires_grad=True) * 2
    out = normalize_metrics(
        {
            "loss": loss,
            "step": torch.tensor(3),
            "one": torch.tensor([0.25]),
            "half": torch.tensor(1.5, dtype=torch.float16),
        }
    )
    assert out == {"loss": 1.0, "step": 3.0, "one": 0.25, "half": 1.5}
    assert all(type(value) is float for value in out.values())


def test_normalize_numpy_values() -> None:
    out = normalize_metrics(
        {
            "f64": np.float64(0.5),
            "f32": np.float32(0.25),
            "i64": np.int64(7),
            "b": np.bool_(True),
            "arr0": np.array(2.0),
        }
    )
    assert out == {"f64": 0.5, "f32": 0.25, "i64": 7.0, "b": 1.0, "arr0": 2.0}
    assert all(type(value) is float for value in out.values())


@pytest.mark.parametrize(
    "value",
    [
        "0.5",
        b"1",
        None,
        [1.0],
        {"x": 1.0},
        1 + 2j,
        object(),
        torch.tensor([1.0, 2.0]),
        torch.zeros(2, 2),
        np.array([1.0, 2.0]),
        np.complex128(1 + 1j),
        10**400,
    ],
)
def test_normalize_rejects_non_numbers(value: object) -> None:
    with pytest.raises(InvalidArgument, match="'bad'"):
        normalize_metrics({"ok": 1.0, "bad": value})


def test_normalize_rejects_bad_keys() -> None:
    with pytest.raises(InvalidArgument, match="str"):
        normalize_metrics({1: 0.5})  # type: ignore[dict-item]
    with pytest.raises(InvalidArgument):
        normalize_metrics([("loss", 0.5)])  # type: ignore[arg-type]


def test_missing_monitor() -> None:
    assert missing_monitor({"acc": 0.5}, "loss")
    assert not missing_monitor({"loss": 0.5}, "loss")
    assert not missing_monitor({}, "loss")
    assert not missing_monitor(None, "loss")
    assert not missing_monitor({"acc": 0.5}, None)


@pytest.mark.parametrize("module_name", ["policy", "metrics"])
def test_pure_modules_do_not_import_torch_or_numpy(module_name: str) -> None:
    module = importlib.import_module(f"distckpt.{module_name}")
    tree = ast.parse(Path(module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"torch", "numpy"}
