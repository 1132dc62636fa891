"""What makes a directory a checkpoint root (distckpt.layout.holds_a_root), on real dirs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import distckpt
from distckpt.layout import holds_a_root


def _step_dir(directory: Path, *, manifest: bool) -> None:
    (directory / "step-00000010").mkdir()
    if manifest:
        (directory / "step-00000010" / "manifest.json").write_text("{}")


def _exported_into(directory: Path) -> None:
    """``directory/model.pt``, as an export there writes it."""
    directory.mkdir()
    (directory / "model.pt").write_bytes(b"exported")


def _links_to(target: str, *, pointer: bool, manifest: bool = False) -> Callable[[Path], None]:
    def make(directory: Path) -> None:
        (directory / target).mkdir(exist_ok=True)
        if manifest:
            (directory / target / "manifest.json").write_text("{}")
        if pointer:
            (directory / "last").write_text(target + "\n")
        else:
            (directory / "last").symlink_to(target, target_is_directory=True)

    return make


@pytest.mark.parametrize(
    ("make", "is_root"),
    [
        (lambda d: None, False),
        (lambda d: (d / ".lock").touch(), False),  # another tool's lock file
        (lambda d: [(d / name).mkdir() for name in (".staging", ".trash")], False),
        (
            lambda d: [_exported_into(d / name) for name in ("last", "best")],
            False,
        ),
        (lambda d: (d / "damaged-x").mkdir(), False),
        (lambda d: _step_dir(d, manifest=False), False),  # a dir of exports named by step
        (_links_to("exp1", pointer=False), False),  # a user's link to one of their roots
        (_links_to("exp1", pointer=True), False),
        (lambda d: (d / ".lease").touch(), False),  # another tool's lock file of that name
        (lambda d: (d / ".lease.json").touch(), True),
        (lambda d: (d / ".lease.0123456789abcdef0123456789abcdef.lingering").touch(), True),
        (lambda d: _step_dir(d, manifest=True), True),
        (_links_to("step-00000010", pointer=False, manifest=True), True),
        (_links_to("step-00000010", pointer=True, manifest=True), True),
        # a sweep's link to its newest trial dir, a directory of roots
        (_links_to("step-00000010", pointer=False), False),
        (_links_to("step-00000010", pointer=True), False),
    ],
    ids=[
        "empty",
        "foreign-lock",
        "staging-and-trash",
        "link-named-dirs",
        "damaged-named-dir",
        "step-dir-without-manifest",
        "last-symlink-to-a-root",
        "last-pointer-to-a-root",
        "foreign-lease-lock",
        "lease-record",
        "lingering-lease-lock",
        "committed-step-dir",
        "last-symlink-to-a-step-dir",
        "last-pointer-to-a-step-dir",
        "last-symlink-to-an-uncommitted-step-dir",
        "last-pointer-to-an-uncommitted-step-dir",
    ],
)
def test_a_root_is_told_by_what_only_a_root_has(
    tmp_path: Path, make: Callable[[Path], object], is_root: bool
) -> None:
    make(tmp_path)
    assert holds_a_root(tmp_path) is is_root


def test_a_root_a_job_opened_and_closed_without_saving_is_one(tmp_path: Path) -> None:
    """Its lease files stay after close: it is a root before its first checkpoint."""
    distckpt.CheckpointManager(tmp_path / "root", fsync=False).close()
    assert (tmp_path / "root" / ".lease").is_file()
    assert (tmp_path / "root" / ".lease.json").is_file()
    assert holds_a_root(tmp_path / "root")
    assert not holds_a_root(tmp_path)
    assert not holds_a_root(tmp_path / "missing")
