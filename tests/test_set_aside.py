"""A restarted job works past a damaged newest checkpoint: the restore that skips it sets it
aside (never deletes it), so the job saves the steps after the one it loaded again.

Real damage on real ranks: a job of 2 ranks saves steps 90 and 100, step 100 is damaged on
disk (or in the object store), and a new job of 2 ranks restores and saves 91..100. A
checkpoint this version cannot judge (an unknown checksum algorithm, a newer format version, a
manifest that cannot be read) is left where it is, and the step rules' refusal names it."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt.cli import main
from distckpt.layout import MANIFEST_NAME, parse_set_aside_name, rank_file_name
from distckpt.objstore import ObjectStore
from distckpt.storage import open_store, open_view
from tests.hostile_cases import edit_manifest
from tests.older_version import run_older_version
from tests.ranks import Collected, run_ranks, values
from tests.s3proxy import S3Proxy
from tests.s3server import S3Server
from tests.test_s3_cli import aws_environment

JOB_TIMEOUT = 120.0
DAMAGED = "step-00000100"


def _weights(step: int, rank: int) -> torch.Tensor:
    return torch.full((256,), float(step * 10 + rank))


def _save_90_and_100(rank: int, world_size: int, root: str, options: dict[str, Any]) -> None:
    with distckpt.CheckpointManager(root, fsync=False, storage_options=options) as manager:
        for step in (90, 100):
            manager.save(step, {"w": _weights(step, rank)})


def _save_90_and_cut_100_short(root: Path) -> None:
    """Steps 90 and 100 saved by one process, step 100's rank file cut short (damage a restore
    is sure of)."""
    with distckpt.CheckpointManager(root, fsync=False) as manager:
        for step in (90, 100):
            manager.save(step, {"w": _weights(step, 0)})
    os.truncate(root / DAMAGED / rank_file_name(0), 100)


def _restart(
    rank: int, world_size: int, root: str, options: dict[str, Any], verify: bool
) -> dict[str, Any]:
    """A requeued job: restore "last", then save 91..100 on its schedule (as a job whose saves
    raise would crash-loop, and whose scheduled save of a committed step 100 would return it),
    and read back what "last" names afterwards."""
    collected = Collected()
    logging.getLogger("distckpt").addHandler(collected)
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(
        root, fsync=False, storage_options=options, every_n_steps=1
    ) as manager:
        restored = manager.restore(state={"w": torch.zeros(256)}, verify=verify)
        assert restored is not None
        out["restored"] = restored.step
        out["steps_after_restore"] = manager.steps()
        if manager.layout is not None:
            out["last_after_restore"] = os.readlink(manager.layout.link_path("last"))
        try:
            out["saved"] = [
                saved.step
                for step in range(91, 101)
                if (saved := manager.save(step, {"w": _weights(step, rank)})) is not None
            ]
        except distckpt.CheckpointError as exc:
            out["save_error"] = (type(exc).__name__, str(exc))
        last = manager.restore(state={"w": torch.zeros(256)}, verify=True)
        assert last is not None
        out["last"] = (last.step, last.state["w"].tolist())
    out["logged"] = [record.getMessage() for record in collected.records]
    return out


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
    values(run_ranks(_save_90_and_100, 2, str(root), {}, timeout=JOB_TIMEOUT))
    do_damage, needs_verify = CONTENT_DAMAGE[damage]
    do_damage(root / DAMAGED)
    damaged_bytes = _tree_digest(root / DAMAGED)

    out = values(run_ranks(_restart, 2, str(root), {}, needs_verify, timeout=JOB_TIMEOUT))

    for rank, rank_out in enumerate(out):
        assert rank_out["restored"] == 90
        assert rank_out["steps_after_restore"] == [90]  # set aside before anything was read
        assert rank_out["last_after_restore"] == "step-00000090"  # moved off it
        assert "save_error" not in rank_out, rank_out.get("save_error")
        assert rank_out["saved"] == list(range(91, 101))
        assert rank_out["last"] == (100, _weights(100, rank).tolist())
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
            manager.save(91, {"w": _weights(91, rank)})
        out["refused"] = str(refused.value)
        out["steps"] = manager.steps()
    return out


@pytest.mark.parametrize("case", sorted(UNJUDGED))
def test_a_newest_checkpoint_that_cannot_be_judged_is_kept_and_the_refusal_names_it(
    root: Path, case: str
) -> None:
    values(run_ranks(_save_90_and_100, 2, str(root), {}, timeout=JOB_TIMEOUT))
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
            manager.save(step, {"w": _weights(step, 0)})
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
            manager.save(91, {"w": _weights(91, 0)})
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
        assert manager.save(100, {"w": _weights(100, 0)}).step == 100
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
            manager.save(91, {"w": _weights(91, rank)})
        out["refused"] = str(refused.value)
        out["steps"] = manager.steps()
        out["saved"] = manager.save(101, {"w": _weights(101, rank)}).step
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
    values(run_ranks(_save_90_and_100, 2, str(root), {}, timeout=JOB_TIMEOUT))
    os.truncate(root / DAMAGED / rank_file_name(1), 100)

    out = values(
        run_ranks(_restart_where_setting_aside_fails, 2, str(root), failure, timeout=JOB_TIMEOUT)
    )

    for rank, rank_out in enumerate(out):
        assert rank_out["restored"] == (90, _weights(90, rank).tolist())
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
        manager.save(100, {"w": _weights(100, 0)})
    (root / DAMAGED / MANIFEST_NAME).unlink()
    with distckpt.CheckpointManager(root, fsync=False) as manager:
        assert manager.restore(state={"w": torch.zeros(256)}, missing_ok=True) is None
        assert manager.steps() == []
        assert manager.save(1, {"w": _weights(1, 0)}).step == 1
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


# --------------------------------------------------------------------------- s3


def _s3_objects(url: str, options: dict[str, Any]) -> dict[str, str]:
    """Every object under the root, by relative name, with its ETag."""
    with ObjectStore(url, options) as store:
        return {info.key: info.etag for info in store.list()}


def _s3_digests(url: str, options: dict[str, Any], prefix: str) -> dict[str, str]:
    """The SHA-256 of each object under ``prefix``, by its name below it."""
    with ObjectStore(url, options) as store:
        return {
            info.key[len(prefix) :]: hashlib.sha256(store.get_bytes(info.key)).hexdigest()
            for info in store.list(prefix)
        }


def test_an_s3_restart_sets_a_damaged_newest_checkpoint_aside_and_saves_past_it(
    s3_server: S3Server, s3_url: str
) -> None:
    pytest.importorskip("botocore")
    options = s3_server.storage_options()
    values(run_ranks(_save_90_and_100, 2, s3_url, options, timeout=JOB_TIMEOUT))
    (rank_file,) = [
        name
        for name in _s3_objects(s3_url, options)
        if name.startswith(f"{DAMAGED}/") and name.endswith(rank_file_name(1))
    ]
    with ObjectStore(s3_url, options) as store:
        store.put_bytes(rank_file, store.get_bytes(rank_file)[:100])  # cut short
    attempt = rank_file.split("/")[1]
    damaged_objects = _s3_digests(s3_url, options, f"{DAMAGED}/{attempt}/")

    out = values(run_ranks(_restart, 2, s3_url, options, False, timeout=JOB_TIMEOUT))

    for rank, rank_out in enumerate(out):
        assert rank_out["restored"] == 90
        assert "save_error" not in rank_out, rank_out.get("save_error")
        assert rank_out["saved"] == list(range(91, 101))
        assert rank_out["last"] == (100, _weights(100, rank).tolist())
    where = f"{s3_url}/damaged-{DAMAGED}-{attempt}"
    assert any(m.startswith("set aside") and where in m for m in out[0]["logged"])
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        manager.gc()  # a set-aside save is no leftover
    # Moved, every byte kept: no step-N/<attempt>/ is left, which any version's cleanup may
    # take for a dead writer's save.
    assert _s3_digests(s3_url, options, f"damaged-{DAMAGED}-{attempt}/") == damaged_objects
    assert not [n for n in _s3_objects(s3_url, options) if n.startswith(f"{DAMAGED}/{attempt}/")]
    report = distckpt.verify(s3_url, storage_options=options)
    assert report.ok and report.set_aside == (where,)


def _run_cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(args), out=out), out.getvalue()


def test_ls_and_verify_list_a_set_aside_checkpoint_as_such(root: Path) -> None:
    _save_90_and_cut_100_short(root)
    with distckpt.CheckpointManager(root, fsync=False) as manager:
        manager.restore(state={"w": torch.zeros(256)})
    (set_aside,) = distckpt.verify(root).set_aside
    status, text = _run_cli("ls", str(root))
    assert status == 0
    assert f"set aside as damaged: {set_aside} (not committed; nothing removes it)" in text
    status, text = _run_cli("ls", str(root), "--json")
    assert status == 0 and json.loads(text)["set_aside"] == [str(set_aside)]
    assert json.loads(text)["damaged_steps"] == []
    status, text = _run_cli("verify", str(root))
    assert status == 0 and f"set aside as damaged (not checked): {set_aside}" in text
    status, text = _run_cli("verify", str(root), "--json")
    assert status == 0 and json.loads(text)["set_aside"] == [str(set_aside)]


def test_an_s3_record_left_by_a_killed_set_aside_goes_with_its_save(
    s3_server: S3Server, s3_url: str
) -> None:
    """A set-aside killed between writing its record and deleting COMMIT leaves both: the
    step stays committed, and once it is deleted (or replaced) its record goes too."""
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        for step in (90, 100):
            manager.save(step, {"w": _weights(step, 0)})
        (commit,) = [n for n in _s3_objects(s3_url, options) if n == f"{DAMAGED}/COMMIT"]
        with ObjectStore(s3_url, options) as store:
            attempt = json.loads(store.get_bytes(commit))["attempt"]
            record = f"damaged-{DAMAGED}-{attempt}"
            store.put_bytes(record, json.dumps({"step": 100, "attempt": attempt}).encode())
        manager.delete(100)
    assert record not in _s3_objects(s3_url, options)
    assert distckpt.verify(s3_url, storage_options=options).set_aside == ()


def _s3_save_90_and_100(url: str, options: dict[str, Any]) -> str:
    """Save steps 90 and 100 in one process; step 100's attempt."""
    with distckpt.CheckpointManager(url, storage_options=options) as manager:
        for step in (90, 100):
            manager.save(step, {"w": _weights(step, 0)})
    with ObjectStore(url, options) as store:
        return str(json.loads(store.get_bytes(f"{DAMAGED}/COMMIT"))["attempt"])


