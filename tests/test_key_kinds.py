"""A key under which the checkpoint holds another kind of value than the given state: a
sub-dict (an empty one too) or a list given where a tensor was saved, a sub-dict where a list
was, a tensor, a list or a plain value where a sub-dict was, at any depth. Nothing of one fits
the other, so the key is on both sides only:
``strict=True`` refuses it before anything is loaded, ``strict=False`` loads the rest and
reports it as missing and unexpected, the same in both formats. A plain value given where a
tensor was saved takes the saved tensor, in both formats; a tensor given where a plain value
was saved is missing, refused by a strict restore before anything is loaded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt.errors import KeyMismatch

FORMATS = ("torch", "dcp")

#: (saved, a function making the given state, the key of the other kind, what is left as given
#: under it). Every case holds "w" too, a tensor that matches.
CASES: dict[str, tuple[dict[str, Any], Callable[[], dict[str, Any]], str, Any]] = {
    "a sub-dict given, a tensor saved": (
        {"extra": torch.full((2,), 7.0)},
        lambda: {"extra": {"a": torch.zeros(2)}},
        "extra",
        {"a": torch.zeros(2)},
    ),
    "a tensor given, a sub-dict saved": (
        {"extra": {"a": torch.full((2,), 7.0)}},
        lambda: {"extra": torch.zeros(2)},
        "extra",
        torch.zeros(2),
    ),
    "a plain value given, a sub-dict saved": (
        {"cfg": {"a": torch.ones(1)}},
        lambda: {"cfg": 5},
        "cfg",
        5,
    ),
    "a sub-dict given, a list saved": (
        {"extra": [torch.full((2,), 7.0)]},
        lambda: {"extra": {"0": torch.zeros(2)}},
        "extra",
        {"0": torch.zeros(2)},
    ),
    "a list given, a sub-dict saved": (
        {"extra": {"0": torch.full((2,), 7.0)}},
        lambda: {"extra": [torch.zeros(2)]},
        "extra",
        [torch.zeros(2)],
    ),
    "a list given, a sub-dict of other keys saved": (
        {"extra": {"x": torch.full((2,), 7.0)}},
        lambda: {"extra": [torch.zeros(2)]},
        "extra",
        [torch.zeros(2)],
    ),
    "a sub-dict of other keys given, a list saved": (
        {"extra": [torch.full((2,), 7.0)]},
        lambda: {"extra": {"x": torch.zeros(2)}},
        "extra",
        {"x": torch.zeros(2)},
    ),
    "a sub-dict given, a list of tensors of another shape saved": (
        {"extra": [torch.full((2,), 7.0)]},
        lambda: {"extra": {"0": torch.zeros(1)}},
        "extra",
        {"0": torch.zeros(1)},
    ),
    "an empty sub-dict given, a tensor saved": (
        {"extra": torch.full((2,), 7.0)},
        lambda: {"extra": {}},
        "extra",
        {},
    ),
    "a list given, a tensor saved": (
        {"extra": torch.full((2,), 7.0)},
        lambda: {"extra": [torch.zeros(2)]},
        "extra",
        [torch.zeros(2)],
    ),
    "one level down": (
        {"a": {"x": torch.ones(1), "v": torch.ones(1)}},
        lambda: {"a": {"v": torch.zeros(1), "x": {"k": torch.zeros(1)}}},
        "a.x",
        {"k": torch.zeros(1)},
    ),
}


def _value_at(state: dict[str, Any], key: str) -> Any:
    value: Any = state
    for part in key.split("."):
        value = value[part]
    return value


def _same(value: Any, expected: Any) -> bool:
    if isinstance(expected, dict):
        return (
            isinstance(value, dict)
            and value.keys() == expected.keys()
            and all(_same(value[k], expected[k]) for k in expected)
        )
    if isinstance(expected, list):
        return (
            isinstance(value, list)
            and len(value) == len(expected)
            and all(_same(item, want) for item, want in zip(value, expected))
        )
    if isinstance(expected, torch.Tensor):
        return isinstance(value, torch.Tensor) and torch.equal(value, expected)
    return value == expected


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_key_holding_another_kind_of_value_is_on_both_sides_only(
    tmp_path: Path, fmt: str, case: str
) -> None:
    saved, given, key, left = CASES[case]
    with distckpt.CheckpointManager(tmp_path, format=fmt, fsync=False) as mgr:
        mgr.save(1, {"w": torch.ones(2), **saved})
        state = {"w": torch.zeros(2), **given()}
        with pytest.raises(KeyMismatch) as refused:
            mgr.restore(state=state)
        assert refused.value.missing_keys == (key,)
        assert refused.value.unexpected_keys == (key,)
        assert torch.equal(state["w"], torch.zeros(2))  # refused before anything is loaded
        ckpt = mgr.restore(state=state, strict=False)
        assert ckpt is not None
        assert (ckpt.missing_keys, ckpt.unexpected_keys) == ((key,), (key,))
        assert torch.equal(state["w"], torch.ones(2))
        assert _same(_value_at(state, key), left)


def test_the_torch_format_finds_a_sub_dict_given_for_a_saved_none(tmp_path: Path) -> None:
    """None, which "dcp" saves as no value a sub-dict's place can read, in the "torch" format
    alone: on both sides only, through ``load_checkpoint`` too."""
    with distckpt.CheckpointManager(tmp_path, format="torch", fsync=False) as mgr:
        mgr.save(1, {"w": torch.ones(2), "extra": None})
        state = {"w": torch.zeros(2), "extra": {"0": torch.zeros(2)}}
        with pytest.raises(KeyMismatch) as refused:
            mgr.restore(state=state)
        assert (refused.value.missing_keys, refused.value.unexpected_keys) == (
            ("extra",),
            ("extra",),
        )
    ckpt = distckpt.load_checkpoint(tmp_path, state=state, strict=False)
    assert (ckpt.missing_keys, ckpt.unexpected_keys) == (("extra",), ("extra",))
    assert torch.equal(state["extra"]["0"], torch.zeros(2))


@pytest.mark.parametrize("given", [None, 3], ids=["none", "int"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_plain_value_given_for_a_saved_tensor_takes_the_tensor(
    tmp_path: Path, fmt: str, given: Any
) -> None:
    """A plain value (None, an int) where the checkpoint holds a tensor is replaced by the saved
    tensor, as any plain value inside a given dict is, with nothing reported, whatever
    ``strict`` is: no restore calls the healthy checkpoint damaged."""
    with distckpt.CheckpointManager(tmp_path, format=fmt, fsync=False) as mgr:
        mgr.save(1, {"w": torch.ones(2), "x": torch.full((1,), 7.0)})
        for strict in (True, False):
            state = {"w": torch.zeros(2), "x": given}
            ckpt = mgr.restore(state=state, strict=strict)
            assert ckpt is not None
            assert (ckpt.missing_keys, ckpt.unexpected_keys) == ((), ())
            assert torch.equal(state["x"], torch.full((1,), 7.0))
            assert torch.equal(state["w"], torch.ones(2))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_tensor_given_for_a_saved_plain_value_is_refused_before_anything_is_loaded(
    tmp_path: Path, fmt: str
) -> None:
    """A tensor where the checkpoint holds a plain value (a string) cannot take it: it is
    missing, refused by a strict restore before anything is loaded, and left as given with
    ``strict=False``, which loads the rest."""
    with distckpt.CheckpointManager(tmp_path, format=fmt, fsync=False) as mgr:
        mgr.save(1, {"w": torch.ones(2), "x": "s5"})
        state = {"w": torch.zeros(2), "x": torch.zeros(1)}
        with pytest.raises(KeyMismatch) as refused:
            mgr.restore(state=state)
        assert (refused.value.missing_keys, refused.value.unexpected_keys) == (("x",), ())
        assert torch.equal(state["w"], torch.zeros(2))
        ckpt = mgr.restore(state=state, strict=False)
        assert ckpt is not None
        assert (ckpt.missing_keys, ckpt.unexpected_keys) == (("x",), ())
        assert torch.equal(state["w"], torch.ones(2))
        assert torch.equal(state["x"], torch.zeros(1))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_per_rank_sub_dict_given_for_a_saved_per_rank_tensor_is_refused_before_loading(
    tmp_path: Path, fmt: str
) -> None:
    """The same for a per-rank value: a sub-dict given where a per-rank tensor was saved is on
    both sides only, refused by a strict restore before anything is loaded."""
    with distckpt.CheckpointManager(tmp_path, format=fmt, fsync=False) as mgr:
        mgr.save(1, {"w": torch.ones(2), "r": distckpt.PerRank(torch.ones(1))})
        state = {"w": torch.zeros(2), "r": distckpt.PerRank({"a": torch.zeros(1)})}
        with pytest.raises(KeyMismatch) as refused:
            mgr.restore(state=state)
        assert (refused.value.missing_keys, refused.value.unexpected_keys) == (("r",), ("r",))
        assert torch.equal(state["w"], torch.zeros(2))


@pytest.mark.parametrize("saved", ["s5", None, ()], ids=["string", "none", "empty-tuple"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_an_empty_sub_dict_given_for_a_saved_plain_value_is_on_both_sides_whatever_strict_is(
    tmp_path: Path, fmt: str, saved: Any
) -> None:
    """An empty sub-dict where the checkpoint holds a plain value: the same keys refused by a
    strict restore, before anything is loaded, as reported with ``strict=False``."""
    with distckpt.CheckpointManager(tmp_path, format=fmt, fsync=False) as mgr:
        mgr.save(1, {"w": torch.ones(2), "x": saved})
        state: dict[str, Any] = {"w": torch.zeros(2), "x": {}}
        with pytest.raises(KeyMismatch) as refused:
            mgr.restore(state=state)
        assert (refused.value.missing_keys, refused.value.unexpected_keys) == (("x",), ("x",))
        assert torch.equal(state["w"], torch.zeros(2))
        ckpt = mgr.restore(state=state, strict=False)
        assert ckpt is not None
        assert (ckpt.missing_keys, ckpt.unexpected_keys) == (("x",), ("x",))
        assert torch.equal(state["w"], torch.ones(2))
        assert state["x"] == {}
