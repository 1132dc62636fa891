"""A restarted job works past a damaged newest checkpoint: the restore that skips it sets it
aside (never deletes it), so the job saves the steps after the one it loaded again.

Real damage on real ranks: a job of 2 ranks saves steps 90 and 100, step 100 is damaged on
disk (or in the object store), and a new job of 2 ranks restores and saves 91..100. A
checkpoint this version cannot judge (an unknown checksum algorithm, a newer format version, a
manifest that cannot be read) is left where it is, and the step rules' refusal names it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt.layout import MANIFEST_NAME, parse_set_aside_name, rank_file_name
from tests.hostile_cases import edit_manifest
from tests.ranks import Collected, run_ranks, values
from tests.set_aside_jobs import DAMAGED, JOB_TIMEOUT, restart, run_cli, save_90_and_100, weights


def _save_90_and_cut_100_short(root: Path) -> None:
    """Steps 90 and 100 saved by one process, step 100's rank file cut short (damage a restore
    is sure of)."""
    with distckpt.CheckpointManager(root, fsync=False) as manager:
        for step in (90, 100):
            manager.save(step, {"w": weights(step, 0)})
    os.truncate(root / DAMAGED / rank_file_name(0), 100)


def _tree_digest(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` by relative name, with the SHA-256 of its bytes."""
    return {
        path.relative_to(directory).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def _edit_manifest(step_dir: Path, **changes: Any) -> None:
    edit_manifest(step_dir, lambda data: data.update(changes))


def _flip_a_byte(path: Path) -> None:
    """One byte changed, the size kept: only a checksum sees it."""
    data = bytearray(path.read_bytes())
    data[len(data) - 8] ^= 0x40
    path.write_bytes(bytes(data))


def _symlink_rank_file(step_dir: Path) -> None:
    """The rank file replaced by a symlink to an identical copy beside the dir."""
    rank_file = step_dir / rank_file_name(0)
    copy = step_dir.parent.parent / "copy.pt"
    rank_file.rename(copy)
    rank_file.symlink_to(copy)


#: Damage this version is sure of, done to step 100's dir, and whether only a restore with
#: verify=True sees it.
CONTENT_DAMAGE = {
    "rank-file-cut-short": (lambda d: os.truncate(d / rank_file_name(1), 100), False),
    "rank-file-missing": (lambda d: (d / rank_file_name(0)).unlink(), False),
    "manifest-garbled": (lambda d: (d / MANIFEST_NAME).write_bytes(b'{"step": 10'), False),
    "byte-flipped": (lambda d: _flip_a_byte(d / rank_file_name(0)), True),
}


@pytest.mark.parametrize("damage", sorted(CONTENT_DAMAGE))
def test_a_restart_sets_a_damaged_newest_checkpoint_aside_and_saves_past_it(
    root: Path, damage: str
) -> None:
    values(run_ranks(save_90_and_100, 2, str(root), {}, timeout=JOB_TIMEOUT))
    do_damage, needs_verify = CONTENT_DAMAGE[damage]
    do_damage(root / DAMAGED)
    damaged_bytes = _tree_digest(root / DAMAGED)

    out = values(run_ranks(restart, 2, str(root), {}, needs_verify, timeout=JOB_TIMEOUT))

    for rank, rank_out in enumerate(out):
        assert rank_out["restored"] == 90
        assert rank_out["steps_after_restore"] == [90]  # set aside before anything was read
        assert rank_out["last_after_restore"] == "step-00000090"  # moved off it
        assert "save_error" not in rank_out, rank_out.get("save_error")
        assert rank_out["saved"] == list(range(91, 101))
        assert rank_out["last"] == (100, weights(100, rank).tolist())
    (set_aside,) = [entry for entry in root.iterdir() if parse_set_aside_name(entry.name)]
    assert parse_set_aside_name(set_aside.name) == (100, set_aside.name.rsplit("-", 1)[1])
    assert _tree_digest(set_aside) == damaged_bytes  # every byte kept, nothing added
    assert os.readlink(root / "last") == DAMAGED  # the new step 100
    warned = [m for m in out[0]["logged"] if m.startswith("set aside")]
    assert len(warned) == 1 and str(set_aside) in warned[0] and str(root / DAMAGED) in warned[0]
    assert not [m for m in out[1]["logged"] if m.startswith("set aside")]  # rank 0 decides
    report = distckpt.verify(root)
    assert report.ok and report.set_aside == (set_aside,)
    assert f"set aside as damaged (not checked): {set_aside}" in str(report)


#: Checkpoints this version cannot judge, done to step 100's dir (it may be whole), whether
#: the restore that skips it verifies checksums, and what the refusal of step 91 says.
UNJUDGED = {
    "unknown-checksum-algorithm": (
        lambda d: _edit_manifest(d, checksum_algorithm="md4"),
        True,
        "'md4'",
    ),
    "manifest-unreadable": (
        # a read that fails for another reason than a missing file (EISDIR here, EIO alike)
        lambda d: ((d / MANIFEST_NAME).unlink(), (d / MANIFEST_NAME).mkdir()),
        False,
        "could not be judged",
    ),
    "unknown-format": (
        lambda d: _edit_manifest(d, format="pickle-jar"),
        False,
        "could not be judged",
    ),
    "rank-file-symlinked": (_symlink_rank_file, False, "could not be judged"),
}


def _restart_where_100_cannot_be_judged(
    rank: int, world_size: int, root: str, verify: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, fsync=False) as manager:
        restored = manager.restore(state={"w": torch.zeros(256)}, verify=verify)
        out["restored"] = restored.step if restored is not None else None
        with pytest.raises(distckpt.InvalidStep) as refused:
            manager.save(91, {"w": weights(91, rank)})
        out["refused"] = str(refused.value)
        out["steps"] = manager.steps()
    return out


@pytest.mark.parametrize("case", sorted(UNJUDGED))
def test_a_newest_checkpoint_that_cannot_be_judged_is_kept_and_the_refusal_names_it(
    root: Path, case: str
) -> None:
    values(run_ranks(save_90_and_100, 2, str(root), {}, timeout=JOB_TIMEOUT))
    do_damage, verify, says = UNJUDGED[case]
    do_damage(root / DAMAGED)

    out = values(
        run_ranks(_restart_where_100_cannot_be_judged, 2, str(root), verify, timeout=JOB_TIMEOUT)
    )

    for rank_out in out:
        assert rank_out["restored"] == 90
        assert rank_out["steps"] == [90, 100]
        refused = rank_out["refused"]
        assert "lower than the newest committed step 100" in refused
        assert str(root / DAMAGED) in refused and says in refused, refused
    assert not [entry for entry in root.iterdir() if parse_set_aside_name(entry.name)]


def test_a_newest_checkpoint_of_a_newer_format_version_is_kept(root: Path) -> None:
    """Not skipped at all: a writing job cannot even open the root, and is told to upgrade."""
    with distckpt.CheckpointManager(root, fsync=False) as manager:
        for step in (90, 100):
            manager.save(step, {"w": weights(step, 0)})
    _edit_manifest(root / DAMAGED, format_version=999, library_version="9.0")
    with pytest.raises(distckpt.UnsupportedVersion, match="upgrade distckpt"):
        distckpt.CheckpointManager(root, fsync=False)
    assert (root / DAMAGED).is_dir()
    assert not [entry for entry in root.iterdir() if parse_set_aside_name(entry.name)]


def test_a_damaged_newer_checkpoint_not_set_aside_is_named_by_the_refusal(root: Path) -> None:
    """Restored by its step, nothing is skipped and nothing set aside: the refusal of a lower
    step says the newer one is damaged and how to get past it."""
    _save_90_and_cut_100_short(root)
    with distckpt.CheckpointManager(root, fsync=False) as manager:
        manager.restore(90, state={"w": torch.zeros(256)})
        with pytest.raises(distckpt.InvalidStep) as refused:
            manager.save(91, {"w": weights(91, 0)})
    message = str(refused.value)
    assert f"{root / DAMAGED} is damaged" in message and "truncated" in message
    assert "restore('last') by a manager that can write sets it aside" in message


def test_a_job_killed_while_setting_aside_leaves_it_for_the_next_restore(root: Path) -> None:
    """Killed (SIGKILL) after moving the links off the damaged checkpoint and before renaming
    it: the checkpoint is still committed and damaged, and the next restart sets it aside."""
    _save_90_and_cut_100_short(root)
    child = os.fork()
    if child == 0:  # pragma: no cover - the child is killed
        from distckpt.storage import posix_removal

        def killed(*args: Any, **kwargs: Any) -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        posix_removal.rename_dir = killed  # type: ignore[assignment]
        with distckpt.CheckpointManager(root, fsync=False) as manager:
            manager.restore(state={"w": torch.zeros(256)})
        os._exit(0)
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    assert os.readlink(root / "last") == "step-00000090"  # moved off it before the kill
    assert (root / DAMAGED).is_dir() and distckpt.verify(root).set_aside == ()

    with distckpt.CheckpointManager(root, fsync=False, wait_for_root=30) as manager:
        restored = manager.restore(state={"w": torch.zeros(256)})
        assert restored is not None and restored.step == 90
        assert manager.steps() == [90]
        assert manager.save(100, {"w": weights(100, 0)}).step == 100
    (set_aside,) = distckpt.verify(root).set_aside
    assert parse_set_aside_name(set_aside.name)[0] == 100


def _restart_where_setting_aside_fails(
    rank: int, world_size: int, root: str, failure: BaseException
) -> dict[str, Any]:
    """A requeued job whose rank 0 fails to rename the damaged checkpoint with ``failure``: the
    restore goes on, and the ranks' later calls agree."""
    from distckpt.storage import posix_removal

    def failing_rename(*args: Any, **kwargs: Any) -> None:
        raise failure

    # The failure is injected (no real filesystem raises a RuntimeError from a rename): the
    # code around it, the ranks and their collectives are real.
    posix_removal.rename_dir = failing_rename  # type: ignore[assignment]
    collected = Collected()
    logging.getLogger("distckpt").addHandler(collected)
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, fsync=False, timeout=JOB_TIMEOUT / 4) as manager:
        restored = manager.restore(state={"w": torch.zeros(256)})
        assert restored is not None
        out["restored"] = (restored.step, restored.state["w"].tolist())
        with pytest.raises(distckpt.InvalidStep) as refused:
            manager.save(91, {"w": weights(91, rank)})
        out["refused"] = str(refused.value)
        out["steps"] = manager.steps()
        out["saved"] = manager.save(101, {"w": weights(101, rank)}).step
    out["errors"] = [
        (record.getMessage(), record.exc_info is not None)
        for record in collected.records
        if record.levelno >= logging.ERROR
    ]
    return out


