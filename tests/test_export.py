"""export(): a committed checkpoint as one torch.save file, loaded in a plain process."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt import export
from distckpt.errors import CheckpointNotFound, InvalidArgument
from distckpt.formats.dcp import ModelOptimizerState
from distckpt.objstore import MIN_PART_SIZE, ObjectStore
from distckpt.objurl import S3Url
from tests.cli_runner import run_cli
from tests.filesystems import _run, require_mounting, unmount
from tests.ranks import run_ranks, values
from tests.s3server import S3Server
from tests.test_dcp import TIMEOUT, fsdp, full_state, make_model, train


def _save_fsdp(rank: int, world_size: int, root: str) -> dict[str, list[Any]]:
    model = fsdp(make_model(0), world_size)
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    train(model, optim, range(2))
    with distckpt.CheckpointManager(root, format="dcp", timeout=30) as mgr:
        mgr.save(2, {"app": ModelOptimizerState(model, optim), "epoch": 4, "tags": ["a", "b"]})
    return full_state(model, optim)


def test_export_dcp_consolidates_full_tensors(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    saved = values(run_ranks(_save_fsdp, 2, str(root), timeout=TIMEOUT))[0]
    # The committed dir must not depend on where it was staged, nor on the root's location.
    moved = tmp_path / "moved"
    shutil.move(str(root), str(moved))

    out = export(moved / "last", tmp_path / "out" / "model.pt")
    assert out == tmp_path / "out" / "model.pt"
    assert [p.name for p in out.parent.iterdir()] == ["model.pt"]  # no temp file left
    state = torch.load(out, weights_only=True)
    assert state["epoch"] == 4 and state["tags"] == ["a", "b"]
    app = state["app"]
    assert set(app) == {"model", "optim"}
    for name, tensor in app["model"].items():
        assert type(tensor) is torch.Tensor
        assert torch.equal(tensor, torch.tensor(saved[f"model.{name}"])), name
    for name, entry in app["optim"]["state"].items():
        for key, tensor in entry.items():
            assert torch.equal(tensor, torch.tensor(saved[f"optim.{name}.{key}"])), (name, key)
    assert app["optim"]["param_groups"][0]["params"] == list(app["model"])

    # Loads straight into a plain (unsharded) model.
    plain = make_model(5)
    plain.load_state_dict(app["model"])

    # Root and step dir paths name the same checkpoint; a second export replaces the file.
    again = export(moved, out)
    assert again == out and torch.load(out, weights_only=True).keys() == state.keys()
    with pytest.raises(InvalidArgument, match="exported whole"):
        export(moved / "step-00000002", tmp_path / "x.pt", rank=1)


def _save_torch(rank: int, world_size: int, root: str) -> None:
    model = make_model(rank)
    with distckpt.CheckpointManager(root, timeout=30) as mgr:
        mgr.save(7, {"model": model, "rank": rank})


def test_export_torch_one_rank_or_all(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    values(run_ranks(_save_torch, 2, str(root), timeout=TIMEOUT))
    expected = {rank: make_model(rank).state_dict() for rank in range(2)}

    def check(state: dict[str, Any], rank: int) -> None:
        assert state["rank"] == rank
        assert state["model"].keys() == expected[rank].keys()
        for name, tensor in state["model"].items():
            assert torch.equal(tensor, expected[rank][name])

    check(torch.load(export(root, tmp_path / "r0.pt"), weights_only=True), 0)
    check(torch.load(export(root / "last", tmp_path / "r1.pt", rank=1), weights_only=True), 1)
    both = torch.load(export(root, tmp_path / "all.pt", all_ranks=True), weights_only=True)
    assert sorted(both) == [0, 1]
    for rank in (0, 1):
        check(both[rank], rank)

    # The command line's --rank and --all-ranks choose as the arguments do.
    for options, out in ((("--rank", "1"), "cli-r1.pt"), (("--all-ranks",), "cli-all.pt")):
        ran = run_cli("export", str(root), str(tmp_path / out), *options)
        assert ran.returncode == 0, ran
    check(torch.load(tmp_path / "cli-r1.pt", weights_only=True), 1)
    both = torch.load(tmp_path / "cli-all.pt", weights_only=True)
    assert sorted(both) == [0, 1]
    for rank in (0, 1):
        check(both[rank], rank)

    with pytest.raises(CheckpointNotFound, match="no rank 2"):
        export(root, tmp_path / "bad.pt", rank=2)
    with pytest.raises(InvalidArgument, match="not both"):
        export(root, tmp_path / "bad.pt", rank=1, all_ranks=True)
    with pytest.raises(CheckpointNotFound):
        export(tmp_path / "nothing-here", tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()


def _bucket_url(s3_url: str) -> str:
    return f"s3://{S3Url.parse(s3_url).bucket}"


@pytest.mark.parametrize("source_in_s3", [False, True], ids=["local-source", "s3-source"])
def test_export_to_an_s3_url_uploads_the_file_a_local_export_writes(
    s3_server: S3Server,
    s3_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    source_in_s3: bool,
) -> None:
    """An ``s3://`` out_file is that object, uploaded in parts (the part size at its minimum,
    the state larger than two parts), not a local file under ``./s3:``."""
    monkeypatch.chdir(tmp_path)
    options = s3_server.storage_options(default_block_size=MIN_PART_SIZE)
    root: str = s3_url if source_in_s3 else str(tmp_path / "ckpt")
    state = {"w": torch.arange(3 * MIN_PART_SIZE // 4, dtype=torch.float32), "step": 7}
    with distckpt.CheckpointManager(root, storage_options=options if source_in_s3 else None) as m:
        m.save(7, state)
    url = f"{_bucket_url(s3_url)}/exports/model.pt"

    written = export(root, url, storage_options=options)

    assert written == url
    local = torch.load(export(root, tmp_path / "model.pt", storage_options=options))
    with ObjectStore(_bucket_url(s3_url), options) as store:
        info = store.head("exports/model.pt")
        assert info.size > 2 * MIN_PART_SIZE
        uploaded = torch.load(io.BytesIO(store.get_bytes("exports/model.pt")), weights_only=True)
    assert uploaded.keys() == local.keys() == state.keys()
    assert torch.equal(uploaded["w"], local["w"]) and torch.equal(uploaded["w"], state["w"])
    assert uploaded["step"] == local["step"] == 7
    assert not (tmp_path / "s3:").exists()


@pytest.mark.parametrize("key", ["", "/", "/exports/"])
def test_export_to_an_s3_url_naming_no_object_is_refused_before_reading(
    s3_server: S3Server, s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    """Refused as bad input before the checkpoint is read: the path here holds none, which
    a read would have reported instead."""
    monkeypatch.chdir(tmp_path)
    url = _bucket_url(s3_url) + key
    with pytest.raises(InvalidArgument, match="names no object"):
        export(tmp_path / "nothing-here", url, storage_options=s3_server.storage_options())
    with pytest.raises(InvalidArgument, match="storage_options retries"):
        export(tmp_path / "nothing-here", f"{url.rstrip('/')}/x.pt", storage_options={"retries": 0})
    assert list(tmp_path.iterdir()) == []


def test_export_twice_into_dirs_named_like_a_roots_entries(tmp_path: Path) -> None:
    """An export's own dirs (``exports/last/``, ``exports/step-00000010/``) make no root, so
    the second export there replaces or adds its file as the first wrote it."""
    root = tmp_path / "root"
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        mgr.save(10, {"w": torch.zeros(2)})
        mgr.save(20, {"w": torch.ones(2)})
    for _ in range(2):
        distckpt.export(root, tmp_path / "exports" / "last" / "model.pt", fsync=False)
    for step in (10, 20):
        name = f"step-{step:08d}"
        distckpt.export(root / name, tmp_path / "exports2" / name / "model.pt", fsync=False)
        state = torch.load(tmp_path / "exports2" / name / "model.pt", weights_only=True)
        assert torch.equal(state["w"], torch.full((2,), float(step == 20)))
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / ".lock").touch()  # another tool's
    distckpt.export(root, tmp_path / "project" / "best" / "model.pt", fsync=False)
    assert (tmp_path / "project" / "best" / "model.pt").is_file()


def _copy_of_a_checkpoint(tmp_path: Path) -> Path:
    """A step dir copied out of its root as ``best-model/``: a checkpoint (it holds its
    manifest) in no root."""
    root = tmp_path / "root"
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        mgr.save(1, {"w": torch.arange(4.0)})
    copy = tmp_path / "best-model"
    shutil.copytree(root / "step-00000001", copy)
    return copy


@pytest.mark.parametrize("target", ["rank-00000.pt", "manifest.json", "extra.pt", "alias/x.pt"])
def test_export_into_the_checkpoint_it_exports_is_refused(tmp_path: Path, target: str) -> None:
    """Into the checkpoint being read, named as it is or through a link to it (``alias``), the
    export would replace its files or join them: refused before anything is written."""
    copy = _copy_of_a_checkpoint(tmp_path)
    (tmp_path / "alias").symlink_to(copy, target_is_directory=True)
    before = {path.name: path.read_bytes() for path in copy.iterdir()}
    out = tmp_path / target if target.startswith("alias/") else copy / target
    with pytest.raises(InvalidArgument, match="inside the checkpoint being exported"):
        export(copy, out)
    assert {path.name: path.read_bytes() for path in copy.iterdir()} == before
    assert distckpt.verify(copy).ok


def test_export_into_the_checkpoint_through_a_bind_mount_is_refused(tmp_path: Path) -> None:
    """A bind mount of the checkpoint's directory reaches the same directory by a path no
    link resolves to: refused as the directory itself is, before anything is written."""
    require_mounting()
    copy = _copy_of_a_checkpoint(tmp_path)
    view = tmp_path / "view"
    view.mkdir()
    _run("mount", "--bind", copy, view)
    try:
        before = {path.name: path.read_bytes() for path in copy.iterdir()}
        for target in ("rank-00000.pt", "manifest.json", "sub/extra.pt"):
            with pytest.raises(InvalidArgument, match="inside the checkpoint being exported"):
                export(copy, view / target)
        assert {path.name: path.read_bytes() for path in copy.iterdir()} == before
    finally:
        assert unmount(view)
    assert distckpt.verify(copy).ok


def test_export_to_a_name_ending_in_a_separator_is_refused(tmp_path: Path) -> None:
    """``exports/`` names a directory: it is refused, not written as a file named
    ``exports``."""
    copy = _copy_of_a_checkpoint(tmp_path)
    with pytest.raises(InvalidArgument, match="names a directory"):
        export(copy, f"{tmp_path / 'exports'}/")
    assert not (tmp_path / "exports").exists()
