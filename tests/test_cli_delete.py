"""``distckpt delete ROOT STEP`` on a local root: one committed checkpoint removed, links
moved off it first, next to a live job, and the checkpoints this version cannot judge (the
case docs/verification.md sends the user to this command for). The s3:// cases are in
tests/test_s3_cli.py."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest
import torch

import distckpt
from tests import hostile_cases
from tests.test_cli import root, run

__all__ = ["root"]  # the fixture, shared with tests/test_cli.py


def test_delete_removes_one_committed_step_and_moves_the_links_off_it(root: Path) -> None:
    out = run("delete", str(root), "30")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "deleted step 30\nkept steps:   10, 20\n"
    assert os.readlink(root / "last") == "step-00000020"
    assert not (root / "step-00000030").exists()
    assert not list((root / ".trash").iterdir())  # its bytes are gone, not only its name
    # best named step 20; the root does not record the job's monitor, so it is removed
    out = run("delete", str(root), "20", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"deleted": 20, "kept": [10]}
    assert not (root / "best").exists() and os.readlink(root / "last") == "step-00000010"
    assert run("verify", str(root)).returncode == 0
    with distckpt.CheckpointManager(root, monitor="loss", fsync=False):
        assert os.readlink(root / "best") == "step-00000010"  # the job's start points it again


def test_delete_next_to_a_live_job(root: Path) -> None:
    """The job holds the root's lease; the delete takes the commit lock alone, and the job's
    next save and retention carry on with the step gone."""
    with distckpt.CheckpointManager(root, monitor="loss", keep_last=2, fsync=False) as mgr:
        out = run("delete", str(root), "20")  # the best
        assert out.returncode == 0, out.stderr
        assert not (root / "best").exists()
        assert mgr.save(40, {"w": torch.zeros(4)}, metrics={"loss": 5.0}) is not None
        assert mgr.steps() == [30, 40]
        assert os.readlink(root / "best") == "step-00000030"  # the job's save points it again


def test_once_the_last_step_is_deleted_its_link_names_no_checkpoint_exit_2(
    tmp_path: Path,
) -> None:
    """README: ``info``, ``verify`` and ``export`` of a path holding no checkpoint exit 2. A
    root whose only step was deleted has no ``last``: ``ROOT/last`` is such a path, not a
    broken link ``verify`` reports with status 1."""
    root = tmp_path / "root"
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        mgr.save(1, {"w": torch.zeros(2)})
    assert run("delete", str(root), "1").returncode == 0
    assert not os.path.lexists(root / "last")
    for args in (("verify",), ("info",), ("export", str(tmp_path / "out.pt"))):
        out = run(args[0], str(root / "last"), *args[1:])
        assert out.returncode == 2, out
        said = out.stderr.removeprefix(f"distckpt {args[0]}: error: ")
        assert re.match(r"no (committed )?checkpoint", said), out.stderr
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("20",), "no checkpoint for step 20 in"),  # deleted just before
        (("25",), "no checkpoint for step 25 in"),
        (("-1",), "step must not be negative"),
    ],
)
def test_delete_of_a_step_not_committed_is_refused_with_status_2(
    root: Path, args: tuple[str, ...], says: str
) -> None:
    assert run("delete", str(root), "20").returncode == 0
    out = run("delete", str(root), *args)
    assert out.returncode == 2, out
    assert out.stderr.startswith(f"distckpt delete: error: {says}"), out.stderr
    assert distckpt.CheckpointManager(root, read_only=True).steps() == [10, 30]


def test_the_refusal_over_a_checkpoint_not_judged_names_the_delete_that_gets_past_it(
    root: Path,
) -> None:
    """docs/verification.md: a save of a lower step is refused naming the checkpoint that could
    not be judged and what to do; the command it names deletes it, and the save goes through."""
    hostile_cases.edit_manifest(root / "step-00000030", lambda data: data.update(format="x"))
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        with pytest.raises(distckpt.InvalidStep, match="could not be judged") as refused:
            mgr.save(25, {"w": torch.zeros(4)})
        (command,) = re.findall(r"\((distckpt delete [^)]*)\)", str(refused.value))
        assert "upgrade distckpt" in str(refused.value)
        out = run(*shlex.split(command)[1:])
        assert out.returncode == 0, out.stderr
        assert mgr.save(25, {"w": torch.zeros(4)}) is not None
        assert mgr.steps() == [10, 20, 25]


#: Checkpoints this version cannot judge (they may be whole), as tests/hostile_cases.py makes
#: them in step 2 of its root: what a refusal of a lower step tells the user to delete.
UNJUDGED = {
    "newer-format-version": hostile_cases.manifest_future_version,
    "unknown-format": hostile_cases.manifest_unknown_format,
    "unknown-checksum-algorithm": hostile_cases.manifest_unknown_checksum,
    "rank-file-symlinked": hostile_cases.shard_symlink,
}


@pytest.mark.parametrize("case", sorted(UNJUDGED))
def test_delete_removes_a_checkpoint_this_version_cannot_judge(tmp_path: Path, case: str) -> None:
    """docs/verification.md: a checkpoint that could not be judged is kept, and the user
    deletes it with ``distckpt delete ROOT STEP``; after that a job saves the step again."""
    root = hostile_cases.make_root(tmp_path / "root")
    UNJUDGED[case](root)
    out = run("delete", str(root), "2")
    assert out.returncode == 0, out.stderr
    assert not (root / hostile_cases.STEP2).exists()
    assert os.readlink(root / "last") == "step-00000001"
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        restored = mgr.restore(state={"w": torch.zeros(hostile_cases.WIDTH), "step": 0})
        assert restored is not None and restored.step == 1
        assert mgr.save(2, hostile_cases.saved_state(2)) is not None
        assert mgr.steps() == [1, 2]


def test_ls_lists_a_newer_format_version_for_delete_to_remove(tmp_path: Path) -> None:
    """``ls`` of a root holding a checkpoint of a newer format version lists it as such (the
    step ``delete`` takes) instead of failing, in the table and in ``--json``."""
    root = hostile_cases.make_root(tmp_path / "root")
    hostile_cases.manifest_future_version(root)
    table = run("ls", str(root))
    assert table.returncode == 0, table.stderr
    (row,) = [line for line in table.stdout.splitlines() if line.startswith("2 ")]
    assert "NEWER FORMAT (upgrade distckpt)" in row
    listed = run("ls", str(root), "--json")
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert [c["step"] for c in data["checkpoints"]] == [1]
    assert (data["newer_format_steps"], data["damaged_steps"]) == ([2], [])
    assert run("delete", str(root), "2").returncode == 0
    assert json.loads(run("ls", str(root), "--json").stdout)["newer_format_steps"] == []


def test_ls_lists_a_newer_format_step_in_step_order_with_its_links(tmp_path: Path) -> None:
    """A step of a newer format version below a readable one is listed in its place among
    the steps, with the links naming it (here ``best``) in the LINKS column."""
    root = hostile_cases.make_root(tmp_path / "root")
    hostile_cases.edit_manifest(
        root / "step-00000001", lambda data: data.update(format_version=999)
    )
    os.symlink("step-00000001", root / "best")
    table = run("ls", str(root))
    assert table.returncode == 0, table.stderr
    first, second = table.stdout.splitlines()[1:3]
    assert first.startswith("1 ") and "NEWER FORMAT (upgrade distckpt)" in first, table.stdout
    assert first.split()[-1] == "best", table.stdout
    assert second.startswith("2 ") and second.split()[-1] == "last", table.stdout


@pytest.mark.parametrize(
    ("command", "links_after"),
    [
        (("delete", "4"), {"last": "step-00000003", "best": "step-00000003"}),
        # ranked by the highest loss, step 2 is the best: the prune moves the best link to it
        (
            ("prune", "--keep-last", "1", "--keep-best", "1", "--monitor", "loss", "--mode", "max"),
            {"last": "step-00000004", "best": "step-00000002"},
        ),
    ],
    ids=["delete", "prune"],
)
def test_a_command_moving_the_links_of_a_pointer_root_writes_pointer_files(
    tmp_path: Path, command: tuple[str, ...], links_after: dict[str, str]
) -> None:
    """A job with ``link="pointer"`` writes ``last``/``best`` as pointer files; a command that
    moves them writes pointer files too, instead of turning them into symlinks."""
    root = tmp_path / "root"
    with distckpt.CheckpointManager(root, link="pointer", monitor="loss", fsync=False) as mgr:
        for step, loss in ((1, 0.5), (2, 0.9), (3, 0.1), (4, 0.7)):
            mgr.save(step, {"w": torch.full((2,), float(step))}, metrics={"loss": loss})

    def pointer_files() -> dict[str, str]:
        links = {name: root / name for name in ("last", "best")}
        assert not any(link.is_symlink() for link in links.values())
        return {name: link.read_text().strip() for name, link in links.items()}

    assert pointer_files() == {"last": "step-00000004", "best": "step-00000003"}
    out = run(command[0], str(root), *command[1:])
    assert out.returncode == 0, out.stderr
    assert pointer_files() == links_after
    assert distckpt.verify(root).ok


def test_a_command_writes_pointer_files_where_either_link_is_one(tmp_path: Path) -> None:
    """A root with a symlink ``last`` and a pointer-file ``best`` (a pointer file written by
    hand, or by a job on a filesystem that refused symlinks): the CLI writes pointer files."""
    root = tmp_path / "root"
    with distckpt.CheckpointManager(root, monitor="loss", fsync=False) as mgr:
        for step, loss in ((1, 0.5), (2, 0.9), (3, 0.1)):
            mgr.save(step, {"w": torch.full((2,), float(step))}, metrics={"loss": loss})
    best = root / "best"
    target = os.readlink(best)
    best.unlink()
    best.write_text(target + "\n")
    assert (root / "last").is_symlink()
    out = run("delete", str(root), "3")
    assert out.returncode == 0, out.stderr
    assert not (root / "last").is_symlink()
    assert (root / "last").read_text().strip() == "step-00000002"
    assert distckpt.verify(root).ok


@pytest.mark.parametrize("target", ["step-1", "./step-1", "absolute"])
def test_ls_lists_a_link_to_a_step_dir_of_another_zero_padding(tmp_path: Path, target: str) -> None:
    """A step dir named with another zero padding (``step-1``), which distckpt reads, keeps
    the links naming it in LINKS, however the link spells its target."""
    root = hostile_cases.make_root(tmp_path / "root")
    os.rename(root / "step-00000001", root / "step-1")
    os.symlink(root / "step-1" if target == "absolute" else target, root / "best")
    table = run("ls", str(root))
    assert table.returncode == 0, table.stderr
    first = table.stdout.splitlines()[1]
    assert first.startswith("1 ") and first.split()[-1] == "best", table.stdout
