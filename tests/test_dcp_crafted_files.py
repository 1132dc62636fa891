"""A "dcp" checkpoint whose files say something else than distckpt wrote: a ``.metadata``
reaching past a data file's end, describing more tensor bytes than the data files hold, or key
paths no saved state has; a manifest that no longer lists a rank's data file; and an extra file
taking a name DCP writes. Each is refused by name, nothing loaded or written."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt.errors import CorruptCheckpoint, InvalidArgument
from distckpt.fsutil import atomic_write_bytes
from distckpt.layout import MANIFEST_NAME
from distckpt.manifest import read_manifest
from tests.ranks import run_ranks, values
from tests.test_dcp import TIMEOUT, _replace_file, _save_plain, _template


def _metadata(step_dir: Path) -> Any:
    with open(step_dir / ".metadata", "rb") as file:
        return pickle.load(file)  # our own file, written by the save just before


def _crafted(tmp_path: Path, change: str) -> Path:
    """A one-process checkpoint of ``_template()``'s keys whose ``.metadata`` has ``change``,
    the manifest fixed to match it (what an attacker would do)."""
    step_dir = _save_plain(tmp_path / "ckpt", {"w": torch.randn(3, 2), "n": 5})
    metadata = _metadata(step_dir)
    data_size = read_manifest(step_dir).files["__0_0.distcp"].size
    if change == "range past the end":
        for info in metadata.storage_data.values():
            info.length = data_size + 1 - info.offset
    elif change == "negative size":
        metadata.state_dict_metadata["w"].size = torch.Size([-3, 2])
    elif change == "larger tensor":
        # 8 MB of float32 described, where the data file holds a few hundred bytes, its one
        # chunk as large: each chunk's elements are the tensor's, only the bytes tell.
        metadata.state_dict_metadata["w"].size = torch.Size([1_000_000, 2])
        metadata.state_dict_metadata["w"].chunks[0].sizes = torch.Size([1_000_000, 2])
    elif change == "chunks short of the size":
        # Within the bytes stored, but its one 3x2 chunk leaves 17 rows unread: as
        # uninitialised memory by an export, as the given tensor was by a restore.
        metadata.state_dict_metadata["w"].size = torch.Size([20, 2])
    else:  # a list index no saved state could have (a state of two keys has at most two items)
        metadata.planner_data["n"] = ("n", 1000)
    _replace_file(step_dir, ".metadata", pickle.dumps(metadata))
    return step_dir


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("range past the end", r"w.*byte range outside __0_0\.distcp"),
        ("negative size", r"w: malformed tensor metadata"),
        ("larger tensor", r"describes 8000000 bytes of tensors but the data files hold"),
        ("chunks short of the size", r"w: its chunks do not fill its size \[20, 2\]"),
        ("list index", r"planner_data is not a map of keys to key paths"),
    ],
)
def test_a_crafted_metadata_is_refused_by_restore_and_export(
    tmp_path: Path, change: str, message: str
) -> None:
    step_dir = _crafted(tmp_path, change)
    out = tmp_path / "out.pt"
    with pytest.raises(CorruptCheckpoint, match=message):
        distckpt.export(step_dir, out)
    assert not out.exists()
    # A restore reads into the given tensors (one of another shape than described is refused
    # before reading), so it allocates nothing the bytes stored would bound: the read of the
    # stored chunk, which holds 3x2, into the 8 MB one given fails.
    described = {"larger tensor": (1_000_000, 2), "chunks short of the size": (20, 2)}
    template = {**_template(), "w": torch.zeros(described.get(change, (3, 2)))}
    restore_message = r"mismatch sizes" if change == "larger tensor" else message
    with pytest.raises(CorruptCheckpoint, match=restore_message):
        distckpt.load_checkpoint(step_dir, state=template)


def test_a_trusted_metadata_that_is_no_dcp_metadata_is_refused(tmp_path: Path) -> None:
    """``allow_pickle=True`` unpickles anything, and then checks it is DCP's metadata."""
    step_dir = _save_plain(tmp_path / "ckpt", {"w": torch.randn(3, 2), "n": 5})
    _replace_file(step_dir, ".metadata", pickle.dumps({"w": [1, 2]}))
    with pytest.raises(CorruptCheckpoint, match=r"\.metadata holds a dict, not DCP metadata"):
        distckpt.load_checkpoint(step_dir, state=_template(), allow_pickle=True)
    with pytest.raises(CorruptCheckpoint, match=r"\.metadata holds a dict, not DCP metadata"):
        distckpt.export(step_dir, tmp_path / "out.pt", allow_pickle=True)


def _save_two_ranks(rank: int, world_size: int, root: str) -> None:
    with distckpt.CheckpointManager(root, format="dcp", fsync=False, timeout=20) as mgr:
        mgr.save(1, {"w": distckpt.PerRank(torch.full((2,), float(rank)))})


def test_verify_names_a_ranks_data_file_the_manifest_no_longer_lists(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    values(run_ranks(_save_two_ranks, 2, str(root), timeout=TIMEOUT))
    step_dir = root / "step-00000001"
    manifest = read_manifest(step_dir)
    files = {name: record for name, record in manifest.files.items() if name != "__1_0.distcp"}
    (step_dir / "__1_0.distcp").unlink()
    atomic_write_bytes(
        step_dir / MANIFEST_NAME, dataclasses.replace(manifest, files=files).to_json(), fsync=False
    )
    report = distckpt.verify(step_dir)
    assert not report.ok
    assert "__1_0.distcp: required by the 'dcp' format but not in the manifest" in str(report)


@pytest.mark.parametrize("name", [".metadata.tmp", ".METADATA", "__0_0.distcp", "__7_0.DISTCP"])
def test_an_extra_file_named_as_dcp_writes_its_own_is_refused(tmp_path: Path, name: str) -> None:
    with distckpt.CheckpointManager(tmp_path / "ckpt", format="dcp", fsync=False) as mgr:
        with pytest.raises(InvalidArgument, match="names the checkpoint's own file"):
            mgr.save(1, {"w": torch.ones(2)}, files={name: b"x"})
        assert mgr.steps() == []
