"""A filesystem that fails under a save: an ext4 root mounted ``errors=remount-ro`` that the
kernel turns read-only after a real filesystem error (``/sys/fs/ext4/<dev>/trigger_fs_error``,
as after a disk error) while the save is made. Every rank raises the same error; the staging
area that can no longer be removed does not replace it, its writer lock is released, and once
the filesystem is repaired the next save works and gc removes the leftover.

And a disk that fails under a filesystem: an ext4 image on a tmpfs smaller than the image,
filled up, so the disk takes no new block (a thin-provisioned disk out of room). Writes land in
the page cache; their fsync, of a file or of a directory, is where the failure shows, and it
must be raised, named after the file or the directory."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import distckpt
from distckpt import events
from distckpt.checksums import ChecksumWriter
from distckpt.fsutil import fsync_dir, swap_link
from distckpt.protocol import out_of_space, ran_out_of_space
from distckpt.storage.posix import PosixRootStore
from tests.filesystem_saves import TIMEOUT
from tests.filesystems import (
    _run,
    not_mountable_reason,
    skip_or_fail,
    take_every_free_block,
    unmount,
)
from tests.ranks import run_ranks, values

IMAGE_MIB = 32


def _mount_ext4(image: Path, target: Path, *options: str) -> str:
    """Mount ``image`` on ``target`` through a loop device; the device's name (``loop3``)."""
    _run("mount", "-o", ",".join(("loop", *options)), image, target)
    source = subprocess.run(
        ["findmnt", "-n", "-o", "SOURCE", target], capture_output=True, text=True, check=True
    ).stdout.strip()
    return os.path.basename(source)


@contextlib.contextmanager
def _ext4_that_fails(base: Path) -> Iterator[tuple[Path, Path, Path]]:
    """A fresh ext4 image mounted ``errors=remount-ro``: (the mount, the file whose write makes
    the kernel fail the filesystem, the image). Skipped (in CI: failed) where it cannot be made."""
    reason = not_mountable_reason(("mkfs.ext4",))
    if reason is not None:
        skip_or_fail(reason)
    image, target = base / "ext4.img", base / "ext4"
    target.mkdir()
    _run("truncate", "-s", f"{IMAGE_MIB}M", image)
    _run("mkfs.ext4", "-q", "-F", image)
    device = _mount_ext4(image, target, "errors=remount-ro")
    try:
        trigger = Path("/sys/fs/ext4", device, "trigger_fs_error")
        if not trigger.exists():
            skip_or_fail(f"this kernel has no {trigger} to fail an ext4 filesystem with")
        yield target, trigger, image
    finally:
        unmount(target)


def _save_as_the_filesystem_fails(
    rank: int, world_size: int, root: str, trigger: str, async_save: bool
) -> tuple[str, str, list[bool]]:
    """Save step 1, then step 2 with the filesystem failed by rank 1 once the save is proposed
    (rank 0 has made the staging dir). Returns the error's type and message and, on rank 0,
    whether each staging dir left is still locked by a live writer."""
    manager = distckpt.CheckpointManager(root, async_save=async_save, timeout=TIMEOUT)
    manager.save(1, {"w": torch.ones(1024)})
    manager.wait()

    def fail_the_filesystem(event: events.PhaseEvent) -> None:
        if event.phase == "save.propose" and event.step == 2 and rank == 1:
            Path(trigger).write_text("distckpt test: a disk error")

    stop_listening = events.add_listener(fail_the_filesystem)
    try:
        manager.save(2, {"w": torch.ones(1024)})
        manager.wait()
        raised = ("nothing", "")
    except Exception as exc:
        raised = (type(exc).__name__, str(exc))
    finally:
        stop_listening()
    staging = Path(root, ".staging")
    locked = [_locked(entry) for entry in sorted(staging.glob("*.lock")) if rank == 0]
    with contextlib.suppress(distckpt.CheckpointError, OSError):  # the root is read-only
        manager.close()
    return raised[0], raised[1], locked


