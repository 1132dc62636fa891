"""``scripts/direct_io_filesystems.py``, the measurement behind docs/filesystems.md's "Direct I/O
speed by file system", run end to end with tiny sizes on two real mounts, so that it cannot rot;
and the mount sizes it asks :class:`~tests.filesystems.MountFactory` for."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.filesystems import TMPFS_MIB, MountFactory, require_mounting

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "direct_io_filesystems.py"
MIB = 1 << 20


def _run_script(*args: str | Path, tmpdir: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The script run in a fresh interpreter (as its users run it), on this tree's code, making
    its mounts under ``tmpdir`` if given."""
    env = {**os.environ, "PYTHONPATH": os.fspath(REPO)}
    if tmpdir is not None:
        env["TMPDIR"] = os.fspath(tmpdir)
    return subprocess.run(
        [sys.executable, SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def test_the_script_measures_each_file_system_it_is_given(tmp_path: Path) -> None:
    """One row per file system, each written direct (strace), with the paired ratio of the
    direct total to the buffered one, its range, and the load average under the table."""
    require_mounting()
    out = tmp_path / "table.md"
    done = _run_script(
        *("--mib", "8", "--rounds", "1", "--filesystems", "tmpfs,ext4", "--markdown", out)
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


def test_the_script_refuses_file_systems_it_does_not_measure() -> None:
    """fusefat loses every commit (no checkpoint to time) and leaks the lost files' space."""
    done = _run_script("--filesystems", "ext4,fat16")
    assert done.returncode == 2 and "not measured: fat16" in done.stderr


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
        assert factory.cleanup() == []
