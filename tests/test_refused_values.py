"""A save warns about values a restore with the default ``allow_pickle=False`` would refuse
(NumPy scalars, named tuples: anything ``torch.load(weights_only=True)`` refuses), once per
manager for each distinct kind, and still saves them; a state of plain values warns nothing."""

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

Point = collections.namedtuple("Point", "x y")

#: (format, async_save) of each way a save is made here
SAVES = [("torch", False), ("torch", True), ("dcp", False)]
SAVE_IDS = ["torch-sync", "torch-async", "dcp-sync"]


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
