"""``restore(optional_keys=..., optional_whole_keys=...)`` where the key checks of both formats
meet the other rules of a restore: keys inside a ``ModelOptimizerState`` (compared one by one),
a whole sub-dict with sub-dicts of its own, and a list under an optional key; and the keys
both formats report for a sub-dict on one side only and a list of another length. Each case runs in
both formats and asks the same answer of both."""

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


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("given", [0, 1, 3], ids=["empty", "shorter", "longer"])
def test_a_list_of_another_length_is_left_as_given_with_strict_false(
    tmp_path: Path, fmt: str, given: int
) -> None:
    """A list of tensors of another length than the saved one (2) is not loaded at all, none of
    its items (DCP would load the items both have into the given tensors), and is reported as
    one missing key, ``lst[len 3 != 2]``, nothing unexpected; ``.state`` holds the saved list.
    The same in both formats."""
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        mgr.save(1, {"a": {"lst": [torch.ones(2), torch.full((2,), 2.0)], "b": torch.ones(1)}})
    state = {"a": {"lst": [torch.zeros(2) for _ in range(given)], "b": torch.zeros(1)}}
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        restored = mgr.restore("last", state=state, strict=False)
    assert restored.missing_keys == (f"a.lst[len {given} != 2]",)
    assert restored.unexpected_keys == ()
    assert len(state["a"]["lst"]) == given
    assert all(not item.any() for item in state["a"]["lst"])
    assert torch.equal(state["a"]["b"], torch.ones(1))
    saved_list = restored.state["a"]["lst"]
    assert [item.tolist() for item in saved_list] == [[1.0, 1.0], [2.0, 2.0]]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_shorter_list_is_refused_by_a_strict_restore_as_its_length(
    tmp_path: Path, fmt: str
) -> None:
    """A list shorter than the saved one is refused as ``lst[len 1 != 2]`` in both formats
    (not as the saved items DCP finds no place for), before anything is loaded."""
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        mgr.save(1, {"lst": [torch.ones(2), torch.ones(2)], "b": torch.ones(1)})
    state = {"lst": [torch.zeros(2)], "b": torch.zeros(1)}
    mgr = distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30)
    with mgr, pytest.raises(KeyMismatch) as raised:
        mgr.restore("last", state=state)
    assert raised.value.missing_keys == ("lst[len 1 != 2]",)
    assert raised.value.unexpected_keys == ()
    assert not state["lst"][0].any() and not state["b"].any()


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_nested_sub_dict_the_checkpoint_lacks_is_reported_as_its_key(
    tmp_path: Path, fmt: str
) -> None:
    """A sub-dict below the top level that the checkpoint lacks as a whole, sub-dicts and all,
    is one missing key with strict=False in both formats (DCP finds it as its leaves)."""
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        mgr.save(1, {"a": {"b": torch.ones(1)}})
    state = {"a": {"b": torch.zeros(1), "c": {"d": torch.zeros(1), "e": {"f": torch.zeros(1)}}}}
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        restored = mgr.restore("last", state=state, strict=False)
    assert restored.missing_keys == ("a.c",)
    assert restored.unexpected_keys == ()
    assert torch.equal(state["a"]["b"], torch.ones(1))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_sub_dict_only_the_checkpoint_holds_is_reported_as_its_key(
    tmp_path: Path, fmt: str
) -> None:
    """A sub-dict, with sub-dicts of its own, that only the checkpoint holds is one unexpected
    key in both formats (DCP finds it as its leaves)."""
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        mgr.save(1, {"a": torch.ones(1), "extras": {"x": torch.ones(1), "y": {"z": torch.ones(1)}}})
    state = {"a": torch.zeros(1)}
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        restored = mgr.restore("last", state=state, strict=False)
    assert restored.missing_keys == ()
    assert restored.unexpected_keys == ("extras",)
    assert torch.equal(state["a"], torch.ones(1))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_missing_sub_dict_whose_key_has_a_dot_is_reported_as_its_key(
    tmp_path: Path, fmt: str
) -> None:
    """A sub-dict under the key ``"a.b"`` the checkpoint lacks, beside a saved ``a`` holding a
    ``b`` (DCP flattens both to ``m.a.b...``), is one missing key in both formats: the places
    are compared, not their dotted text."""
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        mgr.save(1, {"m": {"a": {"b": {"q": torch.ones(1)}}}})
    state = {"m": {"a": {"b": {"q": torch.zeros(1)}}, "a.b": {"c": torch.zeros(1)}}}
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        restored = mgr.restore("last", state=state, strict=False)
    assert restored.missing_keys == ("m.a.b",)
    assert restored.unexpected_keys == ()
    assert torch.equal(state["m"]["a"]["b"]["q"], torch.ones(1))


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_empty_sub_dict_given_for_a_filled_one_reports_the_saved_sub_dicts(
    tmp_path: Path, fmt: str
) -> None:
    """An empty sub-dict given where the checkpoint holds one with a sub-dict of its own: the
    given dict is on both sides, so what only the checkpoint holds is the sub-dict inside it,
    one unexpected key in both formats (never the given dict itself)."""
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        mgr.save(1, {"w": torch.ones(1), "a": {"k": {"x": torch.ones(1)}}})
    state = {"w": torch.zeros(1), "a": {}}
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        restored = mgr.restore("last", state=state, strict=False)
    assert restored.missing_keys == ()
    assert restored.unexpected_keys == ("a.k",)
    assert torch.equal(state["w"], torch.ones(1))
