"""A ``ModelOptimizerState`` gives the same answer in both formats: several optimizers whose
state stays empty round-trip and resume exactly, optimizers of several parameter groups each
get back their own groups and state, and keys missing inside one are reported alike. Each
case runs in both formats and asks the same answer of both."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import distckpt
from tests.ranks import run_ranks, values
from tests.test_dcp import TIMEOUT, batch, fsdp, make_model

FORMATS = ("torch", "dcp")


def _two_optimizers(
    seed: int, first: type[torch.optim.Optimizer]
) -> tuple[torch.nn.Sequential, list[torch.optim.Optimizer]]:
    """The model of ``make_model(seed)`` with one optimizer per Linear layer: ``first`` over
    the first layer, plain SGD (no momentum: its state stays empty) over the last."""
    model = make_model(seed)
    return model, [
        first(model[0].parameters(), lr=0.1),
        torch.optim.SGD(model[2].parameters(), lr=0.05),
    ]


def _train(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], steps: range) -> None:
    for step in steps:
        for optimizer in optimizers:
            optimizer.zero_grad()
        model(batch(step)).square().mean().backward()
        for optimizer in optimizers:
            optimizer.step()


@pytest.mark.parametrize("first", [torch.optim.SGD, torch.optim.Adam], ids=["sgd", "adam"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_several_optimizers_with_empty_states_round_trip_and_resume(
    tmp_path: Path, fmt: str, first: type[torch.optim.Optimizer]
) -> None:
    """torch's set_state_dict gives every optimizer the whole merged state when that state is
    empty (all of them plain SGD), and refuses a plain SGD beside a stateful optimizer under
    strict: each optimizer is loaded its own part, so both formats round-trip bit-exactly and
    the resumed run takes the same steps as the one that went on."""
    model, optimizers = _two_optimizers(0, first)
    _train(model, optimizers, range(2))
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        mgr.save(2, {"app": distckpt.ModelOptimizerState(model, optimizers)})
    resumed, resumed_optimizers = _two_optimizers(1, first)
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        restored = mgr.restore(
            "last", state={"app": distckpt.ModelOptimizerState(resumed, resumed_optimizers)}
        )
    assert restored.missing_keys == () and restored.unexpected_keys == ()
    for saved_optimizer, loaded_optimizer in zip(optimizers, resumed_optimizers):
        assert loaded_optimizer.param_groups[0]["lr"] == saved_optimizer.param_groups[0]["lr"]
        assert len(loaded_optimizer.state) == len(saved_optimizer.state)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    _train(model, optimizers, range(2, 5))
    _train(resumed, resumed_optimizers, range(2, 5))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    assert all(
        torch.equal(a, b)
        for saved, loaded in zip(optimizers, resumed_optimizers)
        for a, b in zip(_state_tensors(saved), _state_tensors(loaded))
    )


def _state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [
        value
        for entry in optimizer.state_dict()["state"].values()
        for value in entry.values()
        if isinstance(value, torch.Tensor)
    ]


def _save_and_grow(root: Path, fmt: str) -> tuple[torch.nn.Sequential, torch.optim.Optimizer]:
    """Save a trained model and Adam, then build a fresh one with a layer added (``3``)."""
    model = make_model(0)
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    _train(model, [optim], range(2))
    with distckpt.CheckpointManager(root, format=fmt, timeout=30) as mgr:
        mgr.save(2, {"app": distckpt.ModelOptimizerState(model, optim)})
    grown = make_model(1)
    grown.append(torch.nn.Linear(5, 5))
    return grown, torch.optim.Adam(grown.parameters(), lr=0.01)


#: What both formats report for the added layer: the model's keys one by one (its state dict
#: is flat, ``3.weight``), and each parameter's optimizer state as the whole sub-dict it is.
ADDED_LAYER_KEYS = (
    "app.model.3.weight",
    "app.model.3.bias",
    "app.optim.state.3.weight",
    "app.optim.state.3.bias",
)


@pytest.mark.parametrize(
    "optional",
    [
        ["app.model.3", "app.optim.state.3"],
        ["app.model.3.weight", "app.model.3.bias", "app.optim.state.3"],
    ],
    ids=["prefixes", "keys"],
)
@pytest.mark.parametrize("fmt", FORMATS)
def test_optional_keys_inside_a_model_optimizer_state_are_reported_one_by_one(
    tmp_path: Path, fmt: str, optional: list[str]
) -> None:
    """Optional keys naming a part of a ModelOptimizerState's flat keys (``app.model.3``)
    excuse the keys under it, reported one by one as the restore compares them, in both
    formats; whatever the optional keys name, the report is the same."""
    grown, grown_optim = _save_and_grow(tmp_path, fmt)
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        restored = mgr.restore(
            "last",
            state={"app": distckpt.ModelOptimizerState(grown, grown_optim)},
            optional_keys=optional,
        )
    assert restored.missing_keys == ADDED_LAYER_KEYS
    assert restored.unexpected_keys == ()


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_non_strict_restore_reports_a_missing_parameter_state_as_one_key(
    tmp_path: Path, fmt: str
) -> None:
    """With strict=False, the optimizer state of a parameter the checkpoint lacks is one
    missing key (its whole sub-dict), in both formats, not each of its values."""
    grown, grown_optim = _save_and_grow(tmp_path, fmt)
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        restored = mgr.restore(
            "last", state={"app": distckpt.ModelOptimizerState(grown, grown_optim)}, strict=False
        )
    assert restored.missing_keys == ADDED_LAYER_KEYS


@pytest.mark.parametrize("fmt", FORMATS)
def test_optional_whole_keys_inside_a_model_optimizer_state_excuse_an_added_layer(
    tmp_path: Path, fmt: str
) -> None:
    """``optional_whole_keys`` naming the added layer inside a ModelOptimizerState (the
    model's ``3``, each parameter's optimizer state) let a strict restore through, each
    reported as the key it names, in both formats."""
    grown, grown_optim = _save_and_grow(tmp_path, fmt)
    whole = ["app.model.3", "app.optim.state.3.weight", "app.optim.state.3.bias"]
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        restored = mgr.restore(
            "last",
            state={"app": distckpt.ModelOptimizerState(grown, grown_optim)},
            optional_whole_keys=whole,
        )
    assert restored.missing_keys == tuple(whole)
    assert restored.unexpected_keys == ()


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_removed_layer_is_reported_unexpected_alike_in_both_formats(
    tmp_path: Path, fmt: str
) -> None:
    """A layer removed between runs: its parameters one by one and each parameter's
    optimizer state as one key (not its values), in the saved order, in both formats."""
    model = make_model(0)
    model.append(torch.nn.Linear(5, 5))
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    _train(model, [optim], range(1))
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        mgr.save(1, {"app": distckpt.ModelOptimizerState(model, optim)})
    shrunk = make_model(1)
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        restored = mgr.restore(
            "last",
            state={
                "app": distckpt.ModelOptimizerState(shrunk, torch.optim.Adam(shrunk.parameters()))
            },
            strict=False,
        )
    assert restored.missing_keys == ()
    assert restored.unexpected_keys == ADDED_LAYER_KEYS


def _two_plain_sgds_on_fsdp(rank: int, world_size: int, root: str) -> bool:
    model = fsdp(make_model(0), world_size)
    optimizers = [
        torch.optim.SGD(model[0].parameters(), lr=0.1),
        torch.optim.SGD(model[2].parameters(), lr=0.05),
    ]
    _train(model, optimizers, range(2))
    with distckpt.CheckpointManager(root, format="dcp", timeout=30) as mgr:
        mgr.save(2, {"app": distckpt.ModelOptimizerState(model, optimizers)})
    resumed = fsdp(make_model(1), world_size)
    resumed_optimizers = [
        torch.optim.SGD(resumed[0].parameters(), lr=0.5),
        torch.optim.SGD(resumed[2].parameters(), lr=0.5),
    ]
    with distckpt.CheckpointManager(root, format="dcp", timeout=30) as mgr:
        mgr.restore(
            "last", state={"app": distckpt.ModelOptimizerState(resumed, resumed_optimizers)}
        )
    _train(model, optimizers, range(2, 4))
    _train(resumed, resumed_optimizers, range(2, 4))
    return all(
        torch.equal(a.full_tensor(), b.full_tensor())
        for a, b in zip(model.parameters(), resumed.parameters())
    )


def test_several_plain_sgds_of_a_sharded_model_resume_exactly(tmp_path: Path) -> None:
    """The same on 2 real ranks with an FSDP2 model ("dcp"): the sharded run resumes exactly,
    each optimizer's learning rate the saved one."""
    results = run_ranks(_two_plain_sgds_on_fsdp, 2, str(tmp_path / "c"), timeout=TIMEOUT)
    assert values(results) == [True, True]


