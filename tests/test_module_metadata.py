"""A module's ``state_dict()`` comes back as ``torch.save`` and ``torch.load(weights_only=True)``
give it back: an ``OrderedDict`` with its ``_metadata`` (each module's version, which
``load_state_dict`` hands to the module's own loading), from a sync or an async save."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import distckpt


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_module_state_dict_keeps_its_type_and_metadata(root: Path, async_save: bool) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    saved = model.state_dict()
    with distckpt.CheckpointManager(root, async_save=async_save, fsync=False) as manager:
        manager.save(1, {"model": model, "copy": saved})
        manager.wait()
    for mmap in (False, True):
        state = distckpt.load_checkpoint(root, mmap=mmap).state
        for got in (state["model"], state["copy"]):
            assert type(got) is type(saved)
            assert got._metadata == saved._metadata
            assert list(got) == list(saved)
            assert all(torch.equal(got[key], saved[key]) for key in saved)


def test_a_plain_dict_stays_a_plain_dict(root: Path) -> None:
    with distckpt.CheckpointManager(root, fsync=False) as manager:
        manager.save(1, {"nested": {"w": torch.ones(1)}})
    assert type(distckpt.load_checkpoint(root).state["nested"]) is dict
