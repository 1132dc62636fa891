"""The "dcp" format's estimate of the bytes a save writes, against what real saves write: many
small items cost more in DCP's framing of each than in their values."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import distckpt
from distckpt.formats.dcp import DcpFormat
from distckpt.formats.dcp_estimate import dcp_sizes
from distckpt.formats.dcp_per_rank import split_per_rank, with_per_rank
from distckpt.formats.dcp_storage import flat_state
from tests.filesystem_saves import TIMEOUT
from tests.filesystems import MountFactory, statvfs_free_bytes


def _written_bytes(root: Path, state: dict[str, object]) -> int:
    with distckpt.CheckpointManager(root, format="dcp", timeout=TIMEOUT) as mgr:
        path = Path(mgr.save(1, state).path)
    return sum(entry.stat().st_size for entry in path.iterdir() if entry.name != "manifest.json")


def test_the_estimate_covers_many_small_tensors_and_plain_values(tmp_path: Path) -> None:
    state: dict[str, object] = {f"layer{i}.param": torch.zeros(1) for i in range(4000)}
    state.update({f"counter{i}": i for i in range(1000)})
    written = _written_bytes(tmp_path / "small", state)
    assert DcpFormat().estimate_bytes(state) >= written


def test_the_estimate_of_a_few_large_tensors_stays_close(tmp_path: Path) -> None:
    state: dict[str, object] = {f"w{i}": torch.ones(1 << 20) for i in range(4)}  # 16 MiB
    written = _written_bytes(tmp_path / "large", state)
    estimate = DcpFormat().estimate_bytes(state)
    assert written <= estimate < written + (128 << 10)


def test_many_small_tensors_that_do_not_fit_are_refused_before_writing(
    mounts: MountFactory,
) -> None:
    """20000 one-element tensors take about 35 MiB in "dcp" for 78 KiB of values: on a volume
    with about 20 MiB free, the preflight refuses the save instead of the disk filling up."""
    root = mounts.get("small-ext4").path / "dcp-many-small"
    state = {f"layer{i}.param": torch.zeros(1) for i in range(20000)}
    assert statvfs_free_bytes(root.parent) < 30 << 20
    with distckpt.CheckpointManager(root, format="dcp", timeout=TIMEOUT) as mgr:
        with pytest.raises(distckpt.InsufficientSpace, match="saving step 1 needs about"):
            mgr.save(1, state)
        assert mgr.steps() == []
        assert os.listdir(root / ".staging") == []


def test_the_estimate_covers_text_and_byte_string_values(tmp_path: Path) -> None:
    """2000 texts of 4 KiB were estimated at 3.98 MiB where DCP wrote 10.40 MiB: a text's
    characters count as a byte string's bytes do."""
    state: dict[str, object] = {f"s{i}": "x" * 4096 for i in range(2000)}
    state.update({f"b{i}": b"y" * 4096 for i in range(500)})
    written = _written_bytes(tmp_path / "text", state)
    assert DcpFormat().estimate_bytes(state) >= written


def test_the_items_counted_are_those_dcp_flattens_the_state_into() -> None:
    """The estimate's one walk keys items as DCP's own flattening does: lists of plain values
    and tuples whole, lists holding tensors or mappings item by item, per-rank values apart."""
    state = {
        "model": {"layer": {"weight": torch.ones(2), "bias": torch.zeros(1)}},
        "ids": list(range(1000)),
        "pairs": (torch.ones(1), 2),
        "groups": [{"lr": 0.1, "params": [0, 1]}, {"lr": 0.2, "params": [2]}],
        "tensors": [torch.ones(1), torch.ones(2)],
        "nested": [[1, 2], [torch.ones(1)]],
        "rng": distckpt.PerRank(torch.ones(3)),
        "text": "hello",
    }
    keys = flat_state(with_per_rank(*split_per_rank(state), rank=0))
    sizes = dcp_sizes(state)
    assert sizes.items == len(keys)
    assert sizes.key_chars >= sum(len(key) for key in keys)