def _s3_save_100_and_kill_its_set_aside(url: str, options: dict[str, Any]) -> tuple[str, str, str]:
    """Save 90 and 100, then leave what a set-aside of 100 killed while it copied leaves: its
    record and one object of the save copied, of several; the save's attempt, the record's
    name and the copied object's."""
    attempt = _s3_save_90_and_100(url, options)
    with ObjectStore(url, options) as store:
        record = f"damaged-{DAMAGED}-{attempt}"
        store.put_bytes(record, json.dumps({"step": 100, "attempt": attempt}).encode())
        first, *rest = store.list(f"{DAMAGED}/{attempt}/")
        assert rest  # a part of the copy, not all of it
        copied = f"{record}/{first.key.rpartition('/')[2]}"
        store.copy(first.key, copied, first.size)
    return attempt, record, copied


@pytest.mark.parametrize("removal", ["delete", "replace"])
def test_an_s3_step_whose_set_aside_was_killed_then_removed_leaves_no_set_aside_copy(
    s3_server: S3Server, s3_url: str, removal: str
) -> None:
    """A set-aside killed with its record written and part of its copy made, then the step
    deleted or replaced by a job killed before its tidy() deleted the objects: nothing is
    listed as set aside, and the next start deletes the part of the copy, not completes it."""
    pytest.importorskip("botocore")
    direct = s3_server.storage_options()
    attempt, set_aside, _ = _s3_save_100_and_kill_its_set_aside(s3_url, direct)
    with S3Proxy(s3_server.port) as proxy:
        # tidy's deletes refused: what a job killed before its tidy leaves
        proxy.fail("POST", "?delete", body_parts=(DAMAGED.encode(),), times=100)
        options = s3_server.storage_options(endpoint_url=proxy.endpoint, retries=1)
        with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
            if removal == "delete":
                manager.delete(100)
            else:
                manager.save(100, {"w": _weights(101, 0)}, overwrite=True)
    assert [n for n in _s3_objects(s3_url, direct) if n.startswith(set_aside)] != []
    assert distckpt.verify(s3_url, storage_options=direct).set_aside == ()
    with distckpt.CheckpointManager(s3_url, storage_options=direct) as manager:
        assert sorted(manager.gc()) == [f"{s3_url}/{set_aside}", f"{s3_url}/{DAMAGED}/{attempt}"]
    left = _s3_objects(s3_url, direct)
    assert [n for n in left if n.startswith((set_aside, f"{DAMAGED}/{attempt}/"))] == []
    assert distckpt.verify(s3_url, storage_options=direct).set_aside == ()


