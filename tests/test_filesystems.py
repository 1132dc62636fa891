"""The filesystem matrix: the public API on real mounts (see tests/filesystems.py), real gloo
ranks, restores and the CLI in fresh processes.

Each filesystem runs the same cases: a 2-rank save with retention and ``best`` in both formats,
synchronous and async; a restore, ``verify`` and ``ls`` in a fresh process; a SIGKILL of rank 0
mid-save and a resume; an async "torch" save whose rank file strace shows written with direct
I/O (or buffered, where the filesystem refuses ``O_DIRECT``: ramfs, outside the matrix).
Then the cases only some mounts can show: a read-only mount, a disk filled by another process
mid-save, a small volume, files held open by a reader.

A filesystem that loses what it renames (fusefat, FAT16 and FAT32) cannot hold checkpoints:
there the matrix proves that every save fails on every rank with :class:`distckpt.CommitLost`
and that nothing is reported committed, and that after a SIGKILL mid-save a restart finds no
checkpoint, no damage and nothing left in ``.staging``.
``scripts/gen_filesystem_table.py`` runs this file and writes the results into
docs/filesystems.md.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import distckpt
import distckpt.formats.dcp  # imported once here, not in every forked rank (seconds each)
from distckpt import faults, proposal
from distckpt.checksums import ChecksumWriter, file_checksum
from distckpt.cli import main
from distckpt.fsutil import WRITEBACK_BYTES, exchange_dirs, probe_writable, start_writeback
from distckpt.lock import WriterLock
from distckpt.memory import anonymous_memory
from tests.filesystems import (
    KINDS,
    LOSES_RENAMED_DIRS,
    MountFactory,
    leaving_free,
    statvfs_free_bytes,
    take_every_free_block,
)
from tests.ranks import run_ranks, values
from tests.syscall_trace import async_save_written_direct

WRITABLE = [name for name, kind in KINDS.items() if not kind.read_only]

#: filesystems of the matrix that refuse O_DIRECT (none here; ramfs, outside it, does)
REFUSE_DIRECT_IO: set[str] = set()

TIMEOUT = 20.0

MATRIX = WRITABLE


def _state(rank: int, step: int) -> dict[str, object]:
    return {"w": torch.full((256,), float(100 * step + rank)), "step": step}


def _cli_job(rank: int, world_size: int, args: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(args)
    return code, out.getvalue()


def _cli(*args: str) -> tuple[int, str]:
    """The ``distckpt`` command line's exit code and output, in a process of its own."""
    return values(run_ranks(_cli_job, 0, list(args), timeout=120))[0]


#: the two save paths the matrix runs on every filesystem: a synchronous "torch" save and an
#: async "dcp" one (both formats, both modes, in one job)
SAVES = (("torch", False), ("dcp", True))


def _save_job(rank: int, world_size: int, root: str) -> object:
    losses = {1: 0.9, 2: 0.5, 3: 0.7}  # best is step 2; keep_last=2 removes step 1
    found = []
    for fmt, async_save in SAVES:
        with distckpt.CheckpointManager(
            Path(root) / fmt,
            keep_last=2,
            monitor="loss",
            format=fmt,
            async_save=async_save,
            timeout=TIMEOUT,
        ) as mgr:
            for step, loss in losses.items():
                result = mgr.save(step, _state(rank, step), metrics={"loss": loss})
                assert result is not None and result.done is not async_save
            mgr.wait()
            found.append((mgr.steps(), mgr.latest_step(), mgr.best_step()))
    return found


def _fresh_check_job(
    rank: int, world_size: int, roots: list[tuple[str, str, int]]
) -> dict[str, dict[str, object]]:
    report = {}
    for root, fmt, step in roots:
        for shard in (0, 1):
            template = {"w": torch.zeros(256), "step": 0}
            ckpt = distckpt.load_checkpoint(root, rank=shard, state=template)
            expected = 100 * step + (shard if fmt == "torch" else 0)
            assert ckpt.step == step, (root, ckpt.step)
            assert torch.equal(template["w"], torch.full((256,), float(expected))), root
        report[root] = {
            command: (code, json.loads(output))
            for command in ("verify", "ls")
            for code, output in [_cli_job(0, 1, [command, "--json", root])]
        }
    return report