def _locked(lock_file: Path) -> bool:
    """Whether a writer holds ``lock_file``'s flock, probed read-only (WriterLock's own probe
    opens it for writing, which a read-only filesystem refuses)."""
    descriptor = os.open(lock_file, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)
    return False


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_filesystem_failing_under_a_save_raises_the_same_error_on_every_rank(
    tmp_path: Path, async_save: bool
) -> None:
    with _ext4_that_fails(tmp_path) as (mount, trigger, image):
        root = mount / "root"
        outcomes = values(
            run_ranks(
                _save_as_the_filesystem_fails,
                2,
                os.fspath(root),
                os.fspath(trigger),
                async_save,
                timeout=90,
            )
        )
        (kind_0, message_0, locked), (kind_1, message_1, _) = outcomes
        assert (kind_0, message_0) == (kind_1, message_1)
        assert kind_0 == "RankFailure", message_0
        assert locked == [False], "the staging left behind is still locked"
        unmount(mount)
        # Repaired, as after the disk error: e2fsck exits 1 when it corrected errors.
        repair = subprocess.run(["e2fsck", "-f", "-y", image], capture_output=True, check=False)
        assert repair.returncode in (0, 1), repair.stdout
        _mount_ext4(image, mount)
        with distckpt.CheckpointManager(root, timeout=TIMEOUT) as manager:
            manager.gc()
            assert [e.name for e in (root / ".staging").iterdir()] == []
            assert manager.save(3, {"w": torch.ones(1024)}) is not None
            assert manager.steps() == [1, 3]


def test_a_bug_in_discarding_the_staging_area_is_raised_not_only_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a failing filesystem or store (OSError, CheckpointError) is logged when the staging
    area cannot be discarded: a programming error in a backend's discard is raised."""

    def discard_with_a_bug(store: object, area: object) -> None:
        raise TypeError("unsupported operand type(s)")

    # A programming error cannot be produced by any real backend on purpose: the discard of
    # the POSIX store is replaced by one that has such a bug.
    monkeypatch.setattr(PosixRootStore, "discard_staging", discard_with_a_bug)
    manager = distckpt.CheckpointManager(tmp_path, timeout=TIMEOUT, fsync=False)
    with manager, pytest.raises(TypeError):
        manager.save(1, {"w": torch.ones(4)}, force=True)


@contextlib.contextmanager
def _ext4_on_a_disk_that_fills(base: Path) -> Iterator[tuple[Path, Callable[[], None]]]:
    """A fresh ext4 whose disk is an image of :data:`IMAGE_MIB` on a tmpfs of 8 MiB: (the mount,
    a function that fills the tmpfs, after which the disk fails every write of a block it has
    not stored yet). Its journal is left unwritten by mkfs (``lazy_journal_init``), so each
    commit writes blocks the full disk refuses. Skipped (in CI: failed) where it cannot be
    made."""
    reason = not_mountable_reason(("mkfs.ext4",))
    if reason is not None:
        skip_or_fail(reason)
    backing, target = base / "backing", base / "ext4"
    backing.mkdir()
    target.mkdir()
    _run("mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", backing)
    try:
        image = backing / "ext4.img"
        _run("truncate", "-s", f"{IMAGE_MIB}M", image)
        _run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=1", image)
        _mount_ext4(image, target)
        try:
            yield target, lambda: take_every_free_block(backing, backing / "hog")
        finally:
            unmount(target)
    finally:
        unmount(backing)


def test_a_disk_that_fails_the_fsync_of_a_file_names_the_file(tmp_path: Path) -> None:
    """Every write is taken into the page cache; the fsync on close is the first to hear of
    the disk's failure (ENOSPC: the loop device's write to the full tmpfs), and raises it named
    after the file, as a failed write is. The save's space mapping then names the rank file,
    not the staging directory it falls back to for an unnamed error."""
    with _ext4_on_a_disk_that_fills(tmp_path) as (mount, fill_the_disk):
        fill_the_disk()
        path = mount / "rank-00000.pt"
        with pytest.raises(OSError) as info, ChecksumWriter(path, fsync=True) as writer:
            writer.write(os.urandom(100_000))
        assert info.value.errno == errno.ENOSPC, info.value
        assert info.value.filename == os.fspath(path)
        full = out_of_space(info.value)
        assert full is not None, info.value
        space = ran_out_of_space(full, root=mount, rank=0, step=2, path=mount / "staging")
        assert f"wrote {path} for step 2" in str(space), space


def test_a_write_that_finds_the_disk_full_is_the_error_raised_not_the_fsync_after_it(
    tmp_path: Path,
) -> None:
    """A write finds the filesystem full (ENOSPC) while the disk under it cannot store what was
    written before either: closing the lost file does not fsync it, so the write's error is the
    one raised and kept, not replaced by the fsync's."""
    with _ext4_on_a_disk_that_fills(tmp_path) as (mount, fill_the_disk):
        write_error: OSError | None = None
        with (
            pytest.raises(OSError) as info,
            ChecksumWriter(mount / "rank-00000.pt", fsync=True) as writer,
        ):
            writer.write(os.urandom(2 << 20))
            fill_the_disk()
            try:
                writer.write(os.urandom((IMAGE_MIB + 8) << 20))  # more than the filesystem holds
            except OSError as exc:
                write_error = exc
                raise
        assert write_error is not None and write_error.errno == errno.ENOSPC, write_error
        assert info.value is write_error, info.value
        assert writer.error is write_error


