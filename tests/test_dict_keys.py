"""Dict keys that are not strings round-trip in both formats: the "dcp" format, which keeps keys
as text, maps them back onto the given state's keys; keys it could not map back are refused at
save."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt.errors import UnrestorableKeys


class ClassCounts:
    """A user's Stateful object keyed by class number."""

    def __init__(self, counts: dict[int, int]) -> None:
        self.counts = counts

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = dict(state["counts"])


def _saved_values() -> dict[str, Any]:
    return {
        "hist": {0: 0.5, 1: 0.25, 10: 0.125},
        "mixed": {2.5: "float", True: "bool", None: "none", "name": "str", -3: "negative"},
        "tensors": {0: torch.arange(3.0), 7: torch.ones(2, 2)},
        "nested": {1: {2: [4, {3: "deep"}]}},
    }


def _fresh_values() -> dict[str, Any]:
    return {
        "hist": {0: 0.0, 1: 0.0, 10: 0.0},
        "mixed": {2.5: "", True: "", None: "", "name": "", -3: ""},
        "tensors": {0: torch.zeros(3), 7: torch.zeros(2, 2)},
        "nested": {1: {2: [0, {3: ""}]}},
    }


def _typed(value: Any) -> Any:
    """``value`` with every dict key paired with its type and tensors as lists: equal only when
    the keys are the same objects' kinds, not their text."""
    if isinstance(value, dict):
        return {(type(key), key): _typed(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_typed(item) for item in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_int_and_other_keys_round_trip_with_their_types(
    tmp_path: Path, fmt: str, strict: bool
) -> None:
    counts = ClassCounts({0: 5, 1: 7})
    with distckpt.CheckpointManager(tmp_path, format=fmt, fsync=False) as mgr:
        mgr.save(1, {"counts": counts, **_saved_values()})
        fresh = ClassCounts({0: 0, 1: 0})
        state = {"counts": fresh, **_fresh_values()}
        checkpoint = mgr.restore("last", state=state, strict=strict)
    assert fresh.counts == {0: 5, 1: 7}
    assert all(type(key) is int for key in fresh.counts)
    values = {key: value for key, value in state.items() if key != "counts"}
    assert _typed(values) == _typed(_saved_values())
    assert (checkpoint.missing_keys, checkpoint.unexpected_keys) == ((), ())


def test_dcp_int_keys_on_one_side_only_are_reported_as_str_keys_are(
    tmp_path: Path,
) -> None:
    with distckpt.CheckpointManager(tmp_path, format="dcp", fsync=False) as mgr:
        mgr.save(1, {"hist": {0: 0.5, 1: 0.25}})
        state: dict[str, Any] = {"hist": {0: 0.0, 2: 0.0}}
        with pytest.raises(distckpt.InvalidArgument, match=r"hist\.2.*hist\.1"):
            mgr.restore("last", state=state)
        assert state == {"hist": {0: 0.0, 2: 0.0}}  # nothing loaded
        checkpoint = mgr.restore("last", state=state, strict=False)
    # What the checkpoint lacks keeps its value and is left out of what was read.
    assert state == {"hist": {0: 0.5, 2: 0.0}}
    assert checkpoint.state == {"hist": {0: 0.5}}
    assert (checkpoint.missing_keys, checkpoint.unexpected_keys) == (("hist.2",), ("hist.1",))


def test_dcp_per_rank_values_keep_their_int_keys(tmp_path: Path) -> None:
    with distckpt.CheckpointManager(tmp_path, format="dcp", fsync=False) as mgr:
        mgr.save(1, {"mine": distckpt.PerRank({0: 5, "seen": {3: 1}})})
        state = {"mine": distckpt.PerRank({0: 0, "seen": {3: 0}})}
        mgr.restore("last", state=state)
    assert _typed(state["mine"].value) == _typed({0: 5, "seen": {3: 1}})


@pytest.mark.parametrize(
    ("place", "keys", "refused"),
    [
        ("counts", {1: "int", "1": "str"}, ("1", "'1'")),
        ("counts", {1.0: "float", "1.0": "str"}, ("1.0", "'1.0'")),
        ("counts", {(1, 2): "tuple"}, ("(1, 2)",)),
    ],
)
def test_dcp_refuses_keys_it_could_not_map_back_before_writing(
    tmp_path: Path, place: str, keys: dict[Any, str], refused: tuple[str, ...]
) -> None:
    with distckpt.CheckpointManager(tmp_path, format="dcp", fsync=False) as mgr:
        with pytest.raises(UnrestorableKeys, match=r"the dict at 'app\.counts'") as raised:
            mgr.save(1, {"app": {place: keys}, "w": torch.ones(1)})
        assert mgr.steps() == []
    assert raised.value.where == "app.counts"
    assert raised.value.keys == refused
    assert isinstance(raised.value, distckpt.InvalidArgument)


def test_dcp_refuses_a_top_level_key_that_is_no_string_to_save_or_restore_into(
    tmp_path: Path,
) -> None:
    """Saved, ``{1: ...}`` would fail every restore (a TypeError comparing 1 with ``"w"``), as
    a non-strict restore into it would: both are refused by name, before DCP starts."""
    refused = pytest.raises(distckpt.InvalidArgument, match=r"string top-level keys, got \[1\]")
    with distckpt.CheckpointManager(tmp_path, format="dcp", fsync=False) as mgr:
        with refused:
            mgr.save(1, {1: torch.ones(1), "w": torch.ones(1)})
        assert mgr.steps() == []
        step_dir = mgr.save(1, {"w": torch.ones(1)}).path
    with refused:
        distckpt.load_checkpoint(
            step_dir, state={1: torch.zeros(1), "w": torch.zeros(1)}, strict=False
        )


def test_dcp_refuses_keys_whose_text_names_an_address(tmp_path: Path) -> None:
    """An object's default text holds its address, which another process does not share."""
    refused = pytest.raises(UnrestorableKeys, match=r"types whose text may differ.*\(object\)")
    with distckpt.CheckpointManager(tmp_path, format="dcp", fsync=False) as mgr, refused:
        mgr.save(1, {"app": [{object(): 1}]})


def test_dcp_export_has_no_state_to_map_onto_and_gives_keys_as_text(tmp_path: Path) -> None:
    with distckpt.CheckpointManager(tmp_path / "root", format="dcp", fsync=False) as mgr:
        mgr.save(1, {"hist": {0: 0.5}})
    distckpt.export(tmp_path / "root", tmp_path / "out.pt", fsync=False)
    assert torch.load(tmp_path / "out.pt") == {"hist": {"0": 0.5}}


def _pickled_whole() -> dict[str, Any]:
    """Dicts with keys "dcp" refuses where it places keys as text, where DCP pickles them whole
    with their keys as they are: in a tuple, in a list of plain values, in a tuple in a list
    DCP walks (it holds a list of tensors)."""
    return {
        "in_tuple": ({1: 5, "1": 6},),
        "in_plain_list": [({(1, 2): "tuple key"},), 3],
        "beside_tensors": [[torch.ones(2)], ({1.0: "float", "1.0": "str"},)],
    }


def test_dcp_keeps_the_keys_of_dicts_it_pickles_whole(tmp_path: Path) -> None:
    with distckpt.CheckpointManager(tmp_path, format="dcp", fsync=False) as mgr:
        mgr.save(1, _pickled_whole())
        state: dict[str, Any] = {
            "in_tuple": ({1: 0, "1": 0},),
            "in_plain_list": [({(1, 2): ""},), 0],
            "beside_tensors": [[torch.zeros(2)], ({1.0: "", "1.0": ""},)],
        }
        mgr.restore("last", state=state)
    assert _typed(state) == _typed(_pickled_whole())


class _CountsLooks(int):
    """An int that counts how often a check asks what it is beyond its type (``isinstance``
    of an unrelated class reads ``__class__``): a plain value a walk looked at."""

    looks = 0

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        _CountsLooks.looks += 1
        return int


def test_dcp_does_not_look_at_each_item_of_a_list_of_plain_values() -> None:
    """DCP pickles such a list whole, so its items have no keys to check: a long one (millions
    of token ids) costs a save nothing per item."""
    _CountsLooks.looks = 0
    state = {"ids": [_CountsLooks(i) for i in range(1000)], "w": torch.ones(1)}
    distckpt.formats.format_named("dcp").check_state(state)
    assert _CountsLooks.looks == 0
