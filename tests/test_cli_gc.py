"""``distckpt gc ROOT`` on a local root: only dead writers' leftovers removed, reported once
they are deleted, a large one deleted outside the commit lock, and what ``--force`` changes;
a leftover whose writer lock cannot be probed (a read-only mount) is kept and listed as such."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import distckpt
from distckpt.cli import main
from tests.filesystems import MountFactory, immutable
from tests.test_cli import root, run

__all__ = ["root"]  # the fixture, shared with tests/test_cli.py


def test_gc_removes_dead_writers_only(root: Path) -> None:
    import filelock

    dead = root / ".staging" / "step-00000040.dead"
    live = root / ".staging" / "step-00000040.live"
    dead.mkdir(parents=True)
    live.mkdir()
    lock = filelock.FileLock(str(live) + ".lock")
    lock.acquire()
    try:
        out = run("gc", str(root), "--json")
        assert out.returncode == 0, out.stderr
        assert not dead.exists() and live.exists()
    finally:
        lock.release()


def test_gc_force_reports_no_kept_because_it_did_not_apply(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where locks are local to each machine and the lease record names a holder on another
    machine, gc keeps that holder's possible staging and says why (``kept_because``);
    ``gc --force`` removes it, and what it still leaves (a staging dir holding a file a reader
    has open) is reported with the reason that applied, never the one --force overrode."""
    import distckpt.lease
    from distckpt.layout import RootLayout
    from distckpt.lease import this_host
    from tests.test_lease import _record_as_another_machine

    _record_as_another_machine(root, host=this_host() + "-node-b")
    staging_root = RootLayout(root).staging_root
    in_use = staging_root / "step-00000002.deadbeef-1"
    in_use.mkdir(parents=True)
    (in_use / ".nfs0000001").write_bytes(b"x")  # a deleted file a reader still holds open
    dead = staging_root / "step-00000003.cafe-1"
    dead.mkdir()
    # No NFS or Lustre driver here, so no mount whose locks are local to each machine can be
    # made (see tests/test_lease.py); the parsing that detects one is tested there on its own.
    monkeypatch.setattr(distckpt.lease, "locks_local_to_machine", lambda path: True)

    def gc(*options: str) -> tuple[int, str]:
        out = io.StringIO()
        return main(["gc", *options, os.fspath(root)], out=out), out.getvalue()

    status, said = gc("--json")
    assert status == 1  # a leftover in use
    report = json.loads(said)
    assert report["removed"] == []
    assert {Path(item["path"]).name for item in report["left"]} == {in_use.name, dead.name}
    assert all("local to each machine" in item["kept_because"] for item in report["left"])

    status, said = gc("--json", "--force")
    assert status == 1
    report = json.loads(said)
    assert report["removed"] == [os.fspath(dead)]
    assert report["left"] == [
        {
            "path": os.fspath(in_use),
            "kind": "staging",
            "writer_alive": False,
            "in_use": True,
            "kept_because": None,
        }
    ]
    status, said = gc("--force")
    assert status == 1 and said == f"left {in_use} (in use; retried later)\n"


def test_gc_reports_a_dead_writers_staging_dir_removed_only_once_deleted(root: Path) -> None:
    """A dead writer's staging dir goes into the trash, then is deleted; where the delete
    fails, gc reports what is left in the trash, not the staging dir as removed."""
    dead = root / ".staging" / "step-00000040.dead"
    (dead / "rank").mkdir(parents=True)
    undeletable = dead / "rank" / "shard.pt"
    undeletable.write_bytes(b"x")
    # immutable: its dir can still be moved into the trash, but the file cannot be deleted
    with immutable(undeletable, may_move_under=root / ".trash"):
        out = run("gc", str(root), "--json")
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert os.fspath(dead) not in report["removed"] and not dead.exists()
        left = [item["path"] for item in report["left"] if item["kind"] == "trash"]
        assert [Path(path).name.startswith(dead.name + ".") for path in left] == [True]
    out = run("gc", str(root), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"removed": left, "left": []}


_SAVING_JOB = """
import json, sys, time
from pathlib import Path
import torch, distckpt

root, lock_timeout, stop = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3])
# bounded: a test killed outright never creates the stop file, and the job must not save
# forever
deadline = time.monotonic() + 300
with distckpt.CheckpointManager(root, timeout=lock_timeout, keep_last=2, fsync=False) as mgr:
    step = 100
    while not stop.exists() and time.monotonic() < deadline:
        step += 1
        began = time.monotonic()
        try:
            mgr.save(step, {"w": torch.zeros(4)})
            error = None
        except distckpt.CheckpointError as exc:
            error = f"{type(exc).__name__}: {exc}"
        print(json.dumps({"began": began, "ended": time.monotonic(), "error": error}), flush=True)
        time.sleep(0.05)
"""

#: files in the dead writer's staging dir: their deletion takes about a second (1.3 s here),
#: several times the lock timeout of the job below
_DEAD_SAVE_FILES = 30_000


