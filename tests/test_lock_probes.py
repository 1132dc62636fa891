"""What looks at a root's locks and temporary files without holding what its writer holds
(``distckpt ls`` probing writer locks without the root lock, ``distckpt gc`` holding the root
lock but not the lease) never makes a live job fail."""

from __future__ import annotations

import contextlib
import io
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt import lock
from distckpt.cli import main
from distckpt.layout import RootLayout
from distckpt.lock import PROBE_GRACE, WriterLock
from distckpt.storage import posix_removal
from tests import job_servers
from tests.filesystems import MountFactory
from tests.waiting import after_rank_0_removals, wait_until


def _probe_the_new_writer_lock_first(
    monkeypatch: pytest.MonkeyPatch, hold_seconds: float
) -> list[threading.Timer]:
    """Have a probe (a lock of the kind ``distckpt ls`` takes) hold each new writer lock for
    ``hold_seconds`` just before the save locks it. ls probes for an instant and lands between
    a save creating its lock file and locking it only by chance: nothing real times that, so
    the probe is placed there by wrapping the save's acquire, and its hold stretched."""
    real_acquire = WriterLock.acquire
    releases: list[threading.Timer] = []

    def probed_first(writer: WriterLock) -> None:
        probe = lock._flock(writer.path, 0)
        probe.acquire()
        releases.append(threading.Timer(hold_seconds, probe.release))
        releases[-1].start()
        real_acquire(writer)

    # A wrapper at our own seam (see the docstring): the probe and the lock it holds are real.
    monkeypatch.setattr(WriterLock, "acquire", probed_first)
    return releases


def test_a_probe_of_a_new_writer_lock_does_not_fail_the_save(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save takes its new writer lock within a grace of :data:`PROBE_GRACE`: a probe
    holding it meanwhile (``distckpt ls``) lets go by then."""
    with distckpt.CheckpointManager(root, timeout=20) as mgr:
        releases = _probe_the_new_writer_lock_first(monkeypatch, PROBE_GRACE / 5)
        assert mgr.save(1, {"w": torch.zeros(2)}).done
    assert releases and not any(release.is_alive() for release in releases)
    assert distckpt.CheckpointManager(root, read_only=True).steps() == [1]
    assert list(RootLayout.at(root).staging_root.iterdir()) == []


def test_a_save_that_cannot_take_its_writer_lock_leaves_no_lock_file(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held past the grace, the lock fails the save, and its lock file (this save's alone)
    goes with it; the next save takes a lock of its own."""
    with distckpt.CheckpointManager(root, timeout=20) as mgr:
        releases = _probe_the_new_writer_lock_first(monkeypatch, PROBE_GRACE * 4)
        with pytest.raises(distckpt.CheckpointError, match="is locked by another writer"):
            mgr.save(1, {"w": torch.zeros(2)})
        releases[-1].join()
        assert list(RootLayout.at(root).staging_root.iterdir()) == []
        monkeypatch.undo()
        assert mgr.save(1, {"w": torch.zeros(2)}).done


# A job opening ROOT that stops once, inside its start, while a temporary file of its own is in
# the root, until the file GO exists: PAUSE is "lease record" (written, not yet renamed over
# .lease.json) or "probe" (the writability probe, created, not yet removed). Then it saves.
_JOB_PAUSED_IN_ITS_START = """
import os, pathlib, sys, time, torch, distckpt

root, pause, go = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
paused = []

def pause_once(name):
    # Nothing real stops a start for long enough inside a file's few milliseconds of life:
    # the job's own process is held there while the test runs distckpt gc beside it.
    if not paused:
        paused.append(name)
        print("paused", name, flush=True)
        # bounded: a test killed outright never creates the file, and the job must not
        # poll forever in a session of its own
        deadline = time.monotonic() + 300
        while not go.exists():
            if time.monotonic() > deadline:
                sys.exit("never told to go on")
            time.sleep(0.01)

real_replace, real_unlink = os.replace, pathlib.Path.unlink

def replace(src, dst, *args, **kwargs):
    if pause == "lease record" and os.path.basename(dst) == ".lease.json":
        pause_once(os.path.basename(src))
    return real_replace(src, dst, *args, **kwargs)

def unlink(path, missing_ok=False):
    if pause == "probe" and path.name.startswith(".probe-"):
        pause_once(path.name)
    return real_unlink(path, missing_ok=missing_ok)

os.replace, pathlib.Path.unlink = replace, unlink
with distckpt.CheckpointManager(root, timeout=20) as mgr:
    print("saved", mgr.save(1, {"w": torch.ones(2)}).step, flush=True)
"""


@pytest.mark.parametrize("pause", ["lease record", "probe"])
def test_gc_where_the_locks_do_not_reach_leaves_a_starting_jobs_files(
    mounts: MountFactory, pause: str, tmp_path: Path
) -> None:
    """``distckpt gc`` through a path whose locks do not reach a job starting through another
    (here the directory under a bindfs mount and the mount, as two NFS clients with local
    locks) holds no lease, so it cannot tell the job's lease record under construction or its
    probe from a dead process's: it leaves both until they are older than
    ``PROBE_GRACE_SECONDS``, and the job starts and saves. (Removing either made the start fail
    with ``RootNotWritable``.)"""
    bindfs = mounts.get("bindfs")
    assert bindfs.writable_source is not None
    name = f"gc-beside-a-start-{pause.replace(' ', '-')}"
    here, there = bindfs.path / name, bindfs.writable_source / name
    distckpt.CheckpointManager(there, timeout=20).close()  # a previous job's, released
    # A job server's child: a fresh interpreter would spend seconds importing torch first.
    script, go = tmp_path / "paused_start.py", tmp_path / "go"
    script.write_text(_JOB_PAUSED_IN_ITS_START)
    out, err = tmp_path / "job.log", tmp_path / "job.err"
    job = job_servers.start_preloaded(
        [os.fspath(script), os.fspath(here), pause, os.fspath(go)], out, stderr_log=err
    )
    try:
        wait_until(
            lambda: (out.exists() and out.read_text().endswith("\n")) or job.poll() is not None,
            "the job paused in its start",
            60,
        )
        paused, _, temporary = out.read_text().strip().partition(" ")
        assert paused == "paused", err.read_text()
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["gc", os.fspath(there)]) == 0
        assert (there / temporary).exists()
        go.touch()
        code = job.wait(120)
    finally:
        job.end()
    assert code == 0 and out.read_text().split()[-2:] == ["saved", "1"], err.read_text()


