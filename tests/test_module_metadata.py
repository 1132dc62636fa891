"""A module's ``state_dict()`` comes back as ``torch.save`` and ``torch.load(weights_only=True)``
give it back: an ``OrderedDict`` with its ``_metadata`` (each module's version, which
``load_state_dict`` hands to the module's own loading), from a sync or an async save."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import distckpt
from distckpt.containers import copy_of_metadata


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


def test_an_async_save_keeps_the_metadata_as_it_was_at_the_save(root: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    saved = model.state_dict()
    versions = {key: dict(value) for key, value in saved._metadata.items()}
    with distckpt.CheckpointManager(root, async_save=True, fsync=False) as manager:
        manager.save(1, {"copy": saved})
        saved._metadata["1"]["version"] = 99  # after the snapshot, before the write is done
        saved._metadata["new"] = {"version": 1}
        manager.wait()
    got = distckpt.load_checkpoint(root).state["copy"]._metadata
    assert {key: dict(value) for key, value in got.items()} == versions


def test_a_copy_of_metadata_shares_no_dict_with_it() -> None:
    metadata = torch.nn.Sequential(torch.nn.Linear(2, 3)).state_dict()._metadata
    copied = copy_of_metadata(metadata)
    assert type(copied) is type(metadata) and copied == metadata
    assert copied is not metadata
    assert all(copied[key] is not metadata[key] for key in metadata)
