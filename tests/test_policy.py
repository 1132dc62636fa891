"""Save schedules (steps, epochs, time, listed steps, the throttle), zero refused where None turns
an option off, and metric normalization: pure functions, no I/O."""

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
    RetentionPolicy,
    SaveSchedule,
    crossed_multiple,
    missing_monitor,
    seconds_since_created,
)


def run_steps(schedule: SaveSchedule, steps: list[int], last_step: int | None = None) -> list[int]:
    """Feed ``steps`` to the step schedule; each save moves ``last_step`` to that step."""
    saved = []
    for step in steps:
        if schedule.due_by_counters(step, None, last_step=last_step, last_epoch=None):
            saved.append(step)
            last_step = step
    return saved


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


def test_seconds_since_created_clamps_unknown_and_future_times_to_now() -> None:
    assert seconds_since_created(1000.0, 1030.5) == 30.5
    assert seconds_since_created(None, 1030.5) == 0.0  # unknown: the interval starts now
    assert seconds_since_created(2000.0, 1030.5) == 0.0  # a clock ahead: made just now
    assert seconds_since_created(math.nan, 1030.5) == 0.0


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
# Zero is not "off": None is


ZERO_REFUSING_OPTIONS = [
    (SaveSchedule, "every_n_steps", {}),
    (SaveSchedule, "every_n_epochs", {}),
    (SaveSchedule, "every_seconds", {}),
    (SaveSchedule, "min_seconds_between_saves", {}),
    (RetentionPolicy, "keep_last", {}),
    (RetentionPolicy, "keep_best", {"monitor": "loss"}),
    (RetentionPolicy, "keep_every_n_steps", {}),
    (RetentionPolicy, "keep_every_n_seconds", {}),
]


@pytest.mark.parametrize(("cls", "name", "extra"), ZERO_REFUSING_OPTIONS)
@pytest.mark.parametrize("zero", [0, 0.0])
def test_zero_says_none_turns_it_off(cls: type, name: str, extra: dict, zero: float) -> None:
    with pytest.raises(InvalidArgument, match=f"{name}=0 is not accepted: use None to turn it off"):
        cls(**{name: zero}, **extra)
    # None is the off value, and is accepted.
    cls(**{name: None}, **extra)


@pytest.mark.parametrize(("cls", "name", "extra"), ZERO_REFUSING_OPTIONS)
def test_negative_values_are_refused_as_not_positive(cls: type, name: str, extra: dict) -> None:
    with pytest.raises(InvalidArgument, match=f"{name} must be a positive") as caught:
        cls(**{name: -1}, **extra)
    assert "use None" not in str(caught.value)


@pytest.mark.parametrize(("cls", "name", "extra"), ZERO_REFUSING_OPTIONS)
def test_numpy_numbers_are_taken_as_the_python_numbers_they_are(
    cls: type, name: str, extra: dict
) -> None:
    """A count or interval read from a NumPy array or computed in NumPy is taken (and kept as
    a plain int or float); a float count, even a whole one, and text are refused, as in
    storage_options (distckpt.arguments)."""
    taken = getattr(cls(**{name: np.int64(3)}, **extra), name)
    assert taken == 3 and type(taken) in (int, float), type(taken)
    if "seconds" in name:
        assert getattr(cls(**{name: np.float32(2.5)}, **extra), name) == 2.5
    else:
        for refused in (3.0, "3", np.float64(3.0), True):
            with pytest.raises(InvalidArgument, match=f"{name} must be a positive int"):
                cls(**{name: refused}, **extra)
    with pytest.raises(InvalidArgument, match=f"{name}=0 is not accepted"):
        cls(**{name: np.int64(0)}, **extra)
    schedule = SaveSchedule(save_on_steps=[np.int64(5), 2])
    assert schedule.save_on_steps == (2, 5) and all(type(s) is int for s in schedule.save_on_steps)


# --------------------------------------------------------------------------------------------
# save_on_steps


def run_listed(steps_called: list[int], listed: list[int], last: int | None = None) -> list[int]:
    return run_steps(SaveSchedule(save_on_steps=listed), steps_called, last_step=last)


