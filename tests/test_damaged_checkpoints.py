"""Damaged checkpoints: skipped by ``last``, refused when asked for, listed by ``steps()`` yet
skipped by the queries; and what the listing shows of checkpoints and their extra files, with
bad extra file names refused on every rank."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt.checksums import file_checksum
from tests.core_ranks import JOB_TIMEOUT, TIMEOUT, _staging_entries, _weights
from tests.hardening_steps import _err, _truncate
from tests.ranks import run_ranks, values

# --------------------------------------------------------------------------- damaged checkpoints


def _damage(step_dir: Path, damage: str) -> None:
    """Damage a one-rank checkpoint: its rank file ``"truncated"`` or ``"missing"``, or
    ``"no manifest"``."""
    if damage == "truncated":
        _truncate(step_dir / "rank-00000.pt")
    elif damage == "missing":
        (step_dir / "rank-00000.pt").unlink()
    else:
        (step_dir / "manifest.json").unlink()


@pytest.mark.parametrize("damage", ["truncated", "missing", "no manifest"])
def test_damaged_newest_is_skipped_by_last_and_refused_explicitly(
    root: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        for step in (1, 2):
            mgr.save(step, {"w": _weights(step, 0)})
    step2 = root / "step-00000002"
    _damage(step2, damage)

    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        # Named explicitly, it is refused (and left where it is).
        with pytest.raises(distckpt.CorruptCheckpoint, match="step-00000002"):
            mgr.restore(2)
        with pytest.raises(distckpt.CorruptCheckpoint):
            distckpt.load_checkpoint(step2)
        assert mgr.latest_step() == 1 and mgr.steps() == [1, 2]
        assert os.readlink(root / "last") == "step-00000001"  # repaired at start-up
        assert distckpt.load_checkpoint(root / "last").step == 1
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="distckpt"):
            template = {"w": torch.zeros(3)}
            assert mgr.restore("last", state=template).step == 1
        assert torch.equal(template["w"], _weights(1, 0))
        assert "step-00000002" in caplog.text
        # "last" skipped it, and set it aside (tests/test_set_aside.py): saving goes on from
        # the step loaded.
        assert mgr.steps() == [1] and not step2.exists()
        assert mgr.save(2, {"w": _weights(2, 0)}).step == 2
        assert mgr.save(3, {"w": _weights(3, 0)}).step == 3
        assert os.readlink(root / "last") == "step-00000003"


# --------------------------------------------------------------------------- listing, extra files


def _save_described(
    rank: int, world_size: int, root: str, vocab: str
) -> list[distckpt.CheckpointInfo]:
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        mgr.save(1, {"w": _weights(1, rank)}, epoch=0, metrics={"loss": 2.0})
        mgr.save(
            2,
            {"w": _weights(2, rank)},
            epoch=1,
            metrics={"loss": 1.0},
            metadata={"note": "with files"},
            files={"config.json": b'{"hidden": 8}', "vocab.txt": vocab},
        )
        return mgr.checkpoints()


def test_checkpoints_and_extra_files(tmp_path: Path, root: Path) -> None:
    vocab = tmp_path / "vocab-source.txt"
    vocab.write_bytes(b"hello\nworld\n" * 1000)
    out = values(run_ranks(_save_described, 2, str(root), str(vocab), timeout=JOB_TIMEOUT))
    assert out[0] == out[1]
    infos = out[0]
    assert [i.step for i in infos] == [1, 2]
    assert [i.epoch for i in infos] == [0, 1]
    assert [dict(i.metrics) for i in infos] == [{"loss": 2.0}, {"loss": 1.0}]
    assert infos[1].metadata == {"note": "with files"}
    for info in infos:
        assert info.format == "torch"
        assert info.world_size == 2
        assert info.path == root / f"step-{info.step:08d}"
        files = [p for p in info.path.iterdir() if p.name != "manifest.json"]
        assert info.size_bytes == sum(p.stat().st_size for p in files)

    step2 = root / "step-00000002"
    assert (step2 / "config.json").read_bytes() == b'{"hidden": 8}'
    assert (step2 / "vocab.txt").read_bytes() == vocab.read_bytes()
    listed = json.loads((step2 / "manifest.json").read_text())["files"]
    assert set(listed) == {"rank-00000.pt", "rank-00001.pt", "config.json", "vocab.txt"}
    for name in ("config.json", "vocab.txt"):
        assert listed[name]["size"] == (step2 / name).stat().st_size
        assert listed[name]["checksum"] == file_checksum(step2 / name)
    assert not (root / "step-00000001" / "config.json").exists()


def _bad_extra_files(rank: int, world_size: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        for label, files in {
            "dotdot": {"../escape.txt": b"x"},
            "manifest": {"manifest.json": b"{}"},
            "rank file": {"rank-00000.pt": b"x"},
            "subdir": {"a/b.txt": b"x"},
            "missing source": {"vocab.txt": os.path.join(root, "nope.txt")},
        }.items():
            try:
                mgr.save(1, {"w": _weights(1, rank)}, files=files)
                out[label] = None
            except Exception as exc:
                out[label] = _err(exc)
        out["steps"] = mgr.steps()
    return out


def test_bad_extra_file_names_are_refused_on_every_rank(root: Path) -> None:
    out = values(run_ranks(_bad_extra_files, 2, str(root), timeout=JOB_TIMEOUT))
    for rank_out in out:
        for label in ("dotdot", "manifest", "rank file", "subdir", "missing source"):
            assert rank_out[label] is not None, label
            assert rank_out[label][0] == "InvalidArgument", (label, rank_out[label])
        assert rank_out["steps"] == []
    assert not (root.parent / "escape.txt").exists()
    assert _staging_entries(root) == []


# --------------------------------------------------------------------------- damaged steps listed


@pytest.mark.parametrize("damage", ["truncated", "missing", "no manifest"])
def test_steps_lists_damaged_checkpoints_the_queries_skip(root: Path, damage: str) -> None:
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": _weights(step, 0)})
        _damage(root / "step-00000002", damage)
        assert mgr.steps() == [1, 2, 3]  # names only: the damaged step is listed
        assert [info.step for info in mgr.checkpoints()] == [1, 3]
        assert mgr.latest_step() == 3