def test_a_disk_that_fails_the_fsync_of_a_directory_raises_it(tmp_path: Path) -> None:
    """A directory's new entry that the disk cannot store fails its fsync (EIO, the journal's
    commit refused): raised named after it, never taken for a filesystem that cannot fsync
    directories."""
    with _ext4_on_a_disk_that_fills(tmp_path) as (mount, fill_the_disk):
        directory = mount / "staging"
        directory.mkdir()
        # the directory itself is on the disk before it fills (ext4: one journal commit)
        fsync_dir(directory)
        fsync_dir(mount)
        fill_the_disk()
        (directory / "rank-0.pt").touch()
        with pytest.raises(OSError) as info:
            fsync_dir(directory)
        assert info.value.errno in (errno.EIO, errno.ENOSPC), info.value
        assert info.value.filename == os.fspath(directory)


def test_a_pointer_link_the_disk_fails_to_store_is_named_after_the_link(tmp_path: Path) -> None:
    """``last`` written as a pointer file onto the failing disk: the fsync of the pointer file
    raises, named after the link, as :func:`~distckpt.fsutil.atomic_write` names its file."""
    with _ext4_on_a_disk_that_fills(tmp_path) as (mount, fill_the_disk):
        (mount / "step-1").mkdir()
        fsync_dir(mount)  # the step is on the disk before it fills
        fill_the_disk()
        link = mount / "last"
        with pytest.raises(OSError) as info:
            swap_link(link, "step-1", mode="pointer", trash_root=mount / ".trash", fsync=True)
        assert info.value.errno in (errno.ENOSPC, errno.EIO), info.value
        assert info.value.filename == os.fspath(link)


def _save_as_the_disk_fills(
    rank: int, world_size: int, root: str, fill_the_disk: Callable[[], None]
) -> tuple[str, str]:
    """Save step 1, then step 2 with the disk filled by rank 0 once the save is proposed; the
    error step 2 raised, by type and message."""
    manager = distckpt.CheckpointManager(root, timeout=TIMEOUT)
    manager.save(1, {"w": torch.ones(1024)})

    def fill_once_proposed(event: events.PhaseEvent) -> None:
        if event.phase == "save.propose" and event.step == 2 and rank == 0:
            fill_the_disk()

    stop_listening = events.add_listener(fill_once_proposed)
    try:
        manager.save(2, {"w": torch.randn(100_000)})
        raised = ("nothing", "")
    except Exception as exc:
        raised = (type(exc).__name__, str(exc))
    finally:
        stop_listening()
    with contextlib.suppress(distckpt.CheckpointError, OSError):  # the disk is gone
        manager.close()
    return raised


def test_a_save_onto_a_disk_that_fails_names_what_it_could_not_store(tmp_path: Path) -> None:
    """docs/faults.md, disk errors: every rank raises the same error, which names the root, and
    each OSError in it names the file or directory whose fsync the disk failed (which one
    fails first, and whether as EIO or ENOSPC, the kernel's timing decides)."""
    with _ext4_on_a_disk_that_fills(tmp_path) as (mount, fill_the_disk):
        root = mount / "root"
        # fork-started ranks: the filling function goes to them as it is
        outcomes = values(
            run_ranks(_save_as_the_disk_fills, 2, os.fspath(root), fill_the_disk, timeout=90)
        )
        (kind_0, message_0), (kind_1, message_1) = outcomes
        assert (kind_0, message_0) == (kind_1, message_1)
        assert kind_0 in ("RankFailure", "InsufficientSpace"), message_0
        assert os.fspath(root) in message_0
        unnamed_os_error = r"\[Errno \d+\] [^:;']*(;|$)"
        assert not re.search(unnamed_os_error, message_0), message_0
        # A rank's InsufficientSpace (alone or inside the RankFailure) names the file whose
        # fsync found no room; an unnamed ENOSPC would name the staging directory instead.
        for written in re.findall(r"ran out of space while rank \d+ wrote (\S+) for", message_0):
            assert re.search(r"/rank-\d{5}\.pt$", written), message_0