@pytest.mark.parametrize(
    "failure",
    [OSError(5, "injected EIO"), RuntimeError("injected bug")],
    ids=["os-error", "bug"],
)
def test_a_failure_to_set_aside_is_logged_and_the_restore_goes_on_in_step(
    root: Path, failure: BaseException
) -> None:
    values(run_ranks(save_90_and_100, 2, str(root), {}, timeout=JOB_TIMEOUT))
    os.truncate(root / DAMAGED / rank_file_name(1), 100)

    out = values(
        run_ranks(_restart_where_setting_aside_fails, 2, str(root), failure, timeout=JOB_TIMEOUT)
    )

    for rank, rank_out in enumerate(out):
        assert rank_out["restored"] == (90, weights(90, rank).tolist())
        assert "lower than the newest committed step 100" in rank_out["refused"]
        assert rank_out["steps"] == [90, 100]
        assert rank_out["saved"] == 101
    (logged, with_traceback), *others = out[0]["errors"]
    assert not others and with_traceback
    assert "could not set aside" in logged and type(failure).__name__ in logged
    assert str(failure) in logged
    assert out[1]["errors"] == []  # rank 0 alone sets aside
    assert (root / DAMAGED).is_dir()


def test_with_nothing_intact_to_load_every_damaged_checkpoint_is_set_aside(root: Path) -> None:
    """``restore(missing_ok=True)`` loads nothing when the only checkpoint is damaged; the
    job starts over from step 1, which is saved."""
    with distckpt.CheckpointManager(root, fsync=False) as manager:
        manager.save(100, {"w": weights(100, 0)})
    (root / DAMAGED / MANIFEST_NAME).unlink()
    with distckpt.CheckpointManager(root, fsync=False) as manager:
        assert manager.restore(state={"w": torch.zeros(256)}, missing_ok=True) is None
        assert manager.steps() == []
        assert manager.save(1, {"w": weights(1, 0)}).step == 1
    assert len(distckpt.verify(root).set_aside) == 1