def _fresh_check(roots: list[tuple[Path, str, int]]) -> dict[str, dict[str, object]]:
    """Every rank's ``last`` of ``roots`` (root, format, newest step) restored with
    ``load_checkpoint``, then the CLI's ``verify`` and ``ls --json``, in a fresh process: one
    that never saw the saves (forked from the test process, which saved nothing itself; a new
    interpreter would only add the seconds torch takes to import)."""
    spec = [(os.fspath(root), fmt, step) for root, fmt, step in roots]
    return values(run_ranks(_fresh_check_job, 0, spec, timeout=300))[0]


def _save_on_lossy(rank: int, world_size: int, root: str) -> object:
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        try:
            mgr.save(1, _state(rank, 1))
        except distckpt.CheckpointError as exc:
            return type(exc).__name__, str(exc), mgr.steps(), mgr.latest_step()
        return "saved", "", mgr.steps(), mgr.latest_step()


@pytest.mark.parametrize("name", MATRIX)
def test_save_retention_best_restore(
    mounts: MountFactory, name: str, record_property: Callable[[str, object], None]
) -> None:
    mount = mounts.get(name)
    root = mount.path / "save"
    if name in LOSES_RENAMED_DIRS:  # every rank fails the save, naming the problem
        for kind, message, steps, latest in values(
            run_ranks(_save_on_lossy, 2, os.fspath(root), timeout=120)
        ):
            assert kind == "CommitLost", message
            assert "lost step 1 when renaming it" in message
            assert (steps, latest) == ([], None)
        record_property(
            "shows",
            "the dir renamed into place is empty: every save fails with "
            "CommitLost on every rank, nothing committed",
        )
        return
    out = values(run_ranks(_save_job, 2, os.fspath(root), timeout=120))
    assert out == [[([2, 3], 3, 2)] * len(SAVES)] * 2
    assert _hidden_files_settle(root) == []
    report = _fresh_check([(root / fmt, fmt, 3) for fmt, _ in SAVES])
    for fmt, _ in SAVES:
        verified, listed = (
            report[os.fspath(root / fmt)]["verify"],
            report[os.fspath(root / fmt)]["ls"],
        )
        assert verified[0] == 0, verified
        assert listed[0] == 0
        assert [c["step"] for c in listed[1]["checkpoints"]] == [2, 3]
        assert listed[1]["links"] == {"last": "step-00000003", "best": "step-00000002"}
        # nothing left behind: no writer lock file, and on FUSE no .fuse_hidden* either
        assert listed[1]["leftovers"] == [], listed[1]["leftovers"]
        # links are symlinks where the filesystem takes them, pointer files elsewhere
        assert (root / fmt / "last").is_symlink() == mount.symlinks


@pytest.mark.parametrize("name", MATRIX)
def test_early_writeback(
    mounts: MountFactory, name: str, record_property: Callable[[str, object], None]
) -> None:
    """A file written as a save writes it with ``fsync=True``, long enough for early writeback
    (two stretches of WRITEBACK_BYTES and a tail, each stretch hinted as it is handed over):
    its bytes and checksum are right whether the file system takes the hint or declines it; an
    error the hint raised would fail the write. Whether it takes it is probed afterwards."""
    target = mounts.get(name).path / "writeback.bin"
    data = os.urandom(2 * WRITEBACK_BYTES + 12345)
    try:
        with ChecksumWriter(target, fsync=True) as writer:
            writer.write(data)
        assert target.read_bytes() == data
        assert writer.checksum == file_checksum(target)
        with open(target, "rb") as file:
            taken = start_writeback(file.fileno(), 0, len(data))
        record_property("shows", "hint taken" if taken else "hint declined, writes unaffected")
    finally:
        target.unlink(missing_ok=True)


@pytest.mark.parametrize("name", MATRIX)
def test_async_save_with_direct_io(
    mounts: MountFactory, name: str, record_property: Callable[[str, object], None]
) -> None:
    """An async "torch" save writes its rank file with direct I/O where the file system takes
    O_DIRECT, buffered where it refuses it; restored bit for bit and verified either way.
    Which it was is read from strace of the save."""
    workdir = mounts.get(name).path / "direct-io"
    direct = async_save_written_direct(workdir, commits=name not in LOSES_RENAMED_DIRS)
    record_property("shows", "direct I/O" if direct else "O_DIRECT refused: written buffered")
    assert direct is (name not in REFUSE_DIRECT_IO)  # what docs/filesystems.md says


