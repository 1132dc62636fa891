"""export() checks the checksum of every file it exports before it writes anything: a damaged
byte inside tensor data, which torch loads without complaint, never leaves the library in a
file that no longer carries a checksum to catch it."""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt.layout import step_dir_name
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


def _saved(root: str, fmt: str, options: Mapping[str, Any] | None = None, step: int = 1) -> str:
    """A checkpoint of one tensor of ``WIDTH`` elements, all 1.5, and ``n`` = ``step`` + 2;
    its step's location."""
    with distckpt.CheckpointManager(root, format=fmt, fsync=False, storage_options=options) as m:
        m.save(step, {"w": torch.full((WIDTH,), 1.5), "n": step + 2})
    return f"{root}/{step_dir_name(step)}"


def _flipped(data: bytes) -> bytes:
    """``data`` with one byte inside the tensor's data changed: the size stays, and the state
    still loads, with one element of another value."""
    return hostile_cases.flip_tensor_byte(data, torch.full((WIDTH,), 1.5))


def _truncated(data: bytes) -> bytes:
    """``data`` cut short: a file of another size than its manifest lists."""
    return data[:100]


def _removed(data: bytes) -> None:
    """No bytes at all: the file is deleted."""
    return None


#: what a damage makes of a file's bytes (None: the file is deleted)
Change = Callable[[bytes], bytes | None]


def _change_local(step_dir: str, name: str, change: Change) -> str:
    """Rewrite the file ``name`` of the local checkpoint at ``step_dir`` through ``change``;
    its path."""
    path = Path(step_dir, name)
    changed = change(path.read_bytes())
    if changed is None:
        path.unlink()
    else:
        path.write_bytes(changed)
    return str(path)


def _change_object(step_dir: str, name: str, change: Change, options: Mapping[str, Any]) -> str:
    """Rewrite the object holding the file ``name`` of the ``s3://`` checkpoint at
    ``step_dir`` through ``change``, as a bad disk of the store would; the object's URL (under
    the save's attempt prefix), as errors name it."""
    url = S3Url.parse(step_dir)
    with ObjectStore(f"s3://{url.bucket}", options) as store:
        (key,) = [
            info.key for info in store.list(f"{url.prefix}/") if info.key.endswith(f"/{name}")
        ]
        changed = change(store.get_bytes(key))
        if changed is None:
            store.delete_one(key)
        else:
            store.put_bytes(key, changed)
    return f"s3://{url.bucket}/{key}"


def _copy_root(source: str, target: str, options: Mapping[str, Any] | None) -> None:
    """A copy of the root ``source`` at ``target``: every file (links kept as links), or on
    s3 every object, copied inside the store, which costs far less than saving again."""
    if options is None:
        shutil.copytree(source, target, symlinks=True)
        return
    source_url, target_url = S3Url.parse(source), S3Url.parse(target)
    with ObjectStore(f"s3://{source_url.bucket}", options) as store:
        for info in list(store.list(f"{source_url.prefix}/")):
            relative = info.key.removeprefix(f"{source_url.prefix}/")
            store.copy(info.key, f"{target_url.prefix}/{relative}", info.size)


FORMATS = ("torch", "dcp")
#: the newest of the two checkpoints each root of :func:`roots` holds
NEWEST = step_dir_name(2)

#: the damages export refuses, and the words of the problem each is reported as
DAMAGES = {
    "checksum": (_flipped, "checksum mismatch"),
    "size": (_truncated, "100 bytes, the manifest says"),
    "missing": (_removed, "missing"),
}


@dataclass(frozen=True)
class Roots:
    """Roots of each format in one store (a local dir or a bucket), built once for the module:
    the tests only read them. Each holds step 1 (its ``n`` is 3) and step 2 (``n`` 4): the
    ``clean`` root undamaged, each of the ``damaged`` ones with step 2's tensor file damaged
    by one of :data:`DAMAGES`."""

    options: dict[str, Any] | None
    #: format -> the root
    clean: dict[str, str]
    #: (format, damage) -> (the root, its damaged file as errors name it)
    damaged: dict[tuple[str, str], tuple[str, str]]


