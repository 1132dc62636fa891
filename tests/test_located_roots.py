"""What a location a user gives names, alike on a local root and on an ``s3://`` one (a real
S3-protocol server, moto): a location holding nothing is no root; a root whose name looks like
a step dir's is the root it is; a released lease has no holder; an export never writes over a
root."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import distckpt
from distckpt import CheckpointNotFound, InvalidArgument
from distckpt.layout import step_dir_name
from distckpt.objlease import LeaseRecord
from distckpt.objstore import ObjectStore
from distckpt.storage import open_store
from distckpt.storage.s3_root import prefix_holds_a_root
from tests.places import Place, move_root, save_step
from tests.s3server import S3Server
from tests.test_cli import run


@pytest.mark.parametrize("name", ["typo", "ru", "run/step-2", "run/step-00000002"])
def test_a_location_holding_nothing_is_not_found(place: Place, name: str) -> None:
    """A typo of a root (``ru`` for ``run``), or a step of it not committed (of any width),
    names nothing: every reader says so, none reports an empty root as fine."""
    save_step(place, f"{place.base}/run", 1)
    location = f"{place.base}/{name}"
    with pytest.raises(CheckpointNotFound):
        distckpt.load_checkpoint(location, storage_options=place.options)
    with pytest.raises(CheckpointNotFound):
        distckpt.verify(location, storage_options=place.options)
    for command in (("verify", location), ("info", location), ("export", location, "out.pt")):
        out = run(*command)
        assert out.returncode == 2, out
        assert out.stderr.startswith(f"distckpt {command[0]}: error: no "), out.stderr
    assert not Path("out.pt").exists()


@pytest.mark.parametrize("name", ["step-1", "step-0000001", "step-000000001"])
def test_a_step_dir_of_any_width_is_that_step(place: Place, name: str) -> None:
    """A step dir's name of any width parses ("On disk"): a local step dir copied in as
    ``step-1`` is step 1, and so is ``s3://BUCKET/run/step-1`` for the step an ``s3://`` root
    committed as ``step-00000001`` (the only name a step has in a bucket)."""
    root = f"{place.base}/run"
    save_step(place, root, 1)
    if place.options is None:
        Path(root, step_dir_name(1)).rename(Path(root, name))
    location = f"{root}/{name}"
    assert distckpt.load_checkpoint(location, storage_options=place.options).step == 1
    report = distckpt.verify(location, storage_options=place.options)
    assert report.ok and [item.step for item in report.checkpoints] == [1]
    for command in ("info", "verify"):
        out = run(command, location)
        assert out.returncode == 0, out


def test_a_root_opened_without_a_save_is_a_root(place: Place) -> None:
    """A root a manager opened and closed before any save is an empty root (its lease files
    make it one): verify finds no checkpoint to report on, and nothing is damaged."""
    root = f"{place.base}/fresh"
    distckpt.CheckpointManager(root, storage_options=place.options).close()
    report = distckpt.verify(root, storage_options=place.options)
    assert report.ok and report.checkpoints == ()
    assert f"no checkpoint in {root}" in str(report)


@pytest.mark.parametrize("name", ["step-1", "step-0001", step_dir_name(1)])
def test_a_root_named_like_a_step_dir_is_read_as_a_root(place: Place, name: str) -> None:
    """A root whose last part looks like a step dir's (a sweep named by a step count), under
    a parent that is no root, holds a root of its own: it is read as that root, and its
    checkpoints as checkpoints of it."""
    root = f"{place.base}/sweep/{name}"
    save_step(place, root, 7)
    assert distckpt.load_checkpoint(root, storage_options=place.options).step == 7
    checkpoint = f"{root}/{step_dir_name(7)}"
    assert distckpt.load_checkpoint(checkpoint, storage_options=place.options).step == 7
    report = distckpt.verify(root, storage_options=place.options)
    assert report.ok and [item.step for item in report.checkpoints] == [7]
    # one run of each command serves every check of its output: on an s3:// root each run
    # costs tens of requests
    outputs = {command: run(command, root) for command in ("ls", "verify", "info")}
    for out in outputs.values():
        assert out.returncode == 0, out
    assert outputs["ls"].stdout.splitlines()[1].startswith("7 ")
    assert "step        7" in outputs["info"].stdout
    distckpt.export(root, "out.pt", storage_options=place.options)
    assert torch.equal(torch.load("out.pt", weights_only=True)["w"], torch.full((3,), 7.0))


def test_a_released_lease_has_no_holder(place: Place) -> None:
    """Once the manager closed, its lease is released: ``lease`` and ``ls`` show none, in
    text and in JSON, though the process that held it is still running."""
    root = f"{place.base}/run"
    save_step(place, root, 1)
    assert run("lease", root).stdout == "lease: none\n"
    assert json.loads(run("lease", "--json", root).stdout)["lease"] is None
    assert json.loads(run("ls", "--json", root).stdout)["lease"] is None
    assert "lease: none" in run("ls", root).stdout


def test_an_export_onto_a_root_is_refused(place: Place) -> None:
    """The output of an export is never the root itself (a directory; a root's prefix): the
    root is left as it was."""
    root = f"{place.base}/run"
    save_step(place, root, 1)
    with pytest.raises(InvalidArgument):
        distckpt.export(f"{root}/last", root, storage_options=place.options)
    if place.options is not None:
        bucket, _, prefix = root[len("s3://") :].partition("/")
        with ObjectStore(f"s3://{bucket}", place.options) as store:
            assert prefix not in [info.key for info in store.list()]
    assert distckpt.load_checkpoint(root, storage_options=place.options).step == 1


def test_a_folder_of_exports_named_like_a_step_dir_is_no_root(place: Place) -> None:
    """A folder of exports named by a step count, holding an export in its own
    ``step-00000010/`` and then in its own ``last/``, is no root: the second export is
    written (README's export row), and on an ``s3://`` store, where a prefix holding no
    committed step is no checkpoint either, readers find nothing there rather than an empty
    root that verifies fine."""
    save_step(place, f"{place.base}/run", 10)
    folder = f"{place.base}/exports/step-1"
    for name in (f"{step_dir_name(10)}/model.pt", "last/model.pt"):
        distckpt.export(f"{place.base}/run", f"{folder}/{name}", storage_options=place.options)
    if place.options is None:
        return  # a local dir of a step dir's name holding no root is a damaged checkpoint
    with pytest.raises(CheckpointNotFound):
        distckpt.verify(folder, storage_options=place.options)
    with pytest.raises(CheckpointNotFound):
        distckpt.load_checkpoint(folder, storage_options=place.options)


def test_a_last_object_naming_no_step_dir_makes_no_root(s3_server: S3Server) -> None:
    """An object named ``last`` that names no step dir (a user's note, ``exp1``) makes no
    root of its prefix, as a local ``runs/last -> exp1`` makes none, nor does one naming a
    step not committed (a sweep's newest trial, ``sweep/step-3/``); one naming a committed
    step does, as a root's pointer. A ``.lease`` object makes one only holding a lease record
    (another tool's lock of that name makes none)."""
    with ObjectStore(f"s3://{s3_server.create_bucket()}", s3_server.storage_options()) as store:
        store.put_bytes("runs/last", b"exp1\n")
        assert not prefix_holds_a_root(store, "runs/")
        store.put_bytes("runs/last", f"{step_dir_name(3)}\n".encode())
        store.put_bytes(f"runs/{step_dir_name(3)}/notes", b"a trial's")
        assert not prefix_holds_a_root(store, "runs/")
        store.put_bytes(f"runs/{step_dir_name(3)}/COMMIT", b"")
        assert prefix_holds_a_root(store, "runs/")
        store.put_bytes("other/.lease", b"another tool's lock")
        assert not prefix_holds_a_root(store, "other/")
        record = LeaseRecord(owner="token", host="host", pid=1, duration=30.0)
        store.put_bytes("other/.lease", record.encode())
        assert prefix_holds_a_root(store, "other/")


def test_a_root_named_like_a_step_dir_inside_a_root_is_refused(place: Place) -> None:
    """A root named like a step dir inside another root would be taken by that root for one
    of its own (leftovers its gc deletes; a damaged checkpoint): readers refuse it, naming
    both, instead of reading a root its neighbour may delete."""
    outer = f"{place.base}/run"
    inner = f"{outer}/{step_dir_name(9)}"
    save_step(place, outer, 1)
    # A manager refuses to make it there: it is made beside the outer root and moved in, as
    # an older version or a copy would have left it.
    save_step(place, f"{place.base}/elsewhere", 7)
    move_root(place, f"{place.base}/elsewhere", inner)
    for read in (distckpt.load_checkpoint, distckpt.verify):
        with pytest.raises(InvalidArgument, match="inside the checkpoint root") as caught:
            read(inner, storage_options=place.options)
        assert inner.rstrip("/") in str(caught.value) and f"root {outer}" in str(caught.value)
    for command in (("ls", inner), ("info", inner), ("verify", inner), ("export", inner, "o.pt")):
        out = run(*command)
        assert out.returncode == 2 and "inside the checkpoint root" in out.stderr, out


def test_a_folder_of_roots_or_a_set_aside_checkpoint_is_no_root(place: Place) -> None:
    """The commands that take a root refuse a folder of roots (``sweep/`` for
    ``sweep/step-1``) and a checkpoint a restore set aside (``ROOT/damaged-step-…``) with exit
    status 2 on both backends, so gc and prune never act there; on an ``s3://`` store the
    folder does not verify as an empty root that is fine. The checkpoint set aside is read
    where it lies, on both backends alike (on an ``s3://`` store it was not found at all):
    verify checks it and names its damage, load_checkpoint and info read it when its files
    pass the size check."""
    save_step(place, f"{place.base}/sweep/step-1", 1)
    save_step(place, f"{place.base}/aside", 1)
    store = open_store(f"{place.base}/aside", storage_options=place.options)
    store.open()
    try:
        set_aside = str(store.set_aside(1, store.view.checkpoint(1).location))
    finally:
        store.close()
    for location in (f"{place.base}/sweep", set_aside):
        for command in (("ls",), ("gc",), ("prune", "--keep-last", "1"), ("lease",)):
            out = run(*command, location)
            assert out.returncode == 2 and "not a checkpoint root" in out.stderr, out
    if place.options is not None:
        with pytest.raises(CheckpointNotFound):
            distckpt.verify(f"{place.base}/sweep", storage_options=place.options)
    report = distckpt.verify(set_aside, storage_options=place.options)
    assert report.ok and [(str(c.path), c.step) for c in report.checkpoints] == [(set_aside, 1)]
    assert distckpt.load_checkpoint(set_aside, storage_options=place.options).step == 1
    info = run("info", "--json", set_aside)
    assert info.returncode == 0 and json.loads(info.stdout)["path"] == set_aside, info
    rank_file = f"{set_aside}/rank-00000.pt"
    if place.options is None:
        Path(rank_file).unlink()
    else:
        with ObjectStore(f"{place.base}/aside", place.options) as objects:
            objects.delete([rank_file.removeprefix(f"{place.base}/aside/")])
    broken = run("verify", set_aside)
    assert broken.returncode == 1 and f"{rank_file}: missing" in broken.stdout, broken
    # read only when its files pass the size check, as a committed checkpoint is
    unreadable = run("info", set_aside)
    assert unreadable.returncode == 2 and f"{rank_file}: missing" in unreadable.stderr
    with pytest.raises(distckpt.CorruptCheckpoint, match=r"rank-00000\.pt: missing"):
        distckpt.load_checkpoint(set_aside, storage_options=place.options)


@pytest.mark.parametrize("left", [(), ("..lease.json.0123abcd.tmp",)], ids=["empty", "lease-tmp"])
def test_a_local_directory_a_crash_left_before_its_lease_verifies_as_an_empty_root(
    tmp_path: Path, left: tuple[str, ...]
) -> None:
    """A local root's files are created one by one, so a crash can leave its directory with
    no lease yet (or only the lease's temporary file): verify reads it as an empty root, as
    the manager then opens it, where a directory that is not there is not found."""
    root = tmp_path / "run"
    root.mkdir()
    for name in left:
        (root / name).write_text("{")
    report = distckpt.verify(root)
    assert report.ok and report.checkpoints == ()
    with pytest.raises(CheckpointNotFound):
        distckpt.verify(tmp_path / "typo")