def _grouped_optimizers(seed: int) -> tuple[torch.nn.Sequential, list[torch.optim.Optimizer]]:
    """The model of ``make_model(seed)`` with two optimizers of two parameter groups each, over
    interleaved layers: Adam over the first layer's weight and the last's bias (its second
    group at another learning rate), SGD with momentum over the rest."""
    model = make_model(seed)
    first, last = model[0], model[2]
    return model, [
        torch.optim.Adam(
            [{"params": [first.weight]}, {"params": [last.bias], "lr": 0.01}], lr=0.05
        ),
        torch.optim.SGD(
            [{"params": [last.weight]}, {"params": [first.bias], "lr": 0.5}],
            lr=0.1,
            momentum=0.9,
        ),
    ]


@pytest.mark.parametrize("fmt", FORMATS)
def test_optimizers_of_several_groups_each_get_their_own_groups_and_state(
    tmp_path: Path, fmt: str
) -> None:
    """Each optimizer is given its own slice of the saved groups (they start where the groups
    of the optimizers before it end) and its own parameters' state: after a restore, every
    optimizer's groups (learning rates included) and state equal the saved ones."""
    model, optimizers = _grouped_optimizers(0)
    _train(model, optimizers, range(2))
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        mgr.save(2, {"app": distckpt.ModelOptimizerState(model, optimizers)})
    resumed, resumed_optimizers = _grouped_optimizers(1)
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        mgr.restore(
            "last", state={"app": distckpt.ModelOptimizerState(resumed, resumed_optimizers)}
        )
    for saved, loaded in zip(optimizers, resumed_optimizers):
        saved_state, loaded_state = saved.state_dict(), loaded.state_dict()
        assert loaded_state["param_groups"] == saved_state["param_groups"]
        assert loaded_state["state"].keys() == saved_state["state"].keys()
        assert all(
            torch.equal(value, loaded_state["state"][index][name])
            for index, entry in saved_state["state"].items()
            for name, value in entry.items()
        )
    assert [group["lr"] for group in resumed_optimizers[1].param_groups] == [0.1, 0.5]