@pytest.fixture(scope="module", params=["local", "s3"])
def roots(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Roots:
    """:class:`Roots` in a local dir and in a bucket of the session's moto server: two saves
    per format, the damaged roots copies of the clean one (a save on s3 costs far more)."""
    if request.param == "local":
        base, options = str(tmp_path_factory.mktemp("roots")), None
    else:
        server: S3Server = request.getfixturevalue("s3_server")
        base, options = f"s3://{server.create_bucket()}", server.storage_options()
    clean: dict[str, str] = {}
    damaged: dict[tuple[str, str], tuple[str, str]] = {}
    for fmt in FORMATS:
        clean[fmt] = f"{base}/{fmt}"
        _saved(clean[fmt], fmt, options)
        _saved(clean[fmt], fmt, options, step=2)
        for damage, (change, _) in DAMAGES.items():
            root = f"{base}/{fmt}-{damage}"
            _copy_root(clean[fmt], root, options)
            newest, name = f"{root}/{NEWEST}", DATA_FILE[fmt]
            if options is None:
                damaged[fmt, damage] = root, _change_local(newest, name, change)
            else:
                damaged[fmt, damage] = root, _change_object(newest, name, change, options)
    return Roots(options, clean, damaged)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_flipped_byte_of_tensor_data_is_refused_and_nothing_is_written(
    roots: Roots, fmt: str, tmp_path: Path
) -> None:
    root, damaged = roots.damaged[fmt, "checksum"]
    step_dir = f"{root}/{NEWEST}"
    out = tmp_path / "exports" / "model.pt"
    out.parent.mkdir()
    out.write_bytes(OLD_OUTPUT)

    with pytest.raises(distckpt.CorruptCheckpoint) as raised:
        distckpt.export(step_dir, out, storage_options=roots.options)

    assert f"{damaged}: checksum mismatch" in str(raised.value)
    assert raised.value.damaged
    assert "distckpt-read" not in str(raised.value)  # the download's temporary dir
    assert [path.name for path in out.parent.iterdir()] == ["model.pt"]  # no temporary file
    assert out.read_bytes() == OLD_OUTPUT

    # Unchecked, the damaged value reaches the output: the check is all that stops it.
    distckpt.export(step_dir, out, storage_options=roots.options, verify=False)
    exported = torch.load(out, weights_only=True)
    assert exported["w"].shape == (WIDTH,)
    assert not torch.equal(exported["w"], torch.full((WIDTH,), 1.5))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_clean_checkpoint_exports_the_same_bytes_checked_or_not(
    roots: Roots, fmt: str, tmp_path: Path
) -> None:
    step_dir, options = f"{roots.clean[fmt]}/{STEP}", roots.options
    checked = distckpt.export(step_dir, tmp_path / "checked.pt", storage_options=options)
    unchecked = distckpt.export(
        step_dir, tmp_path / "unchecked.pt", storage_options=options, verify=False
    )
    assert Path(checked).read_bytes() == Path(unchecked).read_bytes()
    exported = torch.load(checked, weights_only=True)
    assert torch.equal(exported["w"], torch.full((WIDTH,), 1.5)) and exported["n"] == 3


def test_the_cli_refuses_a_damaged_checkpoint_unless_no_verify(tmp_path: Path) -> None:
    """Exit status 2, as for any checkpoint export refuses as damaged (a wrong size too), the
    error naming the file; ``--no-verify`` writes it."""
    step_dir = _saved(str(tmp_path / "root"), "torch")
    damaged = _change_local(step_dir, DATA_FILE["torch"], _flipped)
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


def test_the_cli_refuses_a_roots_failing_newest_checkpoint(tmp_path: Path) -> None:
    """Exit status 2 naming the file, for ROOT and ROOT/last alike, rather than step 1 written
    with status 0."""
    root = tmp_path / "root"
    _saved(str(root), "torch")
    damaged = _change_local(_saved(str(root), "torch", step=2), DATA_FILE["torch"], _truncated)
    out = tmp_path / "model.pt"
    for target in (root, root / "last"):
        refused = run_cli("export", str(target), str(out))
        assert refused.returncode == 2 and f"{damaged}: 100 bytes" in refused.stderr, refused
    assert not out.exists()


@pytest.mark.parametrize("target", ["damaged", "deleted"])
def test_an_export_of_best_refuses_its_failing_target_as_last_does(
    tmp_path: Path, target: str
) -> None:
    """``ROOT/best`` naming a checkpoint cut short: the export, in Python and on the command
    line (exit status 2), raises CorruptCheckpoint naming the file, as ``ROOT/last`` does, not
    CheckpointNotFound; naming a step dir deleted since, CheckpointNotFound saying so. A
    restore of ``ROOT/best`` has nothing to pass over to without a monitor: it finds no best
    checkpoint, saying why, and does not ask for a monitor the saves had."""
    root = tmp_path / "root"
    with distckpt.CheckpointManager(root, monitor="loss", fsync=False) as mgr:
        mgr.save(1, {"w": torch.full((WIDTH,), 1.5)}, metrics={"loss": 1.0})
        mgr.save(2, {"w": torch.full((WIDTH,), 1.5)}, metrics={"loss": 2.0})
    if target == "damaged":
        damaged = _change_local(f"{root}/{STEP}", DATA_FILE["torch"], _truncated)
        error: type[distckpt.CheckpointError] = distckpt.CorruptCheckpoint
        export_says = f"{damaged}: 100 bytes"
        restore_says = f"{root / 'best'} names a damaged checkpoint"
    else:
        shutil.rmtree(root / STEP)
        error = distckpt.CheckpointNotFound
        export_says = restore_says = f"{root / 'best'} is broken: {STEP} does not exist"
    out = tmp_path / "model.pt"

    with pytest.raises(error) as refused_here:
        distckpt.export(root / "best", out)
    assert export_says in str(refused_here.value)
    refused = run_cli("export", str(root / "best"), str(out))
    assert refused.returncode == 2 and export_says in refused.stderr, refused
    assert not out.exists()
    with pytest.raises(distckpt.CheckpointNotFound) as not_found:
        distckpt.load_checkpoint(root / "best")
    assert restore_says in str(not_found.value)
    assert "needs monitor" not in str(not_found.value)


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
    damaged = _change_local(step_dir, DATA_FILE["torch"], _flipped)
    out = tmp_path / "model.pt"

    assert torch.load(distckpt.export(step_dir, out, rank=1), weights_only=True)["n"] == 4
    out.unlink()
    for all_ranks in (False, True):
        with pytest.raises(distckpt.CorruptCheckpoint, match=f"{damaged}: checksum mismatch"):
            distckpt.export(step_dir, out, all_ranks=all_ranks)
        assert not out.exists()


def _refuses_the_newest(roots: Roots, fmt: str, damage: str, named: str, out: Path) -> None:
    """The export writes what was named, the root's newest checkpoint (``last`` names it too):
    not, silently, the older one a restore of ``"last"`` falls back to. A file missing or of
    another size is refused as a checksum mismatch is, with or without ``verify``: the
    resolution of the root finds it, before the checksum check."""
    root, damaged = roots.damaged[fmt, damage]
    change, words = DAMAGES[damage]
    out.write_bytes(OLD_OUTPUT)
    target = f"{root}/{named}" if named else root

    with pytest.raises(distckpt.CorruptCheckpoint) as raised:
        distckpt.export(target, out, storage_options=roots.options)

    assert f"{damaged}: {words}" in str(raised.value)
    assert out.read_bytes() == OLD_OUTPUT
    if change is not _flipped:
        with pytest.raises(distckpt.CorruptCheckpoint, match=words):
            distckpt.export(target, out, storage_options=roots.options, verify=False)
        assert out.read_bytes() == OLD_OUTPUT
    # What a restore does with the same root: passes over step 2 (its n is 4) for step 1's.
    template = {"w": torch.empty(WIDTH), "n": 0}  # "dcp" loads in place: it needs one
    restored = distckpt.load_checkpoint(
        target, state=template, verify=True, storage_options=roots.options
    )
    assert restored.state["n"] == 3


def test_a_roots_failing_newest_checkpoint_is_refused_not_passed_over(
    roots: Roots, tmp_path: Path
) -> None:
    """:func:`_refuses_the_newest` for each format, damage and name of the root (itself or
    ``last``), in one test per store over its shared roots: a case of its own each cost its
    own saves. A failure's note names the case it failed in."""
    for fmt, damage, named in itertools.product(FORMATS, DAMAGES, ["", "last"]):
        case = f"{fmt}-{damage}-{named or 'root'}"
        try:
            _refuses_the_newest(roots, fmt, damage, named, tmp_path / f"{case}.pt")
        except BaseException as failure:
            failure.add_note(f"in the case {case}")
            raise


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_the_extra_files_a_save_stored_are_not_checked(fmt: str, tmp_path: Path) -> None:
    """Not in the output, so not read: a damaged byte of one (same size) refuses no export."""
    root = tmp_path / "root"
    with distckpt.CheckpointManager(root, format=fmt, fsync=False) as mgr:
        mgr.save(1, {"w": torch.full((WIDTH,), 1.5)}, files={"config.json": b'{"hidden": 8}'})
    _change_local(str(root / STEP), "config.json", lambda data: data.replace(b"8", b"9"))
    assert distckpt.verify(root).ok is False  # the damage is there, and verify finds it

    exported = torch.load(distckpt.export(root, tmp_path / "model.pt"), weights_only=True)
    assert torch.equal(exported["w"], torch.full((WIDTH,), 1.5))


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
    _change_local(step_dir, DATA_FILE[fmt], _flipped)

    with pytest.raises(distckpt.InvalidArgument) as raised:
        distckpt.export(step_dir, tmp_path / "model.pt", **refused)

    assert not isinstance(raised.value, distckpt.CorruptCheckpoint)
    assert "rank=" in str(raised.value)
