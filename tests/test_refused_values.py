"""A save warns about values a restore with the default ``allow_pickle=False`` would refuse
(NumPy scalars, named tuples: anything ``torch.load(weights_only=True)`` refuses), once per
manager for each distinct set of refused globals, and still saves them; a state of plain
values warns nothing."""

from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import distckpt
from distckpt.errors import UnsafeCheckpoint
from distckpt.weights_only import RefusedValuesWarning, refused_globals

Point = collections.namedtuple("Point", "x y")

#: (format, async_save) of each way a save is made here
SAVES = [("torch", False), ("torch", True), ("dcp", False)]
SAVE_IDS = ["torch-sync", "torch-async", "dcp-sync"]
#: what the look for refused values may pickle of a state holding a large array
PICKLED_BYTES_ALLOWED = 2**20


def refusal_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "distckpt"
        and record.levelno == logging.WARNING
        and "allow_pickle=False refuses" in record.getMessage()
    ]


def save_steps(root: Path, states: list[dict[str, Any]], *, fmt: str, async_save: bool) -> None:
    with distckpt.CheckpointManager(root, format=fmt, async_save=async_save) as manager:
        for step, state in enumerate(states, start=1):
            manager.save(step, state)
        manager.wait()


@pytest.mark.parametrize(("fmt", "async_save"), SAVES, ids=SAVE_IDS)
def test_a_save_warns_once_per_kind_of_refused_value_and_still_saves(
    root: Path, caplog: pytest.LogCaptureFixture, fmt: str, async_save: bool
) -> None:
    scalar = {"w": torch.ones(2), "loss": np.float64(0.25)}
    named = {"w": torch.ones(2), "loss": 0.5, "where": Point(1, 2)}
    with caplog.at_level(logging.WARNING, logger="distckpt"):
        save_steps(root, [scalar, scalar, named, named], fmt=fmt, async_save=async_save)
    warned = refusal_warnings(caplog)
    assert len(warned) == 2, warned  # the NumPy scalar's, then the named tuple's, each once
    assert "numpy" in warned[0] and "Point" not in warned[0]
    assert f"{__name__}.Point" in warned[1]
    for message in warned:
        assert "add_safe_globals" in message and "allow_pickle=True" in message
    if fmt == "torch":  # saved all the same, and refused by a default restore, as warned
        assert sorted(int(p.name.split("-")[1]) for p in root.glob("step-*")) == [1, 2, 3, 4]
        with pytest.raises(UnsafeCheckpoint):
            distckpt.load_checkpoint(root / "step-00000001")
        got = distckpt.load_checkpoint(root / "step-00000001", allow_pickle=True).state
        assert got["loss"] == np.float64(0.25)


@pytest.mark.parametrize(("fmt", "async_save"), SAVES, ids=SAVE_IDS)
def test_a_plain_state_warns_nothing(
    root: Path, caplog: pytest.LogCaptureFixture, fmt: str, async_save: bool
) -> None:
    plain = {
        "w": torch.arange(4.0),
        "nested": {"ids": [1, 2], "pair": (3, 4.5), "name": "run", "none": None},
        "flags": [True, False],
        "blob": b"\x00\x01",
        "step": 7,
        "tensors": [torch.zeros(2), {"bias": torch.ones(3)}],
    }
    with caplog.at_level(logging.WARNING, logger="distckpt"):
        save_steps(root, [plain], fmt=fmt, async_save=async_save)
    assert refusal_warnings(caplog) == []


@pytest.mark.parametrize(
    "value",
    [np.arange(3), range(3), frozenset({1})],
    ids=["numpy-array", "range", "frozenset"],
)
def test_the_other_values_the_readme_names_warn_too(
    root: Path, caplog: pytest.LogCaptureFixture, value: Any
) -> None:
    with caplog.at_level(logging.WARNING, logger="distckpt"):
        save_steps(root, [{"w": torch.ones(1), "value": value}], fmt="torch", async_save=False)
    assert len(refusal_warnings(caplog)) == 1


@pytest.mark.parametrize(("fmt", "async_save"), SAVES, ids=SAVE_IDS)
def test_a_large_array_is_not_pickled_to_look_for_refused_values(
    root: Path, caplog: pytest.LogCaptureFixture, fmt: str, async_save: bool
) -> None:
    # 4 times the pickled bytes allowed below: one pickle of its data would exceed them.
    replay = np.ones(4 * PICKLED_BYTES_ALLOWED // 8)
    state = {"w": torch.ones(2), "replay": replay, "loss": np.float64(0.5), "where": Point(1, 2)}
    with (
        caplog.at_level(logging.WARNING, logger="distckpt"),
        distckpt.CheckpointManager(root, format=fmt, async_save=async_save) as manager,
    ):
        for step in (1, 2, 3):
            manager.save(step, state)
        manager.wait()
        # The manager's own look for refused values, read for its counts: no public call
        # gives them, and a wrapper around torch.save would also count the format's writes.
        looked = manager._saver._refused_values  # type: ignore[union-attr]
        assert looked.pickled_values == 3  # one value of each kind, once for three saves
        assert looked.pickled_bytes < PICKLED_BYTES_ALLOWED
    warned = refusal_warnings(caplog)
    assert len(warned) == 1, warned
    assert "numpy" in warned[0] and f"{__name__}.Point" in warned[0]


def test_a_kind_met_again_in_a_new_set_of_kinds_is_not_pickled_again() -> None:
    looked = RefusedValuesWarning()
    looked.check({"loss": np.float64(0.5)})
    looked.check({"where": Point(1, 2)})
    assert looked.pickled_values == 2
    looked.check({"loss": np.float64(0.25), "where": Point(3, 4), "n": 1})
    looked.check({"loss": np.float64(0.75)})
    assert looked.pickled_values == 2


def test_each_distinct_set_of_refused_globals_warns_once(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scalar = {"loss": np.float64(0.5)}
    named = {"where": Point(1, 2)}
    both = {**scalar, **named}
    with caplog.at_level(logging.WARNING, logger="distckpt"):
        save_steps(root, [scalar, named, both, both, scalar], fmt="torch", async_save=False)
    warned = refusal_warnings(caplog)
    assert len(warned) == 3, warned
    assert "numpy" in warned[2] and f"{__name__}.Point" in warned[2]


@pytest.mark.parametrize(
    "array",
    [
        np.arange(6.0).reshape(2, 3),
        np.arange(12).reshape(3, 4)[:, ::2],
        np.array(1.5),
        np.empty((0, 2)),
        np.array([Point(1, 2)], dtype=object),
    ],
    ids=["2-d", "strided", "0-d", "empty", "objects"],
)
def test_an_array_warns_of_the_globals_of_the_whole_array(
    caplog: pytest.LogCaptureFixture, array: np.ndarray
) -> None:
    expected, _ = refused_globals([array])
    with caplog.at_level(logging.WARNING, logger="distckpt"):
        RefusedValuesWarning().check({"array": array})
    (warned,) = refusal_warnings(caplog)
    assert f"values of {', '.join(sorted(expected))}, which" in warned
