"""Per-rank items of lists and tuples in the "dcp" format (DCP pickles such a container whole,
so the item has no key of its own): what a restore by the same or another number of ranks
reports of them, what it logs, and how they export; and ``load_checkpoint`` by a process whose
torch.distributed rank saved no part."""

from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt.containers import same_kind_of_tuple
from tests.ranks import run_ranks, values

TIMEOUT = 90.0

#: a namedtuple holding a per-rank item: a restore rebuilds it, of the same kind, with the item
Pair = collections.namedtuple("Pair", "first second")


def _save(rank: int, world_size: int, root: str, fmt: str, state: dict[str, Any]) -> None:
    """Saves ``state`` with each ``"RANK"`` in it, at any depth, replaced by ``PerRank(rank)``."""

    def marked(node: Any) -> Any:
        if node == "RANK":
            return distckpt.PerRank(rank)
        if isinstance(node, dict):
            return {key: marked(value) for key, value in node.items()}
        if isinstance(node, (list, tuple)):
            items = [marked(value) for value in node]
            return items if isinstance(node, list) else same_kind_of_tuple(node, items)
        return node

    with distckpt.CheckpointManager(root, format=fmt, fsync=False, timeout=30) as mgr:
        mgr.save(1, {"w": torch.arange(3.0), **marked(state)})


def _restore(
    rank: int, world_size: int, root: str, given: dict[str, Any], strict: bool = True
) -> Any:
    """What a "dcp" restore into ``{"w": ..., **given}`` returns: the state without ``w`` and
    the keys it reports, or the error's type and message; and the per-rank notes it logs."""
    notes: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: notes.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("distckpt").addHandler(handler)
    with distckpt.CheckpointManager(root, format="dcp", fsync=False, timeout=30) as mgr:
        try:
            ckpt = mgr.restore("last", state={"w": torch.zeros(3), **given}, strict=strict)
            state = {key: value for key, value in ckpt.state.items() if key != "w"}
            out: Any = (state, ckpt.missing_keys, ckpt.unexpected_keys)
        except distckpt.CheckpointError as exc:
            out = (type(exc).__name__, str(exc))
    return out, [note for note in notes if "per-rank" in note]


# ------------------------------------------------------------------ another number of ranks


def test_another_world_size_refuses_per_rank_items_by_name(tmp_path: Path) -> None:
    """WorldSizeMismatch names a per-rank item of a tuple and of a list, each by its place."""
    root = str(tmp_path / "ckpt")
    saved = {"t": ("RANK", "tag"), "l": ["RANK", 5]}
    values(run_ranks(_save, 2, root, "dcp", saved, timeout=TIMEOUT))
    given = {"t": (distckpt.PerRank(-1), "tag"), "l": [distckpt.PerRank(-1), 5]}
    ((error, message), _) = values(run_ranks(_restore, 1, root, given, timeout=TIMEOUT))[0]
    assert error == "WorldSizeMismatch", message
    assert "cannot be resharded to 1 ranks: t.0, l.0." in message, message


def test_a_per_rank_item_the_saved_list_lacks_is_missing_at_any_world_size(
    tmp_path: Path,
) -> None:
    """An item of a per-rank list the saved list does not have (it held another item) is a
    missing key, with the same ranks and with another number: not a WorldSizeMismatch. The
    saved list, holding only the other item, is logged as not restored, not dropped silently."""
    root = str(tmp_path / "ckpt")
    values(run_ranks(_save, 2, root, "dcp", {"l": ["RANK", None]}, timeout=TIMEOUT))
    given = {"l": [None, distckpt.PerRank(-1)]}
    for world_size in (2, 1):
        out = values(run_ranks(_restore, world_size, root, given, False, timeout=TIMEOUT))
        for rank, ((state, missing, _), notes) in enumerate(out):
            assert state == {"l": [None, None]} and missing == ("l.1",), (world_size, out)
            unread = f"rank {rank}: l" if world_size == 2 else "rank 0: l; rank 1: l"
            assert len(notes) == 1 and notes[0].endswith(f"not restored: {unread}"), notes


# ------------------------------------------------------------------ the same number of ranks


def test_a_strict_restore_reports_a_per_rank_item_the_saved_list_lacks(tmp_path: Path) -> None:
    """The per-rank item moved within its list since the save: the saved list is read to see
    that it lacks the asked-for item, which a strict restore refuses."""
    root = str(tmp_path / "ckpt")
    values(run_ranks(_save, 2, root, "dcp", {"l": ["RANK", 5]}, timeout=TIMEOUT))
    given = {"l": [5, distckpt.PerRank(-1)]}
    for (error, message), _ in values(run_ranks(_restore, 2, root, given, timeout=TIMEOUT)):
        assert error == "KeyMismatch", message
        assert "missing from the checkpoint ['l.1']" in message, message


def test_an_added_tuple_with_a_per_rank_item_is_one_missing_key(tmp_path: Path) -> None:
    """An (RNGState(), "tag") the save did not have is reported once, as its place."""
    root = str(tmp_path / "ckpt")
    values(run_ranks(_save, 2, root, "dcp", {}, timeout=TIMEOUT))
    given = {"t": (distckpt.RNGState(), "tag")}
    for (error, message), _ in values(run_ranks(_restore, 2, root, given, timeout=TIMEOUT)):
        assert error == "KeyMismatch", message
        assert "missing from the checkpoint ['t']," in message, message


