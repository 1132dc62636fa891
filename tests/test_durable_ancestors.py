"""A root's directory and its ancestors made durable when a writer opens it, whoever created
them (``fsutil.fsync_ancestors``): up to the mount point, and past the ancestors the process
may not open. That a power loss then keeps the root is the crash explorer's ``fresh_root``
workload (tests/test_crashsim.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import distckpt
from tests.filesystems import MountFactory
from tests.other_user import NOBODY, succeeds_as_nobody
from tests.syscall_trace import assert_part_ran, trace_parts

#: conftest readies the job servers first: the traced runs are their children
NEEDS_JOB_SERVERS = True

#: the file the traced run fsyncs between the two roots' ancestors, where their calls split
BETWEEN = "between-the-roots"


@dataclass(frozen=True)
class TracedRoots:
    """The roots whose ancestors one traced interpreter fsynced, in turn, and what it fsynced
    for each."""

    #: where each root's part ran (its directory holds its traceback if it raised)
    workdir: Path
    volume: Path
    plain: Path
    plain_fsynced: list[str]
    linked: Path
    linked_fsynced: list[str]


@pytest.fixture(scope="module")
def traced_roots(mounts: MountFactory, tmp_path_factory: pytest.TempPathFactory) -> TracedRoots:
    """``fsync_ancestors`` of a plain root on a tmpfs, then of one reached through a symlinked
    directory there, in one traced run (not one each), as parts of their own
    (:func:`trace_parts`: one raising fails only its own test), their calls split at a part
    fsyncing a file between them."""
    volume = mounts.get("tmpfs").path
    plain = volume / f"runs-{uuid.uuid4().hex}" / "root"
    plain.mkdir(parents=True)
    linked = volume / f"linked-{uuid.uuid4().hex}"
    target = linked / "data" / "a" / "b"
    target.mkdir(parents=True)
    (linked / "home").mkdir()
    (linked / "home" / "ck").symlink_to(target)
    linked_root = linked / "home" / "ck" / "root"
    linked_root.mkdir()
    workdir = tmp_path_factory.mktemp("ancestors")
    ancestors = "from pathlib import Path\nfrom distckpt.fsutil import fsync_ancestors\n"
    parts = {
        "plain": f"{ancestors}fsync_ancestors(Path({os.fspath(plain)!r}))\n",
        "between": f"""
import os
between = os.open({BETWEEN!r}, os.O_RDONLY | os.O_CREAT, 0o644)
os.fsync(between)
os.close(between)
""",
        "linked": f"{ancestors}fsync_ancestors(Path({os.fspath(linked_root)!r}))\n",
    }
    fsynced = [call.path for call in trace_parts(parts, workdir, "fsync").calls]
    assert_part_ran(workdir / "between")
    # strace -y names a file by the path the kernel resolved it to
    split = fsynced.index(os.fspath(workdir.resolve() / "between" / BETWEEN))
    return TracedRoots(workdir, volume, plain, fsynced[:split], linked, fsynced[split + 1 :])


def test_the_ancestors_are_fsynced_up_to_the_mount_point(traced_roots: TracedRoots) -> None:
    """Each name from the root up is made durable by an fsync of the dir holding it, the
    mount point's last: the mount point's own name lives on another filesystem."""
    assert_part_ran(traced_roots.workdir / "plain")
    root, volume = traced_roots.plain, traced_roots.volume
    assert traced_roots.plain_fsynced == [os.fspath(root.parent), os.fspath(volume)]


def test_a_root_reached_through_a_symlink_has_its_real_ancestors_fsynced(
    traced_roots: TracedRoots,
) -> None:
    """A root under a symlinked directory lives under the link's target: the target's
    ancestors hold it, and the link's own name is on the way to it."""
    assert_part_ran(traced_roots.workdir / "linked")
    volume = traced_roots.linked
    target = volume / "data" / "a" / "b"
    real = [target, target.parent, volume / "data", volume, volume.parent]
    assert traced_roots.linked_fsynced == [os.fspath(d) for d in [*real, volume / "home"]]


def test_an_ancestor_the_job_may_not_open_does_not_fail_the_open(tmp_path: Path) -> None:
    """A job (here user nobody) whose root lies under a dir it may only traverse (mode 711,
    as many home and project dirs are) cannot fsync that dir: it opens the root and saves."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to run the job as another user")
    # A save here first: what it imports lazily lies where user nobody may not read.
    with distckpt.CheckpointManager(tmp_path / "warm-up", fsync=False) as mgr:
        mgr.save(1, {"w": torch.zeros(2)})
    # Not tmp_path: pytest's base temp dir is the user's alone (mode 700), which another user
    # may not traverse; the system temp dir is open to all.
    outer = Path(tempfile.mkdtemp(prefix="distckpt-traverse-only-"))
    try:
        outer.chmod(0o711)
        mine = outer / "mine"
        mine.mkdir()
        os.chown(mine, NOBODY, NOBODY)

        def open_and_save() -> None:
            assert not os.access(outer, os.R_OK)  # the fsync of it cannot even open it
            with distckpt.CheckpointManager(mine / "root") as mgr:
                mgr.save(1, {"w": torch.zeros(2)})

        assert succeeds_as_nobody(open_and_save), "the job could not open its root"
        assert distckpt.verify(mine / "root").ok
    finally:
        shutil.rmtree(outer)