def test_async_save_where_direct_io_is_refused(mounts: MountFactory) -> None:
    """ramfs has no direct I/O (O_DIRECT: EINVAL): the async save's rank file is written
    buffered, and the save commits, restores and verifies as anywhere else."""
    workdir = mounts.get("ramfs").path / "direct-io"
    assert async_save_written_direct(workdir, commits=True) is False


def _outcome(save: Callable[[], object]) -> str:
    """``"saved"``, or the name of the distckpt error the save raised."""
    try:
        save()
    except distckpt.CheckpointError as exc:
        return type(exc).__name__
    return "saved"


def _killed_mid_save(rank: int, world_size: int, root: str) -> object:
    with distckpt.CheckpointManager(root, keep_last=2, timeout=TIMEOUT) as mgr:
        first = _outcome(lambda: mgr.save(1, _state(rank, 1)))
        faults.arm("after_shard_write", "kill", rank=0)  # SIGKILL, mid-save of step 2
        return first, _outcome(lambda: mgr.save(2, _state(rank, 2)))


def _resume(rank: int, world_size: int, root: str) -> object:
    with distckpt.CheckpointManager(root, keep_last=2, timeout=TIMEOUT) as mgr:
        state = {"w": torch.zeros(256), "step": 0}
        checkpoint = mgr.restore("last", state=state)
        assert torch.equal(state["w"], _state(rank, 1)["w"])
        mgr.save(2, _state(rank, 2))
        return checkpoint.step, mgr.steps()


def _restart_with_nothing_committed(rank: int, world_size: int, root: str) -> object:
    with distckpt.CheckpointManager(root, keep_last=2, timeout=TIMEOUT) as mgr:
        # the auto-resume a restarted job does: nothing to resume from
        restored = mgr.restore("last", state={"w": torch.zeros(256), "step": 0}, missing_ok=True)
        report = distckpt.verify(root)
        return restored, mgr.latest_step(), mgr.steps(), report.ok, len(report.checkpoints)


@pytest.mark.parametrize("name", MATRIX)
def test_sigkill_mid_save_and_resume(
    mounts: MountFactory, name: str, record_property: Callable[[str, object], None]
) -> None:
    mount = mounts.get(name)
    root = mount.path / "sigkill"
    killed = run_ranks(_killed_mid_save, 2, os.fspath(root), timeout=90, expect_killed=True)
    if name in LOSES_RENAMED_DIRS:
        # Nothing ever commits there (step 1 fails with CommitLost); the kill leaves step 2's
        # staging dir. A restart must find no checkpoint and no damage, and clean up.
        assert [(r.rank, r.value) for r in killed] == [(1, ("CommitLost", "CoordinationError"))]
        restarted = run_ranks(_restart_with_nothing_committed, 2, os.fspath(root), timeout=90)
        assert values(restarted) == [(None, None, [], True, 0)] * 2
        assert os.listdir(root / ".staging") == []
        assert not any(p.name.startswith("step-") for p in root.iterdir())
        record_property(
            "shows",
            "step 1 fails with CommitLost, the kill mid-save of step 2 is seen by rank 1; a "
            "restart finds no checkpoint, verify passes, nothing left in .staging",
        )
        return
    assert [(r.rank, r.value) for r in killed] == [(1, ("saved", "CoordinationError"))]
    # the resume goes through "last", a pointer file where symlinks are refused (exFAT), in
    # fresh processes that never saw the save
    assert (root / "last").is_symlink() == mount.symlinks
    assert values(run_ranks(_resume, 2, os.fspath(root), timeout=90)) == [(1, [1, 2])] * 2
    assert os.listdir(root / ".staging") == []


# ---------------------------------------------------------------- read-only mount


def _save_one(rank: int, world_size: int, root: str) -> object:
    with distckpt.CheckpointManager(root, monitor="loss", timeout=TIMEOUT) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, _state(rank, step), metrics={"loss": {1: 0.9, 2: 0.5, 3: 0.7}[step]})
    return True


