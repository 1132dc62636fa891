"""A manager, writing or read-only, and the commands that open a root refuse a root inside
another root under one of that root's own names (its ``last``, a step dir, a path under one)
before anything is created or written, on a local and an ``s3://`` root alike; a root under
any other name inside a root, or inside what only looks like a root (a sweep's trial dirs and
``last`` link, another tool's ``.lease`` or ``manifest.json``), is opened.

One case per store walks every name, mode and command over one setup, so that the whole
costs a few saves rather than one per combination."""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import distckpt
from distckpt import InvalidArgument
from distckpt.layout import step_dir_name
from distckpt.objstore import ObjectStore
from distckpt.objurl import S3Url
from tests.cli_runner import run_cli
from tests.places import Place, move_root, put_file, save_step
from tests.ranks import run_ranks, values

#: the outer root's own names a root is refused under ("saved": its SaveResult.path)
OWN_NAMES = (
    "last",
    "best",
    "last/sub",
    "saved",
    step_dir_name(9),
    f"{step_dir_name(9)}/new",
    ".staging/x",
)
#: where roots are moved in, as an older version let a manager make them
MOVED_IN = (step_dir_name(9), ".staging/x", f"{step_dir_name(1)}/new")
COMMANDS = (("gc",), ("prune", "--keep-last", "1"), ("delete", "1"), ("lease",), ("ls",))


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


def _refused(place: Place, inner: str, outer: str) -> None:
    """A manager at ``inner``, writing and read-only, is refused naming both roots."""
    for read_only in (False, True):
        with pytest.raises(InvalidArgument, match="inside the checkpoint root") as caught:
            distckpt.CheckpointManager(inner, storage_options=place.options, read_only=read_only)
        message = str(caught.value)
        assert message.startswith(inner) and f"root {outer}," in message, (read_only, message)


def _opens(place: Place, *roots: str) -> None:
    """A manager opens (and closes) each of ``roots``, under the place."""
    for root in roots:
        distckpt.CheckpointManager(f"{place.base}/{root}", storage_options=place.options).close()


def _make_look_alikes(place: Place) -> None:
    """A sweep of trial dirs ``step-1``, ``step-2`` with a ``last`` link to the newest (a
    symlink; in a bucket, an object naming it), and a dir holding another tool's ``.lease``:
    no roots, though named like one's entries."""
    for trial in ("step-1", "step-2"):
        put_file(place, f"sweep/{trial}/notes.txt", b"a trial's notes")
    if place.options is None:
        Path(place.base, "sweep", "last").symlink_to("step-2")
    else:
        put_file(place, "sweep/last", b"step-2\n")
    put_file(place, "other/.lease", b"another tool's lock")


def _lease_files_in_saves(place: Place, outer: str) -> tuple[str, list[str]]:
    """Plant what an older version let a save hold, an extra file ``.lease``, in the committed
    step 1 of the bucket's root ``outer`` and in a save of step 2 whose writer died before its
    ``COMMIT``: the key of step 1's, and the dead save's keys."""
    save_step(place, outer, 2)
    bucket, _, base = place.base.removeprefix("s3://").partition("/")
    planted = []
    with ObjectStore(f"s3://{bucket}", place.options) as store:
        for step in (1, 2):
            manifest = next(
                info.key
                for info in store.list(f"{base}/run/{step_dir_name(step)}/")
                if info.key.endswith("/manifest.json")
            )
            planted.append(manifest.replace("/manifest.json", "/.lease"))
            # the dead save's holds a real lease record (the root's own): only its being in a
            # save (a manifest.json beside it) tells gc it is no inner root's
            record = store.get_bytes(f"{base}/run/.lease") if step == 2 else b"a user's file"
            store.put_bytes(planted[-1], record)
        store.delete([f"{base}/run/{step_dir_name(2)}/COMMIT"])
        return planted[0], [info.key for info in store.list(f"{base}/run/{step_dir_name(2)}/")]


