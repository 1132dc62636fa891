"""A filesystem that ignores case (exFAT through exfat-fuse, a real mount): ``export`` under a
root's own names spelled in another case, two jobs naming one root in two cases, and extra
files whose names a checkpoint's own names take in another case."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import distckpt
from distckpt.errors import InvalidArgument, RootInUse
from distckpt.layout import RootLayout, on_disk_spelling
from distckpt.storage import open_store
from tests.cli_runner import run_cli
from tests.filesystems import MountFactory
from tests.lease_holders import Holder, start_holder


def _root_of_two_steps(root: Path) -> Path:
    with distckpt.CheckpointManager(root) as manager:
        for step in (1, 2):
            manager.save(step, {"w": torch.ones(4) * step})
    return root


def _listing(root: Path) -> dict[str, list[str]]:
    return {str(path): sorted(names) for path, _, names in os.walk(root)}


@pytest.mark.parametrize(
    "out",
    [
        "STEP-00000002/rank-00000.pt",
        "Step-00000002/model.pt",
        "STEP-00000001/RANK-00000.PT",
        "LAST",
        "Last/model.pt",
        ".STAGING/x.pt",
    ],
)
def test_export_under_a_roots_own_name_in_another_case_is_refused(
    mounts: MountFactory, out: str
) -> None:
    """exFAT opens ``ROOT/LAST`` as the ``last`` pointer file and ``ROOT/STEP-00000002`` as the
    committed step dir (exfat-fuse gives each spelling an inode of its own, so no device and
    inode comparison tells): such an ``out_file`` is refused before anything is written."""
    root = _root_of_two_steps(mounts.get("exfat").path / f"case-export-{out.replace('/', '_')}")
    before = _listing(root)
    with pytest.raises(InvalidArgument, match="under its own name"):
        distckpt.export(root / "step-00000002", root / out)
    assert _listing(root) == before
    assert (root / "last").read_text().strip() == "step-00000002"
    assert distckpt.load_checkpoint(root).step == 2


def test_export_into_the_checkpoint_it_exports_in_another_case_is_refused(
    mounts: MountFactory,
) -> None:
    """A copy of a checkpoint (no root's step dir) exported into itself, spelled otherwise."""
    base = mounts.get("exfat").path / "case-export-copy"
    root = _root_of_two_steps(base / "root")
    shutil.copytree(root / "step-00000002", base / "best-model")
    with pytest.raises(InvalidArgument, match="inside the checkpoint being exported"):
        distckpt.export(base / "best-model", base / "BEST-MODEL" / "model.pt")
    assert sorted(os.listdir(base / "best-model")) == sorted(os.listdir(root / "step-00000002"))


def test_a_roots_names_in_another_case_are_refused_where_case_matters_too(
    tmp_path: Path,
) -> None:
    """Compared ignoring case on every filesystem, as the README says: ``ROOT/LAST`` would be
    the pointer itself wherever the root is copied to a filesystem that ignores case."""
    root = _root_of_two_steps(tmp_path / "root")
    with pytest.raises(InvalidArgument, match="under its own name 'LAST'"):
        distckpt.export(root / "step-00000002", root / "LAST")
    assert not (root / "LAST").exists()
    assert distckpt.export(root / "step-00000002", root / "model.pt") == root / "model.pt"


def test_on_disk_spelling_respells_only_what_the_disk_matches(
    mounts: MountFactory, tmp_path: Path
) -> None:
    base = mounts.get("exfat").path / "case-spelling"
    (base / "run").mkdir(parents=True)
    assert on_disk_spelling(base / "RUN" / "new") == base / "run" / "new"
    assert on_disk_spelling(base / "Other" / "x") == base / "Other" / "x"  # not there yet
    (tmp_path / "run").mkdir()  # a filesystem that tells cases apart: RUN is another name
    assert on_disk_spelling(tmp_path / "RUN") == tmp_path / "RUN"
    assert on_disk_spelling(tmp_path / "run") == tmp_path / "run"


def test_two_jobs_naming_one_root_in_two_cases_do_not_both_hold_it(
    mounts: MountFactory, holders: list[Holder]
) -> None:
    """exfat-fuse keeps a ``flock`` per spelling's inode: ``run/.lease`` and ``RUN/.lease``
    did not exclude each other, and both jobs committed into one root. Each job now locks
    the names the disk lists, whatever spelling it was given."""
    base = mounts.get("exfat").path / "case-lease"
    (base / "run").mkdir(parents=True)
    first = start_holder(holders, base / "run")
    assert first.line() == "held 1"
    second = start_holder(holders, base / "RUN")
    assert second.line().startswith(f"refused RootInUse root {base / 'run'} is in use")
    with pytest.raises(RootInUse, match=f"pid {first.pid}"):
        distckpt.CheckpointManager(base / "Run")
    assert first.ask("check") == "current"


def test_a_root_reached_through_a_symlink_to_another_case_is_the_same_root(
    mounts: MountFactory, holders: list[Holder], tmp_path: Path
) -> None:
    """A symlink whose target is spelled ``RUN`` kept that spelling on the way: both jobs held
    the root. Its target is spelled as the disk lists it; where that spelling is already the
    listed one, the symlinked path is kept as given."""
    base = mounts.get("exfat").path / "case-symlink"
    (base / "run").mkdir(parents=True)
    link = tmp_path / "link-to-RUN"
    link.symlink_to(base / "RUN")
    first = start_holder(holders, base / "run")
    assert first.line() == "held 1"
    second = start_holder(holders, link)
    assert second.line().startswith(f"refused RootInUse root {base / 'run'} is in use")
    assert RootLayout.at(link / "sub").root == base / "run" / "sub"
    (tmp_path / "run").mkdir()
    (tmp_path / "link-to-run").symlink_to(tmp_path / "run")
    assert RootLayout.at(tmp_path / "link-to-run").root == tmp_path / "link-to-run"


def test_a_root_another_job_creates_in_another_case_before_the_open_is_locked_as_listed(
    mounts: MountFactory, holders: list[Holder]
) -> None:
    """A store made for ``RUN`` while no such root existed, whose root another job then
    created as ``run``, takes the lease and the lock in the spelling that job takes them in."""
    base = mounts.get("exfat").path / "case-create-race"
    base.mkdir()
    store = open_store(base / "RUN")
    assert store.root == base / "RUN"  # not there yet: spelled as given
    (base / "run").mkdir()  # the other job's mkdir, between this store's making and its open
    store.open()
    try:
        assert store.root == base / "run"
        held = start_holder(holders, base / "run")
        assert held.line().startswith(f"refused RootInUse root {base / 'run'} is in use")
        assert sorted(os.listdir(base / "run")) == sorted(os.listdir(base / "RUN"))
        assert ".lock" in os.listdir(base / "run")
    finally:
        store.close()


def test_gc_leaves_the_live_staging_of_a_job_that_opened_the_root_through_a_symlink(
    mounts: MountFactory, tmp_path: Path
) -> None:
    """``distckpt gc run`` took the writer lock of a staging dir by the disk's spelling while
    the job held it by its symlink's (``RUN``): it found it free and deleted a live save."""
    base = mounts.get("exfat").path / "case-gc"
    (base / "run").mkdir(parents=True)
    link = tmp_path / "link-to-RUN"
    link.symlink_to(base / "RUN")
    store = open_store(link)
    store.open()
    try:
        area = store.begin_staging(2, "live0000token")
        done = run_cli("gc", os.fspath(base / "run"))
        assert done.returncode == 0, done.stderr
        assert "writer alive" in done.stdout + done.stderr
        assert os.path.isdir(area.location)
        store.discard_staging(area)
    finally:
        store.close()


def test_a_parent_is_not_listed_where_case_is_told_apart(tmp_path: Path) -> None:
    """Listing each ancestor at every open cost a listing of every large parent (a home of
    100k entries): where no other spelling of a name opens anything, its parent is not listed.
    Told by the parent's access time, which a listing sets (relatime: when it is a day old)."""
    parent, control = tmp_path / "parent", tmp_path / "control"
    (parent / "Run").mkdir(parents=True)
    control.mkdir()
    for directory in (parent, control):
        os.utime(directory, (0, os.stat(directory).st_mtime))
    os.listdir(control)
    if os.stat(control).st_atime == 0:
        pytest.skip(f"{tmp_path} does not record access times (noatime)")
    assert on_disk_spelling(parent / "Run" / "new") == parent / "Run" / "new"
    assert os.stat(parent).st_atime == 0


@pytest.mark.parametrize(
    ("fmt", "name", "own"),
    [
        ("torch", "Manifest.json", "manifest.json"),
        ("torch", "RANK-00000.PT", "rank-00000.pt"),
        ("dcp", ".METADATA", ".metadata"),
        ("dcp", "__0_0.DistCP", "__0_0.distcp"),
        # a root's lease files: a bucket's gc took a save holding ".lease" for a root of its own
        ("torch", ".Lease", ".lease"),
        ("dcp", ".LEASE.json", ".lease.json"),
    ],
)
def test_an_extra_file_named_like_a_checkpoints_own_in_another_case_is_refused(
    tmp_path: Path, fmt: str, name: str, own: str
) -> None:
    """Refused on every filesystem before anything is written, so that a checkpoint stays whole
    wherever it is copied; the format tells which names are its own."""
    with distckpt.CheckpointManager(tmp_path / "root", format=fmt) as manager:
        refused = f"{re.escape(repr(name))} is not allowed: .* {re.escape(repr(own))}"
        with pytest.raises(InvalidArgument, match=refused):
            manager.save(1, {"w": torch.ones(4)}, files={name: b"hello"})
        assert manager.steps() == []
        assert list((tmp_path / "root" / ".staging").glob("*")) == []


def test_extra_files_whose_names_differ_only_in_case_are_refused(tmp_path: Path) -> None:
    with distckpt.CheckpointManager(tmp_path / "root") as manager:
        with pytest.raises(InvalidArgument, match=r"'notes\.txt' and 'Notes\.txt' differ only in"):
            manager.save(1, {"w": torch.ones(4)}, files={"notes.txt": b"a", "Notes.txt": b"b"})
        assert manager.save(2, {"w": torch.ones(4)}, files={"notes.txt": b"a"}).step == 2


def test_an_extra_manifest_in_another_case_on_exfat_damages_nothing(mounts: MountFactory) -> None:
    """On exFAT ``Manifest.json`` was written over the checkpoint's ``manifest.json``: the save
    returned, and the next start set the checkpoint aside as damaged."""
    root = mounts.get("exfat").path / "case-extra-manifest"
    with distckpt.CheckpointManager(root) as manager:
        manager.save(1, {"w": torch.ones(4)})
        with pytest.raises(InvalidArgument, match=r"'Manifest\.json' is not allowed"):
            manager.save(2, {"w": torch.ones(4)}, files={"Manifest.json": b"hello"})
    with distckpt.CheckpointManager(root) as manager:
        assert manager.steps() == [1]
        assert manager.restore("last").step == 1
    assert not [entry for entry in os.listdir(root) if entry.startswith("damaged-")]


def test_extra_files_named_like_a_roots_other_entries_are_stored(tmp_path: Path) -> None:
    """Only a root's lease files are refused as extra-file names: ``last``, ``best`` or a step
    dir's name inside a save fool no reader, gc or verify."""
    files = {"last": b"a", "best": b"b", "step-1": b"c", "damaged-step-1-notes.txt": b"d"}
    with distckpt.CheckpointManager(tmp_path / "root") as manager:
        assert manager.save(1, {"w": torch.ones(4)}, files=files).step == 1
        assert manager.gc() == []
    assert distckpt.verify(tmp_path / "root").ok
    assert (tmp_path / "root" / "step-00000001" / "step-1").read_bytes() == b"c"
