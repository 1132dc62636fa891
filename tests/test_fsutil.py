"""The filesystem primitives behind every commit: link swaps, atomic writes, checksums,
directory removal and the writability probe."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distckpt.checksums import COALESCE_BYTES, ChecksumWriter, crc32_combine, file_checksum
from distckpt.fsutil import (
    POINTER_MAX_BYTES,
    atomic_write_bytes,
    discard_dir,
    make_dirs,
    probe_writable,
    read_link,
    remove_link,
    swap_link,
)
from tests.file_events import recording_removals_and_renames
from tests.filesystems import MountFactory
from tests.other_user import succeeds_as_nobody


def _refuse_symlinks(code: int) -> Any:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError(code, os.strerror(code))

    return refuse


@pytest.fixture
def parent(tmp_path: Path) -> Path:
    """A root-like directory holding two step dirs, with its trash beside them."""
    return _make_parent(tmp_path / "root")


@pytest.fixture
def exfat_parent(mounts: MountFactory, request: pytest.FixtureRequest) -> Path:
    """Like ``parent``, on exFAT: a real filesystem that refuses symlinks (ENOSYS)."""
    return _make_parent(mounts.get("exfat").path / f"fsutil-{request.node.name}")


def _make_parent(directory: Path) -> Path:
    directory.mkdir()
    for name in ("step-00000001", "step-00000002"):
        (directory / name).mkdir()
        (directory / name / "data").write_text(name)
    return directory


def _swap(parent: Path, target: str, mode: str = "auto") -> str:
    return swap_link(parent / "last", target, mode=mode, trash_root=parent / ".trash", fsync=True)


def _leftovers(parent: Path) -> list[str]:
    """Temporary link names and trash entries a swap must not leave behind."""
    temps = [p.name for p in parent.iterdir() if p.name.endswith(".tmp")]
    trash = parent / ".trash"
    return temps + (sorted(os.listdir(trash)) if trash.is_dir() else [])


# --------------------------------------------------------------------------- swap_link


def _nothing(link: Path) -> None:
    pass


def _regular_file(link: Path) -> None:
    link.write_bytes(b"\x00\xff junk that is not a pointer\nline two\n")


def _symlink_elsewhere(link: Path) -> None:
    os.symlink("/nonexistent/elsewhere", link)


def _old_symlink(link: Path) -> None:
    os.symlink("step-00000001", link)


def _directory(link: Path) -> None:
    link.mkdir()
    (link / "file.txt").write_text("left by another tool")
    (link / "nested").mkdir()
    (link / "nested" / "deeper.bin").write_bytes(b"1234")


@pytest.mark.parametrize(
    "before", [_nothing, _regular_file, _symlink_elsewhere, _old_symlink, _directory]
)
def test_swap_link_replaces_whatever_is_there_with_a_relative_symlink(
    parent: Path, before: Any
) -> None:
    link = parent / "last"
    before(link)
    assert _swap(parent, "step-00000002") == "symlink"
    assert link.is_symlink()
    assert os.readlink(link) == "step-00000002"
    assert not os.path.isabs(os.readlink(link))
    assert (link / "data").read_text() == "step-00000002"
    assert read_link(link) == "step-00000002"
    assert _leftovers(parent) == []


@pytest.mark.parametrize("mode", ["symlink", "pointer"])
def test_a_swap_renames_the_new_link_over_the_old_one_never_removing_it(
    parent: Path, mode: str
) -> None:
    """Readers see the old target or the new one, never no link: the swap's one change to the
    link's name is the rename of the new link over the old, which is neither removed nor
    renamed away first. Python's audit events show every removal and rename the swap makes;
    no reader can be timed into the instant a remove-then-create swap leaves no link."""
    link = parent / "last"
    swap_link(link, "step-00000001", mode=mode, trash_root=parent / ".trash", fsync=False)
    with recording_removals_and_renames() as seen:
        swap_link(link, "step-00000002", mode=mode, trash_root=parent / ".trash", fsync=False)
    name = os.fspath(link)
    assert [event for event in seen if event.paths[0] == name] == [], seen
    assert [event.event for event in seen if event.paths[-1] == name] == ["os.rename"], seen
    assert read_link(link) == "step-00000002" and _leftovers(parent) == []


def test_swap_link_never_touches_the_old_target(parent: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    os.symlink(elsewhere, parent / "last")
    _swap(parent, "step-00000001")
    assert (elsewhere / "keep.txt").read_text() == "keep"
    assert (parent / "step-00000002" / "data").read_text() == "step-00000002"


def test_relative_link_survives_moving_its_directory(parent: Path, tmp_path: Path) -> None:
    _swap(parent, "step-00000001")
    moved = tmp_path / "moved"
    os.rename(parent, moved)
    assert (moved / "last" / "data").read_text() == "step-00000001"
    assert read_link(moved / "last") == "step-00000001"


@pytest.mark.parametrize("before", [_nothing, _regular_file, _old_symlink, _directory])
def test_pointer_mode_writes_a_one_line_file(parent: Path, before: Any) -> None:
    link = parent / "last"
    before(link)
    assert _swap(parent, "step-00000002", mode="pointer") == "pointer"
    assert link.is_file() and not link.is_symlink()
    assert link.read_text() == "step-00000002\n"
    assert read_link(link) == "step-00000002"
    assert _leftovers(parent) == []
    # and back to a symlink over the pointer file
    assert _swap(parent, "step-00000001", mode="symlink") == "symlink"
    assert os.readlink(link) == "step-00000001"


@pytest.mark.parametrize("before", [_nothing, _regular_file, _directory])
def test_auto_mode_falls_back_to_a_pointer_where_symlinks_are_refused(
    exfat_parent: Path, before: Any
) -> None:
    before(exfat_parent / "last")
    assert _swap(exfat_parent, "step-00000002") == "pointer"
    assert read_link(exfat_parent / "last") == "step-00000002"
    assert not (exfat_parent / "last").is_symlink()
    assert _leftovers(exfat_parent) == []
    assert _swap(exfat_parent, "step-00000001") == "pointer"  # and over its own pointer
    assert read_link(exfat_parent / "last") == "step-00000001"


def test_symlink_mode_does_not_fall_back(exfat_parent: Path) -> None:
    assert _swap(exfat_parent, "step-00000001", mode="pointer") == "pointer"
    with pytest.raises(OSError) as info:
        _swap(exfat_parent, "step-00000002", mode="symlink")
    assert info.value.errno == errno.ENOSYS
    assert read_link(exfat_parent / "last") == "step-00000001"  # the old link is untouched
    assert _leftovers(exfat_parent) == []


def test_auto_mode_raises_errors_other_than_a_refusal(
    parent: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Kept as a mock: no filesystem here refuses symlink(2) with ENOSPC on demand (a full ext4
    # still stores a short symlink in a free dir-entry slot), and a swap must not take that
    # for "symlinks unsupported".
    _old_symlink(parent / "last")
    monkeypatch.setattr(os, "symlink", _refuse_symlinks(errno.ENOSPC))
    with pytest.raises(OSError) as info:
        _swap(parent, "step-00000002")
    assert info.value.errno == errno.ENOSPC
    assert os.readlink(parent / "last") == "step-00000001"


@pytest.mark.parametrize("target", ["", ".", "..", "a/b", "../step-00000001", "/abs/step"])
def test_swap_link_refuses_targets_outside_its_directory(parent: Path, target: str) -> None:
    with pytest.raises(ValueError):
        _swap(parent, target)
    assert not (parent / "last").exists()
    assert not (parent / "last").is_symlink()


# --------------------------------------------------------------------------- read_link


def test_read_link_of_both_kinds_and_of_what_is_not_a_link(tmp_path: Path) -> None:
    symlink = tmp_path / "symlink"
    os.symlink("step-00000003", symlink)  # dangling: read_link reads, it does not follow
    pointer = tmp_path / "pointer"
    pointer.write_text("  step-00000004  \n")
    assert read_link(symlink) == "step-00000003"
    assert read_link(pointer) == "step-00000004"

    assert read_link(tmp_path / "missing") is None
    assert read_link(tmp_path) is None  # a directory
    for name, content in {
        "empty": b"",
        "blank": b"\n\n",
        "two lines": b"step-00000001\nstep-00000002\n",
        "binary": b"\xff\xfe\x00step",
        "huge": b"x" * (POINTER_MAX_BYTES + 1),
    }.items():
        path = tmp_path / name
        path.write_bytes(content)
        assert read_link(path) is None, name
    assert read_link(tmp_path / "pointer" / "below-a-file") is None


def test_remove_link_removes_either_kind_and_tolerates_nothing(tmp_path: Path) -> None:
    symlink, pointer = tmp_path / "a", tmp_path / "b"
    os.symlink("x", symlink)
    pointer.write_text("x\n")
    for link in (symlink, pointer, tmp_path / "missing"):
        remove_link(link, fsync=True)
        assert not link.exists() and not link.is_symlink()


# --------------------------------------------------------------------------- atomic_write_bytes


def test_atomic_write_bytes_creates_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    atomic_write_bytes(path, b"first", fsync=True)
    assert path.read_bytes() == b"first"
    atomic_write_bytes(path, b"second, longer", fsync=False)
    assert path.read_bytes() == b"second, longer"
    assert os.listdir(tmp_path) == ["manifest.json"]


def test_atomic_write_bytes_leaves_the_old_content_when_it_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "manifest.json"
    path.write_bytes(b"old")

    def fail(src: Any, dst: Any) -> None:
        raise OSError(errno.EIO, "simulated I/O error")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        atomic_write_bytes(path, b"new", fsync=True)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["manifest.json"]  # no temporary file left


# --------------------------------------------------------------------------- checksums


@pytest.mark.parametrize("chunks", [[], [b""], [b"abc"], [b"a" * 1000, b"b" * 5, bytearray(b"c")]])
def test_checksum_writer_matches_file_checksum(tmp_path: Path, chunks: list[bytes]) -> None:
    path = tmp_path / "shard.pt"
    with ChecksumWriter(path, fsync=True) as writer:
        for chunk in chunks:
            writer.write(chunk)
    data = b"".join(chunks)
    assert writer.size == len(data) == path.stat().st_size
    assert writer.checksum == file_checksum(path)
    assert writer.checksum == f"{zlib.crc32(data):08x}"
    assert path.read_bytes() == data


def test_checksum_writer_accepts_memoryviews_and_large_data(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    path = tmp_path / "big.bin"
    with ChecksumWriter(path, fsync=False) as writer:
        view = memoryview(data)
        writer.write(view[: 1 << 20])
        writer.write(view[1 << 20 :])
    assert writer.checksum == file_checksum(path)
    assert path.read_bytes() == data


def test_checksum_writer_gathers_small_writes_around_large_ones(tmp_path: Path) -> None:
    """Small writes are gathered, a large one between them goes straight through; the bytes,
    their order, the size (as a running ``tell()`` for DCP) and the checksum all hold."""
    pieces = [os.urandom(n) for n in (7, 300, COALESCE_BYTES - 100, 500, COALESCE_BYTES, 3)]
    pieces += [os.urandom(4096) for _ in range(600)]  # more than one gathering's worth
    path = tmp_path / "many.bin"
    with ChecksumWriter(path, fsync=True) as writer:
        accepted = 0
        for piece in pieces:
            accepted += writer.write(piece)
            assert writer.size == accepted
        assert writer.checksum == f"{zlib.crc32(b''.join(pieces)):08x}"  # before the last flush
    data = b"".join(pieces)
    assert path.read_bytes() == data
    assert writer.checksum == file_checksum(path) == f"{zlib.crc32(data):08x}"


def test_checksum_writer_never_reuses_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "shard.pt"
    path.write_bytes(b"someone else's")
    with pytest.raises(FileExistsError):
        ChecksumWriter(path, fsync=True)
    assert path.read_bytes() == b"someone else's"


def test_file_checksum_changes_with_content(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"same size 1")
    b.write_bytes(b"same size 2")
    assert file_checksum(a) != file_checksum(b)


# --------------------------------------------------------------------------- discard_dir


def test_discard_dir_removes_the_tree_through_the_trash(tmp_path: Path) -> None:
    doomed = tmp_path / "step-00000001"
    (doomed / "sub").mkdir(parents=True)
    (doomed / "sub" / "file").write_bytes(b"x")
    os.symlink("/nonexistent", doomed / "dangling")
    trash = tmp_path / ".trash"
    discard_dir(doomed, trash, fsync=True)
    assert not doomed.exists()
    assert os.listdir(trash) == []


def test_discard_dir_of_nothing_is_not_an_error(tmp_path: Path) -> None:
    discard_dir(tmp_path / "missing", tmp_path / ".trash", fsync=True)
    assert os.listdir(tmp_path / ".trash") == []


def test_discard_dir_does_not_follow_symlinks_inside(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep").write_text("keep")
    doomed = tmp_path / "doomed"
    doomed.mkdir()
    os.symlink(precious, doomed / "link")
    discard_dir(doomed, tmp_path / ".trash", fsync=False)
    assert (precious / "keep").read_text() == "keep"


# --------------------------------------------------------------------------- probe_writable


def test_probe_writable_leaves_nothing(tmp_path: Path) -> None:
    probe_writable(tmp_path)
    assert os.listdir(tmp_path) == []


def test_probe_writable_raises_where_nothing_can_be_written(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        probe_writable(tmp_path / "missing")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(OSError):
        probe_writable(afile)


def test_probe_writable_raises_on_a_read_only_directory() -> None:
    # Root ignores directory permissions, so as root the probe runs in a forked child that has
    # become an unprivileged user (nobody), as a job of an ordinary user would.
    parent = Path(tempfile.mkdtemp())
    try:
        parent.chmod(0o755)
        readonly = parent / "ro"
        readonly.mkdir(mode=0o555)
        readonly.chmod(0o555)
        if os.geteuid() != 0:
            with pytest.raises(PermissionError):
                probe_writable(readonly)
            return

        def refused() -> None:
            with pytest.raises(PermissionError):
                probe_writable(readonly)

        assert succeeds_as_nobody(refused), "the probe did not refuse the directory"
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_make_dirs_creates_missing_parents_and_accepts_existing(tmp_path: Path) -> None:
    deep = tmp_path / "a" / "b" / "c"
    make_dirs(deep, fsync=True)
    assert deep.is_dir()
    make_dirs(deep, fsync=True)  # already there: nothing to do, no error
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(OSError):
        make_dirs(tmp_path / "file" / "below", fsync=True)


@settings(max_examples=200, deadline=None)
@given(first=st.binary(max_size=300), second=st.binary(max_size=300))
def test_crc32_combine_is_the_crc_of_the_concatenation(first: bytes, second: bytes) -> None:
    combined = crc32_combine(zlib.crc32(first), zlib.crc32(second), len(second))
    assert combined == zlib.crc32(first + second)


@pytest.mark.parametrize(
    ("first_size", "second_size"),
    [(0, 0), (0, 1), (1, 0), (7, 13), (64, 1 << 20), ((1 << 20) + 1, (3 << 20) + 5)],
)
def test_crc32_combine_of_large_and_empty_parts(first_size: int, second_size: int) -> None:
    first, second = os.urandom(first_size), os.urandom(second_size)
    combined = crc32_combine(zlib.crc32(first), zlib.crc32(second), second_size)
    assert combined == zlib.crc32(first + second)


def test_parallel_writes_then_appends_continue_the_same_file(tmp_path: Path) -> None:
    """After :meth:`ChecksumWriter.write_in_parallel`, a plain write lands after the chunks
    and the size and checksum cover them all, as if every buffer had been written in turn."""
    parts = [os.urandom(n) for n in (5, 0, 1 << 16, 3, (1 << 20) + 9)]
    chunks = [[memoryview(parts[0]), memoryview(parts[1])], [memoryview(parts[2])]]
    chunks.append([memoryview(parts[3]), memoryview(parts[4])])
    with ChecksumWriter(tmp_path / "file", fsync=True) as writer:
        writer.write(b"head")
        writer.write_in_parallel(chunks, threads=2)
        writer.write(b"tail")
    expected = b"head" + b"".join(parts) + b"tail"
    assert (tmp_path / "file").read_bytes() == expected
    assert (writer.size, writer.checksum) == (len(expected), f"{zlib.crc32(expected):08x}")
