"""export() checks the checksum of every file it exports before it writes anything: a damaged
byte inside tensor data, which torch loads without complaint, never leaves the library in a
file that no longer carries a checksum to catch it."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt.objstore import ObjectStore
from distckpt.objurl import S3Url
from tests import hostile_cases
from tests.cli_runner import run_cli
from tests.s3server import S3Server

STEP = "step-00000001"
#: elements of the saved tensor: its bytes are found in the data file by their values
WIDTH = 256
#: the file of each format that holds the tensor's bytes
DATA_FILE = {"torch": "rank-00000.pt", "dcp": "__0_0.distcp"}
OLD_OUTPUT = b"the output of an earlier export"


def _saved(root: str, fmt: str, options: Mapping[str, Any] | None = None) -> str:
    """A checkpoint of one tensor of ``WIDTH`` elements, all 1.5; its step's location."""
    with distckpt.CheckpointManager(root, format=fmt, fsync=False, storage_options=options) as m:
        m.save(1, {"w": torch.full((WIDTH,), 1.5), "n": 3})
    return f"{root}/{STEP}"


def _flipped(data: bytes) -> bytes:
    """``data`` with one byte inside the tensor's data changed: the size stays, and the state
    still loads, with one element of another value."""
    return hostile_cases.flip_tensor_byte(data, torch.full((WIDTH,), 1.5))


def _flip_local(step_dir: str, fmt: str) -> str:
    """Damage the local checkpoint at ``step_dir``; the path of the damaged file."""
    path = Path(step_dir, DATA_FILE[fmt])
    path.write_bytes(_flipped(path.read_bytes()))
    return str(path)


def _flip_object(root: str, fmt: str, options: Mapping[str, Any]) -> str:
    """Damage the one object of the ``s3://`` checkpoint of ``root`` holding the tensor, as a
    bad disk of the store would; the object's URL (under the save's attempt prefix), as
    errors name it."""
    url = S3Url.parse(root)
    with ObjectStore(f"s3://{url.bucket}", options) as store:
        (key,) = [
            info.key
            for info in store.list(f"{url.prefix}/{STEP}/")
            if info.key.endswith(f"/{DATA_FILE[fmt]}")
        ]
        store.put_bytes(key, _flipped(store.get_bytes(key)))
    return f"s3://{url.bucket}/{key}"


@dataclass(frozen=True)
class Saved:
    """A checkpoint of one format saved by :func:`_saved` in a local root or an ``s3://`` one."""

    root: str
    fmt: str
    options: dict[str, Any] | None

    @property
    def step_dir(self) -> str:
        return f"{self.root}/{STEP}"

    def damage(self) -> str:
        """Flip a byte of its tensor data; the damaged file as errors name it."""
        if self.options is not None:
            return _flip_object(self.root, self.fmt, self.options)
        return _flip_local(self.step_dir, self.fmt)


@pytest.fixture(params=itertools.product(["local", "s3"], ["torch", "dcp"]), ids="-".join)
def saved(request: pytest.FixtureRequest, tmp_path: Path) -> Saved:
    """A checkpoint of each format in a local root and in a fresh bucket of the test's moto
    server."""
    where, fmt = request.param
    if where == "local":
        root, options = str(tmp_path / "root"), None
    else:
        server: S3Server = request.getfixturevalue("s3_server")
        root, options = f"s3://{server.create_bucket()}/ckpt", server.storage_options()
    _saved(root, fmt, options)
    return Saved(root, fmt, options)


def test_a_flipped_byte_of_tensor_data_is_refused_and_nothing_is_written(
    saved: Saved, tmp_path: Path
) -> None:
    damaged = saved.damage()
    out = tmp_path / "exports" / "model.pt"
    out.parent.mkdir()
    out.write_bytes(OLD_OUTPUT)

    with pytest.raises(distckpt.CorruptCheckpoint) as raised:
        distckpt.export(saved.step_dir, out, storage_options=saved.options)

    assert f"{damaged}: checksum mismatch" in str(raised.value)
    assert raised.value.damaged
    assert "distckpt-read" not in str(raised.value)  # the download's temporary dir
    assert [path.name for path in out.parent.iterdir()] == ["model.pt"]  # no temporary file
    assert out.read_bytes() == OLD_OUTPUT

    # Unchecked, the damaged value reaches the output: the check is all that stops it.
    distckpt.export(saved.step_dir, out, storage_options=saved.options, verify=False)
    exported = torch.load(out, weights_only=True)
    assert exported["w"].shape == (WIDTH,)
    assert not torch.equal(exported["w"], torch.full((WIDTH,), 1.5))


def test_a_clean_checkpoint_exports_the_same_bytes_checked_or_not(
    saved: Saved, tmp_path: Path
) -> None:
    options = saved.options
    checked = distckpt.export(saved.step_dir, tmp_path / "checked.pt", storage_options=options)
    unchecked = distckpt.export(
        saved.step_dir, tmp_path / "unchecked.pt", storage_options=options, verify=False
    )
    assert Path(checked).read_bytes() == Path(unchecked).read_bytes()
    exported = torch.load(checked, weights_only=True)
    assert torch.equal(exported["w"], torch.full((WIDTH,), 1.5)) and exported["n"] == 3


