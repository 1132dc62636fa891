"""A ``torch.Generator`` in a saved state: saved as plain data (its state and device, no pickle,
no warning) and restored in place, so that the object a sampler holds continues its stream."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt.errors import GeneratorDeviceMismatch


def nested_state(generator: torch.Generator, other: torch.Generator) -> dict[str, Any]:
    return {"gen": generator, "nested": {"pair": [other, (other, 3)]}}


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_the_same_generator_objects_continue_their_streams_after_a_restore(
    root: Path, fmt: str
) -> None:
    generator = torch.Generator().manual_seed(1)
    other = torch.Generator().manual_seed(2)
    state = nested_state(generator, other)
    with distckpt.CheckpointManager(root, format=fmt, fsync=False) as mgr:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing to pickle, so nothing to warn of
            mgr.save(1, state)
        expected = torch.rand(4, generator=generator), torch.rand(4, generator=other)
        torch.rand(7, generator=generator)  # training goes on, then the job restarts
        torch.rand(9, generator=other)
        checkpoint = mgr.restore("last", state=state)
    assert checkpoint.missing_keys == checkpoint.unexpected_keys == ()
    assert state["gen"] is generator and state["nested"]["pair"][0] is other
    assert state["nested"]["pair"][1][0] is other
    assert torch.equal(torch.rand(4, generator=generator), expected[0])
    assert torch.equal(torch.rand(4, generator=other), expected[1])


def test_a_saved_generator_reads_back_as_its_state_and_device(root: Path) -> None:
    generator = torch.Generator().manual_seed(3)
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        mgr.save(1, {"gen": generator})
    loaded = distckpt.load_checkpoint(root).state["gen"]
    assert loaded["device"] == "cpu"
    assert torch.equal(loaded["generator_state"], generator.get_state())


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_a_generator_of_another_device_is_refused_naming_both_devices(root: Path, fmt: str) -> None:
    # This machine has no CUDA to make a CUDA generator on: its saved form is written as data.
    saved_on_cuda = {"generator_state": torch.Generator().get_state(), "device": "cuda:0"}
    with distckpt.CheckpointManager(root, format=fmt, fsync=False) as mgr:
        mgr.save(1, {"weight": torch.ones(3), "gen": saved_on_cuda})
        state = {"weight": torch.zeros(3), "gen": torch.Generator()}
        with pytest.raises(GeneratorDeviceMismatch) as raised:
            mgr.restore("last", state=state)
    error = raised.value
    assert (error.key, error.saved_device, error.given_device) == ("gen", "cuda:0", "cpu")
    assert isinstance(error, distckpt.InvalidArgument)
    if fmt == "torch":  # a "dcp" read loads tensors in place before anything is checked
        assert torch.equal(state["weight"], torch.zeros(3))