def _restore_pair(rank: int, world_size: int, root: str) -> Any:
    # DCP pickles the namedtuple whole; weights_only loading needs it allowed (in this rank
    # only: the process ends with the test's job).
    torch.serialization.add_safe_globals([Pair])
    return _restore(rank, world_size, root, {"p": Pair(distckpt.PerRank(-1), "tag")})


def test_a_namedtuple_is_rebuilt_with_its_per_rank_item(tmp_path: Path) -> None:
    root = str(tmp_path / "ckpt")
    values(run_ranks(_save, 2, root, "dcp", {"p": Pair("RANK", "tag")}, timeout=TIMEOUT))
    for rank, ((state, missing, _), _) in enumerate(
        values(run_ranks(_restore_pair, 2, root, timeout=TIMEOUT))
    ):
        assert type(state["p"]) is Pair and state["p"] == Pair(rank, "tag"), state
        assert missing == (), missing


def test_per_rank_values_not_asked_for_are_logged_beside_asked_ones(tmp_path: Path) -> None:
    """The same ranks, a state asking for one of a rank's two per-rank values: the other is
    logged as not restored, not dropped silently."""
    root = str(tmp_path / "ckpt")
    values(run_ranks(_save, 2, root, "dcp", {"n": "RANK", "m": "RANK"}, timeout=TIMEOUT))
    given = {"n": distckpt.PerRank(-1)}
    out = values(run_ranks(_restore, 2, root, given, False, timeout=TIMEOUT))
    for rank, ((state, _, unexpected), notes) in enumerate(out):
        assert state == {"n": rank} and unexpected == (), out
        assert len(notes) == 1 and notes[0].endswith(f"not restored: rank {rank}: m"), notes


# ------------------------------------------------------------------ export


@pytest.mark.parametrize("fmt", ["dcp", "torch"])
def test_export_keeps_per_rank_items_of_tuples_and_lists(tmp_path: Path, fmt: str) -> None:
    """ "dcp" exports every rank's items under __per_rank__ (each in its container, saved whole,
    the other items None); "torch" exports a rank's state as it was given."""
    root = tmp_path / "ckpt"
    saved = {"t": ("RANK", "tag"), "l": ["RANK", 5]}
    values(run_ranks(_save, 2, str(root), fmt, saved, timeout=TIMEOUT))
    if fmt == "dcp":
        exported = torch.load(distckpt.export(root, tmp_path / "all.pt"), weights_only=True)
        assert exported["t"] == (None, "tag") and exported["l"] == [None, 5], exported
        assert exported["__per_rank__"] == {
            str(rank): {"t": [rank], "l": [rank]} for rank in range(2)
        }, exported
        return
    for rank in range(2):
        out = distckpt.export(root, tmp_path / f"r{rank}.pt", rank=rank)
        exported = torch.load(out, weights_only=True)
        assert exported["t"] == (rank, "tag") and exported["l"] == [rank, 5], exported


# ------------------------------------------------------------------ a rank no part was saved by


def _load_by_default_rank(rank: int, world_size: int, root: str, per_rank: bool) -> Any:
    """An evaluation job of more ranks than saved: each rank loads alone, as its own rank."""
    state: dict[str, Any] = {"w": torch.zeros(3)}
    if per_rank:
        state["n"] = distckpt.PerRank(-1)
    try:
        # not strict: a "torch" rank's part holds the per-rank value a state may leave out
        loaded = distckpt.load_checkpoint(root, state=state, strict=False)
    except distckpt.CheckpointError as exc:
        return type(exc).__name__, str(exc)
    # the keys asked for: a "torch" rank's part, read whole, holds the others too
    return {key: loaded.state[key] for key in state} | {"w": loaded.state["w"].tolist()}


@pytest.mark.parametrize("fmt", ["dcp", "torch"])
def test_load_checkpoint_by_a_rank_that_saved_no_part(tmp_path: Path, fmt: str) -> None:
    """3 ranks, each loading a 2-rank checkpoint without rank=: "dcp" gives every rank the
    shared values, and refuses only a rank past the saved ones asking for per-rank values;
    "torch" has no part for that rank."""
    root = str(tmp_path / "ckpt")
    values(run_ranks(_save, 2, root, fmt, {"n": "RANK"}, timeout=TIMEOUT))
    shared = values(run_ranks(_load_by_default_rank, 3, root, False, timeout=TIMEOUT))
    own = values(run_ranks(_load_by_default_rank, 3, root, True, timeout=TIMEOUT))
    for rank in range(2):
        assert shared[rank] == {"w": [0.0, 1.0, 2.0]}, shared
        assert own[rank] == {"w": [0.0, 1.0, 2.0], "n": rank}, own
    if fmt == "dcp":
        assert shared[2] == {"w": [0.0, 1.0, 2.0]}, shared
    else:
        assert shared[2][0] == "CheckpointNotFound" and "no rank 2" in shared[2][1], shared
    error, message = own[2]
    assert error == "CheckpointNotFound" and "there is no rank 2" in message, own
    if fmt == "dcp":
        assert "per-rank values n from; leave them out of state=" in message, message
