"""Mappings other than dicts and OrderedDicts in a "torch" save (a ``defaultdict``, a
``Counter``) are kept whole, pickled with their type as ``torch.save`` keeps them, in a sync
and an async save alike: a default restore loads them as ``torch.load(weights_only=True)``
does (a ``Counter``, on its allow-list) or refuses them (a ``defaultdict``: the save warned),
and ``allow_pickle=True`` gives them back with their type."""

from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt.errors import UnsafeCheckpoint

MODES = [False, True]
MODE_IDS = ["sync", "async"]


def save(root: Path, state: dict[str, Any], *, async_save: bool) -> None:
    with distckpt.CheckpointManager(root, async_save=async_save, fsync=False) as manager:
        manager.save(1, state)
        manager.wait()


@pytest.mark.parametrize("async_save", MODES, ids=MODE_IDS)
def test_a_counter_comes_back_a_counter_from_a_default_restore(
    root: Path, async_save: bool
) -> None:
    save(root, {"counts": collections.Counter({"a": 3, "b": 1})}, async_save=async_save)
    got = distckpt.load_checkpoint(root).state["counts"]
    assert type(got) is collections.Counter and got.most_common(1) == [("a", 3)]


@pytest.mark.parametrize("async_save", MODES, ids=MODE_IDS)
def test_a_defaultdict_warns_at_the_save_is_refused_by_default_and_kept_with_pickles(
    root: Path, async_save: bool, caplog: pytest.LogCaptureFixture
) -> None:
    per_class = collections.defaultdict(list, {"cat": [1, 2]})
    with caplog.at_level(logging.WARNING, logger="distckpt"):
        save(root, {"per_class": per_class}, async_save=async_save)
    assert "collections.defaultdict" in caplog.text
    with pytest.raises(UnsafeCheckpoint, match=r"collections\.defaultdict"):
        distckpt.load_checkpoint(root)
    got = distckpt.load_checkpoint(root, allow_pickle=True).state["per_class"]
    assert type(got) is collections.defaultdict and got == per_class
    got["dog"].append(3)  # its default_factory came back with it
    assert got["dog"] == [3]


@pytest.mark.parametrize("async_save", MODES, ids=MODE_IDS)
def test_tensors_inside_a_defaultdict_are_saved_as_at_the_save_and_restored_in_place(
    root: Path, async_save: bool
) -> None:
    weights = torch.arange(4.0)
    with distckpt.CheckpointManager(root, async_save=async_save, fsync=False) as manager:
        manager.save(1, {"by_name": collections.defaultdict(list, {"w": weights})})
        with torch.no_grad():
            weights.add_(100)  # after save() returned: an async save's snapshot must not see it
        manager.wait()
    given = torch.zeros(4)
    state = {"by_name": collections.defaultdict(list, {"w": given})}
    distckpt.load_checkpoint(root, state=state, allow_pickle=True)
    assert state["by_name"]["w"] is given and given.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_dcp_saves_a_defaultdict_as_a_dict_of_its_items_without_a_warning(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """DCP flattens every mapping into its keys: nothing is pickled whole, nothing to warn of."""
    saved = {"by_name": collections.defaultdict(list, {"w": torch.arange(2.0), "ids": [1]})}
    with (
        caplog.at_level(logging.WARNING, logger="distckpt"),
        distckpt.CheckpointManager(root, format="dcp", fsync=False) as manager,
    ):
        manager.save(1, saved)
        state = {"by_name": collections.defaultdict(list, {"w": torch.zeros(2), "ids": [0]})}
        manager.restore("last", state=state)
    assert "allow_pickle" not in caplog.text
    assert state["by_name"]["w"].tolist() == [0.0, 1.0] and state["by_name"]["ids"] == [1]


def test_an_object_with_a_state_dict_inside_a_defaultdict_is_pickled_as_it_is(root: Path) -> None:
    save(
        root, {"d": collections.defaultdict(dict, {"lin": torch.nn.Linear(1, 1)})}, async_save=False
    )
    got = distckpt.load_checkpoint(root, allow_pickle=True).state["d"]["lin"]
    assert type(got) is torch.nn.Linear