def test_an_s3_delete_that_failed_after_dropping_the_set_aside_record_leaves_the_copy_made(
    s3_server: S3Server, s3_url: str
) -> None:
    """A delete that dropped the record of a killed set-aside but not the step's COMMIT: the
    step is still committed, and the part of the copy made is no leftover (the next restore's
    set-aside goes on with it)."""
    pytest.importorskip("botocore")
    direct = s3_server.storage_options()
    _, set_aside, copied = _s3_save_100_and_kill_its_set_aside(s3_url, direct)
    with S3Proxy(s3_server.port) as proxy:
        proxy.fail("DELETE", f"{DAMAGED}/COMMIT", times=100)
        options = s3_server.storage_options(endpoint_url=proxy.endpoint, retries=1)
        with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
            with pytest.raises(distckpt.CheckpointError):
                manager.delete(100)
            assert manager.gc() == []
    assert set_aside not in _s3_objects(s3_url, direct)
    assert copied in _s3_objects(s3_url, direct)
    assert open_view(s3_url, storage_options=direct).committed_steps() == [90, 100]


def test_retention_and_gc_leave_a_set_aside_checkpoint(root: Path) -> None:
    _save_90_and_cut_100_short(root)
    with distckpt.CheckpointManager(root, fsync=False, keep_last=1) as manager:
        manager.restore(state={"w": torch.zeros(256)})
        (set_aside,) = distckpt.verify(root).set_aside
        for step in range(91, 102):
            manager.save(step, {"w": _weights(step, 0)})
        assert manager.steps() == [101]
        assert manager.gc() == [] and manager.prune() == []
    assert Path(set_aside).is_dir() and distckpt.verify(root).set_aside == (set_aside,)
    # Renamed back by hand, it is a (damaged) committed checkpoint again.
    Path(set_aside).rename(root / DAMAGED)
    with distckpt.CheckpointManager(root, fsync=False, read_only=True) as manager:
        assert manager.steps() == [100, 101]


