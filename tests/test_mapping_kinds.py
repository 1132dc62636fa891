"""A mapping other than a dict or an OrderedDict (a ``defaultdict``, a ``Counter``, a
``MappingProxyType``) is saved as its items, objects with ``state_dict()`` inside it through
it: read without ``state=`` it is a plain dict, and a restore with ``state=`` loads into the
mapping given, which keeps its own type, in both formats."""

from __future__ import annotations

import collections
import types
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt


def saved_state() -> dict[str, Any]:
    linear = torch.nn.Linear(1, 1)
    with torch.no_grad():
        linear.weight.fill_(5.0)
    return {
        "by_name": collections.defaultdict(list, {"w": torch.arange(3.0), "n": 1, "lin": linear}),
        "counts": collections.Counter({"a": 3}),
        "frozen": types.MappingProxyType({"x": 2}),
    }


def save(root: Path, fmt: str, *, async_save: bool = False) -> None:
    with distckpt.CheckpointManager(
        root, format=fmt, async_save=async_save, fsync=False
    ) as manager:
        manager.save(1, saved_state())
        manager.wait()


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_torch_checkpoint_read_without_state_holds_plain_dicts(
    root: Path, async_save: bool
) -> None:
    save(root, "torch", async_save=async_save)
    got = distckpt.load_checkpoint(root).state
    assert {type(value) for value in got.values()} == {dict}
    assert got["by_name"]["w"].tolist() == [0.0, 1.0, 2.0] and got["by_name"]["n"] == 1
    assert got["by_name"]["lin"]["weight"].item() == 5.0  # through its state_dict()
    assert got["counts"] == {"a": 3} and got["frozen"] == {"x": 2}


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_a_restore_with_state_loads_into_the_given_mappings_which_keep_their_type(
    root: Path, fmt: str
) -> None:
    save(root, fmt)
    weights, linear = torch.zeros(3), torch.nn.Linear(1, 1)
    by_name = collections.defaultdict(list, {"w": weights, "n": 0, "lin": linear})
    state = {"by_name": by_name, "counts": collections.Counter({"a": 0}), "frozen": {"x": 0}}
    distckpt.load_checkpoint(root, state=state)
    assert state["by_name"] is by_name and by_name.default_factory is list
    assert by_name["w"] is weights and weights.tolist() == [0.0, 1.0, 2.0]
    assert by_name["n"] == 1 and by_name["lin"] is linear and linear.weight.item() == 5.0
    assert type(state["counts"]) is collections.Counter and state["counts"].most_common() == [
        ("a", 3)
    ]
    assert state["frozen"] == {"x": 2}
