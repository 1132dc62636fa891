"""How a checkpoint root is spelled: an ``s3://`` URL whose scheme is in capitals is the same
object-store root; a URL of another scheme or one with surrounding whitespace is refused
(taken for a local path it would quietly save into a local directory of that odd name); a
local path with a ``:`` in it stays a local path. Through the manager, ``load_checkpoint`` and
the command line, against a real S3-protocol server (moto)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import distckpt
from distckpt import InvalidArgument
from tests.s3server import S3Server, aws_environment
from tests.test_cli import run

pytest.importorskip("botocore")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_server: S3Server) -> Path:
    """An empty working directory of the test's own (a root taken for a relative local path
    would be created there), and the AWS variables of the test server for the CLI."""
    for name, value in aws_environment(s3_server).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_an_s3_url_with_its_scheme_in_capitals_is_the_object_store_root(
    s3_server: S3Server, s3_url: str, workdir: Path
) -> None:
    shouted = "S3://" + s3_url[len("s3://") :]
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(shouted, storage_options=options) as manager:
        saved = manager.save(1, {"w": torch.ones(2)})
        assert saved is not None and saved.path == f"{s3_url}/step-00000001"
        assert manager.root == s3_url
    loaded = distckpt.load_checkpoint(shouted, storage_options=options)
    assert loaded.step == 1 and torch.equal(loaded.state["w"], torch.ones(2))
    assert distckpt.load_checkpoint(s3_url, storage_options=options).step == 1
    listed = run("ls", shouted)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[1].startswith("1 ")
    assert list(workdir.iterdir()) == []  # nothing saved locally


@pytest.mark.parametrize(
    ("spelling", "refusal"),
    [
        ("s3a://{bucket}/ckpt", "another scheme"),
        ("gs://{bucket}/ckpt", "another scheme"),
        ("file:///{bucket}/ckpt", "another scheme"),
        (" s3://{bucket}/ckpt", "whitespace"),
        ("s3://{bucket}/ckpt\n", "whitespace"),
    ],
)
def test_a_root_no_store_takes_is_refused_not_saved_locally(
    s3_server: S3Server, s3_url: str, workdir: Path, spelling: str, refusal: str
) -> None:
    root = spelling.format(bucket=s3_url[len("s3://") :].partition("/")[0])
    options = s3_server.storage_options()
    with pytest.raises(InvalidArgument, match=refusal):
        distckpt.CheckpointManager(root, storage_options=options)
    with pytest.raises(InvalidArgument, match=refusal):
        distckpt.load_checkpoint(root, storage_options=options)
    for command in ("ls", "info", "verify", "gc"):
        out = run(command, root)
        assert out.returncode == 2 and refusal in out.stderr, (command, out)
    assert list(workdir.iterdir()) == []


def test_a_local_path_with_a_colon_is_a_local_root(workdir: Path) -> None:
    for root in ("run:1/ckpt", "S3:/bucket/ckpt"):  # no "//" after the colon: a path
        with distckpt.CheckpointManager(root) as manager:
            manager.save(1, {"w": torch.ones(2)})
        assert (workdir / root / "step-00000001").is_dir()
        assert distckpt.load_checkpoint(root).step == 1


@pytest.mark.parametrize("url", ["s3://bucket/ckpt", "S3://bucket/ckpt", "gs://bucket/ckpt"])
def test_a_url_given_as_a_path_is_refused_not_saved_locally(workdir: Path, url: str) -> None:
    # Path turns "//" into "/": as a path, it would be a local directory named after the URL.
    assert str(Path(url)).startswith(url.partition(":")[0] + ":/")
    with pytest.raises(InvalidArgument, match="give an s3:// root as a str"):
        distckpt.CheckpointManager(Path(url))
    with pytest.raises(InvalidArgument, match="give an s3:// root as a str"):
        distckpt.load_checkpoint(Path(url))
    assert list(workdir.iterdir()) == []
