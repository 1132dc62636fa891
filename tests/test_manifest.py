"""manifest.json: its schema round trip, strict JSON, refused names and versions, and the
checks a checkpoint dir must pass against it."""

from __future__ import annotations

import json
import math
import os
import re
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt.checksums import file_checksum
from distckpt.errors import (
    CorruptCheckpoint,
    InvalidArgument,
    ManifestChecksumMismatch,
    UnsupportedVersion,
)
from distckpt.layout import MANIFEST_NAME
from distckpt.manifest import (
    FORMAT_VERSION,
    MANIFEST_CHECKSUM_KEY,
    FileRecord,
    Manifest,
    check_json_metadata,
    content_checksum,
    find_problems,
    read_manifest,
)
from tests.hostile_cases import reseal_manifest
from tests.older_version import run_older_version


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


# ------------------------------------------------------------- the manifest's own checksum

REPO = Path(__file__).resolve().parent.parent


def _unusual_manifest() -> Manifest:
    """A manifest whose numbers and strings JSON may spell more than one way: non-finite and
    long metrics, a subnormal float, an int past 64 bits, text outside ASCII."""
    return _manifest(
        metrics={"loss": 0.35, "nan": math.nan, "up": math.inf, "down": -math.inf, "third": 1 / 3},
        metadata={"note": "héllo ✓ \U0001f600 \u2028", "tiny": 5e-324, "big": 2**70, "e": 1e22},
    )


def _without_key(data: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in data.items() if key != MANIFEST_CHECKSUM_KEY}


def test_a_manifest_records_the_crc32_of_its_content_as_compact_sorted_json() -> None:
    # The recipe docs/verification.md gives, redone here with zlib: any reader can check it.
    data = _strict(_unusual_manifest().to_json())
    content = json.dumps(_without_key(data), sort_keys=True, separators=(",", ":")).encode()
    assert data[MANIFEST_CHECKSUM_KEY] == f"{zlib.crc32(content):08x}"


def test_a_flipped_bit_in_the_epoch_and_a_metric_is_a_checksum_mismatch() -> None:
    # The reported damage: one bit makes "epoch": 3 read 7, another makes the loss 0.35 read
    # 0.15. Both still parse and follow the schema; only the manifest's checksum sees them.
    raw = bytearray(_manifest(metrics={"loss": 0.35}).to_json())
    raw[raw.index(b'"epoch": 3') + len(b'"epoch": ')] ^= 0x04
    raw[raw.index(b"0.35") + 2] ^= 0x02
    source = "step-00000007/manifest.json"
    with pytest.raises(ManifestChecksumMismatch, match="mismatch of the manifest") as raised:
        Manifest.from_json(bytes(raw), source=source)
    error = raised.value
    assert isinstance(error, CorruptCheckpoint) and error.damaged
    assert error.path == source
    assert error.recorded == json.loads(raw)[MANIFEST_CHECKSUM_KEY] != error.computed
    assert error.computed == content_checksum(json.loads(raw))


def test_any_one_bit_flipped_in_a_manifest_is_damage_or_changes_nothing() -> None:
    # Every bit of a manifest, flipped alone: either the manifest is judged damaged, or what
    # it says is unchanged (a flip in the checksum key's name leaves the content as it was;
    # one in a hex escape's case leaves the same text).
    raw = _unusual_manifest().to_json()
    mismatches = 0
    for bit in range(len(raw) * 8):
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        try:
            read = Manifest.from_json(bytes(flipped), source="m")
        except CorruptCheckpoint as exc:
            assert exc.damaged, (bit, str(exc))
            mismatches += isinstance(exc, ManifestChecksumMismatch)
        else:
            assert read.to_json() == raw, bit
    # Flips inside strings and numbers leave valid JSON (over a third of them, here): only the
    # checksum finds those.
    assert mismatches > len(raw) * 8 // 3


def test_a_manifest_spelled_otherwise_with_the_same_content_still_checks() -> None:
    # The checksum is of the parsed content: another indent, key order, escaping or number
    # spelling (as another JSON writer, or a person's editor, may give) changes nothing.
    manifest = _unusual_manifest()
    raw = manifest.to_json()
    data = json.loads(raw)
    respellings = [
        json.dumps(data).encode(),
        json.dumps(dict(reversed(list(data.items()))), indent=4, ensure_ascii=False).encode(),
        raw.replace(b"0.35", b"3.5e-1").replace(b"1e+22", b"10000000000000000000000.0"),
    ]
    for respelled in respellings:
        assert respelled != raw
        assert Manifest.from_json(respelled, source="m").to_json() == raw


