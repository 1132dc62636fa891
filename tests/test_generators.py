"""A ``torch.Generator`` in a saved state: saved as plain data (its state and device, no pickle,
no warning) and restored in place, so that the object a sampler holds continues its stream."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt.errors import GeneratorDeviceMismatch
from tests.older_version import run_older_version
from tests.ranks import run_ranks, values


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
        # Marked per rank as a generator is, so that "dcp" saves it where it looks for one.
        mgr.save(1, {"weight": torch.ones(3), "gen": distckpt.PerRank(saved_on_cuda)})
        state = {"weight": torch.zeros(3), "gen": torch.Generator()}
        with pytest.raises(GeneratorDeviceMismatch) as raised:
            mgr.restore("last", state=state)
    error = raised.value
    assert (error.key, error.saved_device, error.given_device) == ("gen", "cuda:0", "cpu")
    assert isinstance(error, distckpt.InvalidArgument)
    if fmt == "torch":  # a "dcp" read loads tensors in place before anything is checked
        assert torch.equal(state["weight"], torch.zeros(3))


def test_only_the_type_of_a_saved_generators_device_counts(root: Path) -> None:
    """A generator's state does not depend on its device's index (a CUDA generator saved on
    cuda:1 restores into one on cuda:0); shown on the CPU, the only device here, with an index."""
    saved = torch.Generator().manual_seed(4)
    expected = torch.rand(3, generator=torch.Generator().manual_seed(4))
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        mgr.save(1, {"gen": {"generator_state": saved.get_state(), "device": "cpu:0"}})
        generator = torch.Generator()
        mgr.restore("last", state={"gen": generator})
    assert torch.equal(torch.rand(3, generator=generator), expected)


#: Run by the older version: a "torch" checkpoint of a generator at step 1, saved the way it
#: saved one (pickled, with a warning naming allow_pickle=True as the way to read it back).
_OLDER_VERSION_SAVES_A_GENERATOR = """
import json, torch
root = json.loads(sys.argv[1])[0]
with distckpt.CheckpointManager(root, fsync=False) as mgr:
    mgr.save(1, {"gen": torch.Generator().manual_seed(7), "w": torch.ones(1)})
"""


@pytest.mark.parametrize("strict", [True, False])
def test_a_generator_an_older_version_pickled_restores_in_place(
    root: Path, older_distckpt: Path, strict: bool
) -> None:
    run_older_version(older_distckpt, _OLDER_VERSION_SAVES_A_GENERATOR, os.fspath(root))
    generator = torch.Generator().manual_seed(7)
    expected = torch.rand(4, generator=generator)
    torch.rand(5, generator=generator)  # the run moved on
    state = {"gen": generator, "w": torch.zeros(1)}
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        checkpoint = mgr.restore("last", state=state, allow_pickle=True, strict=strict)
    assert checkpoint.missing_keys == checkpoint.unexpected_keys == ()
    assert state["gen"] is generator
    assert torch.equal(torch.rand(4, generator=generator), expected)


def _saves_and_restores_its_rank_generator(rank: int, world_size: int, root: str, fmt: str) -> bool:
    generator = torch.Generator().manual_seed(100 + rank)
    state = {"w": torch.ones(2), "gen": generator}
    with distckpt.CheckpointManager(root, format=fmt, fsync=False, timeout=20) as mgr:
        mgr.save(1, state)
        expected = torch.rand(3, generator=generator)
        torch.rand(11, generator=generator)
        mgr.restore("last", state=state)
    return torch.equal(torch.rand(3, generator=generator), expected)


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_each_rank_gets_its_own_generator_back_unmarked(root: Path, fmt: str) -> None:
    """Ranks seed their generators apart; "dcp", which saves an unmarked value once, saves a
    generator per rank as it does an ``RNGState``."""
    ranks = run_ranks(_saves_and_restores_its_rank_generator, 2, os.fspath(root), fmt)
    assert values(ranks) == [True, True]