@pytest.fixture(scope="module")
def read_only_root(mounts: MountFactory) -> Path:
    """A root with steps 1-3 (best 2), written through a writable name and seen read-only."""
    mount = mounts.get("readonly")
    assert mount.writable_source is not None
    values(run_ranks(_save_one, 2, os.fspath(mount.writable_source / "ro"), timeout=90))
    return mount.path / "ro"


def test_read_only_mount_load_verify_ls(read_only_root: Path) -> None:
    with pytest.raises(OSError):  # the mount really is read-only
        (read_only_root / "probe").write_bytes(b"x")
    report = _fresh_check([(read_only_root, "torch", 3)])[os.fspath(read_only_root)]
    assert report["verify"][0] == 0, report
    assert report["ls"][1]["links"] == {"last": "step-00000003", "best": "step-00000002"}


def _read_only_manager(rank: int, world_size: int, root: str) -> object:
    mgr = distckpt.CheckpointManager(root, read_only=True, monitor="loss", timeout=TIMEOUT)
    state = {"w": torch.zeros(256), "step": 0}
    step = mgr.restore("last", state=state).step
    refused = []
    for call in (lambda: mgr.save(4, state), lambda: mgr.delete(1), mgr.prune, mgr.gc):
        try:
            call()
        except distckpt.CheckpointError as exc:
            refused.append("read_only=True" in str(exc))
    mgr.close()
    return step, mgr.latest_step(), mgr.best_step(), mgr.steps(), refused


def test_read_only_manager(read_only_root: Path) -> None:
    before = sorted(os.listdir(read_only_root))
    out = values(run_ranks(_read_only_manager, 2, os.fspath(read_only_root), timeout=90))
    assert out == [(3, 3, 2, [1, 2, 3], [True] * 4)] * 2
    assert sorted(os.listdir(read_only_root)) == before


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
        # its snapshot is page-aligned and ext4 takes O_DIRECT, test_async_save_with_direct_io)
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


# ---------------------------------------------------------------- files held open

#: how long a FUSE daemon may take to handle a close it is told of asynchronously
FUSE_RELEASE_SECONDS = 5.0


def _hidden_files_settle(root: Path) -> list[Path]:
    """The ``.fuse_hidden*`` files under ``root`` once FUSE had time to handle the closes
    before now (it deletes a hidden file when told of its last close, asynchronously): none,
    unless a file is still open or was lost to the daemon."""
    deadline = time.monotonic() + FUSE_RELEASE_SECONDS
    while True:
        hidden = sorted(root.rglob(".fuse_hidden*"))
        if not hidden or time.monotonic() > deadline:
            return hidden
        time.sleep(0.05)


@pytest.mark.parametrize("name", ["bindfs", "fuse2fs"])
def test_writer_locks_and_probes_leave_nothing_hidden(mounts: MountFactory, name: str) -> None:
    """A writer lock file and a write probe are removed while still open: a file removed
    just after its close races the FUSE daemon's asynchronous handling of that close, and
    2 to 6 in 100 were left as ``.fuse_hidden*`` for good (34 of these 600 before the fix)."""
    staging = mounts.get(name).path / "locks" / ".staging"
    staging.mkdir(parents=True)
    for number in range(300):
        claim = WriterLock(staging / f"step-{number:08d}.token")
        claim.acquire()
        claim.release()
        probe_writable(staging.parent)
    assert _hidden_files_settle(staging.parent) == []
    assert sorted(os.listdir(staging)) == [] and sorted(os.listdir(staging.parent)) == [".staging"]


@pytest.mark.parametrize("name", ["bindfs", "fuse2fs"])
def test_file_held_open_in_trash_is_in_use_then_collected(mounts: MountFactory, name: str) -> None:
    """A FUSE filesystem keeps an unlinked file that a reader holds open as .fuse_hidden*: it is
    reported in use (never as a dead writer's leftover) and removed once nobody holds it."""
    root = mounts.get(name).path / "held"
    values(run_ranks(_save_one, 2, os.fspath(root), timeout=90))
    doomed = root / ".trash" / "step-00000001.0123"
    doomed.mkdir(parents=True)
    (doomed / "rank-00000.pt").write_bytes(b"x" * 100)
    with open(doomed / "rank-00000.pt", "rb"):  # a reader that has not finished
        gc_code, gc_out = _cli("gc", os.fspath(root))
        hidden = [p for p in (doomed).iterdir() if p.name.startswith(".fuse_hidden")]
        assert hidden, f"{name} did not keep the open file as .fuse_hidden*: {gc_out}"
        listed = _cli("ls", os.fspath(root))[1]
        assert "in use" in listed and "dead writer" not in listed, listed
        assert "nothing to collect" not in gc_out and gc_code != 0, gc_out
    time.sleep(0.2)  # the FUSE daemon releases the hidden file when the last handle closes
    assert _cli("gc", os.fspath(root))[0] == 0
    assert not doomed.exists()


