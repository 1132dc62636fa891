"""Lists through a restore's key check and read, in both formats with the same answer: a list
saved with items DCP writes no key for (an empty dict, a dict of per-rank values) restores
into the same structure; a dict key that reads like a list's item is none of its items; an
empty list saved is reported by its length; a list of another length gives back the saved
list with its dicts' keys as given; and a list led by empty dicts restores, and exports with
None for them in "dcp"."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt.errors import KeyMismatch

FORMATS = ("torch", "dcp")


def _one(value: float) -> torch.Tensor:
    return torch.full((1,), value)


#: a saved state and a fresh one of the same structure, whose tensors are zeros
SAME_STRUCTURE: dict[str, tuple[dict[str, Any], Callable[[], dict[str, Any]]]] = {
    "a list ending in an empty dict": (
        {"l": [_one(1), {}], "b": _one(2)},
        lambda: {"l": [torch.zeros(1), {}], "b": torch.zeros(1)},
    ),
    "a list ending in a dict of empty dicts": (
        {"l": [{"a": _one(1)}, {"a": {}}]},
        lambda: {"l": [{"a": torch.zeros(1)}, {"a": {}}]},
    ),
    "a list ending in a dict of per-rank values": (
        {"l": [_one(1), {"x": distckpt.PerRank(_one(3))}]},
        lambda: {"l": [torch.zeros(1), {"x": distckpt.PerRank(torch.zeros(1))}]},
    ),
    "a list of a plain value and an empty dict": (
        {"w": _one(1), "a": [1.5, {}]},
        lambda: {"w": torch.zeros(1), "a": [1.5, {}]},
    ),
    "a list of an empty dict between plain values": (
        {"w": _one(1), "a": [1.5, {}, 1.5]},
        lambda: {"w": torch.zeros(1), "a": [1.5, {}, 1.5]},
    ),
    "a list of an empty dict and a list of plain values": (
        {"w": _one(1), "a": [{}, [7]]},
        lambda: {"w": torch.zeros(1), "a": [{}, [7]]},
    ),
    "a list of a tensor, an empty dict and a plain value": (
        {"w": _one(1), "a": [_one(2), {}, 1.5]},
        lambda: {"w": torch.zeros(1), "a": [torch.zeros(1), {}, 1.5]},
    ),
    # DCP writes a key for the tensor, or the plain value, alone: its list index is past the
    # one key path .metadata holds.
    "a list led by empty dicts": (
        {"l": [{}, {}, _one(1)]},
        lambda: {"l": [{}, {}, torch.zeros(1)]},
    ),
    "a list of empty dicts and a plain value": (
        {"w": _one(1), "l": [{}, {}, {}, 5]},
        lambda: {"w": torch.zeros(1), "l": [{}, {}, {}, 0]},
    ),
    "a list beside a dict key naming an item of it": (
        {"hist": [_one(1), _one(2)], "hist.5": _one(3)},
        lambda: {"hist": [torch.zeros(1), torch.zeros(1)], "hist.5": torch.zeros(1)},
    ),
}


def _tensors(state: Any) -> list[float]:
    """The values of every tensor of ``state`` (per-rank ones too), in order."""
    if isinstance(state, distckpt.PerRank):
        return _tensors(state.value)
    if isinstance(state, dict):
        return [value for item in state.values() for value in _tensors(item)]
    if isinstance(state, list):
        return [value for item in state for value in _tensors(item)]
    return state.tolist() if isinstance(state, torch.Tensor) else []


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
@pytest.mark.parametrize("case", sorted(SAME_STRUCTURE))
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_list_restores_into_the_structure_it_was_saved_from(
    tmp_path: Path, fmt: str, case: str, strict: bool
) -> None:
    """DCP writes no key for an empty dict, nor for a dict whose values all went to per-rank
    places, and a dict key ``hist.5`` is flattened like an item of ``hist``: none of these
    makes a list of the same length one of another length."""
    saved, fresh = SAME_STRUCTURE[case]
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        mgr.save(1, saved)
        state = fresh()
        restored = mgr.restore("last", state=state, strict=strict)
    assert restored.missing_keys == () and restored.unexpected_keys == ()
    assert _tensors(state) == _tensors(saved)


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_empty_list_saved_is_reported_by_its_length(tmp_path: Path, fmt: str) -> None:
    """DCP saves an empty list as one value at its place: a restore that gives two tensors
    there reports ``l[len 2 != 0]``, refused when strict, and loads none of the list, as
    "torch" does."""
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        mgr.save(1, {"l": [], "b": _one(1)})
        state = {"l": [torch.zeros(1), torch.zeros(1)], "b": torch.zeros(1)}
        with pytest.raises(KeyMismatch) as refused:
            mgr.restore("last", state=state)
        assert refused.value.missing_keys == ("l[len 2 != 0]",)
        assert refused.value.unexpected_keys == ()
        assert not state["b"].any()
        restored = mgr.restore("last", state=state, strict=False)
    assert restored.missing_keys == ("l[len 2 != 0]",) and restored.unexpected_keys == ()
    assert _tensors(state) == [0.0, 0.0, 1.0]
    assert restored.state["l"] == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_shorter_list_of_dicts_gives_back_the_keys_as_given(tmp_path: Path, fmt: str) -> None:
    """The saved list of another length comes back in ``.state`` with the dicts' int keys of
    the given list's items, not their text (DCP saves dict keys as text)."""
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        mgr.save(1, {"l": [{0: _one(1)}, {0: _one(2)}]})
        restored = mgr.restore("last", state={"l": [{0: torch.zeros(1)}]}, strict=False)
    assert restored.missing_keys == ("l[len 1 != 2]",)
    assert list(restored.state["l"][0]) == [0]
    assert _tensors(restored.state["l"]) == [1.0, 2.0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_trailing_empty_dicts_of_a_saved_list_count_in_torch_only(tmp_path: Path, fmt: str) -> None:
    """A "dcp" checkpoint holds no key for an empty dict: the saved list ``[t, {}]`` given as
    ``[t]`` is one of the same length there (its item loaded), and one of another length in
    "torch", as the README says."""
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        mgr.save(1, {"l": [_one(1), {}]})
        state = {"l": [torch.zeros(1)]}
        restored = mgr.restore("last", state=state, strict=False)
    if fmt == "torch":
        assert restored.missing_keys == ("l[len 1 != 2]",)
        assert _tensors(state) == [0.0]
    else:
        assert restored.missing_keys == ()
        assert _tensors(state) == [1.0]


@pytest.mark.parametrize("saved", [[{}, {}, 1.0], [{}, {}, {}, 5]], ids=["tensor", "plain"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_list_led_by_empty_dicts_restores_them_and_exports_them_as_none_in_dcp(
    tmp_path: Path, fmt: str, saved: list[Any]
) -> None:
    """The empty dicts come back from a restore into the saved structure in both formats; an
    export, which has no given structure, rebuilds "dcp"'s list from the one key it holds
    and fills the items before it with None, as the README says."""
    last = _one(saved[-1]) if isinstance(saved[-1], float) else saved[-1]
    with distckpt.CheckpointManager(tmp_path / "ckpt", format=fmt, timeout=30) as mgr:
        step = mgr.save(1, {"l": [*saved[:-1], last]}).path
        state = {"l": [{} for _ in saved[:-1]] + [torch.zeros(1) if saved[-1] == 1.0 else 0]}
        restored = mgr.restore("last", state=state)
    assert restored.missing_keys == () and restored.unexpected_keys == ()
    assert state["l"][:-1] == saved[:-1] and restored.state["l"][:-1] == saved[:-1]
    assert _tensors(state) == _tensors([last]) and restored.state["l"][-1] == last
    distckpt.export(step, tmp_path / "out.pt")
    exported = torch.load(tmp_path / "out.pt", weights_only=True)["l"]
    assert exported[:-1] == (saved[:-1] if fmt == "torch" else [None] * (len(saved) - 1))
    assert exported[-1] == last
