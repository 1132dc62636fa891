"""Space on real mounts (see tests/filesystems.py): a small volume takes a small checkpoint, the
space margin, a disk filled by another process mid-save, a full disk while rank files, the
manifest, an export, a pointer link or the lease record are written (each error naming its
file), and free space a filesystem does not report."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distckpt
from distckpt import faults, proposal
from distckpt.memory import anonymous_memory
from tests.filesystem_saves import TIMEOUT
from tests.filesystems import (
    MountFactory,
    leaving_free,
    statvfs_free_bytes,
    take_every_free_block,
)
from tests.ranks import run_ranks, values

# ---------------------------------------------------------------- space


def _small_save(rank: int, world_size: int, root: str, space_margin: float) -> object:
    with distckpt.CheckpointManager(root, space_margin=space_margin, timeout=TIMEOUT) as mgr:
        try:
            # about 3 MiB in all on a volume of about 20 MiB
            result = mgr.save(1, {"w": torch.zeros(384 << 10)})
        except distckpt.CheckpointError as exc:
            return type(exc).__name__, str(exc)
        return result is not None and result.done


def test_small_volume_takes_a_small_checkpoint(mounts: MountFactory) -> None:
    """The default margin (5 % of the save, at least 1 MiB) lets it fit; a margin of ten times
    the save does not, and the refusal names the option."""
    root = mounts.get("small-ext4").path / "small"
    assert values(run_ranks(_small_save, 2, os.fspath(root), 0.05, timeout=90)) == [True] * 2
    refused = values(run_ranks(_small_save, 2, os.fspath(root / "wide"), 10.0, timeout=90))
    for kind, message in refused:
        assert kind == "InsufficientSpace", message
        assert "space_margin=10" in message
    with pytest.raises(distckpt.InvalidArgument):
        distckpt.CheckpointManager(root, space_margin=-1)


_FILLER = """
import os, sys, time
staging, hog = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        # a file in step 2's staging dir: the preflight has passed (it read the free space
        # before any rank writes) and a rank is writing its 64 MiB
        dirs = [n for n in os.listdir(staging) if n.startswith("step-00000002.")]
        if any(os.listdir(os.path.join(staging, n)) for n in dirs if not n.endswith(".lock")):
            break
    except OSError:
        pass
    time.sleep(0.0005)
