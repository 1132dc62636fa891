"""The structured fields of a restore's errors, as every rank sees them (``errors.py``
promises ``path`` and ``step`` wherever they are known, and each class its own fields): another
world size, a tensor of another shape, a rank the checkpoint does not have, a damaged DCP data
file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt.errors import CheckpointNotFound, CorruptCheckpoint
from distckpt.formats.dcp_storage import Reader
from tests.ranks import run_ranks, values

TIMEOUT = 90.0


def _save(rank: int, world_size: int, root: str, fmt: str) -> None:
    with distckpt.CheckpointManager(root, format=fmt, timeout=30) as mgr:
        mgr.save(3, {"w": torch.arange(40.0), "note": "hello", "rng": distckpt.RNGState()})


def _restore(rank: int, world_size: int, root: str, fmt: str, width: int) -> tuple[str, Any]:
    """The error a restore into a state whose ``w`` holds ``width`` elements raises here."""
    state = {"w": torch.zeros(width), "note": "", "rng": distckpt.RNGState()}
    try:
        with distckpt.CheckpointManager(root, format=fmt, timeout=30) as mgr:
            mgr.restore("last", state=state)
    except distckpt.CheckpointError as exc:
        return type(exc).__name__, exc.fields()
    return "ok", None


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_world_size_mismatch_names_both_sizes_and_the_checkpoint(tmp_path: Path, fmt: str) -> None:
    """Saved by 1 rank, restored by 2: refused ("dcp": for its per-rank RNG state) with both
    world sizes, the checkpoint's path and its step as fields, on every rank (rank 1 raises
    the error rebuilt from rank 0's fields)."""
    root = str(tmp_path / "ckpt")
    run_ranks(_save, 1, root, fmt, timeout=TIMEOUT)
    for kind, fields in values(run_ranks(_restore, 2, root, fmt, 40, timeout=TIMEOUT)):
        assert kind == "WorldSizeMismatch"
        assert fields["saved_world_size"] == 1
        assert fields["world_size"] == 2
        assert fields["path"] == str(tmp_path / "ckpt" / "step-00000003")
        assert fields["step"] == 3


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_shape_mismatch_names_the_checkpoint_and_its_step(tmp_path: Path, fmt: str) -> None:
    root = str(tmp_path / "ckpt")
    run_ranks(_save, 2, root, fmt, timeout=TIMEOUT)
    for kind, fields in values(run_ranks(_restore, 2, root, fmt, 41, timeout=TIMEOUT)):
        assert kind == "ShapeMismatch"
        assert fields["mismatches"] == (("w", (40,), (41,)),)
        assert fields["path"] == str(tmp_path / "ckpt" / "step-00000003")
        assert fields["step"] == 3


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
@pytest.mark.parametrize("strict", [True, False])
def test_a_rank_the_checkpoint_lacks_names_the_checkpoint(
    tmp_path: Path, fmt: str, strict: bool
) -> None:
    """load_checkpoint(rank=) of a rank that did not save: refused in either format, with or
    without ``strict``, and whether or not the state asks for the per-rank values: the
    caller named a rank that has no part ("dcp" would otherwise load the shared values and
    find no per-rank ones: a key mismatch, or a silent partial load). The refusal is for the
    rank itself, not for the per-rank values a "dcp" rank past the saved ones cannot read."""
    root = str(tmp_path / "ckpt")
    run_ranks(_save, 2, root, fmt, timeout=TIMEOUT)
    for rank in (2, 5):
        for per_rank in (False, True):
            state: dict[str, Any] = {"w": torch.zeros(40), "note": ""}
            if per_rank:
                state["rng"] = distckpt.RNGState()
            with pytest.raises(CheckpointNotFound, match=f"there is no rank {rank}") as raised:
                distckpt.load_checkpoint(root, rank=rank, state=state, strict=strict)
            assert "to read the per-rank values" not in str(raised.value), raised.value
            assert raised.value.path == str(tmp_path / "ckpt" / "step-00000003")
            assert raised.value.step == 3
            assert state["w"].count_nonzero() == 0  # nothing loaded
    # the ranks that saved it read their part
    state = {"w": torch.zeros(40), "note": "", "rng": distckpt.RNGState()}
    assert distckpt.load_checkpoint(root, rank=1, state=state).state["note"] == "hello"


def test_a_damaged_dcp_data_file_is_named_with_the_value(tmp_path: Path) -> None:
    """A byte flipped in the last value's bytes of rank 0's data file (its size unchanged, so
    only the read finds it): every rank raises CorruptCheckpoint whose ``path`` is that file,
    and whose message names it and the value, not only the unpickler's complaint."""
    root = str(tmp_path / "ckpt")
    run_ranks(_save, 2, root, "dcp", timeout=TIMEOUT)
    data_file = tmp_path / "ckpt" / "step-00000003" / "__0_0.distcp"
    damaged = bytearray(data_file.read_bytes())
    damaged[-100] ^= 0xFF
    data_file.write_bytes(bytes(damaged))
    for rank, (kind, fields) in enumerate(
        values(run_ranks(_restore_message, 2, root, timeout=TIMEOUT))
    ):
        assert kind == "CorruptCheckpoint"
        assert fields["path"] == str(data_file)
        assert fields["step"] == 3
        assert fields["rank"] == 0
        assert fields["message"].startswith("DCP failed while reading step-00000003 on rank 0")
        assert f"rank 0: CorruptCheckpoint: {data_file}: value " in fields["message"], rank


def _restore_message(rank: int, world_size: int, root: str) -> tuple[str, Any]:
    """:func:`_restore` of a "dcp" checkpoint, with the error's message among its fields."""
    state = {"w": torch.zeros(40), "note": "", "rng": distckpt.RNGState()}
    try:
        with distckpt.CheckpointManager(root, format="dcp", timeout=30) as mgr:
            mgr.restore("last", state=state)
    except distckpt.CheckpointError as exc:
        return type(exc).__name__, {**exc.fields(), "message": str(exc)}
    return "ok", None


def test_a_damaged_dcp_data_file_is_named_when_torch_does_not_say_which_item(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader learns which item torch reads from torch's private ``_slice_file`` hook: a
    torch that renamed it would never call ours. Taking our override away (nothing real
    stands for a future torch release) shows the error still names the data file, as
    CorruptCheckpoint with the file as its ``path``."""
    root = tmp_path / "ckpt"
    with distckpt.CheckpointManager(root, format="dcp", timeout=30) as mgr:
        mgr.save(3, {"w": torch.arange(40.0), "note": "hello"})
    data_file = root / "step-00000003" / "__0_0.distcp"
    damaged = bytearray(data_file.read_bytes())
    damaged[-100] ^= 0xFF
    data_file.write_bytes(bytes(damaged))
    monkeypatch.delattr(Reader, "_slice_file")
    with (
        pytest.raises(CorruptCheckpoint) as raised,
        distckpt.CheckpointManager(root, format="dcp", timeout=30) as mgr,
    ):
        mgr.restore("last", state={"w": torch.zeros(40), "note": ""})
    assert raised.value.path == str(data_file)
    assert f"{data_file} cannot be read" in str(raised.value)
