"""``scripts/direct_io_filesystems.py``, the measurement behind docs/filesystems.md's "Direct I/O
speed by file system", run end to end with tiny sizes on two real mounts, so that it cannot rot;
and the mount sizes it asks :class:`~tests.filesystems.MountFactory` for."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.crashsim.trace import StraceUnavailable, ensure_strace
from tests.filesystems import TMPFS_MIB, MountFactory, require_mounting, skip_or_fail, unmount
from tests.processes import live_group_members, wait_until_group_is_gone

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "direct_io_filesystems.py"
MIB = 1 << 20


#: How long the script may run here; then it is stopped (SIGTERM) and given this long to unmount
SCRIPT_TIMEOUT_SECONDS = 120
STOP_GRACE_SECONDS = 30


def _require_strace() -> None:
    """strace installed now, outside the script's time: installing it may wait minutes for the
    dpkg lock on a fresh machine."""
    try:
        ensure_strace()
    except StraceUnavailable as exc:
        skip_or_fail(str(exc))


def _mounts_under(directory: Path) -> list[Path]:
    """The mount points at or below ``directory`` in this process's mount table."""
    # field 5 of a line of mountinfo is the mount point (octal escapes for blanks)
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    points = [Path(line.split()[4]) for line in lines]
    return [point for point in points if point.is_relative_to(directory.resolve())]


def _undo_mounts_left(directory: Path) -> list[Path]:
    """The mounts the script left under ``directory``, each undone now, so that a failing test
    does not leave them to the machine."""
    left = _mounts_under(directory)
    for point in reversed(left):
        unmount(point)
    return left


def _start_script(
    *args: str | Path,
    tmpdir: Path,
    stdout: int = subprocess.PIPE,
    extra_env: Mapping[str, str] | None = None,
) -> subprocess.Popen[str]:
    """The script started in a fresh interpreter (as its users run it), on this tree's code,
    making its mounts under ``tmpdir``; in a session of its own, so that a stop reaches the ranks
    and the tools it started too."""
    return subprocess.Popen(
        [sys.executable, os.fspath(SCRIPT), *map(os.fspath, args)],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env={
            **os.environ,
            "PYTHONPATH": os.fspath(REPO),
            "TMPDIR": os.fspath(tmpdir),
            **(extra_env or {}),
        },
        start_new_session=True,
    )