def test_nested_roots_are_refused_and_others_opened_and_left_alone(
    place: Place, caplog: pytest.LogCaptureFixture
) -> None:
    """Under the outer root's own names, not there yet or roots moved in: every manager and
    every command that opens a root refuses, changing nothing, and the outer root verifies
    as it did. ``run/sub``, a sweep's trial dir (even through its ``last``) and a dir under
    another tool's ``.lease`` open. The outer root's start and gc leave ``run/sub`` alone,
    and in a bucket a root moved in under a step dir's name too, with a warning naming it
    (locally only ``run/sub`` is promised: the README says so); a save holding a ``.lease``
    file is no root: committed, no warning names it; dead, gc removes it."""
    _make_look_alikes(place)
    _opens(place, "other/step-3/run", "sweep/step-1/run", "sweep/last/run")
    outer = f"{place.base}/run"
    saved = os.fspath(save_step(place, outer, 1).path)
    before = _everything(place)
    for name in OWN_NAMES:
        _refused(place, saved if name == "saved" else f"{outer}/{name}", outer)
    assert _everything(place) == before
    assert distckpt.verify(outer, storage_options=place.options).ok

    for name in MOVED_IN:
        save_step(place, f"{place.base}/elsewhere", 5)
        move_root(place, f"{place.base}/elsewhere", f"{outer}/{name}")
    before = _everything(place)
    for name in MOVED_IN:
        _refused(place, f"{outer}/{name}", outer)
        _refused(place, f"{outer}/{name}/deeper", outer)
    for command in COMMANDS:
        for name in ("last", step_dir_name(1), *MOVED_IN[:2]):
            inner = f"{outer}/{name}"
            out = run_cli(command[0], inner, *command[1:])
            assert out.returncode == 2 and "Traceback" not in out.stderr, out
            assert out.stderr.startswith(f"distckpt {command[0]}: error: {inner} is "), out.stderr
    assert _everything(place) == before

    if place.options is None:
        # Locally verify reports a root moved in under a step dir's name as a damaged
        # checkpoint, and gc removes one in .staging as a dead save's: only run/sub is
        # promised to be left alone (README, "On disk").
        for name in MOVED_IN:
            shutil.rmtree(f"{outer}/{name}")
        dead: list[str] = []
    else:
        in_a_committed_save, dead = _lease_files_in_saves(place, outer)
        # a root with nothing committed yet, known by its lease record alone, moved in with
        # an unfinished save: gc leaves the save alone too
        distckpt.CheckpointManager(f"{place.base}/fresh", storage_options=place.options).close()
        move_root(place, f"{place.base}/fresh", f"{outer}/{step_dir_name(8)}")
        put_file(place, f"run/{step_dir_name(8)}/{step_dir_name(1)}/x/rank-00000.pt", b"w")
    save_step(place, f"{outer}/sub", 5)
    before = [name for name in _everything(place) if name not in dead]
    assert run_cli("gc", outer).returncode == 0  # removes the dead save
    with (
        caplog.at_level(logging.WARNING, logger="distckpt"),
        distckpt.CheckpointManager(outer, storage_options=place.options) as manager,
    ):
        assert manager.gc() == []
        assert manager.steps() == [1]
    assert _everything(place) == before
    if place.options is not None:  # not in its manifest: verify would report it, rightly
        with ObjectStore(f"s3://{S3Url.parse(outer).bucket}", place.options) as store:
            store.delete([in_a_committed_save])
    report = distckpt.verify(outer, storage_options=place.options)
    assert report.ok and [checkpoint.step for checkpoint in report.checkpoints] == [1]
    assert distckpt.load_checkpoint(f"{outer}/sub", storage_options=place.options).step == 5
    # in a bucket the roots moved in under a step dir's name, and nothing else (not a save
    # holding a .lease file)
    moved_under_steps = (step_dir_name(9), f"{step_dir_name(1)}/new", step_dir_name(8))
    expected = {f"{outer}/{name}" for name in moved_under_steps} if place.options else set()
    assert set(re.findall(r"leaving (\S+) alone", caplog.text)) == expected, caplog.text
    for where in expected:
        assert f"leaving {where} alone: a checkpoint root of its own is there" in caplog.text
    if place.options is not None:  # a root at the bucket's top is named as every URL of it
        top = f"s3://{S3Url.parse(outer).bucket}"
        save_step(place, top, 1)
        _refused(place, f"{top}/{step_dir_name(9)}", top)


def _open_refused(rank: int, world_size: int, root: str) -> tuple[str, str]:
    try:
        distckpt.CheckpointManager(root, timeout=30)
    except InvalidArgument as exc:
        return type(exc).__name__, str(exc)
    return "opened", ""


def test_a_local_checkpoint_by_any_path_is_refused_on_every_rank(tmp_path: Path) -> None:
    """Locally, a ``last`` pointer file, a symlink elsewhere to a step dir, and a copy of a
    checkpoint in no root (it holds a manifest, whole or cut short) are no roots either,
    refused changing nothing; a dir holding another tool's ``manifest.json``, or under one,
    opens. Rank 0 alone opens the root: the refusal reaches every rank of a job as the same
    error, none left waiting in a collective."""
    outer = tmp_path / "run"
    with distckpt.CheckpointManager(outer, link="pointer") as manager:
        saved = manager.save(1, {"w": torch.ones(3)})
    assert saved is not None and (outer / "last").is_file()
    (tmp_path / "link").symlink_to(saved.path)
    copy = tmp_path / "best-model"
    copy.mkdir()
    manifest = (Path(saved.path) / "manifest.json").read_bytes()
    (copy / "manifest.json").write_bytes(manifest)
    cut_short = tmp_path / "interrupted-copy"  # a copy of the checkpoint cut off midway
    cut_short.mkdir()
    (cut_short / "manifest.json").write_bytes(manifest[: len(manifest) // 2])
    for root, says in (
        (outer / "last", f"inside the checkpoint root {outer},"),
        (tmp_path / "link", f"inside the checkpoint root {outer},"),
        (copy, "is a checkpoint (it holds manifest.json), not a checkpoint root"),
        (cut_short, "is a checkpoint (it holds manifest.json), not a checkpoint root"),
    ):
        before = sorted(p.name for p in tmp_path.rglob("*"))
        with pytest.raises(InvalidArgument) as caught:
            distckpt.CheckpointManager(root)
        assert says in str(caught.value), caught.value
        assert sorted(p.name for p in tmp_path.rglob("*")) == before

    tool_output = tmp_path / "out"
    tool_output.mkdir()
    (tool_output / "manifest.json").write_text('{"tool": "other"}')
    for root in (tool_output, tool_output / "ckpt"):
        with distckpt.CheckpointManager(root) as manager:
            assert manager.save(1, {"w": torch.ones(3)}) is not None

    inner = os.fspath(outer / step_dir_name(9))
    refusals = values(run_ranks(_open_refused, 2, inner, timeout=60))
    assert [kind for kind, _ in refusals] == ["InvalidArgument"] * 2
    assert all(f"inside the checkpoint root {outer}," in message for _, message in refusals)
    assert not Path(inner).exists()
