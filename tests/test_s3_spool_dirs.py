"""Which leftover temp dirs of object-store saves and reads (spools, downloads) a job removes:
those of dead processes where their pid means what it means here, never a live job's in
another PID namespace that shares the temp dir (containers started with ``-v /tmp:/tmp``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from distckpt.storage.s3_spool import (
    UNJUDGED_TEMP_DIR_AGE,
    make_temp_dir,
    remove_dead_temp_dirs,
    temp_dir_place,
)

#: ``unshare -pf --mount-proc``: a process in a PID namespace of its own, as in a container
UNSHARE_PID_NAMESPACE = ["unshare", "-pf", "--mount-proc"]


def _unshare_refusal() -> str | None:
    """Why a new PID namespace cannot be made here (None when it can)."""
    if shutil.which("unshare") is None:
        return "no unshare(1) on this machine"
    try:
        probe = subprocess.run(
            [*UNSHARE_PID_NAMESPACE, "true"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare failed: {exc}"
    if probe.returncode != 0:
        return f"unshare -p is not permitted here (needs root or user namespaces): {probe.stderr}"
    return None


@pytest.fixture
def live_spool() -> Iterator[Path]:
    """A spool dir as a live save of this process has it, removed after the test."""
    directory = make_temp_dir("spool", "attempt-r0")
    (directory / "rank-00000.pt").write_bytes(b"x" * 100)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_a_job_in_another_pid_namespace_leaves_a_live_jobs_spool_alone(live_spool: Path) -> None:
    refusal = _unshare_refusal()
    if refusal is not None:
        pytest.skip(refusal)
    # the other job runs with pid 1 in its namespace, where this process's pid names nothing
    other_job = subprocess.run(
        [
            *UNSHARE_PID_NAMESPACE,
            sys.executable,
            "-c",
            "from distckpt.storage.s3_spool import remove_dead_temp_dirs, temp_dir_place\n"
            "remove_dead_temp_dirs()\n"
            "print(temp_dir_place())",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
    )
    assert other_job.returncode == 0, other_job.stderr
    assert other_job.stdout.strip() != temp_dir_place()  # it knows it is somewhere else
    assert (live_spool / "rank-00000.pt").read_bytes() == b"x" * 100


def _dead_pid() -> int:
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(child.stdout)  # exited: its pid names no process (unless reused at once)


def _check_removal(kept: Path, removed: Path) -> None:
    """Remove the dead temp dirs: ``kept`` must stay and ``removed`` go (both are removed
    after)."""
    try:
        remove_dead_temp_dirs()
        assert kept.is_dir() and not removed.exists()
    finally:
        shutil.rmtree(kept, ignore_errors=True)
        shutil.rmtree(removed, ignore_errors=True)


def _long_unchanged(directory: Path, seconds: float = UNJUDGED_TEMP_DIR_AGE + 60) -> Path:
    """``directory``, last changed ``seconds`` ago (by default just past the age rule)."""
    long_ago = time.time() - seconds
    os.utime(directory, (long_ago, long_ago))
    return directory


def test_temp_dirs_of_dead_processes_are_removed() -> None:
    mine = make_temp_dir("spool", "live")
    left = Path(str(mine).replace(f"-{os.getpid()}@", f"-{_dead_pid()}@"))
    left.mkdir()
    _check_removal(kept=mine, removed=left)


def test_a_dir_named_as_older_versions_did_is_removed_only_once_long_unchanged() -> None:
    # Its pid cannot be judged (it has no place in its name): only its age tells.
    name = f"distckpt-spool-{_dead_pid()}-attempt-r0-"
    recent = Path(tempfile.mkdtemp(prefix=name))
    old = _long_unchanged(Path(tempfile.mkdtemp(prefix=name)))
    _check_removal(kept=recent, removed=old)


def test_a_dir_named_as_older_versions_did_is_kept_while_its_pid_runs_here() -> None:
    # However old: in this PID namespace, a running process of its pid may be its writer.
    kept = _long_unchanged(Path(tempfile.mkdtemp(prefix=f"distckpt-read-{os.getpid()}-s1-")))
    removed = _long_unchanged(Path(tempfile.mkdtemp(prefix=f"distckpt-read-{_dead_pid()}-s1-")))
    _check_removal(kept=kept, removed=removed)


def test_a_dir_of_another_place_is_removed_only_once_long_unchanged() -> None:
    # Made in a previous boot, or in another PID namespace sharing the temp dir: its pid
    # cannot be judged here, so only its age tells (a live job there keeps it changing).
    elsewhere = "0" * 12
    assert elsewhere != temp_dir_place()
    name = f"distckpt-spool-{os.getpid()}@{elsewhere}-attempt-r0-"
    hour = 3600.0  # the docs promise 24 hours
    recent = _long_unchanged(Path(tempfile.mkdtemp(prefix=name)), 23 * hour)
    old = _long_unchanged(Path(tempfile.mkdtemp(prefix=name)), 24 * hour + 60)
    _check_removal(kept=recent, removed=old)