def test_a_lease_holder_removes_a_young_probe_at_once_only_while_its_lease_is_current(
    mounts: MountFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cleanup by the holder of the root's current lease removes a probe of any age: every
    writer that makes one took the lease first, so its maker is dead or fenced. When another
    job takes the lease over through a path the holder's locks do not reach (the bindfs mount
    and its source dir, as two NFS clients with local locks) after the holder's cleanup
    checked its lease, a young probe may be that job's, made right now: the cleanup leaves it
    to its age. The takeover is placed in that instant by wrapping the cleanup's listing (no
    job can be timed into it otherwise); the job taking over is real."""
    bindfs = mounts.get("bindfs")
    assert bindfs.writable_source is not None
    here, there = bindfs.path / "holder-cleanup", bindfs.writable_source / "holder-cleanup"
    with distckpt.CheckpointManager(here, timeout=20) as holder:
        young = here / ".probe-0123abcd"
        young.write_bytes(b"distckpt write probe\n")
        assert young in holder.gc()

        real_find_leftovers = posix_removal.find_leftovers
        taken_over: list[distckpt.CheckpointManager] = []

        def taken_over_first(*args: Any, **kwargs: Any) -> list[lock.Leftover]:
            if not taken_over:
                taken_over.append(distckpt.CheckpointManager(there, timeout=20))
                # The new holder's own cleanup may remove a probe at once (its lease is
                # current): the probe is made once that cleanup is over.
                after_rank_0_removals(taken_over[-1])
                young.write_bytes(b"distckpt write probe\n")  # as the new holder's start does
            return real_find_leftovers(*args, **kwargs)

        # A hook at our own seam: no job can be timed into the instant after the lease check.
        monkeypatch.setattr(posix_removal, "find_leftovers", taken_over_first)
        try:
            with contextlib.suppress(distckpt.LeaseLost):
                holder.gc()
            assert young.exists()
        finally:
            for other in taken_over:
                other.close()
