"""Crafted "dcp" checkpoints, and saves that would make one:

* a ``.metadata`` (the manifest resealed to match, as an attacker would) with a byte range past
  a data file's end, a negative tensor size, a tensor larger than its chunks or than the bytes
  stored, a chunk reaching past its tensor's size, key paths' list indices past the bound on
  items no key names (one list, or two together; at the bound it is read), a storage entry
  naming a file that is no data file (``../../etc/passwd``, ``.metadata``), or, trusted with
  ``allow_pickle=True``, no DCP metadata at all: a restore refuses it as ``CorruptCheckpoint``
  naming the fault, and so does an export (but for the storage entry case, tested by restore
  only), writing nothing;
* a manifest that no longer lists a rank's data file: not refused, reported by ``verify`` as
  required by the format but not in the manifest;
* an extra file given to a save under a name DCP writes: refused, nothing committed;
* pickles that would run code, as ``.metadata`` or inside it: ``UnsafeCheckpoint`` from export
  and from a restore on every rank, the code never run; as a saved value: refused unless
  ``allow_pickle=True``, which runs it as DCP would."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt.errors import CorruptCheckpoint, InvalidArgument, UnsafeCheckpoint
from distckpt.formats.dcp_metadata import MAX_UNNAMED_LIST_ITEMS, read_metadata
from distckpt.manifest import read_manifest
from tests.hostile_cases import edit_manifest, reseal
from tests.ranks import run_ranks, values
from tests.test_dcp import TIMEOUT, _save_plain, _template


class _RunsCode:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _replace_file(step_dir: Path, name: str, content: bytes) -> None:
    """Swap a checkpoint file and fix the manifest to match: what an attacker would do."""
    (step_dir / name).write_bytes(content)
    reseal(step_dir, name)


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
    elif change == "chunk past its size":
        # As many elements as the tensor, its last row past it: DCP would read past the tensor.
        metadata.state_dict_metadata["w"].chunks[0].offsets = torch.Size([1, 0])
    elif change == "list index":
        # No count in .metadata bounds a list's leading empty dicts, which DCP writes no key
        # for: one item past the fixed bound on those is refused.
        metadata.planner_data["n"] = ("n", MAX_UNNAMED_LIST_ITEMS + 1)
    else:  # each list within the bound, not the two together
        half = MAX_UNNAMED_LIST_ITEMS // 2 + 1
        metadata.planner_data["n"] = ("n", half)
        metadata.planner_data["w"] = ("w", half)
    _replace_file(step_dir, ".metadata", pickle.dumps(metadata))
    return step_dir


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("range past the end", r"w.*byte range outside __0_0\.distcp"),
        ("negative size", r"w: malformed tensor metadata"),
        ("larger tensor", r"describes 8000000 bytes of tensors but the data files hold"),
        ("chunks short of the size", r"w: its chunks do not fill its size \[20, 2\]"),
        ("chunk past its size", r"w: its chunks do not fill its size \[3, 2\]"),
        ("list index", r"planner_data describes lists with more than 1048576 items"),
        ("list indices", r"planner_data describes lists with more than 1048576 items"),
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


def test_a_list_index_at_the_bound_is_read(tmp_path: Path) -> None:
    """A list whose leading items no key names, as many as the bound allows: what a save of
    that many empty dicts before a value writes, so it is read (export would rebuild it)."""
    step_dir = _save_plain(tmp_path / "ckpt", {"w": torch.randn(3, 2), "n": 5})
    metadata = _metadata(step_dir)
    metadata.planner_data["n"] = ("n", MAX_UNNAMED_LIST_ITEMS)
    _replace_file(step_dir, ".metadata", pickle.dumps(metadata))
    read = read_metadata(step_dir, read_manifest(step_dir))
    assert read.planner_data["n"] == ("n", MAX_UNNAMED_LIST_ITEMS)


# ".metadata" is a file of the manifest, but no data file: it must not be read as one either.
@pytest.mark.parametrize("named", ["../../etc/passwd", ".metadata"])
def test_metadata_pointing_outside_the_data_files_is_refused(tmp_path: Path, named: str) -> None:
    step_dir = _save_plain(tmp_path / "ckpt", {"w": torch.randn(3, 2), "n": 5})
    metadata = _metadata(step_dir)
    for info in metadata.storage_data.values():
        info.relative_path = named
    _replace_file(step_dir, ".metadata", pickle.dumps(metadata))
    with pytest.raises(CorruptCheckpoint, match=r"not a \.distcp file of the manifest"):
        distckpt.load_checkpoint(step_dir, state=_template())


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
    edit_manifest(step_dir, lambda data: data["files"].pop("__1_0.distcp"))
    (step_dir / "__1_0.distcp").unlink()
    report = distckpt.verify(step_dir)
    assert not report.ok
    assert "__1_0.distcp: required by the 'dcp' format but not in the manifest" in str(report)


@pytest.mark.parametrize("name", [".metadata.tmp", ".METADATA", "__0_0.distcp", "__7_0.DISTCP"])
def test_an_extra_file_named_as_dcp_writes_its_own_is_refused(tmp_path: Path, name: str) -> None:
    with distckpt.CheckpointManager(tmp_path / "ckpt", format="dcp", fsync=False) as mgr:
        with pytest.raises(InvalidArgument, match="names the checkpoint's own file"):
            mgr.save(1, {"w": torch.ones(2)}, files={name: b"x"})
        assert mgr.steps() == []


# ------------------------------------------------------------------ pickles that run code


# Sets an attribute on DCP's Metadata class itself (pickle's BUILD with slot state): allowed
# globals only, yet it would patch the class for the whole process.
_PATCHES_A_CLASS = (
    b"\x80\x02ctorch.distributed.checkpoint.metadata\nMetadata\n"
    b"N}X\x08\x00\x00\x00patchme_K\x01s\x86b."
)


@pytest.mark.parametrize("payload", ["top-level", "nested", "patches-a-class"])
def test_malicious_metadata_is_refused_without_running_code(tmp_path: Path, payload: str) -> None:
    step_dir = _save_plain(tmp_path / "ckpt", {"w": torch.randn(3, 2), "n": 5})
    marker = tmp_path / "marker"
    if payload == "top-level":
        content = pickle.dumps(_RunsCode(marker))
    elif payload == "nested":  # hidden inside otherwise genuine metadata
        metadata = _metadata(step_dir)
        metadata.planner_data["n"] = _RunsCode(marker)
        content = pickle.dumps(metadata)
    else:
        content = _PATCHES_A_CLASS
    _replace_file(step_dir, ".metadata", content)

    with pytest.raises(UnsafeCheckpoint, match=r"\.metadata.*allow_pickle=True"):
        distckpt.load_checkpoint(step_dir, state=_template())
    from distckpt import export

    with pytest.raises(UnsafeCheckpoint):
        export(step_dir, tmp_path / "out.pt")
    assert not marker.exists()
    assert not (tmp_path / "out.pt").exists()
    from torch.distributed.checkpoint.metadata import Metadata

    assert not hasattr(Metadata, "patchme_")


def _save_replicated(rank: int, world_size: int, root: str) -> None:
    with distckpt.CheckpointManager(root, format="dcp", fsync=False, timeout=20) as mgr:
        mgr.save(1, {"w": torch.arange(6.0).reshape(3, 2), "n": 5})


def _restore_replicated(rank: int, world_size: int, root: str) -> tuple[str, str]:
    with distckpt.CheckpointManager(root, format="dcp", timeout=20) as mgr:
        try:
            mgr.restore("last", state=_template())
        except distckpt.CheckpointError as exc:
            return type(exc).__name__, str(exc)
    return "", "no error"


def test_malicious_metadata_is_refused_on_every_rank(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    values(run_ranks(_save_replicated, 2, str(root), timeout=TIMEOUT))
    marker = tmp_path / "marker"
    _replace_file(root / "step-00000001", ".metadata", pickle.dumps(_RunsCode(marker)))
    out = values(run_ranks(_restore_replicated, 2, str(root), timeout=TIMEOUT))
    assert [error_type for error_type, _ in out] == ["UnsafeCheckpoint"] * 2, out
    assert not marker.exists()


def test_malicious_value_is_refused_unless_pickle_is_allowed(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    step_dir = _save_plain(tmp_path / "ckpt", {"w": torch.randn(3, 2), "evil": _RunsCode(marker)})
    template = {"w": torch.zeros(3, 2), "evil": None}
    with pytest.raises(UnsafeCheckpoint, match=r"'evil'.*allow_pickle=True"):
        distckpt.load_checkpoint(step_dir, state=template)
    assert not marker.exists()
    # The opt-out loads it the way DCP itself would, running the code: trusted input only.
    ckpt = distckpt.load_checkpoint(step_dir, state=template, allow_pickle=True)
    assert marker.exists()
    assert ckpt.state["evil"] == 0  # os.system's exit status