fd = os.open(hog, os.O_WRONLY | os.O_CREAT)
free = os.statvfs(hog).f_bavail * os.statvfs(hog).f_frsize
os.posix_fallocate(fd, 0, free)  # everything that is left, at once
os.close(fd)
print("filled", free)
"""


def _fill_mid_save(
    rank: int, world_size: int, root: str, async_save: bool, writer_threads: int
) -> object:
    with distckpt.CheckpointManager(
        root, async_save=async_save, writer_threads=writer_threads, timeout=TIMEOUT
    ) as mgr:
        mgr.save(1, {"w": torch.ones(1024)})
        mgr.wait()
        try:
            mgr.save(2, {"w": torch.ones(16 << 20)})  # 64 MiB per rank: the preflight passes
            mgr.wait()
        except distckpt.CheckpointError as exc:
            return type(exc).__name__, str(exc)
        return "saved", ""


@pytest.mark.parametrize(
    ("async_save", "writer_threads"),
    [(False, 1), (True, 1), (False, 2)],
    ids=["sync", "async", "sync-2-writers"],
)
def test_disk_filled_by_another_process_mid_save(
    mounts: MountFactory, async_save: bool, writer_threads: int
) -> None:
    """The save fails with InsufficientSpace on every rank, however many threads write each
    rank file and whether direct I/O writes it (the async save), naming the file, and leaves
    nothing behind: the previous checkpoint is still the last."""
    mount = mounts.get("ext4")
    root = mount.path / f"full-{'async' if async_save else 'sync'}-{writer_threads}"
    hog = mount.path / "hog"
    (root / ".staging").mkdir(parents=True)
    filler = subprocess.Popen(
        [sys.executable, "-c", _FILLER, os.fspath(root / ".staging"), os.fspath(hog)]
    )
    try:
        out = values(
            run_ranks(_fill_mid_save, 2, os.fspath(root), async_save, writer_threads, timeout=90)
        )
    finally:
        filler.wait(60)
        hog.unlink(missing_ok=True)
    for kind, message in out:  # both ranks get the error, which says what happened
        assert kind in ("InsufficientSpace", "RankFailure"), message
        assert "No space left on device" in message
        # named after the file (the async save's rank file is written with direct I/O here:
        # its snapshot is page-aligned and ext4 takes O_DIRECT:
        # test_filesystems.py::test_async_save_with_direct_io)
        assert "/rank-00000.pt for step 2: No space left on device" in message, message
        assert f"the filesystem of {root} ran out of space" in message
        assert "free space when the save began: " in message
    resumed = values(run_ranks(_resume_after_full, 2, os.fspath(root), timeout=90))
    assert resumed == [(1, [1])] * 2
    assert os.listdir(root / ".staging") == []


def _resume_after_full(rank: int, world_size: int, root: str) -> object:
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        checkpoint = mgr.restore("last", state={"w": torch.zeros(1024)})
        return checkpoint.step, mgr.steps()


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_disk_full_error_names_the_file(mounts: MountFactory, direct: bool) -> None:
    """A write that runs out of space says which file it was writing (the root and the free
    space the preflight saw are for the manager to add), buffered or direct (page-aligned
    memory, written straight from it)."""
    mount = mounts.get("small-ext4")
    target = mount.path / f"victim-{direct}.bin"
    try:
        with (
            leaving_free(mount.path, 0, filler_name=f"hog-names-{direct}"),
            pytest.raises(OSError) as info,
            distckpt.checksums.ChecksumWriter(target, fsync=True, direct=direct) as writer,
        ):
            assert writer.direct is direct
            writer.write(anonymous_memory(8 << 20))
        assert info.value.errno == errno.ENOSPC
        assert os.fspath(target) in str(info.value)
    finally:
        target.unlink(missing_ok=True)


def test_an_export_onto_a_full_disk_says_so_and_names_its_file(
    mounts: MountFactory, tmp_path: Path
) -> None:
    """``export`` streams ``torch.save`` into its file, whose zip writer turns a failed write
    into an error of its own ("unexpected pos ..."); the export raises the disk's error instead,
    named after the file it was writing, and leaves no temporary file behind."""
    with distckpt.CheckpointManager(tmp_path / "root") as mgr:
        mgr.save(1, {"w": torch.ones(12 << 20)})  # 48 MiB, more than the volume holds
    mount = mounts.get("small-ext4")
    out = mount.path / "exported.pt"
    with pytest.raises(OSError) as info:
        distckpt.export(tmp_path / "root", out, rank=0)
    assert info.value.errno == errno.ENOSPC
    assert os.fspath(out) in str(info.value)
    assert not [name for name in os.listdir(mount.path) if "exported" in name]


def _fill_before_manifest(rank: int, world_size: int, root: str, hog: str) -> object:
    real_hit = faults.hit

    def fill_at_the_manifest(point: str, at_rank: int) -> None:
        if point == "before_manifest":
            take_every_free_block(Path(root).parent, Path(hog))
        real_hit(point, at_rank)

    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        mgr.save(1, {"w": torch.ones(1024)})
        # The moment is our own fault point: the manifest is written under the lock right
        # after it, and no other process can be scheduled into that window.
        faults.hit = fill_at_the_manifest
        try:
            mgr.save(2, {"w": torch.ones(1024)})
        except distckpt.CheckpointError as exc:
            return type(exc).__name__, str(exc)
        return "saved", ""


def test_disk_full_while_the_manifest_is_written(mounts: MountFactory) -> None:
    """Out of space in the commit (the shards fit, the manifest does not): every rank's error
    names the root, the manifest and the free space the preflight saw, as for a shard."""
    mount = mounts.get("small-ext4")
    root, hog = mount.path / "manifest-full", mount.path / "hog-manifest"
    try:
        out = values(run_ranks(_fill_before_manifest, 2, os.fspath(root), os.fspath(hog)))
    finally:
        hog.unlink(missing_ok=True)
    for kind, message in out:
        assert kind == "InsufficientSpace", message
        assert f"the filesystem of {root} ran out of space while rank 0 wrote" in message
        assert f"{root / '.staging'}/step-00000002." in message, message
        assert "manifest.json for step 2: No space left on device" in message, message
        assert "free space when the save began: " in message and " MiB;" in message, message
    resumed = values(run_ranks(_resume_after_full, 2, os.fspath(root), timeout=90))
    assert resumed == [(1, [1])] * 2
    assert os.listdir(root / ".staging") == []


def test_no_size_reported_is_unknown_free_space(mounts: MountFactory) -> None:
    """fusefat's FAT32 reports 0 blocks: its free space is unknown, not zero."""
    mount = mounts.get("fat32")
    assert os.statvfs(mount.path).f_blocks == 0
    assert distckpt.fsutil.free_bytes(mount.path) is None
    assert distckpt.fsutil.free_bytes(mounts.get("ext4").path) == statvfs_free_bytes(
        mounts.get("ext4").path
    )


