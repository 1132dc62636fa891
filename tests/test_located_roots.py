"""What a location a user gives names, alike on a local root and on an ``s3://`` one (a real
S3-protocol server, moto): a location holding nothing is no root; a root whose name looks like
a step dir's is the root it is; a released lease has no holder; an export never writes over a
root."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt import CheckpointNotFound, InvalidArgument
from distckpt.layout import step_dir_name
from distckpt.objstore import ObjectStore
from tests.s3server import S3Server
from tests.test_cli import run
from tests.test_s3_cli import aws_environment


@dataclass(frozen=True)
class Place:
    """Where a test's roots go (a directory, or an ``s3://`` prefix) and its store's options."""

    base: str
    options: dict[str, Any] | None


@pytest.fixture(params=["local", "s3"])
def place(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Place:
    """A place of each kind. For ``s3``, the AWS variables of the test server are set for the
    command line, and the working directory is the test's own (an s3:// URL taken for a
    relative path would be created there)."""
    monkeypatch.chdir(tmp_path)
    if request.param == "local":
        return Place(str(tmp_path / "roots"), None)
    server: S3Server = request.getfixturevalue("s3_server")
    for name, value in aws_environment(server).items():
        monkeypatch.setenv(name, value)
    return Place(f"s3://{server.create_bucket()}/roots", server.storage_options())


def _save(place: Place, root: str, step: int) -> None:
    with distckpt.CheckpointManager(root, storage_options=place.options) as manager:
        manager.save(step, {"w": torch.full((3,), float(step))})


@pytest.mark.parametrize(
    "name",
    ["typo", "ru", "run/step-1", "run/step-0001", "run/step-000000001", "run/step-00000002"],
)
def test_a_location_holding_nothing_is_not_found(place: Place, name: str) -> None:
    """A typo of a root (``ru`` for ``run``), or a step of it under a name it never has (a
    step dir is named with eight digits) or not committed, names nothing: every reader says
    so, none reports an empty root as fine."""
    _save(place, f"{place.base}/run", 1)
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
    _save(place, root, 7)
    assert distckpt.load_checkpoint(root, storage_options=place.options).step == 7
    checkpoint = f"{root}/{step_dir_name(7)}"
    assert distckpt.load_checkpoint(checkpoint, storage_options=place.options).step == 7
    report = distckpt.verify(root, storage_options=place.options)
    assert report.ok and [item.step for item in report.checkpoints] == [7]
    for command in ("ls", "verify", "info"):
        out = run(command, root)
        assert out.returncode == 0, out
    assert run("ls", root).stdout.splitlines()[1].startswith("7 ")
    assert "step        7" in run("info", root).stdout
    distckpt.export(root, "out.pt", storage_options=place.options)
    assert torch.equal(torch.load("out.pt", weights_only=True)["w"], torch.full((3,), 7.0))


def test_a_released_lease_has_no_holder(place: Place) -> None:
    """Once the manager closed, its lease is released: ``lease`` and ``ls`` show none, in
    text and in JSON, though the process that held it is still running."""
    root = f"{place.base}/run"
    _save(place, root, 1)
    assert run("lease", root).stdout == "lease: none\n"
    assert json.loads(run("lease", "--json", root).stdout)["lease"] is None
    assert json.loads(run("ls", "--json", root).stdout)["lease"] is None
    assert "lease: none" in run("ls", root).stdout


def test_an_export_onto_a_root_is_refused(place: Place) -> None:
    """The output of an export is never the root itself (a directory; a root's prefix): the
    root is left as it was."""
    root = f"{place.base}/run"
    _save(place, root, 1)
    with pytest.raises(InvalidArgument):
        distckpt.export(f"{root}/last", root, storage_options=place.options)
    if place.options is not None:
        bucket, _, prefix = root[len("s3://") :].partition("/")
        with ObjectStore(f"s3://{bucket}", place.options) as store:
            assert prefix not in [info.key for info in store.list()]
    assert distckpt.load_checkpoint(root, storage_options=place.options).step == 1
