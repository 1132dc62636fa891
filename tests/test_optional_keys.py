"""``restore(optional_keys=..., optional_whole_keys=...)`` where the key checks of both formats
meet the other rules of a restore: keys inside a ``ModelOptimizerState`` (compared one by one),
a whole sub-dict with sub-dicts of its own, and a list under an optional key. Each case runs
in both formats and asks the same answer of both."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import distckpt
from distckpt.errors import KeyMismatch
from tests.test_dcp import make_model, train

FORMATS = ("torch", "dcp")


@pytest.mark.parametrize("fmt", FORMATS)
def test_optional_keys_inside_a_model_optimizer_state_load_the_rest(
    tmp_path: Path, fmt: str
) -> None:
    """A layer added between runs, named as optional inside the ModelOptimizerState: the check
    excuses it, and the object's own load then keeps the new layer's values instead of torch
    refusing what the check let through."""
    model = make_model(0)
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    train(model, optim, range(2))
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        mgr.save(2, {"app": distckpt.ModelOptimizerState(model, optim)})
    grown = make_model(1)
    grown.append(torch.nn.Linear(5, 5))
    new_layer = grown[3].weight.detach().clone()
    grown_optim = torch.optim.Adam(grown.parameters(), lr=0.01)
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        restored = mgr.restore(
            "last",
            state={"app": distckpt.ModelOptimizerState(grown, grown_optim)},
            optional_keys=["app.model.3", "app.optim.state.3"],
        )
    assert restored.missing_keys and all(
        key.startswith(("app.model.3", "app.optim.state.3")) for key in restored.missing_keys
    )
    assert torch.equal(grown[0].weight, model[0].weight)
    assert torch.equal(grown[3].weight, new_layer)
    assert int(grown_optim.state[grown[0].weight]["step"]) == 2


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_optional_whole_sub_dict_with_sub_dicts_may_be_missing(tmp_path: Path, fmt: str) -> None:
    """DCP reads a sub-dict it holds nothing of as its empty containers, nested ones too: that
    is nothing, so the whole key is missing, as "torch" finds it."""
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        mgr.save(1, {"w": torch.ones(3)})
    state = {"w": torch.zeros(3), "extra": {"x": torch.zeros(2), "y": {"z": torch.ones(1)}}}
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        restored = mgr.restore("last", state=state, optional_whole_keys=["extra"])
    assert list(restored.missing_keys) == ["extra"]
    assert torch.equal(state["w"], torch.ones(3))
    assert torch.equal(state["extra"]["y"]["z"], torch.ones(1))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_longer_list_under_an_optional_key_is_refused(tmp_path: Path, fmt: str) -> None:
    """A list's items are not keys a newer version added: a list longer than the saved one is
    refused even under an optional parent, before anything is loaded, in both formats."""
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        mgr.save(1, {"a": {"lst": [torch.ones(2)], "b": torch.ones(1)}})
    state = {"a": {"lst": [torch.zeros(2), torch.zeros(2)], "b": torch.zeros(1)}}
    mgr = distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30)
    with mgr, pytest.raises(KeyMismatch, match=r"a\.lst\[len 2 != 1\]"):
        mgr.restore("last", state=state, optional_keys=["a"])
    assert torch.equal(state["a"]["lst"][0], torch.zeros(2))
    assert torch.equal(state["a"]["b"], torch.zeros(1))