def _end_script(script: subprocess.Popen[str], *, stop: bool) -> tuple[str, str]:
    """The script's output once it has ended, and all it started. ``stop``: SIGTERM its process
    group first (the script makes it an exception and unmounts) and give it a grace period.
    Then SIGKILL to the group: the script if it has not ended, and whatever outlived it (which
    would hold the output pipes open)."""
    if stop:
        os.killpg(script.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            script.wait(timeout=STOP_GRACE_SECONDS)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(script.pid, signal.SIGKILL)
    wait_until_group_is_gone(script.pid)
    stdout, stderr = script.communicate()
    return stdout or "", stderr or ""


def _run_script(
    *args: str | Path, tmpdir: Path, extra_env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The script run to its end (stopped if it runs over its time); it may leave no mount
    under ``tmpdir``, even when stopped."""
    with _start_script(*args, tmpdir=tmpdir, extra_env=extra_env) as script:
        try:
            # what it printed so far is kept: _end_script's communicate returns all of it
            script.communicate(timeout=SCRIPT_TIMEOUT_SECONDS)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        stdout, stderr = _end_script(script, stop=timed_out)
    assert _undo_mounts_left(tmpdir) == [], f"the script left mounts behind:\n{stderr}"
    assert not timed_out, f"the script ran over {SCRIPT_TIMEOUT_SECONDS} s:\n{stderr}"
    return subprocess.CompletedProcess(script.args, script.returncode, stdout, stderr)


def test_the_script_measures_each_file_system_it_is_given(tmp_path: Path) -> None:
    """One row per file system, each written direct (strace), with the paired ratio of the
    direct total to the buffered one, its range, and the load average under the table."""
    require_mounting()
    _require_strace()
    out = tmp_path / "table.md"
    scratch = tmp_path / "script-tmp"
    scratch.mkdir()
    done = _run_script(
        *("--mib", "8", "--rounds", "1", "--filesystems", "tmpfs,ext4", "--markdown", out),
        tmpdir=scratch,
    )
    assert done.returncode == 0, done.stderr
    lines = out.read_text().splitlines()
    header = lines[0]
    assert header.startswith("| 2 ranks x 8 MiB, 1 rounds |")
    assert "direct / buffered total (paired: median, range)" in header
    rows = {line.split(" | ")[0].removeprefix("| "): line.split(" | ") for line in lines[2:4]}
    assert list(rows) == ["tmpfs", "ext4"]
    for cells in rows.values():
        assert len(cells) == len(header.split(" | "))
        assert cells[1] == "yes"  # written direct: both take O_DIRECT (tests/test_filesystems.py)
        ratio, spread = cells[-1].removesuffix(" |").split(" ")
        assert float(ratio.removesuffix("x")) > 0
        low, high = (float(v) for v in spread.strip("()").split(".."))
        assert low == high  # one round: one ratio
    assert "load average (1, 5, 15 min) before" in lines[-1]


def test_a_file_system_it_cannot_mount_is_named_and_the_others_measured(
    mounts: MountFactory, tmp_path: Path
) -> None:
    """The script's temporary directory on exFAT (96 MiB, and no sparse files: an image takes
    its whole size at once) has no room for ext4's 512 MiB image: the script says so, measures
    tmpfs (in memory) and exits 1."""
    require_mounting()
    _require_strace()
    scratch = mounts.get("exfat").path / "direct-io-script"
    scratch.mkdir()
    out = tmp_path / "table.md"
    try:
        done = _run_script(
            *("--mib", "1", "--rounds", "1", "--filesystems", "ext4,tmpfs", "--markdown", out),
            tmpdir=scratch,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert done.returncode == 1, done.stderr
    assert "ext4: not mounted, not measured: truncate" in done.stderr
    table = out.read_text()
    assert "| tmpfs | yes |" in table and "| ext4 |" not in table
    assert "ext4: not mounted (truncate -s 512M" in table


def test_the_script_stopped_by_sigterm_unmounts_what_it_mounted(tmp_path: Path) -> None:
    """As its docstring says: SIGTERM to the script alone (``kill``) while its ranks save on a
    tmpfs it mounted ends it, its ranks too, and leaves no mount behind."""
    require_mounting()
    _require_strace()
    args = ("--mib", "1", "--rounds", "100000", "--filesystems", "tmpfs")
    with _start_script(*args, tmpdir=tmp_path, stdout=subprocess.DEVNULL) as script:
        try:
            # the ranks' root on the mount: the mount is recorded, so a stop now must undo it
            deadline = time.monotonic() + SCRIPT_TIMEOUT_SECONDS
            while not list(tmp_path.glob("direct-io-*/tmpfs/speed")):
                assert script.poll() is None, "the script ended before its ranks saved"
                assert time.monotonic() < deadline, "the script's ranks never started saving"
                time.sleep(0.1)
            script.send_signal(signal.SIGTERM)  # to the script alone, as `kill` sends it
            script.wait(timeout=STOP_GRACE_SECONDS)
            left_running = live_group_members(script.pid)  # its ranks must have gone with it
        finally:
            _, stderr = _end_script(script, stop=script.poll() is None)
            mounts_left = _undo_mounts_left(tmp_path)
    assert mounts_left == [], stderr
    assert script.returncode != 0
    assert left_running == [], stderr


def test_the_script_refuses_file_systems_it_does_not_measure(tmp_path: Path) -> None:
    """fusefat loses every commit (no checkpoint to time) and leaks the lost files' space.
    The refusal comes before torch is imported (Python's import log names no torch module)."""
    done = _run_script(
        "--filesystems",
        "ext4,fat16",
        tmpdir=tmp_path,
        extra_env={"PYTHONPROFILEIMPORTTIME": "1"},
    )
    assert done.returncode == 2 and "not measured: fat16" in done.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()]
    assert "distckpt" not in imported and "torch" not in imported, done.stderr


@pytest.mark.parametrize(
    ("min_size_mib", "tmpfs_mib", "ext4_mib"),
    [(None, TMPFS_MIB, 512), (640, 640, 640), (200, 200, 512)],
)
def test_a_mount_factory_makes_images_and_tmpfs_at_least_the_size_asked(
    tmp_path: Path, min_size_mib: int | None, tmpfs_mib: int, ext4_mib: int
) -> None:
    """``min_size_mib`` enlarges a tmpfs and an image that would be smaller; a kind larger than
    it keeps its own size (ext4: 512 MiB), and None keeps every kind's own."""
    require_mounting()
    factory = MountFactory(tmp_path, min_size_mib=min_size_mib)
    try:
        tmpfs = os.statvfs(factory.mount("tmpfs").path)
        assert tmpfs.f_blocks * tmpfs.f_frsize == tmpfs_mib * MIB
        factory.mount("ext4")
        assert (tmp_path / "ext4.img").stat().st_size == ext4_mib * MIB
    finally:
        # asserted after the test's own checks: a failure above is the one to report
        not_undone = factory.cleanup()
    assert not_undone == []