@pytest.mark.parametrize("value", [5, None, ["0000abcd"]])
def test_a_manifest_checksum_that_is_no_string_is_damage(value: object) -> None:
    data = json.loads(_manifest().to_json())
    data[MANIFEST_CHECKSUM_KEY] = value
    with pytest.raises(CorruptCheckpoint, match=MANIFEST_CHECKSUM_KEY) as raised:
        Manifest.from_json(json.dumps(data).encode(), source="m")
    assert raised.value.damaged


def test_a_manifest_without_its_own_checksum_is_read_unchecked_as_before() -> None:
    # What every earlier version wrote: read as it says, whatever it says.
    data = json.loads(_manifest().to_json())
    del data[MANIFEST_CHECKSUM_KEY]
    data["epoch"] = 7
    assert Manifest.from_json(json.dumps(data).encode(), source="m") == _manifest(epoch=7)


def _documented_check() -> str:
    """The code docs/verification.md gives to check a manifest's own checksum by hand."""
    doc = (REPO / "docs" / "verification.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.DOTALL)
    (block,) = [block for block in blocks if MANIFEST_CHECKSUM_KEY in block]
    return block


def test_the_documented_check_passes_an_intact_manifest_and_fails_a_flipped_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with distckpt.CheckpointManager(tmp_path, fsync=False) as mgr:
        mgr.save(1000, {"w": torch.zeros(2)}, epoch=3, metrics={"loss": math.nan})
    monkeypatch.chdir(tmp_path)
    exec(_documented_check(), {})
    path = tmp_path / "step-00001000" / MANIFEST_NAME
    raw = bytearray(path.read_bytes())
    raw[raw.index(b'"epoch": 3') + len(b'"epoch": ')] ^= 0x04
    path.write_bytes(bytes(raw))
    with pytest.raises(AssertionError):
        exec(_documented_check(), {})


# ------------------------------------------------------------- next to an older version

_OLDER_VERSION_RESUMES = """
import json, torch
root, = json.loads(sys.argv[1])
assert distckpt.verify(root).ok, str(distckpt.verify(root))
with distckpt.CheckpointManager(root, fsync=False) as mgr:
    restored = mgr.restore("last", state={"w": torch.zeros(2)}, verify=True)
    print(json.dumps([restored.step, restored.epoch, restored.metrics["loss"]]))
    mgr.save(restored.step + 1, {"w": torch.full((2,), 9.0)}, epoch=4, metrics={"loss": 0.1})
"""


def test_an_older_version_reads_a_manifest_recording_its_checksum_and_this_one_reads_its(
    tmp_path: Path, older_distckpt: Path
) -> None:
    # Downgrading must work: distckpt 0.2.0 ignores the key it does not know (and the format
    # version is the one it reads). Its manifest, without the key, reads here as before.
    with distckpt.CheckpointManager(tmp_path, fsync=False) as mgr:
        mgr.save(1, {"w": torch.ones(2)}, epoch=3, metrics={"loss": 0.35})
    assert MANIFEST_CHECKSUM_KEY in _strict(
        (tmp_path / "step-00000001" / MANIFEST_NAME).read_bytes()
    )

    output = run_older_version(older_distckpt, _OLDER_VERSION_RESUMES, os.fspath(tmp_path))
    assert json.loads(output) == [1, 3, 0.35]

    older_written = _strict((tmp_path / "step-00000002" / MANIFEST_NAME).read_bytes())
    assert MANIFEST_CHECKSUM_KEY not in older_written
    assert distckpt.verify(tmp_path).ok
    with distckpt.CheckpointManager(tmp_path, fsync=False) as mgr:
        restored = mgr.restore("last", state={"w": torch.zeros(2)}, verify=True)
        assert restored is not None and (restored.step, restored.epoch) == (2, 4)
        assert torch.equal(restored.state["w"], torch.full((2,), 9.0))