def _dead_writers_staging_dir(root: Path, scratch: Path) -> Path:
    """A large save's staging dir whose writer died (no writer lock), moved into ``.staging``
    in one rename once complete. Its files are hard links of one empty file: as many names
    to delete as a sharded save's, made in a fraction of the time."""
    building = scratch / "dead-save"
    building.mkdir()
    first = building / "rank-00000.pt"
    first.touch()
    for index in range(1, _DEAD_SAVE_FILES):
        os.link(first, building / f"rank-{index:05d}.pt")
    staging = root / ".staging" / "step-00000099.0123456789ab"
    building.rename(staging)
    return staging


def test_gc_deletes_a_dead_writers_large_staging_dir_outside_the_commit_lock(
    tmp_path: Path,
) -> None:
    """`distckpt gc` next to a live job, with a dead writer's staging dir whose deletion takes
    about a second: every save the job makes meanwhile, with a commit lock timeout of 0.25 s
    (half its ``timeout``), takes the lock and succeeds (gc only renames the dir into the trash
    under the lock, and deletes it after)."""
    root, stop = tmp_path / "root", tmp_path / "stop"
    job = subprocess.Popen(
        [sys.executable, "-c", _SAVING_JOB, os.fspath(root), "0.5", os.fspath(stop)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert job.stdout is not None
        first = json.loads(job.stdout.readline())  # opened and saved once
        assert first["error"] is None, first
        dead = _dead_writers_staging_dir(root, tmp_path)
        gc_began = time.monotonic()
        out = run("gc", os.fspath(root))
        gc_ended = time.monotonic()
        assert out.returncode == 0, out.stderr
        assert f"removed {dead}" in out.stdout and not dead.exists()
        time.sleep(0.5)  # a save or two after the gc
        stop.touch()
        saves = [json.loads(line) for line in job.stdout]
    finally:
        stop.touch()
        job.wait(timeout=120)
    assert job.returncode == 0
    during = [save for save in saves if save["began"] < gc_ended and save["ended"] > gc_began]
    assert during, "no save ran while gc did: the test proves nothing"
    assert [save["error"] for save in saves if save["error"]] == []
    assert list((root / ".trash").iterdir()) == []


def test_gc_leaves_a_leftover_whose_writer_lock_cannot_be_probed(root: Path) -> None:
    """A writer lock file nobody can open for writing (immutable here: EPERM even for root,
    as EROFS on a read-only mount) tells nothing of its writer: gc and ls say so, and gc
    leaves the staging dir and its lock where they are."""
    staging = root / ".staging" / "step-00000040.0123abcd"
    staging.mkdir(parents=True)
    (staging / "rank-00000.pt").write_bytes(b"partial")
    lock_file = Path(f"{staging}.lock")
    lock_file.touch()
    with immutable(lock_file):
        gc = run("gc", str(root), "--json")
        gc_text = run("gc", str(root))
        listed = run("ls", str(root))
    assert gc.returncode == 0, gc.stderr
    report = json.loads(gc.stdout)
    assert report["removed"] == []
    assert [(item["path"], item["writer_alive"]) for item in report["left"]] == [
        (str(staging), None)
    ]
    assert staging.is_dir() and lock_file.exists()
    assert gc_text.returncode == 0, gc_text.stderr
    assert gc_text.stdout.splitlines() == [
        f"left {staging} (writer unknown: its lock cannot be opened for writing here to probe"
        " it; retried later)"
    ]
    assert listed.returncode == 0, listed.stderr
    assert (
        f"leftover staging: {staging} (writer unknown: its lock cannot be opened for writing"
        " here to probe it; gc leaves it)"
    ) in listed.stdout


def test_read_only_mount_ls_a_dead_saves_leftover(mounts: MountFactory) -> None:
    """A killed save's staging dir and writer lock, seen through a read-only mount: its lock
    cannot be opened for writing, so ``ls`` lists it with its writer unknown (and does not
    fail), and ``gc`` there is refused as on any read-only root."""
    mount = mounts.get("readonly")
    assert mount.writable_source is not None
    source = mount.writable_source / "leftover"
    with distckpt.CheckpointManager(source, fsync=False) as mgr:
        mgr.save(1, {"w": torch.zeros(4)})
    staging = source / ".staging" / "step-00000002.0123abcd"
    staging.mkdir(parents=True)
    (staging / "rank-00000.pt").write_bytes(b"partial")
    Path(f"{staging}.lock").touch()
    seen = mount.path / "leftover"
    listed = run("ls", "--json", os.fspath(seen))
    assert listed.returncode == 0, listed.stderr
    leftovers = json.loads(listed.stdout)["leftovers"]
    assert [(item["kind"], item["writer_alive"]) for item in leftovers] == [("staging", None)]
    table = run("ls", os.fspath(seen))
    assert table.returncode == 0, table.stderr
    assert "(writer unknown: its lock cannot be opened for writing here" in table.stdout
    assert run("gc", os.fspath(seen)).returncode == 2
    assert staging.is_dir()
