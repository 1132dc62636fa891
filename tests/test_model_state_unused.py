"""A parameter without optimizer state when saved (a head no loss reached yet, an expert no
token was routed to) through a ``ModelOptimizerState``: torch's step creating a fresh
optimizer's state gives it some on restore, which a checkpoint is not expected to hold and
which the restore removes, so the resumed run is bit-exact the one that went on, in both
formats, with ``strict`` either way, and on FSDP2 ranks. A parameter tied under two names
keeps the optimizer state it was saved with."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import distckpt
from tests.ranks import run_ranks, values
from tests.test_dcp import TIMEOUT, batch, fsdp

FORMATS = ("torch", "dcp")
AUX_FROM = 4  # the head is used from this step on, after the save


def _model(seed: int) -> torch.nn.Sequential:
    """A body and an aux head (the last Linear), which only steps from AUX_FROM on use."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 3))


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    body, head = model[0], model[1]
    for step in steps:
        optimizer.zero_grad()
        hidden = body(batch(step))
        loss = hidden.square().mean() + (head(hidden).square().mean() if step >= AUX_FROM else 0)
        loss.backward()
        optimizer.step()


def _resume(root: Path, fmt: str, strict: bool) -> tuple[bool, bool, tuple[str, ...]]:
    """(whether the head has no optimizer state right after the restore, whether the resumed
    run's weights equal the uninterrupted run's, the restore's missing keys)."""
    model = _model(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    _train(model, optimizer, range(3))
    assert model[1].weight not in optimizer.state  # what the case is about
    with distckpt.CheckpointManager(root, format=fmt, timeout=30) as mgr:
        mgr.save(3, {"app": distckpt.ModelOptimizerState(model, optimizer)})
    _train(model, optimizer, range(3, 7))
    resumed = _model(1)
    resumed_optimizer = torch.optim.Adam(resumed.parameters(), lr=0.01)
    state = {"app": distckpt.ModelOptimizerState(resumed, resumed_optimizer)}
    with distckpt.CheckpointManager(root, format=fmt, timeout=30) as mgr:
        restored = mgr.restore("last", state=state, strict=strict)
    head_without_state = resumed[1].weight not in resumed_optimizer.state
    _train(resumed, resumed_optimizer, range(3, 7))
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    return head_without_state, same, restored.missing_keys


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_parameter_saved_without_optimizer_state_resumes_exactly(
    tmp_path: Path, fmt: str, strict: bool
) -> None:
    """Nothing is missing, the head has no Adam state after the restore (its first real step
    is Adam's first), and the resumed weights are bit-exact the uninterrupted run's."""
    assert _resume(tmp_path, fmt, strict) == (True, True, ())


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_parameters_restored_without_optimizer_state_are_named_in_the_log(
    tmp_path: Path, fmt: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="distckpt"):
        _resume(tmp_path, fmt, strict=True)
    lines = [r.getMessage() for r in caplog.records if "without optimizer state" in r.getMessage()]
    assert lines == ["restored without optimizer state (the checkpoint has none): 1.bias, 1.weight"]


class _Tied(torch.nn.Module):
    """An embedding and an output projection sharing one weight (two names, one Parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(6, 6, bias=False)
        self.project = torch.nn.Linear(6, 6, bias=False)
        self.project.weight = self.embed.weight

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.project(torch.tanh(self.embed(inputs)))


def _train_tied(model: _Tied, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        optimizer.zero_grad()
        model(batch(step)).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize("fmt", FORMATS)
def test_tied_weights_keep_their_restored_optimizer_state(tmp_path: Path, fmt: str) -> None:
    """The tied weight is in the optimizer state under its first name only; restored into a
    fresh Adam, it keeps that state (step 3), and the resumed run is bit-exact the one that
    went on."""
    torch.manual_seed(0)
    model = _Tied()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    _train_tied(model, optimizer, range(3))
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        mgr.save(3, {"app": distckpt.ModelOptimizerState(model, optimizer)})
    _train_tied(model, optimizer, range(3, 6))
    torch.manual_seed(1)
    resumed = _Tied()
    resumed_optimizer = torch.optim.Adam(resumed.parameters(), lr=0.01)
    state = {"app": distckpt.ModelOptimizerState(resumed, resumed_optimizer)}
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        restored = mgr.restore("last", state=state)
    assert restored.missing_keys == ()
    assert float(resumed_optimizer.state[resumed.embed.weight]["step"]) == 3
    _train_tied(resumed, resumed_optimizer, range(3, 6))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))


def _resume_fsdp(rank: int, world_size: int, root: str) -> tuple[bool, bool, tuple[str, ...]]:
    model = fsdp(_model(0), world_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    _train(model, optimizer, range(3))
    with distckpt.CheckpointManager(root, format="dcp", timeout=30) as mgr:
        mgr.save(3, {"app": distckpt.ModelOptimizerState(model, optimizer)})
    _train(model, optimizer, range(3, 7))
    resumed = fsdp(_model(1), world_size)
    resumed_optimizer = torch.optim.Adam(resumed.parameters(), lr=0.01)
    state = {"app": distckpt.ModelOptimizerState(resumed, resumed_optimizer)}
    with distckpt.CheckpointManager(root, format="dcp", timeout=30) as mgr:
        restored = mgr.restore("last", state=state)
    head_without_state = resumed[1].weight not in resumed_optimizer.state
    _train(resumed, resumed_optimizer, range(3, 7))
    same = all(
        torch.equal(a.full_tensor(), b.full_tensor())
        for a, b in zip(model.parameters(), resumed.parameters())
    )
    return head_without_state, same, restored.missing_keys


def test_a_parameter_saved_without_optimizer_state_resumes_exactly_on_fsdp2(
    tmp_path: Path,
) -> None:
    """The same on 2 FSDP2 ranks, the head's state sharded as DTensors."""
    out = values(run_ranks(_resume_fsdp, 2, str(tmp_path / "ckpt"), timeout=TIMEOUT))
    assert out == [(True, True, ())] * 2
