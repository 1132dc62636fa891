"""``distckpt prune``'s options refused in the command line's words (the option, not the
Python argument), with exit status 2, before anything is removed; and what a prune the options
allow removes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import distckpt
from tests.cli_runner import run_cli as run


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    with distckpt.CheckpointManager(path, monitor="loss", fsync=False) as mgr:
        for step in (10, 20, 30):
            mgr.save(step, {"w": torch.zeros(2)}, metrics={"loss": float(step)})
    return path


@pytest.mark.parametrize(
    ("options", "said"),
    [
        (["--keep-last", "0"], "--keep-last 0: give a count of at least 1, or leave the option"),
        (["--keep-best", "-1", "--monitor", "loss", "--mode", "min"], "--keep-best -1: give"),
        (["--keep-every-n-steps", "0"], "--keep-every-n-steps 0: give a count of at least 1"),
        (["--keep-every-n-seconds", "0"], "--keep-every-n-seconds 0: give a positive number"),
        (["--keep-every-n-seconds", "soon"], "--keep-every-n-seconds soon: give a positive"),
        (["--keep-every-n-seconds", "inf"], "--keep-every-n-seconds inf: give a positive"),
        (["--keep-best", "1"], "--keep-best needs --monitor M --mode min|max"),
        (["--keep-last", "1", "--keep-unranked"], "--keep-unranked needs --monitor M"),
    ],
)
def test_prune_refuses_options_in_its_own_words(root: Path, options: list[str], said: str) -> None:
    out = run("prune", str(root), *options)
    assert out.returncode == 2, out
    assert out.stderr.startswith(f"distckpt prune: error: {said}"), out.stderr
    # The Python API's words name arguments the command line has not got.
    assert "None" not in out.stderr and "=" not in out.stderr, out.stderr
    assert distckpt.CheckpointManager(root, read_only=True).steps() == [10, 20, 30]


def test_prune_refuses_a_monitor_that_ranks_no_checkpoint(root: Path) -> None:
    """README: a --monitor no checkpoint has a finite value of (a typo) would remove best:
    refused with exit status 2, naming the metric and the metrics the checkpoints have."""
    best_before = os.readlink(root / "best")
    out = run("prune", str(root), "--keep-last", "1", "--monitor", "los", "--mode", "min")
    assert out.returncode == 2, out
    assert out.stderr.startswith(
        "distckpt prune: error: --monitor los ranks no checkpoint: none has a finite los (the "
        "checkpoints' metrics: loss)"
    ), out.stderr
    assert distckpt.CheckpointManager(root, read_only=True).steps() == [10, 20, 30]
    assert os.readlink(root / "best") == best_before


def test_prune_by_a_monitor_on_a_root_with_no_checkpoint_removes_nothing(tmp_path: Path) -> None:
    """With no checkpoint there is nothing the monitor could rank, and nothing to remove."""
    empty = tmp_path / "empty"
    distckpt.CheckpointManager(empty, fsync=False).close()
    out = run("prune", str(empty), "--keep-last", "1", "--monitor", "los", "--mode", "min")
    assert out.returncode == 0, out


def test_prune_leaves_no_bytes_of_what_it_removed(root: Path) -> None:
    """As ``delete`` does (tests/test_cli_delete.py): a step prune removed is gone with its
    bytes when it returns, not left in the root's trash for the next start or ``gc``."""
    out = run("prune", str(root), "--keep-last", "1", "--json")
    assert out.returncode == 0, out
    # best (step 10, the lowest loss) is kept as well as the newest, step 30
    assert json.loads(out.stdout) == {"removed": [20], "kept": [10, 30]}
    assert not (root / "step-00000020").exists()
    assert not any((root / ".trash").iterdir())
