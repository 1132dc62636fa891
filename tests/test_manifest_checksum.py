"""A manifest's checksum of its own content (``manifest_crc32``): the recipe, what it finds
(flipped bits) and what it lets pass (the same content spelled otherwise), how the command
line shows and checks it, and an older version next to manifests that record it."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt.errors import CorruptCheckpoint, ManifestChecksumMismatch
from distckpt.layout import MANIFEST_NAME
from distckpt.manifest import MANIFEST_CHECKSUM_KEY, Manifest, content_checksum
from tests.filesystems import skip_or_fail
from tests.hostile_cases import reseal_manifest
from tests.older_version import run_older_version
from tests.test_cli import run
from tests.test_manifest import _manifest, _strict

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
    # The float 1e22 of the metadata is integral: in the canonical form, the int it equals.
    data = _strict(_unusual_manifest().to_json())
    assert data["metadata"]["e"] == 1e22 and isinstance(data["metadata"]["e"], float)
    content = _without_key(data) | {"metadata": data["metadata"] | {"e": 10**22}}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    assert data[MANIFEST_CHECKSUM_KEY] == f"{zlib.crc32(canonical):08x}"


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
        # As jq and JavaScript write integral floats back: without the fraction.
        raw.replace(b"1e+22", b"10000000000000000000000"),
    ]
    for respelled in respellings:
        assert respelled != raw
        assert Manifest.from_json(respelled, source="m") == manifest


#: Each tool rewriting a manifest from standard input, as a person tidying one by hand may.
_REWRITERS = {
    "jq": ["jq", "-S", "."],
    "node": [
        "node",
        "-e",
        "let s='';process.stdin.on('data',d=>s+=d)"
        ".on('end',()=>process.stdout.write(JSON.stringify(JSON.parse(s),null,2)))",
    ],
}


def _rewritten(tool: str, raw: bytes) -> bytes:
    command = _REWRITERS[tool]
    if shutil.which(command[0]) is None:
        skip_or_fail(f"{command[0]} is not installed")
    return subprocess.run(command, input=raw, capture_output=True, check=True, timeout=60).stdout


@pytest.mark.parametrize("tool", sorted(_REWRITERS))
def test_a_manifest_jq_or_javascript_rewrote_keeping_every_value_still_checks(tool: str) -> None:
    # Both write 1.0 as 1 (which Python then reads as an int), 1e20 as 1e+20 or
    # 100000000000000000000, 1e-7 as 1e-07: the same values, so no damage.
    manifest = _manifest(
        metrics={"acc": 1.0, "loss": 0.25, "big": 1e20, "huge": 1e21, "tiny": 1e-7, "neg": -3.0},
        metadata={"lr": 1.0, "scale": 1e20, "steps": [1.0, 2.5, -0.5], "nested": {"w": 2.0}},
    )
    raw = manifest.to_json()
    rewritten = _rewritten(tool, raw)
    assert b'"acc": 1,' in rewritten and b'"acc": 1.0' in raw
    assert json.loads(rewritten) == json.loads(raw)
    assert Manifest.from_json(rewritten, source=tool) == manifest


@pytest.mark.parametrize(
    ("tool", "metadata"),
    [
        # Rounded to the nearest double by both: another value.
        ("jq", {"big": 2**60 + 1}),
        ("node", {"big": 2**60 + 1}),
        # jq writes -0, JavaScript 0: Python reads either as the int 0, without the sign.
        ("jq", {"zero": -0.0}),
        ("node", {"zero": -0.0}),
    ],
)
def test_a_value_jq_or_javascript_does_not_keep_is_a_checksum_mismatch(
    tool: str, metadata: dict[str, Any]
) -> None:
    raw = _manifest(metadata=metadata).to_json()
    rewritten = _rewritten(tool, raw)
    assert json.loads(rewritten) != json.loads(raw) or b"-0.0" in raw
    with pytest.raises(ManifestChecksumMismatch):
        Manifest.from_json(rewritten, source=tool)


def test_the_checksum_written_is_the_one_a_reader_computes_for_any_float() -> None:
    # The writer checksums its values as they are, not as parsed back: every double (random
    # bit patterns: subnormal, huge, integral or not, of either sign) must dump as text that
    # parses back to the same value, or the reader would judge the manifest damaged.
    generator = random.Random(20260101)
    doubles = [struct.unpack("<d", generator.randbytes(8))[0] for _ in range(4000)]
    finite = [value for value in doubles if math.isfinite(value)]
    chosen = [0.1 + 0.2, 1 / 3, 5e-324, 1e22, 2.0**53 + 2, -0.0, 0.0, -1e300, 1.0]
    manifest = _manifest(
        metrics={f"m{i}": value for i, value in enumerate(finite[:200] + chosen)}
        | {"nan": math.nan, "inf": math.inf, "-inf": -math.inf},
        metadata={"values": finite + chosen, "nested": {"x": chosen}},
    )
    assert Manifest.from_json(manifest.to_json(), source="m") == manifest


def test_a_commit_serialises_its_manifest_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The committed manifest's size is checked against the bytes written, not against a
    # second serialisation (which costs as much as the first, on a manifest of many files).
    # A spy that counts the calls and returns what to_json returns: how often a commit
    # serialises its manifest shows nowhere else (its bytes are the same either way).
    calls: list[int] = []
    to_json = Manifest.to_json

    def counted(manifest: Manifest) -> bytes:
        calls.append(manifest.step)
        return to_json(manifest)

    monkeypatch.setattr(Manifest, "to_json", counted)
    with distckpt.CheckpointManager(tmp_path, fsync=False) as mgr:
        mgr.save(1, {"w": torch.ones(2)})
    assert calls == [1]


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
        mgr.save(
            1000,
            {"w": torch.zeros(2)},
            epoch=3,
            metrics={"loss": math.nan, "acc": 1.0, "big": 1e20, "neg": -0.0},
            metadata={"scale": [2.0, -4.0, 0.5]},
        )
    monkeypatch.chdir(tmp_path)
    exec(_documented_check(), {})
    path = tmp_path / "step-00001000" / MANIFEST_NAME
    written = path.read_bytes()
    # jq writes 1.0 as 1 and 1e20 as 1e+20, the same values; -0.0 as -0, the int 0 to Python:
    # a sign lost, which the documented check finds as distckpt does.
    rewritten = _rewritten("jq", written)
    path.write_bytes(rewritten)
    with pytest.raises(AssertionError):
        exec(_documented_check(), {})
    with (
        distckpt.CheckpointManager(tmp_path, fsync=False, read_only=True) as reader,
        pytest.raises(ManifestChecksumMismatch),
    ):
        reader.restore(1000)
    assert b'"neg": -0\n' in rewritten
    path.write_bytes(rewritten.replace(b'"neg": -0\n', b'"neg": -0.0\n'))
    exec(_documented_check(), {})
    path.write_bytes(written)
    raw = bytearray(path.read_bytes())
    raw[raw.index(b'"epoch": 3') + len(b'"epoch": ')] ^= 0x04
    path.write_bytes(bytes(raw))
    with pytest.raises(AssertionError):
        exec(_documented_check(), {})


# ------------------------------------------------------------- on the command line


def _three_steps(tmp_path: Path) -> Path:
    """A root with steps 10, 20 and 30, of losses 3.0, 1.0 and 2.0."""
    root = tmp_path / "root"
    with distckpt.CheckpointManager(root, monitor="loss", fsync=False) as mgr:
        for step, loss in ((10, 3.0), (20, 1.0), (30, 2.0)):
            mgr.save(step, {"w": torch.full((4,), float(step))}, metrics={"loss": loss})
    return root


def test_verify_reports_a_flipped_bit_in_a_manifest_even_without_checksums(tmp_path: Path) -> None:
    root = _three_steps(tmp_path)
    # The manifest's own checksum costs no file read: --no-checksums checks it too. The loss
    # of step 20 (1.0, the best) reads 3.0 after one flipped bit.
    manifest = root / "step-00000020" / "manifest.json"
    data = bytearray(manifest.read_bytes())
    data[data.index(b'"loss": 1.0') + len(b'"loss": ')] ^= 0x02
    manifest.write_bytes(bytes(data))
    for flags in ((), ("--no-checksums",)):
        out = run("verify", str(root), *flags)
        assert out.returncode == 1, out
        broken = [line for line in out.stdout.splitlines() if "BROKEN" in line]
        assert broken == ["BROKEN step-00000020"], out.stdout
        assert f"{manifest}: checksum mismatch of the manifest itself" in out.stdout
    report = json.loads(run("verify", str(root), "--json").stdout)
    assert [c["ok"] for c in report["checkpoints"]] == [True, False, True]


def test_verify_without_checksums_checks_the_manifests_own(tmp_path: Path) -> None:
    # As its docstring and docs/verification.md say: checksums=False reads no file but the
    # manifests, whose own checksum it checks. The loss of step 20 (1.0) reads 3.0.
    root = _three_steps(tmp_path)
    manifest = root / "step-00000020" / MANIFEST_NAME
    data = bytearray(manifest.read_bytes())
    data[data.index(b'"loss": 1.0') + len(b'"loss": ')] ^= 0x02
    manifest.write_bytes(bytes(data))
    report = distckpt.verify(root, checksums=False)
    assert not report.ok
    assert "checksum mismatch of the manifest itself" in str(report)


def test_info_json_shows_the_checksum_the_manifest_records_or_none(tmp_path: Path) -> None:
    root = _three_steps(tmp_path)
    path = root / "step-00000020" / MANIFEST_NAME

    def shown() -> object:
        out = run("info", str(path.parent), "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)[MANIFEST_CHECKSUM_KEY]

    assert shown() == _strict(path.read_bytes())[MANIFEST_CHECKSUM_KEY]
    # A newer writer's key, which this version drops: the checksum of the content as this
    # version would write it again is not the one the file records.
    data = json.loads(path.read_bytes())
    data["added_by_a_newer_version"] = 1
    path.write_text(json.dumps(reseal_manifest(data)))
    assert shown() == data[MANIFEST_CHECKSUM_KEY]
    # As an earlier version wrote it: nothing recorded, nothing shown.
    del data[MANIFEST_CHECKSUM_KEY]
    path.write_text(json.dumps(data))
    assert shown() is None


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