def test_a_read_only_manager_never_sets_aside(root: Path) -> None:
    _save_90_and_cut_100_short(root)
    with distckpt.CheckpointManager(root, read_only=True) as manager:
        restored = manager.restore(state={"w": torch.zeros(256)})
        assert restored is not None and restored.step == 90
        assert manager.steps() == [90, 100]
    assert sorted(entry.name for entry in root.iterdir() if not entry.name.startswith(".")) == [
        "last",
        "step-00000090",
        DAMAGED,
    ]


def test_a_damaged_checkpoint_of_another_root_is_not_set_aside(root: Path, tmp_path: Path) -> None:
    """A restore of a path into another root skips what that root holds damaged; this
    manager's store is not that root's, so it leaves it alone."""
    other = tmp_path / "other"
    _save_90_and_cut_100_short(other)
    with distckpt.CheckpointManager(root, fsync=False) as manager:
        restored = manager.restore(other, state={"w": torch.zeros(256)})
        assert restored is not None and restored.step == 90
    assert (other / DAMAGED).is_dir()


def test_a_resume_through_a_symlink_to_the_root_sets_the_damaged_newer_one_aside(
    root: Path, tmp_path: Path
) -> None:
    """The resume may name this root by a path through a symlink to it: the damaged newer
    checkpoint it skips is still this root's, and is set aside (it used to stay committed,
    and the job's save of step 100 then returned the damaged checkpoint)."""
    _save_90_and_cut_100_short(root)
    alias = tmp_path / "alias"
    alias.symlink_to(root)
    with distckpt.CheckpointManager(root, fsync=False) as manager:
        restored = manager.restore(f"{alias}/last", state={"w": torch.zeros(256)}, verify=True)
        assert restored is not None and restored.step == 90
        assert manager.steps() == [90]
        assert manager.save(100, {"w": weights(100, 0)}).step == 100
        assert torch.equal(manager.restore(100, verify=True).state["w"], weights(100, 0))
    assert len(distckpt.verify(root).set_aside) == 1