# ---------------------------------------------------------------- two writers, unshared locks

# The other job opens its manager first (its start-up cleanup would take this job's staging
# dir for a dead writer's: the writer lock does not reach it either), then saves on request.
_OTHER_WRITER = """
import sys, torch, distckpt
with distckpt.CheckpointManager(sys.argv[1], timeout=20) as mgr:
    print("open", flush=True)
    sys.stdin.readline()
    try:
        mgr.save(1, {"w": torch.ones(4)})
    except distckpt.LeaseLost as exc:
        print("fenced:", exc, flush=True)
        sys.exit(3)
"""


def test_two_writers_the_lock_does_not_reach_never_both_commit(mounts: MountFactory) -> None:
    """Two jobs on one directory whose ``flock`` locks are not shared: here bindfs and the
    directory under it (flock on a bindfs mount does not reach the underlying directory), as
    on two NFS clients with local locks. The lease *record* still reaches both: the job that
    opened the root last holds it, and the other one's save is fenced with ``LeaseLost``,
    nothing of it visible."""
    bindfs = mounts.get("bindfs")
    assert bindfs.writable_source is not None
    here, there = bindfs.path / "two-writers", bindfs.writable_source / "two-writers"
    other = subprocess.Popen(
        [sys.executable, "-c", _OTHER_WRITER, os.fspath(there)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout is not None and other.stdout.readline() == "open\n"
        with distckpt.CheckpointManager(here, timeout=TIMEOUT) as mgr:
            out, err = other.communicate("save\n", timeout=120)
            assert other.returncode == 3 and "fenced:" in out, err
            assert mgr.save(1, {"w": torch.zeros(4)}) is not None
    finally:
        if other.returncode is None:
            other.kill()
            other.wait()
    loaded = distckpt.load_checkpoint(here)
    assert loaded.step == 1 and torch.equal(loaded.state["w"], torch.zeros(4))
    assert [p for p in (here / ".staging").iterdir() if p.is_dir()] == []


def test_a_step_committed_between_the_lease_check_and_the_rename(
    mounts: MountFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one window the lease record leaves on such mounts: another writer's ``step-N``
    lands between this commit's check under the lock and its rename. The rename must then
    fail saying so (``ConcurrentCommit``), not "Directory not empty". The other writer's
    rename is made here by a hook at our own fault point (a real directory on the real mount),
    because no second job can be scheduled into that window any other way."""
    bindfs = mounts.get("bindfs")
    assert bindfs.writable_source is not None
    here = bindfs.path / "collision"
    real_hit = faults.hit

    def another_writer_renames_first(point: str, rank: int) -> None:
        if point == "before_rename":
            landed = here / "step-00000001"
            landed.mkdir()
            (landed / "rank-00000.pt").write_bytes(b"the other writer's data")
        real_hit(point, rank)

    monkeypatch.setattr(faults, "hit", another_writer_renames_first)
    with (
        distckpt.CheckpointManager(here, timeout=TIMEOUT) as mgr,
        pytest.raises(distckpt.ConcurrentCommit) as info,
    ):
        mgr.save(1, {"w": torch.zeros(4)})
    message = str(info.value)
    assert "step 1 was committed by another writer meanwhile" in message
    assert "does not reach that writer" in message and "NFS" in message
    assert isinstance(info.value, FileExistsError) and info.value.step == 1
    assert (here / "step-00000001" / "rank-00000.pt").read_bytes() == b"the other writer's data"
    assert [p for p in (here / ".staging").iterdir() if p.is_dir()] == []


def _read_only_refusals(rank: int, world_size: int, root: str) -> dict[str, object]:
    """Every change asked of a read-only manager, as (error type, is a ReadOnlyRoot, a
    RootNotWritable, a PermissionError, its path field); and the steps checkpoints() lists."""
    out: dict[str, object] = {}
    with distckpt.CheckpointManager(root, read_only=True, timeout=TIMEOUT) as mgr:
        out["checkpoints"] = [info.step for info in mgr.checkpoints()]
        changes: dict[str, Callable[[], object]] = {
            "save": lambda: mgr.save(4, _state(rank, 4)),
            "delete": lambda: mgr.delete(1),
            "prune": mgr.prune,
            "gc": mgr.gc,
        }
        for name, change in changes.items():
            try:
                change()
            except distckpt.CheckpointError as exc:
                out[name] = (
                    type(exc).__name__,
                    isinstance(exc, distckpt.ReadOnlyRoot),
                    isinstance(exc, distckpt.RootNotWritable),
                    isinstance(exc, PermissionError),
                    exc.path,
                )
        out["steps"] = mgr.steps()
    return out


def _tree_snapshot(root: Path) -> dict[str, tuple[int, int, str | None]]:
    """``root`` and every entry under it, by its path relative to ``root``: its size, its
    modification time in ns and, for a link, its target (a link is not followed)."""
    snapshot: dict[str, tuple[int, int, str | None]] = {}
    for entry in [root, *root.rglob("*")]:  # rglob does not descend into linked directories
        stat = entry.lstat()
        target = os.readlink(entry) if entry.is_symlink() else None
        snapshot[os.fspath(entry.relative_to(root))] = (stat.st_size, stat.st_mtime_ns, target)
    return snapshot


@pytest.mark.parametrize("where", ["read-only mount", "writable directory"])
def test_read_only_refusals_are_read_only_root_permission_errors(
    request: pytest.FixtureRequest, tmp_path: Path, where: str
) -> None:
    if where == "read-only mount":
        root: Path = request.getfixturevalue("read_only_root")
    else:  # read_only=True never writes, even where it could
        root = tmp_path / "ro"
        values(run_ranks(_save_one, 2, os.fspath(root), timeout=90))
    before = _tree_snapshot(root)
    out = values(run_ranks(_read_only_refusals, 2, os.fspath(root), timeout=90))
    refused = ("ReadOnlyRoot", True, True, True, os.fspath(root))
    expected = {"checkpoints": [1, 2, 3], "steps": [1, 2, 3]}
    expected.update(dict.fromkeys(("save", "delete", "prune", "gc"), refused))
    assert out == [expected] * 2
    # every entry at every depth as it was: the lease record, .lock, the links, the step dirs'
    # files (a directory's mtime also changes when an entry is made and removed again)
    assert _tree_snapshot(root) == before


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
    1 MiB floor refuses it, and a margin of 0 takes it."""
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


def test_an_error_between_the_two_renames_of_an_overwrite_puts_the_old_step_back(
    mounts: MountFactory,
) -> None:
    """Where two names cannot be exchanged (bindfs refuses RENAME_EXCHANGE), ``overwrite=True``
    moves the old step into the trash, then renames the new one into place. An error raised
    between the two (an injected one here: a real one is an I/O error) fails the save and, as
    a failed save leaves the root as it was, the old step is renamed back, not left in the
    trash to be deleted."""
    root = mounts.get("bindfs").path / "overwrite-error"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    assert not exchange_dirs(root / "a", root / "b", fsync=False)  # the fallback runs here
    (root / "a").rmdir()
    (root / "b").rmdir()
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        mgr.save(1, {"w": torch.ones(1)})
        mgr.save(2, {"w": torch.full((1,), 2.0)})
        faults.arm("during_delete", "raise", rank=0)
        try:
            with pytest.raises(Exception, match="during_delete"):
                mgr.save(2, {"w": torch.full((1,), 20.0)}, overwrite=True)
        finally:
            faults.disarm()
        assert mgr.steps() == [1, 2]
        assert os.readlink(root / "last") == "step-00000002"
        assert not (root / ".trash").exists() or os.listdir(root / ".trash") == []
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        assert mgr.steps() == [1, 2]
        assert torch.equal(mgr.restore(2, verify=True).state["w"], torch.full((1,), 2.0))
