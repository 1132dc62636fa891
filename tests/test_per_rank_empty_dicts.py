"""Per-rank values holding empty dicts through the "dcp" format: DCP gives an empty dict no key,
so the save lists their places and a restore by the same ranks recreates them, each rank its
own, in a value's own order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from tests.ranks import run_ranks, values
from tests.stateful_values import Holder

TIMEOUT = 90.0


class Stream(torch.utils.data.IterableDataset):
    """A Stateful iterable dataset whose state holds an empty dict its loading reads back."""

    def __init__(self) -> None:
        self.pos = 0
        self.extra: dict[str, Any] = {}

    def __iter__(self) -> Any:
        while self.pos < 12:
            self.pos += 1
            yield torch.tensor([self.pos - 1])

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos, "extra": dict(self.extra)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pos = state["pos"]
        self.extra = state["extra"]


def _loader() -> Any:
    from torchdata.stateful_dataloader import StatefulDataLoader

    return StatefulDataLoader(Stream(), batch_size=2)


def _save_then_restore(rank: int, world_size: int, root: str) -> dict[str, Any]:
    loader = _loader()
    batches = iter(loader)
    seen = [next(batches).flatten().tolist() for _ in range(rank + 1)]  # each rank elsewhere
    own = {"pos": rank + 5, "seen_shards": {}, "nested": {"a": {}, "b": rank}}
    state = {
        "obj": distckpt.PerRank(Holder(own)),
        "plain": distckpt.PerRank({"x": rank, "e": {}}),
        "listed": distckpt.PerRank({"lt": [torch.full((1,), float(rank)), {}], "x": rank}),
        "loader": loader,
    }
    with distckpt.CheckpointManager(root, format="dcp", fsync=False, timeout=30) as mgr:
        mgr.save(1, state)
        seen += [batch.flatten().tolist() for batch in batches]
        holder = Holder({"pos": 0, "seen_shards": {}, "nested": {"a": {}, "b": -1}})
        plain = distckpt.PerRank({"x": -1, "e": {}})
        listed = distckpt.PerRank({"lt": [torch.zeros(1), {}], "x": -1})
        fresh = _loader()
        template = {
            "obj": distckpt.PerRank(holder),
            "plain": plain,
            "listed": listed,
            "loader": fresh,
        }
        ckpt = mgr.restore("last", state=template)
        resumed = [batch.flatten().tolist() for batch in fresh]
    return {
        "obj": (holder.state, list(holder.state)),
        "plain": plain.value,
        "listed": (listed.value["lt"][0].tolist(), listed.value["lt"][1:], listed.value["x"]),
        "resumed": resumed == seen[rank + 1 :],
        "missing": ckpt.missing_keys,
    }


def test_per_rank_values_keep_their_empty_dicts(tmp_path: Path) -> None:
    """A Stateful value, a plain dict and a list holding an empty dict, each different on each
    rank, come back as saved with a strict restore, and a data loader over a dataset whose state
    holds an empty dict goes on with the next batch."""
    out = values(run_ranks(_save_then_restore, 2, str(tmp_path / "ckpt"), timeout=TIMEOUT))
    for rank, got in enumerate(out):
        own = {"pos": rank + 5, "seen_shards": {}, "nested": {"a": {}, "b": rank}}
        assert got["obj"] == (own, ["pos", "seen_shards", "nested"]), got
        assert got["plain"] == {"x": rank, "e": {}}, got
        assert got["listed"] == ([float(rank)], [{}], rank), got
        assert got["resumed"], got
        assert got["missing"] == (), got


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_a_sub_dict_given_where_an_empty_one_was_saved(tmp_path: Path, fmt: str) -> None:
    """Named by its leaves in "torch", and in "dcp" inside a per-rank value (its empty dict is
    listed with it); a shared value in "dcp" is named by its outermost key the checkpoint holds
    nothing under."""
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        mgr.save(1, {"s": {"e": {}}, "v": distckpt.PerRank({"e": {}})})
        given = {"s": {"e": {"a": 1, "b": 2}}, "v": distckpt.PerRank({"e": {"a": 1, "b": 2}})}
        restored = mgr.restore("last", state=given, strict=False)
    shared = ["s.e.a", "s.e.b"] if fmt == "torch" else ["s"]
    assert sorted(restored.missing_keys) == sorted([*shared, "v.e.a", "v.e.b"])
    assert restored.unexpected_keys == ()


def _save_as_before(root: Path, state: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Save ``state`` in "dcp" as versions before the places of empty dicts were listed did."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    # Those versions saved with DCP's DefaultSavePlanner, which this one replaces: the save is
    # made with it, so the checkpoint is written exactly as they wrote it.
    with monkeypatch.context() as patched:
        patched.setattr("distckpt.formats.dcp.PerRankSavePlanner", DefaultSavePlanner)
        with distckpt.CheckpointManager(root, format="dcp", timeout=30) as mgr:
            mgr.save(1, state)


def test_a_checkpoint_saved_without_the_places_of_empty_dicts_restores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint of an earlier version restores strictly, nothing reported: a per-rank
    object comes back with what DCP saved of it, without the nested empty dict it gave no key,
    as that version restored it."""
    saved = {"obj": distckpt.PerRank(Holder({"pos": 5, "nested": {"a": {}, "b": 3}}))}
    _save_as_before(tmp_path, {**saved, "w": torch.ones(3)}, monkeypatch)
    holder = Holder({"pos": 0, "nested": {"a": {}, "b": -1}})
    state = {"obj": distckpt.PerRank(holder), "w": torch.zeros(3)}
    with distckpt.CheckpointManager(tmp_path, format="dcp", timeout=30) as mgr:
        restored = mgr.restore("last", state=state)
    assert (restored.missing_keys, restored.unexpected_keys) == ((), ())
    assert state["w"].tolist() == [1.0, 1.0, 1.0]
    assert holder.state == {"pos": 5, "nested": {"b": 3}}


def test_the_top_level_empty_dicts_of_an_earlier_checkpoint_are_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty dict an earlier version did not list, at a per-rank value's top level, is
    missing, as that version reported it: a strict restore refuses an object holding one,
    naming both lists of keys; ``strict=False`` loads a plain dict's other keys."""
    holder = Holder({"pos": 5, "seen": {}})
    state = {"obj": distckpt.PerRank(holder), "plain": distckpt.PerRank({"x": 7, "e": {}})}
    _save_as_before(tmp_path, state, monkeypatch)
    given = Holder({"pos": 0, "seen": {}})
    plain = distckpt.PerRank({"x": -1, "e": {}})
    with (
        distckpt.CheckpointManager(tmp_path, format="dcp", timeout=30) as mgr,
        pytest.raises(distckpt.KeyMismatch) as caught,
    ):
        mgr.restore("last", state={"obj": distckpt.PerRank(given), "plain": plain})
    assert caught.value.changed_keys == (("obj", ("pos",), ("pos", "seen")),)
    assert caught.value.missing_keys == ("plain.e",)
    with distckpt.CheckpointManager(tmp_path, format="dcp", timeout=30) as mgr:
        restored = mgr.restore("last", state={"plain": plain}, strict=False)
    assert restored.missing_keys == ("plain.e",)
    assert plain.value == {"x": 7, "e": {}}
    assert given.state == {"pos": 0, "seen": {}}