def test_space_margin_is_a_fraction_of_the_save_at_least_1_mib() -> None:
    mib = 1 << 20
    assert proposal.margin_bytes(100 * mib, 0.05) == 5 * mib  # large saves: the fraction
    assert proposal.margin_bytes(64 << 10, 0.05) == mib  # small ones: the floor
    assert proposal.margin_bytes(0, 0.05) == mib
    assert proposal.margin_bytes(64 << 10, 0.0) == 0  # 0 turns the margin off, floor too
    assert proposal.margin_bytes(100 * mib, 0.0) == 0


def test_a_small_save_is_refused_without_room_for_the_1_mib_margin(
    mounts: MountFactory,
) -> None:
    """With 5 % of a 64 KiB save as its whole margin it would fit in the 640 KiB left free; the
    1 MiB floor refuses it, and a margin of 0 takes it. A margin of 0 with less room than the
    save itself is refused without a word of the floor it does not apply."""
    volume = mounts.get("small-ext4").path
    root = volume / "margin-floor"
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr, leaving_free(volume, 640 << 10):
        with pytest.raises(distckpt.InsufficientSpace, match=r"\+1\.0 MiB margin"):
            mgr.save(1, {"w": torch.zeros(16 << 10)})  # 64 KiB
        assert mgr.steps() == []
    with (
        distckpt.CheckpointManager(root, space_margin=0, timeout=TIMEOUT) as mgr,
        leaving_free(volume, 640 << 10),
    ):
        assert mgr.save(1, {"w": torch.zeros(16 << 10)}).step == 1
        with pytest.raises(distckpt.InsufficientSpace) as info:
            mgr.save(2, {"w": torch.zeros(1 << 20)})  # 4 MiB
        assert "(+0.0 MiB margin)" in str(info.value) and "at least" not in str(info.value)
        assert "space_margin=0: no margin" in str(info.value), info.value


def test_a_pointer_link_that_runs_out_of_space_leaves_no_temporary_file(
    mounts: MountFactory,
) -> None:
    """``link="pointer"`` writes ``last`` as a small file: when that write fails on a full
    disk (here in a delete, which moves ``last`` first), the failed delete leaves no
    ``.last.<hex>.tmp`` behind in the root."""
    volume = mounts.get("small-ext4").path
    root = volume / "pointer-full"
    with distckpt.CheckpointManager(root, link="pointer", timeout=TIMEOUT) as mgr:
        mgr.save(1, {"w": torch.ones(1)})
        mgr.save(2, {"w": torch.ones(1)})
        hog = volume / "pointer-hog"
        try:
            take_every_free_block(volume, hog)  # root's reserve too: the ranks run as root
            with pytest.raises(distckpt.CheckpointError) as info:
                mgr.delete(2)
            assert "No space left on device" in str(info.value)
            assert sorted(name for name in os.listdir(root) if name.endswith(".tmp")) == []
        finally:
            hog.unlink(missing_ok=True)
        assert mgr.steps() == [1, 2]
        assert mgr.save(3, {"w": torch.ones(1)}).step == 3


def test_a_manager_opened_on_a_full_disk_raises_insufficient_space(
    mounts: MountFactory,
) -> None:
    """Opening writes the lease record: on a full disk that is InsufficientSpace naming the
    root (as every failure of a write that runs out of space), not a bare CheckpointError."""
    volume = mounts.get("small-ext4").path
    root = volume / "open-full"
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        mgr.save(1, {"w": torch.ones(1)})
    hog = volume / "open-hog"
    try:
        take_every_free_block(volume, hog)  # root's reserve too: the ranks run as root
        with pytest.raises(distckpt.InsufficientSpace) as info:
            distckpt.CheckpointManager(root, timeout=TIMEOUT)
    finally:
        hog.unlink(missing_ok=True)
    assert os.fspath(root) in str(info.value)
    assert "No space left on device" in str(info.value)
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        assert mgr.steps() == [1]