def test_ls_and_verify_list_a_set_aside_checkpoint_as_such(root: Path) -> None:
    _save_90_and_cut_100_short(root)
    with distckpt.CheckpointManager(root, fsync=False) as manager:
        manager.restore(state={"w": torch.zeros(256)})
    (set_aside,) = distckpt.verify(root).set_aside
    status, text = run_cli("ls", str(root))
    assert status == 0
    assert f"set aside as damaged: {set_aside} (not committed; nothing removes it)" in text
    status, text = run_cli("ls", str(root), "--json")
    assert status == 0 and json.loads(text)["set_aside"] == [str(set_aside)]
    assert json.loads(text)["damaged_steps"] == []
    status, text = run_cli("verify", str(root))
    assert status == 0 and f"set aside as damaged (not checked): {set_aside}" in text
    status, text = run_cli("verify", str(root), "--json")
    assert status == 0 and json.loads(text)["set_aside"] == [str(set_aside)]


def test_retention_and_gc_leave_a_set_aside_checkpoint(root: Path) -> None:
    _save_90_and_cut_100_short(root)
    with distckpt.CheckpointManager(root, fsync=False, keep_last=1) as manager:
        manager.restore(state={"w": torch.zeros(256)})
        (set_aside,) = distckpt.verify(root).set_aside
        for step in range(91, 102):
            manager.save(step, {"w": weights(step, 0)})
        assert manager.steps() == [101]
        assert manager.gc() == [] and manager.prune() == []
    assert Path(set_aside).is_dir() and distckpt.verify(root).set_aside == (set_aside,)
    # Renamed back by hand, it is a (damaged) committed checkpoint again.
    Path(set_aside).rename(root / DAMAGED)
    with distckpt.CheckpointManager(root, fsync=False, read_only=True) as manager:
        assert manager.steps() == [100, 101]


def test_a_damaged_checkpoint_older_than_the_one_best_loads_stays_committed(root: Path) -> None:
    """Only damage newer than what a restore loads blocks the saves after it: a best whose
    bytes a checksum finds changed, which ``restore("best", verify=True)`` falls back past to a
    newer checkpoint, is not set aside (the start's link repair, checking sizes only, left
    ``best`` naming it)."""
    with distckpt.CheckpointManager(root, fsync=False, monitor="loss") as manager:
        for step, loss in ((90, 0.1), (95, 0.5), (100, 0.9)):
            manager.save(step, {"w": weights(step, 0)}, metrics={"loss": loss})
    _flip_a_byte(root / "step-00000090" / rank_file_name(0))
    with distckpt.CheckpointManager(root, fsync=False, monitor="loss") as manager:
        restored = manager.restore("best", state={"w": torch.zeros(256)}, verify=True)
        assert restored is not None and restored.step == 95
        assert manager.steps() == [90, 95, 100]
    assert (root / "step-00000090").is_dir()
    assert distckpt.verify(root).set_aside == ()
