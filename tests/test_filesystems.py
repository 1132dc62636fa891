"""The filesystem matrix: the public API on real mounts (see tests/filesystems.py), real gloo
ranks, restores and the CLI in fresh processes.

Each filesystem runs the same cases: a 2-rank save with retention and ``best`` in both formats,
synchronous and async; a restore, ``verify`` and ``ls`` in a fresh process; a SIGKILL of rank 0
mid-save and a resume; an async "torch" save whose rank file strace shows written with direct
I/O (or buffered, where the filesystem refuses ``O_DIRECT``: ramfs, outside the matrix).
Then a case only some mounts can show: a read-only mount, and what a read-only manager refuses.
A full or small volume is in test_filesystems_space.py, what FUSE mounts keep or do not share
in test_filesystems_fuse.py.

A filesystem that loses what it renames (fusefat, FAT16 and FAT32) cannot hold checkpoints:
there the matrix proves that every save fails on every rank with :class:`distckpt.CommitLost`
and that nothing is reported committed, and that after a SIGKILL mid-save a restart finds no
checkpoint, no damage and nothing left in ``.staging``.
``scripts/gen_filesystem_table.py`` runs this file and the two beside it and writes the
results into docs/filesystems.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import distckpt
import distckpt.formats.dcp  # imported once here, not in every forked rank (seconds each)
from distckpt import faults
from distckpt.checksums import ChecksumWriter, file_checksum
from distckpt.fsutil import WRITEBACK_BYTES, start_writeback
from tests.filesystem_saves import (
    TIMEOUT,
    _cli_job,
    _hidden_files_settle,
    _save_one,
    _state,
)
from tests.filesystems import (
    KINDS,
    LOSES_RENAMED_DIRS,
    MountFactory,
    tree_snapshot,
)
from tests.ranks import run_ranks, values
from tests.syscall_trace import DirectIOSave, async_saves_traced, saves_timeout

#: conftest readies the job servers first: the traced runs are their children
NEEDS_JOB_SERVERS = True

WRITABLE = [name for name, kind in KINDS.items() if not kind.read_only]

#: filesystems of the matrix that refuse O_DIRECT (none here; ramfs, outside it, does)
REFUSE_DIRECT_IO: set[str] = set()

MATRIX = WRITABLE

#: the direct I/O tests' own limit, above the suite's: the first of them runs the fixture's one
#: traced interpreter over every filesystem, which is killed after its own timeout, this far
#: below, so that each test can report which filesystem it hung on
DIRECT_IO_TEST_TIMEOUT = pytest.mark.timeout(saves_timeout(len(MATRIX) + 1) + 120)


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


@pytest.fixture(scope="module")
def direct_io_saves(
    mounts: MountFactory, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, DirectIOSave]:
    """Per filesystem of the matrix and ramfs: an async "torch" save, its restore and
    ``verify``, all made by one traced run, one filesystem after the other (not one run per
    filesystem: see :func:`~tests.syscall_trace.async_saves_traced`). A filesystem that
    cannot be mounted is left out: its test skips (in CI: fails) in ``mounts.get``."""
    workdirs = {}
    for name in [*MATRIX, "ramfs"]:
        try:
            workdirs[name] = mounts.mount(name).path / "direct-io"
        except RuntimeError:
            continue
    traced = async_saves_traced(list(workdirs.values()), tmp_path_factory.mktemp("direct-io"))
    return {name: traced[workdir] for name, workdir in workdirs.items()}


@DIRECT_IO_TEST_TIMEOUT
@pytest.mark.parametrize("name", MATRIX)
def test_async_save_with_direct_io(
    mounts: MountFactory,
    direct_io_saves: dict[str, DirectIOSave],
    name: str,
    record_property: Callable[[str, object], None],
) -> None:
    """An async "torch" save writes its rank file with direct I/O where the file system takes
    O_DIRECT, buffered where it refuses it; restored bit for bit and verified either way.
    Which it was is read from strace of the save."""
    mounts.get(name)  # skips (in CI: fails) where it cannot be mounted
    direct = direct_io_saves[name].written_direct(commits=name not in LOSES_RENAMED_DIRS)
    record_property("shows", "direct I/O" if direct else "O_DIRECT refused: written buffered")
    assert direct is (name not in REFUSE_DIRECT_IO)  # what docs/filesystems.md says


@DIRECT_IO_TEST_TIMEOUT
def test_async_save_where_direct_io_is_refused(
    mounts: MountFactory, direct_io_saves: dict[str, DirectIOSave]
) -> None:
    """ramfs has no direct I/O (O_DIRECT: EINVAL): the async save's rank file is written
    buffered, and the save commits, restores and verifies as anywhere else."""
    mounts.get("ramfs")  # skips (in CI: fails) where it cannot be mounted
    assert direct_io_saves["ramfs"].written_direct(commits=True) is False


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


@pytest.mark.parametrize("where", ["read-only mount", "writable directory"])
def test_read_only_refusals_are_read_only_root_permission_errors(
    request: pytest.FixtureRequest, tmp_path: Path, where: str
) -> None:
    if where == "read-only mount":
        root: Path = request.getfixturevalue("read_only_root")
    else:  # read_only=True never writes, even where it could
        root = tmp_path / "ro"
        values(run_ranks(_save_one, 2, os.fspath(root), timeout=90))
    before = tree_snapshot(root)
    out = values(run_ranks(_read_only_refusals, 2, os.fspath(root), timeout=90))
    refused = ("ReadOnlyRoot", True, True, True, os.fspath(root))
    expected = {"checkpoints": [1, 2, 3], "steps": [1, 2, 3]}
    expected.update(dict.fromkeys(("save", "delete", "prune", "gc"), refused))
    assert out == [expected] * 2
    # every entry at every depth as it was: the lease record, .lock, the links, the step dirs'
    # files (a directory's mtime also changes when an entry is made and removed again)
    assert tree_snapshot(root) == before