# ------------------------------------------------------------- s3, with an older version


def _older_version_starts(older: Path, url: str, options: dict[str, Any]) -> None:
    """An older version's writing manager opens the root (its start removes what it takes
    for leftovers), runs gc, and closes: in a process of its own, importing that version."""
    code = (
        "import json\n"
        "url, options = json.loads(sys.argv[1])\n"
        "manager = distckpt.CheckpointManager(url, storage_options=options)\n"
        "manager.gc()\n"
        "manager.close()\n"
    )
    run_older_version(older, code, url, options)


def _s3_save_90_and_damaged_100(url: str, options: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """Steps 90 and 100 saved by one process, step 100's rank file cut short: its attempt,
    and the digests of its objects."""
    attempt = _s3_save_90_and_100(url, options)
    with ObjectStore(url, options) as store:
        rank_file = f"{DAMAGED}/{attempt}/{rank_file_name(0)}"
        store.put_bytes(rank_file, store.get_bytes(rank_file)[:100])
    return attempt, _s3_digests(url, options, f"{DAMAGED}/{attempt}/")


def _assert_set_aside_whole(
    url: str, options: dict[str, Any], attempt: str, digests: dict[str, str]
) -> None:
    """Step 100's save is set aside with every byte, listed as such, and no longer under a
    ``step-N/`` prefix."""
    assert _s3_digests(url, options, f"damaged-{DAMAGED}-{attempt}/") == digests
    assert not [name for name in _s3_objects(url, options) if name.startswith(f"{DAMAGED}/")]
    report = distckpt.verify(url, storage_options=options)
    assert report.ok and report.set_aside == (f"{url}/damaged-{DAMAGED}-{attempt}",)


def test_an_older_versions_start_and_gc_leave_an_s3_set_aside_save(
    s3_server: S3Server, s3_url: str, older_distckpt: Path
) -> None:
    options = s3_server.storage_options()
    attempt, digests = _s3_save_90_and_damaged_100(s3_url, options)
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        restored = manager.restore(state={"w": torch.zeros(256)})
        assert restored is not None and restored.step == 90
    _assert_set_aside_whole(s3_url, options, attempt, digests)

    _older_version_starts(older_distckpt, s3_url, options)

    _assert_set_aside_whole(s3_url, options, attempt, digests)


def _kill_this_process(*args: Any, **kwargs: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize(
    ("killed", "older_starts_next"),
    [("while-copying", False), ("after-unpublishing", False), ("after-unpublishing", True)],
    ids=["while-copying", "after-unpublishing", "after-unpublishing-older-starts-next"],
)
def test_an_s3_set_aside_killed_midway_is_completed_and_loses_nothing(
    s3_server: S3Server, s3_url: str, older_distckpt: Path, killed: str, older_starts_next: bool
) -> None:
    """SIGKILLed after copying one object (step 100 still committed: the next restart sets it
    aside again, copying the rest) or after deleting COMMIT (the copy whole: the next start
    deletes the originals), then restarted by this version, or first started by an older one,
    which deletes the originals as a dead writer's save: harmless, they were copied. (Killed
    while copying, the step is still committed, which every version's start leaves alone.)"""
    options = s3_server.storage_options()
    attempt, digests = _s3_save_90_and_damaged_100(s3_url, options)
    child = os.fork()
    if child == 0:  # pragma: no cover - the child is killed
        if killed == "while-copying":
            copy = ObjectStore.copy
            copies: list[str] = []

            def copy_once_then_die(self: ObjectStore, source: str, target: str, size: int) -> None:
                if copies:
                    _kill_this_process()
                copies.append(source)
                copy(self, source, target, size)

            ObjectStore.copy = copy_once_then_die  # type: ignore[method-assign]
        else:
            from distckpt.storage.s3_upkeep import Upkeep

            Upkeep._delete_prefix = _kill_this_process  # type: ignore[method-assign]
        with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
            manager.restore(state={"w": torch.zeros(256)})
        os._exit(0)
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    committed = killed == "while-copying"
    assert (f"{DAMAGED}/COMMIT" in _s3_objects(s3_url, options)) == committed

    if older_starts_next:
        _older_version_starts(older_distckpt, s3_url, options)
    # this version's restart: it takes the lease the killed job held (a dead process here)
    with distckpt.CheckpointManager(s3_url, storage_options=options, wait_for_root=30) as manager:
        restored = manager.restore(state={"w": torch.zeros(256)})
        assert restored is not None and restored.step == 90
        assert manager.steps() == [90]

    _assert_set_aside_whole(s3_url, options, attempt, digests)


def _requests_sent(store: ObjectStore, operation: str) -> list[dict[str, Any]]:
    """The parameters of each ``operation`` request (botocore's name, e.g. ``CopyObject``)
    that ``store``'s client sends from now on (their API parameters), by botocore's own event
    hook: the requests are real."""
    sent: list[dict[str, Any]] = []
    store.client.meta.events.register(
        f"before-parameter-build.s3.{operation}", lambda params, **_: sent.append(dict(params))
    )
    return sent


def test_an_s3_set_aside_out_of_its_budget_stays_committed_and_is_continued_later(
    s3_server: S3Server,
    s3_url: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A copy that does not finish within the store's budget (half the manager's timeout:
    the other ranks wait for it in the restore's collective) leaves the step committed, with a
    warning; ls and verify do not list it as set aside; the next set-aside copies only what
    is missing."""
    options = s3_server.storage_options()
    attempt, digests = _s3_save_90_and_damaged_100(s3_url, options)
    location = f"{s3_url}/{DAMAGED}"
    with distckpt.CheckpointManager(s3_url, storage_options=options, timeout=40) as manager:
        assert manager._store.set_aside_budget == 20.0  # type: ignore[attr-defined]

    store = open_store(s3_url, storage_options=options, lock_timeout=0.0)  # no time to copy
    store.open()
    try:
        with caplog.at_level(logging.WARNING, logger="distckpt"):
            assert store.set_aside(100, location) is None
    finally:
        store.close()
    assert any("did not finish within" in r.getMessage() for r in caplog.records)
    objects = _s3_objects(s3_url, options)
    assert f"{DAMAGED}/COMMIT" in objects and f"damaged-{DAMAGED}-{attempt}" in objects
    # the record is there, the step still committed: not listed as set aside
    assert distckpt.verify(s3_url, storage_options=options).set_aside == ()
    for name, value in aws_environment(s3_server).items():  # what the CLI's client reads
        monkeypatch.setenv(name, value)
    status, text = _run_cli("ls", s3_url)
    assert status == 0 and "set aside" not in text and "DAMAGED" in text

    # one object copied before (a set-aside that ran out of time, or was killed)
    first = sorted(digests)[0]
    with ObjectStore(s3_url, options) as client:
        source = f"{DAMAGED}/{attempt}/{first}"
        client.copy(source, f"damaged-{DAMAGED}-{attempt}/{first}", client.head(source).size)
    store = open_store(s3_url, storage_options=options, lock_timeout=60.0)
    store.open()
    try:
        copies = _requests_sent(store.s3.client, "CopyObject")  # type: ignore[attr-defined]
        assert store.set_aside(100, location) == f"{s3_url}/damaged-{DAMAGED}-{attempt}"
    finally:
        store.close()
    assert len(copies) == len(digests) - 1
    _assert_set_aside_whole(s3_url, options, attempt, digests)


def test_listing_s3_set_aside_saves_reads_their_records_not_their_copies(
    s3_server: S3Server, s3_url: str
) -> None:
    options = s3_server.storage_options()
    attempt, digests = _s3_save_90_and_damaged_100(s3_url, options)
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        manager.restore(state={"w": torch.zeros(256)})
    view = open_view(s3_url, storage_options=options)
    client = view.s3.client  # type: ignore[attr-defined]
    listings = _requests_sent(client, "ListObjectsV2")
    keys_listed: list[str] = []
    client.client.meta.events.register(
        "after-call.s3.ListObjectsV2",
        lambda parsed, **_: keys_listed.extend(item["Key"] for item in parsed.get("Contents", [])),
    )
    assert view.set_aside_checkpoints() == [f"{s3_url}/damaged-{DAMAGED}-{attempt}"]
    assert listings and all(params.get("Delimiter") == "/" for params in listings)
    copied = [key for key in keys_listed if f"damaged-{DAMAGED}-{attempt}/" in key]
    assert copied == [] and digests  # the copy is there, never listed


def test_an_s3_set_aside_copies_the_objects_of_a_save_at_once(
    s3_server: S3Server, s3_url: str
) -> None:
    """While one object's copy is held back, another's goes through: the copies run side by
    side (``max_concurrency`` at a time), not one after another."""
    options = s3_server.storage_options()
    attempt, digests = _s3_save_90_and_damaged_100(s3_url, options)
    assert len(digests) >= 2
    copy_prefix = f"damaged-{DAMAGED}-{attempt}/"
    with S3Proxy(s3_server.port) as proxy:
        held = proxy.hold("PUT", copy_prefix)
        store = open_store(
            s3_url, storage_options={**options, "endpoint_url": proxy.endpoint}, lock_timeout=60
        )
        store.open()
        try:
            with ThreadPoolExecutor(1) as setting_aside:
                where = setting_aside.submit(store.set_aside, 100, f"{s3_url}/{DAMAGED}")
                assert held.arrived.wait(JOB_TIMEOUT)
                # another copy is answered while the first is held
                assert proxy.wait_for("PUT", copy_prefix, timeout=JOB_TIMEOUT)
                held.release()
                assert where.result(JOB_TIMEOUT) == f"{s3_url}/damaged-{DAMAGED}-{attempt}"
        finally:
            held.release()
            store.close()
    _assert_set_aside_whole(s3_url, options, attempt, digests)
