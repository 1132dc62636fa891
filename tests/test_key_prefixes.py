"""Restoring across wrapper prefixes: a model saved from a ``torch.compile``'d module
(``_orig_mod.``) or a DDP-wrapped one (``module.``) restores into the bare model, and the
reverse, in both formats, with one INFO line; ``fix_key_prefixes=False`` turns it off."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo  # imported here once: compiled modules would import it in every rank

import distckpt
from distckpt.errors import InvalidArgument
from distckpt.key_prefixes import matching_prefixes
from tests.ranks import run_ranks, values

TIMEOUT = 60.0
FORMATS = ["torch", "dcp"]


def make_model(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def same_params(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def prefix_notes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "distckpt" and "wrapper prefixes" in record.getMessage()
    ]


# ------------------------------------------------------------------ the mapping itself


def test_keys_are_mapped_only_when_every_key_matches_one_to_one() -> None:
    bare = {"0.weight", "0.bias"}
    compiled = {"_orig_mod.0.weight", "_orig_mod.0.bias"}
    assert matching_prefixes(bare, compiled) == {
        "0.weight": "_orig_mod.0.weight",
        "0.bias": "_orig_mod.0.bias",
    }
    assert matching_prefixes(compiled, bare) == {
        "_orig_mod.0.weight": "0.weight",
        "_orig_mod.0.bias": "0.bias",
    }
    # DDP around a compiled model, into the bare one
    assert matching_prefixes(bare, {"module._orig_mod.0.weight", "module._orig_mod.0.bias"})
    assert matching_prefixes(bare, bare) is None  # nothing to map
    assert matching_prefixes(bare, {"module.0.weight"}) is None  # a key left unmatched
    assert matching_prefixes(bare, {"module.0.weight", "module.0.bias", "x"}) is None
    # two saved keys that would both become "0.weight": ambiguous, so not mapped
    assert matching_prefixes({"0.weight"}, {"0.weight", "module.0.weight"}) is None
    assert matching_prefixes({"module", "x"}, {"module", "y"}) is None


# ------------------------------------------------------------------ torch.compile (one process)


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    # backend="eager": the wrapper (and its "_orig_mod." keys) without generating code.
    return torch.compile(model, backend="eager")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("direction", ["compiled-to-plain", "plain-to-compiled"])
def test_compiled_and_plain_models_restore_into_each_other(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fmt: str, direction: str
) -> None:
    saved_model, target_model = make_model(0), make_model(1)
    if direction == "compiled-to-plain":
        saved, target = compiled(saved_model), target_model
    else:
        saved, target = saved_model, compiled(target_model)
    assert set(saved.state_dict()) != set(target.state_dict())
    with distckpt.CheckpointManager(tmp_path / "ckpt", format=fmt, fsync=False) as mgr:
        mgr.save(1, {"model": saved, "n": 3})
        with pytest.raises(InvalidArgument, match="does not match the given state"):
            mgr.restore(state={"model": target, "n": 0}, fix_key_prefixes=False)
        assert not same_params(saved_model, target_model)  # the refusal changed nothing
        assert prefix_notes(caplog) == []
        with caplog.at_level(logging.INFO, logger="distckpt"):
            ckpt = mgr.restore(state={"model": target, "n": 0})
    assert ckpt is not None and ckpt.missing_keys == () and ckpt.unexpected_keys == ()
    assert same_params(saved_model, target_model)
    assert ckpt.state["n"] == 3
    notes = prefix_notes(caplog)
    assert len(notes) == 1 and "'_orig_mod.'" in notes[0], notes
    # The same through load_checkpoint, in a plain process.
    again = make_model(2)
    into = again if direction == "compiled-to-plain" else compiled(again)
    distckpt.load_checkpoint(tmp_path / "ckpt", state={"model": into, "n": 0})
    assert same_params(saved_model, again)


@pytest.mark.parametrize("fmt", FORMATS)
def test_strict_compares_keys_after_the_prefixes_are_mapped(tmp_path: Path, fmt: str) -> None:
    # A compiled model's checkpoint into a bare model is no strict mismatch ("dcp" compares
    # keys with .metadata before reading: it must compare the mapped keys); a key really
    # missing beside it still is, named alone, and nothing is loaded.
    saved_model = make_model(0)
    with distckpt.CheckpointManager(tmp_path / "ckpt", format=fmt, fsync=False) as mgr:
        mgr.save(1, {"model": compiled(saved_model), "n": 3})
        bare = make_model(1)
        ckpt = mgr.restore(state={"model": bare, "n": 0}, strict=True)
        assert ckpt is not None and ckpt.missing_keys == () and ckpt.unexpected_keys == ()
        assert same_params(saved_model, bare) and ckpt.state["n"] == 3

        other = make_model(2)
        state = {"model": other, "n": 0, "extra": torch.zeros(2)}
        with pytest.raises(InvalidArgument, match="does not match the given state") as refused:
            mgr.restore(state=state, strict=True)
        assert "['extra']" in str(refused.value) and "_orig_mod" not in str(refused.value)
        assert not same_params(saved_model, other) and state["n"] == 0  # nothing loaded
        ckpt = mgr.restore(state=state, strict=False)
        assert ckpt is not None and ckpt.missing_keys == ("extra",), ckpt.missing_keys
        assert ckpt.unexpected_keys == ()
        assert same_params(saved_model, other) and state["n"] == 3  # in place, as in main

        # A checkpoint key the state lacks beside the mapped model: unexpected, refused.
        mgr.save(2, {"model": compiled(make_model(3)), "n": 4, "gone": torch.ones(1)})
        with pytest.raises(InvalidArgument, match=r"not in the given state \['gone'\]"):
            mgr.restore(2, state={"model": make_model(4), "n": 0}, strict=True)


def _per_rank_and_prefixes(rank: int, world_size: int, root: str) -> dict[str, Any]:
    saved_model = make_model(0)
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, format="dcp", fsync=False, timeout=30) as mgr:
        mgr.save(1, {"model": compiled(saved_model), "seen": distckpt.PerRank(rank + 10)})
        bare = make_model(1)
        state = {"model": bare, "seen": distckpt.PerRank(-1)}
        ckpt = mgr.restore(state=state, strict=True)
        out["clean"] = ckpt.missing_keys == () and ckpt.unexpected_keys == ()
        out["model"] = same_params(saved_model, bare)
        out["seen"] = ckpt.state["seen"]
        out["seen_in_place"] = state["seen"].value
        try:
            mgr.restore(state={"model": make_model(2), "other": distckpt.PerRank(0)})
            out["refused"] = "no error"
        except InvalidArgument as exc:
            out["refused"] = str(exc)
    return out


def test_strict_with_per_rank_values_and_mapped_prefixes_in_dcp(tmp_path: Path) -> None:
    # Per-rank values are split out and the other ranks' are not unexpected; a per-rank
    # value the checkpoint lacks is a real mismatch.
    out = values(run_ranks(_per_rank_and_prefixes, 2, str(tmp_path / "ckpt"), timeout=TIMEOUT))
    for rank, result in enumerate(out):
        assert result["clean"] and result["model"], result
        assert result["seen"] == rank + 10 and result["seen_in_place"] == rank + 10, result
        assert "['other']" in result["refused"], result["refused"]


# ------------------------------------------------------------------ DDP (2 gloo ranks)


def _ddp_round_trips(rank: int, world_size: int, root: str, fmt: str) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel

    wrapped_model = make_model(0)
    wrapped = DistributedDataParallel(wrapped_model)
    plain = make_model(1)
    out: dict[str, Any] = {"keys": sorted(wrapped.state_dict())[:1]}
    with distckpt.CheckpointManager(root, format=fmt, fsync=False, timeout=30) as mgr:
        mgr.save(1, {"model": wrapped})
        try:
            mgr.restore(1, state={"model": plain}, fix_key_prefixes=False)
            out["off"] = "no error"
        except InvalidArgument as exc:
            out["off"] = str(exc)
        ckpt = mgr.restore(1, state={"model": plain})
        out["into_plain"] = same_params(wrapped_model, plain) and ckpt.missing_keys == ()
        # ...and the reverse: a bare model's checkpoint into the DDP-wrapped one.
        bare = make_model(2)
        mgr.save(2, {"model": bare})
        ckpt = mgr.restore(2, state={"model": wrapped})
        out["into_ddp"] = same_params(bare, wrapped_model) and ckpt.missing_keys == ()
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_ddp_and_plain_models_restore_into_each_other(tmp_path: Path, fmt: str) -> None:
    out = values(run_ranks(_ddp_round_trips, 2, str(tmp_path / "ckpt"), fmt, timeout=TIMEOUT))
    for result in out:
        assert result["keys"] == ["module.0.bias"]
        assert "does not match the given state" in result["off"], result["off"]
        assert result["into_plain"] and result["into_ddp"], result
