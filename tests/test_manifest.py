"""manifest.json: its schema round trip, strict JSON, refused names and versions, and the
checks a checkpoint dir must pass against it."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt.checksums import file_checksum
from distckpt.errors import (
    CorruptCheckpoint,
    InvalidArgument,
    UnsupportedVersion,
)
from distckpt.layout import MANIFEST_NAME
from distckpt.manifest import (
    FORMAT_VERSION,
    FileRecord,
    Manifest,
    check_json_metadata,
    find_problems,
    read_manifest,
)
from tests.hostile_cases import reseal_manifest


def _manifest(**changes: Any) -> Manifest:
    fields: dict[str, Any] = {
        "step": 7,
        "world_size": 2,
        "format": "torch",
        "files": {
            "rank-00000.pt": FileRecord(size=10, checksum="0000abcd", rank=0),
            "rank-00001.pt": FileRecord(size=12, checksum="1234abcd", rank=1),
        },
        "epoch": 3,
        "metrics": {"loss": 0.5},
        "metadata": {"run": "exp", "lrs": [0.1, 0.01], "nested": {"flag": True, "none": None}},
        "torch_version": "2.13.0",
        "created_utc": "2026-01-01T00:00:00+00:00",
    }
    fields.update(changes)
    return Manifest(**fields)


def _reject_constant(name: str) -> float:
    raise ValueError(f"not strict JSON: {name}")


def _strict(raw: bytes) -> Any:
    return json.loads(raw, parse_constant=_reject_constant)


def _raw(**changes: Any) -> bytes:
    """A valid manifest's JSON with some top-level fields replaced (None removes one), as a
    writer of that content would write it (its own checksum recorded again)."""
    data = json.loads(_manifest().to_json())
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    return json.dumps(reseal_manifest(data)).encode()


def test_round_trip() -> None:
    manifest = _manifest()
    raw = manifest.to_json()
    assert Manifest.from_json(raw, source="m") == manifest
    data = _strict(raw)
    assert data["format_version"] == FORMAT_VERSION
    assert data["files"]["rank-00001.pt"] == {"size": 12, "checksum": "1234abcd", "rank": 1}
    assert manifest.total_bytes == 22


def test_a_manifest_without_created_utc_reads_as_unknown() -> None:
    # Not the time it was read: a time history built from it must not move between reads.
    manifest = Manifest.from_json(_raw(created_utc=None), source="m")
    assert manifest.created_utc is None
    assert Manifest.from_json(manifest.to_json(), source="m").created_utc is None


@pytest.mark.parametrize(
    ("value", "stored"), [(math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf")]
)
def test_non_finite_metrics_are_stored_as_strict_json(value: float, stored: str) -> None:
    manifest = _manifest(metrics={"m": value, "loss": 1.5})
    raw = manifest.to_json()
    data = _strict(raw)  # raises on NaN / Infinity tokens
    assert data["metrics"] == {"m": stored, "loss": 1.5}
    back = Manifest.from_json(raw, source="m").metrics["m"]
    if math.isnan(value):
        assert math.isnan(back)
    else:
        assert back == value


def test_unknown_metric_strings_are_refused() -> None:
    with pytest.raises(CorruptCheckpoint):
        Manifest.from_json(_raw(metrics={"loss": "lots"}), source="m")


@pytest.mark.parametrize(
    "name",
    ["../rank-00000.pt", "a/../../b", "/etc/passwd", "..", "", "dir\\file", "sub/../../x"],
)
def test_file_names_that_leave_the_dir_are_refused(name: str) -> None:
    files = {name: {"size": 1, "checksum": "00000000", "rank": 0}}
    with pytest.raises(CorruptCheckpoint, match="outside"):
        Manifest.from_json(_raw(files=files), source="m")


def test_a_newer_format_version_is_unsupported() -> None:
    with pytest.raises(UnsupportedVersion, match=str(FORMAT_VERSION + 1)):
        Manifest.from_json(_raw(format_version=FORMAT_VERSION + 1), source="m")
    assert not issubclass(UnsupportedVersion, CorruptCheckpoint)


_UNREADABLE = {
    "empty": b"",
    "not json": b"{not json",
    "not utf-8": b"\xff\xfe garbage",
    "a list": b"[1, 2]",
    "a string": b'"a string"',
    "version as str": _raw(format_version="1"),
    "no version": _raw(format_version=None),
    "no files": _raw(files=None),
    "step as str": _raw(step="7"),
    "file record incomplete": _raw(files={"rank-00000.pt": {"size": 1}}),
    "no ranks": _raw(world_size=0),
    "negative world size": _raw(world_size=-2),
    "epoch as str": _raw(epoch="abc"),
    "epoch negative": _raw(epoch=-1),
    "epoch as bool": _raw(epoch=True),
    "metadata as list": _raw(metadata=[1]),
    "checksum algorithm as int": _raw(checksum_algorithm=32),
    "library version as int": _raw(library_version=1),
    "torch version as list": _raw(torch_version=[2, 13]),
    "python version as int": _raw(python_version=3),
    "created_utc as number": _raw(created_utc=5),
}


@pytest.mark.parametrize("label", list(_UNREADABLE))
def test_unreadable_manifests_are_damaged(label: str) -> None:
    # Each lacks a key every version writes, or holds one of a type none writes: sure damage.
    with pytest.raises(CorruptCheckpoint) as raised:
        Manifest.from_json(_UNREADABLE[label], source="m")
    assert raised.value.damaged


def test_optional_keys_may_be_missing_or_null_where_a_version_writes_them_so() -> None:
    # A manifest made by hand or by another tool may lack them; a save with no epoch writes
    # null, as does a Manifest whose created_utc is unknown.
    optional = ("epoch", "metadata", "library_version", "torch_version", "python_version")
    stripped = json.loads(_raw(created_utc=None))
    for key in optional:
        stripped.pop(key)
    read = Manifest.from_json(json.dumps(reseal_manifest(stripped)).encode(), source="m")
    assert (read.epoch, read.metadata, read.created_utc) == (None, {}, None)
    unknown_epoch_and_time = _manifest(epoch=None, created_utc=None)
    assert Manifest.from_json(unknown_epoch_and_time.to_json(), source="m") == (
        unknown_epoch_and_time
    )


def test_unknown_keys_are_ignored_at_the_top_level_and_in_file_records() -> None:
    # A newer writer adds keys without raising FORMAT_VERSION: they must never read as damage.
    data = json.loads(_manifest().to_json())
    data["compression"] = None
    for record in data["files"].values():
        record["mtime_ns"] = 123
    assert Manifest.from_json(json.dumps(reseal_manifest(data)).encode(), source="m") == _manifest()


_WRONG_FILE_RECORDS = {
    "not an object": ["size", 1],
    "size missing": {"checksum": "00000000", "rank": 0},
    "size as str": {"size": "1", "checksum": "00000000", "rank": 0},
    "size as bool": {"size": True, "checksum": "00000000", "rank": 0},
    "size negative": {"size": -1, "checksum": "00000000", "rank": 0},
    "checksum missing": {"size": 1, "rank": 0},
    "checksum as int": {"size": 1, "checksum": 0, "rank": 0},
    "rank as str": {"size": 1, "checksum": "00000000", "rank": "0"},
}


@pytest.mark.parametrize("label", list(_WRONG_FILE_RECORDS))
def test_a_file_record_missing_a_key_or_of_a_wrong_type_is_damaged(label: str) -> None:
    files = {"rank-00000.pt": _WRONG_FILE_RECORDS[label]}
    with pytest.raises(CorruptCheckpoint, match=r"rank-00000\.pt") as raised:
        Manifest.from_json(_raw(files=files), source="m")
    assert raised.value.damaged


@pytest.mark.parametrize(
    "raw",
    [
        _raw(metrics={"loss": "lots"}),
        _raw(files={"dir\\file": {"size": 1, "checksum": "00000000", "rank": 0}}),
    ],
    ids=["metric spelled unknown", "backslash in a name"],
)
def test_what_a_newer_writer_could_write_is_refused_but_not_damaged(raw: bytes) -> None:
    with pytest.raises(CorruptCheckpoint) as raised:
        Manifest.from_json(raw, source="m")
    assert not raised.value.damaged


def test_a_manifest_too_large_to_read_is_not_judged_damaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The limit is this version's: a newer one listing more files may pass it. Lowered so that
    # a small manifest is over it (a real one of 64 MiB would take seconds to write and read).
    monkeypatch.setattr("distckpt.manifest.MAX_MANIFEST_BYTES", 16)
    (tmp_path / MANIFEST_NAME).write_bytes(_manifest().to_json())
    with pytest.raises(CorruptCheckpoint, match="does not read it") as raised:
        read_manifest(tmp_path)
    assert not raised.value.damaged


def test_read_manifest_of_a_dir_without_one(tmp_path: Path) -> None:
    with pytest.raises(CorruptCheckpoint, match=r"manifest\.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_bytes(_manifest().to_json())
    assert read_manifest(tmp_path) == _manifest()


@pytest.mark.parametrize("epoch", [-1, "3", 1.5, True])
def test_a_save_refuses_an_epoch_its_manifest_could_not_hold(tmp_path: Path, epoch: Any) -> None:
    # A manifest holding such an epoch reads as damaged, so the save must not write one.
    with distckpt.CheckpointManager(tmp_path, fsync=False) as mgr:
        with pytest.raises(InvalidArgument, match="epoch"):
            mgr.save(1, {"w": torch.zeros(2)}, epoch=epoch)
        assert mgr.steps() == []
        mgr.save(1, {"w": torch.zeros(2)}, epoch=0)
        assert mgr.checkpoints()[0].epoch == 0


def test_metadata_must_be_plain_json() -> None:
    assert check_json_metadata(None) == {}
    assert check_json_metadata({"a": [1, "x", None]}) == {"a": [1, "x", None]}
    for bad in ({"x": math.nan}, {"x": object()}, {"x": {1, 2}}, ["not", "a", "dict"]):
        with pytest.raises(InvalidArgument):
            check_json_metadata(bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- find_problems


@pytest.fixture
def checkpoint(tmp_path: Path) -> tuple[Path, Manifest]:
    """A step dir with two files and the manifest that describes them."""
    directory = tmp_path / "step-00000007"
    directory.mkdir()
    files = {}
    for rank, content in enumerate((b"rank zero data", b"rank one, longer data")):
        name = f"rank-{rank:05d}.pt"
        (directory / name).write_bytes(content)
        files[name] = FileRecord(len(content), file_checksum(directory / name), rank)
    manifest = _manifest(files=files)
    (directory / "manifest.json").write_bytes(manifest.to_json())
    return directory, manifest


def test_an_intact_dir_has_no_problems(checkpoint: tuple[Path, Manifest]) -> None:
    directory, manifest = checkpoint
    assert find_problems(directory, manifest, expected_step=7, checksums=True) == []


def test_truncated_file(checkpoint: tuple[Path, Manifest]) -> None:
    directory, manifest = checkpoint
    with open(directory / "rank-00001.pt", "r+b") as file:
        file.truncate(5)
    (problem,) = find_problems(directory, manifest)
    assert "rank-00001.pt" in problem
    assert "5 bytes" in problem


def test_missing_file(checkpoint: tuple[Path, Manifest]) -> None:
    directory, manifest = checkpoint
    (directory / "rank-00000.pt").unlink()
    (problem,) = find_problems(directory, manifest)
    assert "rank-00000.pt" in problem
    assert "missing" in problem


def test_symlinked_file(checkpoint: tuple[Path, Manifest], tmp_path: Path) -> None:
    directory, manifest = checkpoint
    # Same size and bytes elsewhere: only the symlink itself is wrong.
    outside = tmp_path / "outside.pt"
    os.rename(directory / "rank-00000.pt", outside)
    os.symlink(outside, directory / "rank-00000.pt")
    (problem,) = find_problems(directory, manifest, checksums=True)
    assert "rank-00000.pt" in problem
    assert "symlink" in problem


def test_wrong_step(checkpoint: tuple[Path, Manifest]) -> None:
    directory, manifest = checkpoint
    (problem,) = find_problems(directory, manifest, expected_step=8)
    assert problem == f"{directory / MANIFEST_NAME}: names step 7, but the dir is for step 8"
    assert find_problems(directory, manifest) == []  # no expectation, no step check


def test_changed_bytes_are_found_only_with_checksums(checkpoint: tuple[Path, Manifest]) -> None:
    directory, manifest = checkpoint
    path = directory / "rank-00000.pt"
    path.write_bytes(path.read_bytes().upper())  # same size
    assert find_problems(directory, manifest) == []
    (problem,) = find_problems(directory, manifest, checksums=True)
    assert "rank-00000.pt" in problem
    assert "checksum" in problem


def test_every_problem_is_reported(checkpoint: tuple[Path, Manifest]) -> None:
    directory, manifest = checkpoint
    (directory / "rank-00000.pt").unlink()
    (directory / "rank-00001.pt").write_bytes(b"short")
    problems = find_problems(directory, manifest, expected_step=9)
    assert len(problems) == 3