def test_the_cli_refuses_a_damaged_checkpoint_unless_no_verify(tmp_path: Path) -> None:
    """Exit status 2, as for any checkpoint export refuses as damaged (a wrong size too), the
    error naming the file; ``--no-verify`` writes it."""
    step_dir = _saved(str(tmp_path / "root"), "torch")
    damaged = _flip_local(step_dir, "torch")
    out = tmp_path / "model.pt"
    out.write_bytes(OLD_OUTPUT)

    refused = run_cli("export", step_dir, str(out))

    assert refused.returncode == 2, refused
    assert f"{damaged}: checksum mismatch" in refused.stderr
    assert out.read_bytes() == OLD_OUTPUT
    assert run_cli("verify", step_dir).returncode == 1  # verify reports it, as a problem
    written = run_cli("export", step_dir, str(out), "--no-verify")
    assert written.returncode == 0, written
    assert torch.load(out, weights_only=True).keys() == {"w", "n"}
    with open(damaged, "r+b") as file:  # a file of another size: refused unchecked too
        file.truncate(100)
    refused = run_cli("export", step_dir, str(tmp_path / "again.pt"), "--no-verify")
    assert refused.returncode == 2 and f"{damaged}: 100 bytes" in refused.stderr, refused
    assert not (tmp_path / "again.pt").exists()


def _two_ranks(tmp_path: Path) -> str:
    """A "torch" checkpoint of two ranks made in this process: a second root's rank file (its
    ``n`` is 4) added as rank 1, listed in the manifest as a two-rank save lists it. Made by
    hand for speed: a real two-rank save starts two processes and a process group, which
    costs seconds, where these tests only need a second rank's file listed in the manifest
    with its size and checksum, as an export reads it."""
    step_dir = _saved(str(tmp_path / "root"), "torch")
    with distckpt.CheckpointManager(tmp_path / "other", fsync=False) as mgr:
        mgr.save(1, {"w": torch.full((WIDTH,), 1.5), "n": 4})
    rank1 = Path(step_dir, "rank-00001.pt")
    rank1.write_bytes((tmp_path / "other" / STEP / DATA_FILE["torch"]).read_bytes())
    record = {**hostile_cases.file_record(rank1), "rank": 1}
    hostile_cases.edit_manifest(
        Path(step_dir),
        lambda data: data.update(world_size=2, files={**data["files"], rank1.name: record}),
    )
    return step_dir


def test_a_rank_export_checks_that_ranks_file_alone(tmp_path: Path) -> None:
    """The other ranks' bytes are not in the output: a damaged rank 0 refuses the exports
    that hold it (rank 0, every rank) and not the export of rank 1."""
    step_dir = _two_ranks(tmp_path)
    assert distckpt.load_checkpoint(step_dir, rank=1, verify=True).state["n"] == 4
    damaged = _flip_local(step_dir, "torch")
    out = tmp_path / "model.pt"

    assert torch.load(distckpt.export(step_dir, out, rank=1), weights_only=True)["n"] == 4
    out.unlink()
    for all_ranks in (False, True):
        with pytest.raises(distckpt.CorruptCheckpoint, match=f"{damaged}: checksum mismatch"):
            distckpt.export(step_dir, out, all_ranks=all_ranks)
        assert not out.exists()


def test_a_roots_damaged_newest_checkpoint_is_refused_not_passed_over(tmp_path: Path) -> None:
    """The export writes what was named, the root's newest checkpoint: not, silently, the
    older one a ``"last"`` restore with ``verify=True`` would fall back to."""
    root = tmp_path / "root"
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        for step in (1, 2):
            mgr.save(step, {"w": torch.full((WIDTH,), 1.5), "n": step})
    damaged = _flip_local(str(root / "step-00000002"), "torch")
    with pytest.raises(distckpt.CorruptCheckpoint, match=f"{damaged}: checksum mismatch"):
        distckpt.export(root, tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()


@pytest.mark.parametrize(
    ("fmt", "refused"),
    [("dcp", {"rank": 0}), ("torch", {"rank": 0, "all_ranks": True})],
    ids=["dcp", "torch"],
)
def test_arguments_export_refuses_are_refused_as_such_on_a_damaged_checkpoint(
    fmt: str, refused: dict[str, Any], tmp_path: Path
) -> None:
    """``InvalidArgument``, saying what is wrong with them, not the damage a check of files
    these arguments would never export finds."""
    step_dir = _saved(str(tmp_path / "root"), fmt)
    _flip_local(step_dir, fmt)

    with pytest.raises(distckpt.InvalidArgument) as raised:
        distckpt.export(step_dir, tmp_path / "model.pt", **refused)

    assert not isinstance(raised.value, distckpt.CorruptCheckpoint)
    assert "rank=" in str(raised.value)
