"""A volume already full, or short of inodes, when a save begins, and a save whose extra files
the volume cannot hold: each refused as :class:`~distckpt.InsufficientSpace` on every rank,
with nothing left in ``.staging`` (real mounts: tests/filesystems.py)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import distckpt
from distckpt.storage.posix import PosixRootStore
from tests.filesystem_saves import TIMEOUT
from tests.filesystems import MountFactory, statvfs_free_bytes, take_every_free_block
from tests.ranks import run_ranks, values


def _save_on_a_full_disk(
    rank: int, world_size: int, root: str, hog: str, async_save: bool
) -> tuple[str, str, object, object]:
    with distckpt.CheckpointManager(root, async_save=async_save, timeout=TIMEOUT) as mgr:
        mgr.save(1, {"w": torch.ones(1024)})
        mgr.wait()
        if rank == 0:  # full once the manager is open (opening writes the lease record)
            take_every_free_block(Path(root).parent, Path(hog))
        dist.barrier()
        try:
            mgr.save(2, {"w": torch.ones(1 << 20)})
            mgr.wait()
            outcome: tuple[str, str, object, object] = ("saved", "", None, None)
        except distckpt.CheckpointError as exc:
            outcome = (type(exc).__name__, str(exc), exc.step, exc.path)
        dist.barrier()
        if rank == 0:
            os.unlink(hog)
        return outcome


@pytest.mark.parametrize(
    ("name", "async_save"),
    [("small-ext4", False), ("xfs", False), ("xfs", True), ("exfat", False)],
    ids=["ext4-sync", "xfs-sync", "xfs-async", "exfat-sync"],
)
def test_a_disk_full_before_the_save_is_insufficient_space(
    mounts: MountFactory, name: str, async_save: bool
) -> None:
    """Creating the staging dir (ext4, exFAT) or its writer lock (xfs) fails with ENOSPC
    before the free-space check runs: that is InsufficientSpace naming the step and the file,
    on every rank, not a RankFailure nor "cannot lock"."""
    volume = mounts.get(name).path
    root = volume / f"full-before-{'async' if async_save else 'sync'}"
    out = values(
        run_ranks(_save_on_a_full_disk, 2, os.fspath(root), os.fspath(volume / "hog"), async_save)
    )
    for kind, message, step, path in out:
        assert kind == "InsufficientSpace", message
        staging = root / ".staging"
        assert f"of {root} ran out of space while rank 0 wrote {staging}/step-00000002." in message
        assert "No space left on device" in message
        assert step == 2 and str(path).startswith(f"{root / '.staging'}/step-00000002."), path
    assert os.listdir(root / ".staging") == []
    with distckpt.CheckpointManager(root) as mgr:
        assert mgr.steps() == [1]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_the_free_space_check_counts_the_extra_files(
    mounts: MountFactory, tmp_path: Path, async_save: bool
) -> None:
    """A 30 MiB extra file on a volume with about 20 MiB free is refused by the check before
    anything is written, not by the disk filling up mid-save (an async save reads it at
    save(), and counts it the same)."""
    volume = mounts.get("small-ext4").path
    root = volume / f"extra-files-{'async' if async_save else 'sync'}"
    big = tmp_path / "big.bin"
    big.write_bytes(b"\1" * (30 << 20))
    assert statvfs_free_bytes(volume) < 30 << 20
    with distckpt.CheckpointManager(root, timeout=TIMEOUT, async_save=async_save) as mgr:
        mgr.save(1, {"w": torch.ones(8)})
        refused = r"saving step 2 needs about 30\.\d MiB"
        with pytest.raises(distckpt.InsufficientSpace, match=refused):
            mgr.save(2, {"w": torch.ones(8)}, files={"big.bin": big})
            mgr.wait()
        assert os.listdir(root / ".staging") == []
        mgr.save(3, {"w": torch.ones(8)}, files={"small.bin": b"x"})
        mgr.wait()
        assert mgr.steps() == [1, 3]
    shutil.rmtree(root)


def test_out_of_inodes_is_not_blamed_on_another_process(mounts: MountFactory) -> None:
    """A tmpfs of 16 inodes runs out of them with 32 MiB free: the error says space or inodes
    ran out, not that another process filled the disk."""
    root = mounts.get("tmpfs-16-inodes").path / "inodes"
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        with pytest.raises(distckpt.InsufficientSpace) as info:
            for step in range(1, 10):
                mgr.save(step, {"w": torch.ones(100)})
        assert os.statvfs(root).f_bavail > 0  # space was left: the inodes ran out
        message = str(info.value)
        assert "No space left on device" in message
        assert "the space or the filesystem's free inodes ran out" in message, message
        assert "another process" not in message
        assert os.listdir(root / ".staging") == []
    shutil.rmtree(root)  # the inodes, for the other test of this mount


def test_inodes_run_out_before_the_save_begins_is_insufficient_space(mounts: MountFactory) -> None:
    """A tmpfs whose last inodes another process took once the manager was open: creating the
    staging dir fails with 32 MiB free. The error names rank 0 and says space or inodes ran
    out, not that the filesystem is full."""
    volume = mounts.get("tmpfs-16-inodes").path
    root, hog = volume / "inodes-before", volume / "hog"
    try:
        with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
            hog.mkdir()
            try:
                for index in range(64):
                    (hog / str(index)).touch()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
            with pytest.raises(distckpt.InsufficientSpace) as info:
                mgr.save(1, {"w": torch.ones(4)})
            assert os.statvfs(volume).f_bavail > 0
            message = str(info.value)
            assert "the space or the filesystem's free inodes ran out" in message, message
            assert "the filesystem is full" not in message
            assert info.value.rank == 0 and info.value.step == 1
            assert list(root.glob(".staging/*")) == []
            shutil.rmtree(hog)  # room for the close to mark the lease released
    finally:
        shutil.rmtree(hog, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def test_opening_a_root_on_a_full_disk_is_insufficient_space(mounts: MountFactory) -> None:
    """An existing root on a volume with no free block left: opening it writes the lease record
    and a writability probe, which fail with ENOSPC. That is InsufficientSpace naming the root,
    and it says that the space or the inodes ran out (a full inode table looks the same)."""
    volume = mounts.get("small-ext4").path
    root, hog = volume / "open-full", volume / "hog-open"
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        mgr.save(1, {"w": torch.ones(4)})
    try:
        take_every_free_block(volume, hog)
        with pytest.raises(distckpt.InsufficientSpace) as info:
            distckpt.CheckpointManager(root, timeout=TIMEOUT)
        message = str(info.value)
        assert f"checkpoint root {root}" in message, message
        assert "the space or the filesystem's free inodes ran out" in message, message
        assert str(info.value.path).startswith(str(root)), info.value.path
    finally:
        hog.unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)


def _leave_free_inodes(hog: Path, free_inodes: int) -> None:
    """Fill ``hog``'s filesystem with empty files until no inode is left, then free
    ``free_inodes`` of them."""
    taken: list[Path] = []
    with contextlib.suppress(OSError):  # ENOSPC: every inode is taken
        for index in range(64):
            (hog / str(index)).touch()
            taken.append(hog / str(index))
    for file in taken[:free_inodes]:
        file.unlink()


@pytest.mark.parametrize(
    ("free_inodes", "failed"),
    [
        (1, "cannot be created"),  # the root itself, its parent made
        (2, "cannot lock its files"),  # .lease
        (3, "cannot take its lease"),  # the record
        (4, "cannot lock its files"),  # .lock
        (5, "is not writable"),  # the probe
    ],
)
def test_a_new_root_whose_open_runs_out_of_inodes_is_left_a_valid_empty_root(
    mounts: MountFactory, free_inodes: int, failed: str
) -> None:
    """Opening a root that does not exist yet, with 1 to 5 inodes left: the open fails at
    creating a parent, the root, its lease lock, its lease record, its commit lock or its
    writability probe. Whichever it is, that is InsufficientSpace naming the root (not the
    lock's bare "cannot lock"). Nothing is removed: what is left (the directories, the lease
    files) is a valid empty root, which the next open takes once inodes are freed."""
    volume = mounts.get("tmpfs-16-inodes").path
    kept, hog = volume / "kept", volume / "hog-inodes"
    root = kept / "new" / "root"
    kept.mkdir()
    hog.mkdir()
    try:
        _leave_free_inodes(hog, free_inodes)
        with pytest.raises(distckpt.InsufficientSpace) as info:
            distckpt.CheckpointManager(root, timeout=TIMEOUT)
        assert f"checkpoint root {root} {failed}: " in str(info.value)
        assert "the space or the filesystem's free inodes ran out" in str(info.value)
        shutil.rmtree(hog)
        with distckpt.CheckpointManager(root, timeout=TIMEOUT) as manager:
            assert manager.steps() == []
    finally:
        shutil.rmtree(hog, ignore_errors=True)
        shutil.rmtree(kept, ignore_errors=True)


@pytest.mark.parametrize(
    ("interruption", "raised"),
    [
        (KeyboardInterrupt, KeyboardInterrupt),
        (RuntimeError, distckpt.CheckpointError),  # the manager names the open that failed
    ],
)
def test_an_error_while_a_full_disk_fails_the_open_is_not_taken_for_the_full_disk(
    mounts: MountFactory,
    monkeypatch: pytest.MonkeyPatch,
    interruption: type[BaseException],
    raised: type[BaseException],
) -> None:
    """A Ctrl-C (or another error) raised while the open's failure path runs after a full disk
    has that disk's ENOSPC in its ``__context__``: it is not turned into InsufficientSpace,
    and a Ctrl-C reaches the caller as it is, never lost."""
    volume = mounts.get("tmpfs-16-inodes").path
    kept, hog = volume / "kept", volume / "hog-inodes"
    root = kept / "root"
    kept.mkdir()
    hog.mkdir()
    original_close = PosixRootStore.close
    pressed: list[PosixRootStore] = []

    def close_then_interrupt(store: PosixRootStore) -> None:
        original_close(store)
        if not pressed:  # once, in the close the store's own failure path runs
            pressed.append(store)
            raise interruption("pressed while the failed open closes")

    # Patched because nothing real puts a Ctrl-C at that point: a SIGINT sent from outside
    # lands wherever the process happens to be, and would make the test depend on timing.
    monkeypatch.setattr(PosixRootStore, "close", close_then_interrupt)
    try:
        _leave_free_inodes(hog, 4)  # the writability probe, the open's fourth creation, fails
        with pytest.raises(raised) as info:
            distckpt.CheckpointManager(root, timeout=TIMEOUT)
        assert type(info.value) is raised
        assert "pressed while the failed open closes" in str(info.value)
    finally:
        monkeypatch.undo()
        shutil.rmtree(hog, ignore_errors=True)
        shutil.rmtree(kept, ignore_errors=True)