def test_save_on_steps_fires_on_reaching_or_crossing_a_listed_step() -> None:
    # Equality fires; jumping over a listed step fires once at the first step past it.
    assert run_listed([1, 2, 3, 4, 5, 6], [3, 5]) == [3, 5]
    assert run_listed([1, 4, 9, 12, 30], [3, 5, 10, 11, 100]) == [4, 9, 12]
    # A jump over several listed steps saves once.
    assert run_listed([2, 50, 51], [5, 10, 20]) == [50]


def test_save_on_steps_first_save_and_restart() -> None:
    # No save yet: any listed step at or below the current step is due, 0 included.
    assert SaveSchedule(save_on_steps=[0]).due_by_counters(0, None, last_step=None, last_epoch=None)
    assert run_listed([7, 8], [5]) == [7]
    # Restarted from step 10, a listed step at 10 is not saved again; 15 is.
    assert run_listed([11, 12, 15, 16], [10, 15], last=10) == [15]
    # Restarted from an off-list step 12 past listed 11: 11 is not redone.
    assert run_listed([13, 14], [11], last=12) == []


def test_save_on_steps_combines_with_other_schedules_by_any() -> None:
    schedule = SaveSchedule(every_n_steps=10, save_on_steps=(3, 25))
    assert run_steps(schedule, list(range(1, 31))) == [3, 10, 20, 25, 30]


def test_save_on_steps_normalized_and_validated() -> None:
    assert SaveSchedule(save_on_steps=[30, 10, 10, 20]).save_on_steps == (10, 20, 30)
    assert SaveSchedule(save_on_steps={5}).save_on_steps == (5,)
    assert SaveSchedule(save_on_steps=None).save_on_steps == ()  # type: ignore[arg-type]
    assert not SaveSchedule(save_on_steps=[]).is_set
    assert SaveSchedule(save_on_steps=[4]).is_set
    # A counter schedule: every rank decides alone.
    assert not SaveSchedule(save_on_steps=[4]).needs_agreement
    assert SaveSchedule(save_on_steps=[1, 2]) == SaveSchedule(save_on_steps=(2, 1))
    for bad in ("10", 10, [1, -1], [1.0], [True], {"a": 1}):
        with pytest.raises(InvalidArgument, match="save_on_steps"):
            SaveSchedule(save_on_steps=bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# min_seconds_between_saves


def test_throttle_off_never_holds_back() -> None:
    schedule = SaveSchedule(every_n_steps=1)
    assert not schedule.throttled(100.0, last_started=99.9, in_flight=True)
    assert not schedule.needs_agreement


def test_throttle_by_time_since_the_previous_save_began() -> None:
    schedule = SaveSchedule(every_n_steps=1, min_seconds_between_saves=30)
    assert schedule.needs_agreement  # rank 0's clock decides
    assert not schedule.throttled(100.0, last_started=None, in_flight=False)
    assert schedule.throttled(129.9, last_started=100.0, in_flight=False)
    assert not schedule.throttled(130.0, last_started=100.0, in_flight=False)
    # A save still in flight holds the next one back however long ago it began.
    assert schedule.throttled(1e9, last_started=100.0, in_flight=True)
    assert schedule.throttled(0.0, last_started=None, in_flight=True)


def test_throttle_alone_is_not_a_schedule() -> None:
    # Continuous checkpointing: every save() call asks, the throttle thins them out.
    schedule = SaveSchedule(min_seconds_between_saves=5)
    assert not schedule.is_set
    assert schedule.needs_agreement


def test_throttled_save_is_deferred_not_lost() -> None:
    # The caller's loop: a held-back save leaves last_step as it was, so it stays due.
    schedule = SaveSchedule(every_n_steps=10, min_seconds_between_saves=60)
    last_step: int | None = None
    last_started: float | None = None
    saved = []
    for step, now in [(10, 0.0), (20, 30.0), (21, 50.0), (22, 61.0), (30, 62.0), (40, 200.0)]:
        due = schedule.due_by_counters(step, None, last_step=last_step, last_epoch=None)
        if due and not schedule.throttled(now, last_started=last_started, in_flight=False):
            saved.append(step)
            last_step, last_started = step, now
    assert saved == [10, 22, 40]


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
