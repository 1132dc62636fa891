"""A manager, writing or read-only, and the commands that change a root refuse a root inside
another root under one of that root's own names (its ``last``, a step dir, a path under one)
before anything is created or written, on a local and an ``s3://`` root alike; a root under
any other name inside a root is left alone by it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

import distckpt
from distckpt import InvalidArgument
from distckpt.layout import step_dir_name
from distckpt.objstore import ObjectStore
from tests.cli_runner import run_cli
from tests.places import Place, move_root, save_step
from tests.ranks import run_ranks, values
from tests.s3server import S3Server


def _everything(place: Place) -> list[str]:
    """Every file, link, dir or object under the place: what a refusal must leave as it was."""
    if place.options is None:
        return sorted(
            os.path.relpath(os.path.join(parent, name), place.base)
            for parent, dirs, files in os.walk(place.base)
            for name in dirs + files
        )
    bucket = place.base.split("/")[2]
    with ObjectStore(f"s3://{bucket}", place.options) as store:
        return sorted(info.key for info in store.list(""))


@pytest.mark.parametrize("read_only", [False, True])
@pytest.mark.parametrize(
    "name",
    [
        "last",
        "best",
        "last/sub",
        "saved",
        step_dir_name(9),
        f"{step_dir_name(9)}/new",
        ".staging/x",
    ],
)
def test_a_manager_refuses_a_root_under_another_roots_own_name(
    place: Place, name: str, read_only: bool
) -> None:
    """``ROOT/last``, a step dir (a ``SaveResult.path``), a step dir's name not committed and
    a path under one: the outer root would take a root there for a checkpoint, a dead save's
    leftovers (its gc deletes them from a bucket) or a link. The manager refuses before it
    writes anything, naming both roots, and the outer root verifies as it did."""
    outer = f"{place.base}/run"
    saved = save_step(place, outer, 1).path
    inner = os.fspath(saved) if name == "saved" else f"{outer}/{name}"
    before = _everything(place)
    with pytest.raises(InvalidArgument, match="inside the checkpoint root") as caught:
        distckpt.CheckpointManager(inner, storage_options=place.options, read_only=read_only)
    assert str(caught.value).startswith(inner) and f"root {outer}," in str(caught.value)
    assert _everything(place) == before
    assert distckpt.verify(outer, storage_options=place.options).ok


def test_a_manager_refuses_a_local_checkpoint_by_any_path(tmp_path: Path) -> None:
    """Locally, a ``last`` pointer file, a symlink elsewhere to a step dir, and a copy of a
    checkpoint in no root (it holds a manifest) are no roots either."""
    outer = tmp_path / "run"
    with distckpt.CheckpointManager(outer, link="pointer") as manager:
        saved = manager.save(1, {"w": torch.ones(3)})
    assert saved is not None and (outer / "last").is_file()
    (tmp_path / "link").symlink_to(saved.path)
    copy = tmp_path / "best-model"
    copy.mkdir()
    (copy / "manifest.json").write_bytes((Path(saved.path) / "manifest.json").read_bytes())
    for root, says in (
        (outer / "last", f"inside the checkpoint root {outer},"),
        (tmp_path / "link", f"inside the checkpoint root {outer},"),
        (copy, "is a checkpoint (it holds manifest.json), not a checkpoint root"),
    ):
        before = sorted(p.name for p in tmp_path.rglob("*"))
        with pytest.raises(InvalidArgument) as caught:
            distckpt.CheckpointManager(root)
        assert says in str(caught.value), caught.value
        assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_a_root_under_another_name_inside_a_root_is_left_alone(place: Place) -> None:
    """``run/sub`` is no name of ``run``'s: a manager opens it, and ``run``'s start, gc and
    verify neither count nor remove its checkpoints."""
    outer, inner = f"{place.base}/run", f"{place.base}/run/sub"
    save_step(place, outer, 1)
    save_step(place, inner, 5)
    with distckpt.CheckpointManager(outer, storage_options=place.options) as manager:
        manager.gc()
        assert manager.steps() == [1]
    assert run_cli("gc", outer).returncode == 0
    report = distckpt.verify(outer, storage_options=place.options)
    assert report.ok and [c.step for c in report.checkpoints] == [1]
    assert distckpt.load_checkpoint(inner, storage_options=place.options).step == 5


@pytest.mark.parametrize(
    "command", [("gc",), ("prune", "--keep-last", "1"), ("delete", "1"), ("lease",)]
)
def test_the_commands_that_open_a_root_refuse_a_nested_one(
    place: Place, command: tuple[str, ...]
) -> None:
    """``gc``, ``prune``, ``delete`` and ``lease`` on ``ROOT/last``, on a step dir, and on a
    root moved in under a step dir's name or into ``.staging`` (as an older version let a
    manager make it) exit with status 2 and a message, not a traceback, and change nothing."""
    outer = f"{place.base}/run"
    save_step(place, outer, 1)
    save_step(place, f"{place.base}/elsewhere", 1)
    move_root(place, f"{place.base}/elsewhere", f"{outer}/{step_dir_name(9)}")
    save_step(place, f"{place.base}/elsewhere", 1)
    move_root(place, f"{place.base}/elsewhere", f"{outer}/.staging/x")
    before = _everything(place)
    nested = (step_dir_name(1), step_dir_name(9), ".staging/x")
    for inner in (f"{outer}/last", *(f"{outer}/{name}" for name in nested)):
        out = run_cli(command[0], inner, *command[1:])
        assert out.returncode == 2, out
        assert out.stderr.startswith(f"distckpt {command[0]}: error: {inner} is "), out.stderr
        assert "Traceback" not in out.stderr
    assert _everything(place) == before


def test_an_s3_root_moved_in_under_a_step_name_is_left_by_the_outer_gc(
    s3_server: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    """A root under ``run/step-00000009`` or ``run/step-00000001/new`` (moved in, or made by
    a version that let a manager open it) is no dead writer's save of ``run``'s: the outer
    root's start and gc leave its objects, with a warning naming it, where they deleted them."""
    place = Place(f"s3://{s3_server.create_bucket()}/roots", s3_server.storage_options())
    outer = f"{place.base}/run"
    save_step(place, outer, 1)
    inners = (f"{outer}/{step_dir_name(9)}", f"{outer}/{step_dir_name(1)}/new")
    for inner in inners:
        save_step(place, f"{place.base}/elsewhere", 5)
        move_root(place, f"{place.base}/elsewhere", inner)
    before = _everything(place)
    with (
        caplog.at_level(logging.WARNING, logger="distckpt"),
        distckpt.CheckpointManager(outer, storage_options=place.options) as manager,
    ):
        assert manager.gc() == []
    assert _everything(place) == before
    for inner in inners:
        assert f"leaving {inner} alone: a checkpoint root of its own is there" in caplog.text


def _open_refused(rank: int, world_size: int, root: str) -> tuple[str, str]:
    try:
        distckpt.CheckpointManager(root, timeout=30)
    except InvalidArgument as exc:
        return type(exc).__name__, str(exc)
    return "opened", ""


def test_every_rank_of_a_job_gets_the_refusal(tmp_path: Path) -> None:
    """Rank 0 alone opens the root: the refusal reaches every rank as the same error, none
    left waiting in a collective."""
    outer = tmp_path / "run"
    with distckpt.CheckpointManager(outer) as manager:
        manager.save(1, {"w": torch.ones(3)})
    inner = os.fspath(outer / step_dir_name(9))
    refusals = values(run_ranks(_open_refused, 2, inner, timeout=60))
    assert [kind for kind, _ in refusals] == ["InvalidArgument"] * 2
    assert all(f"inside the checkpoint root {outer}," in message for _, message in refusals)
    assert not Path(inner).exists()
