"""Direct I/O: an async save's "torch" rank file is written with ``O_DIRECT`` straight from the
snapshot's page-aligned buffers (:class:`distckpt.checksums.ChecksumWriter` with
``direct=True``), a sync save's stays buffered, and the bytes are the same either way.

What the kernel is asked is read from ``strace`` of real saves in tests/test_direct_io_traced.py;
what it saves in CPU and page cache is the benchmark's to show (``scripts/bench``), not a
test's.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import resource
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import distckpt
from distckpt.checksums import COALESCE_BYTES, DIRECT_STAGING_BYTES, ChecksumWriter, file_checksum
from distckpt.formats import ReadOptions, format_named
from distckpt.formats.base import ShardContext
from distckpt.formats.raw_rank_file import write_rank_file, writes_direct
from distckpt.formats.raw_rank_reader import load_rank_file
from distckpt.formats.torch_files import load_skeleton
from distckpt.memory import DIRECT_ALIGNMENT, anonymous_memory, buffer_address
from distckpt.snapshot import Slot, flat_buffers
from distckpt.storage.posix import PosixRootStore
from distckpt.storage.s3 import S3RootStore
from tests.filesystems import MountFactory, require_direct_io, skip_or_fail, take_every_free_block
from tests.ranks import run_ranks, values


def _page_aligned_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, object]:
    """A state whose tensors are an async snapshot's buffers (:func:`flat_buffers`), filled
    with random values, and a plain value."""
    slots: list[Slot] = [
        ((key,), torch.Size(shape), torch.float32) for key, shape in shapes.items()
    ]
    buffers = flat_buffers(slots)
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, object] = {"step": seed}
    for key in shapes:
        buffer = buffers[(key,)]
        buffer.copy_(torch.randn(buffer.shape, generator=generator))
        state[key] = buffer
    return state


#: states that take every path of the direct writer: name -> (tensor shapes, written direct)
CASES: dict[str, tuple[dict[str, tuple[int, ...]], bool]] = {
    # no storage of 1 MiB or more: nothing could go straight from memory, so buffered
    "empty": ({}, False),
    "only-tiny": ({f"t{i}": (10,) for i in range(50)}, False),
    "many-pages": ({f"p{i}": (DIRECT_ALIGNMENT // 4,) for i in range(3000)}, False),
    "not-a-page-multiple": ({"w": ((3 << 20) // 4 + 25,), "t": (3,)}, True),
    # several stretches straight from memory, with staged tiny tensors and a partial page
    "large": (
        {"a": (7,), "w": (5 * DIRECT_STAGING_BYTES // 4 + 1,), "b": (1,), "v": (1 << 20,)},
        True,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_direct_rank_file_is_byte_for_byte_the_buffered_one(tmp_path: Path, case: str) -> None:
    require_direct_io(tmp_path)
    shapes, expect_direct = CASES[case]
    state = _page_aligned_state(shapes, seed=len(case))
    direct_path, buffered_path = tmp_path / "direct.pt", tmp_path / "buffered.pt"
    direct = write_rank_file(state, direct_path, fsync=True, direct=True)
    buffered = write_rank_file(state, buffered_path, fsync=True, direct=False)
    assert direct.direct is expect_direct and buffered.direct is False
    assert direct_path.read_bytes() == buffered_path.read_bytes()
    assert direct.size == buffered.size == direct_path.stat().st_size
    assert direct.checksum == buffered.checksum == file_checksum(direct_path)
    restored = load_rank_file(direct_path, ReadOptions(), load_skeleton)
    for key in shapes:
        assert torch.equal(restored[key], state[key]), key  # type: ignore[arg-type]


def test_parallel_writers_stay_buffered(tmp_path: Path) -> None:
    """Several writer threads write at offsets: never direct, even from page-aligned memory."""
    state = _page_aligned_state({"w": (3 << 20,)}, seed=1)
    path = tmp_path / "rank.pt"
    writer = write_rank_file(state, path, fsync=False, writer_threads=2, direct=True)
    assert writer.direct is False
    with ChecksumWriter(tmp_path / "direct.bin", fsync=False, direct=True) as direct_writer:
        if direct_writer.direct:
            with pytest.raises(distckpt.InvalidArgument, match="buffered writer"):
                direct_writer.write_in_parallel([[memoryview(b"x")]], 2)


def _aligned_bytes(nbytes: int) -> memoryview:
    memory = anonymous_memory(nbytes)
    memory[:] = os.urandom(nbytes)
    return memory


def test_a_file_mostly_of_memory_off_a_page_stays_buffered(tmp_path: Path) -> None:
    """README, async saves: a file is written direct only when at least 90% of its bytes are
    storages of 1 MiB or more at page-aligned addresses. A page-aligned storage of 1 MiB is
    written direct alone, and buffered beside 2 MiB that start 64 bytes into a page."""
    require_direct_io(tmp_path)
    state = _page_aligned_state({"w": (1 << 18,)}, seed=5)
    assert write_rank_file(state, tmp_path / "alone.pt", fsync=False, direct=True).direct
    memory = _aligned_bytes(DIRECT_ALIGNMENT + (2 << 20))
    state["off_a_page"] = torch.frombuffer(memory[64 : 64 + (2 << 20)], dtype=torch.uint8)
    path = tmp_path / "mostly-off-a-page.pt"
    writer = write_rank_file(state, path, fsync=False, direct=True)
    assert writer.direct is False
    restored = load_rank_file(path, ReadOptions(), load_skeleton)
    assert torch.equal(restored["off_a_page"], state["off_a_page"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("aligned_share", "head_share", "expect_direct"),
    [(0.89, 0.01, False), (0.91, 0.01, True), (0.89, 0.02, False)],
    ids=["89%", "91%", "91%-of-the-storages-but-89%-of-the-file"],
)
def test_a_file_is_direct_when_90_percent_of_its_bytes_are_page_aligned_storages(
    aligned_share: float, head_share: float, expect_direct: bool
) -> None:
    """The share is of the whole file, the head (header, index, skeleton) included: the head
    goes through the staging buffer as memory off a page does."""
    total = 10 << 20
    aligned_bytes, head_bytes = int(aligned_share * total), int(head_share * total)
    unaligned_bytes = total - aligned_bytes - head_bytes
    off_a_page = _aligned_bytes(DIRECT_ALIGNMENT + unaligned_bytes)[64 : 64 + unaligned_bytes]
    storages = [
        torch.frombuffer(memory, dtype=torch.uint8).untyped_storage()
        for memory in (_aligned_bytes(aligned_bytes), off_a_page)
    ]
    chosen = writes_direct(storages, head_bytes=head_bytes, direct=True, writer_threads=1)
    assert chosen is expect_direct


def test_a_file_system_without_direct_io_gets_a_buffered_file(mounts: MountFactory) -> None:
    """ramfs has no direct I/O: it refuses O_DIRECT (EINVAL), after creating the file. The
    writer removes it, creates it again without and writes it buffered; the bytes and checksum
    are the same."""
    target = mounts.get("ramfs").path / "no-direct.bin"
    data = _aligned_bytes(2 * COALESCE_BYTES + 5)
    try:
        with ChecksumWriter(target, fsync=True, direct=True) as writer:
            writer.write(b"head")
            writer.write(data)
        assert writer.direct is False
        assert target.read_bytes() == b"head" + bytes(data)
        assert writer.checksum == file_checksum(target)
        with pytest.raises(FileExistsError):  # and O_EXCL still holds on such a file system
            ChecksumWriter(target, fsync=False, direct=True)
    finally:
        target.unlink(missing_ok=True)


def _refusing_direct_writes_after(
    real_write: Callable[[int, object], int], allowed: int
) -> Callable[[int, object], int]:
    """``os.write`` that fails with EINVAL a direct write (on a descriptor with O_DIRECT) after
    ``allowed`` of them, as a device with stricter alignment rules would: no device on this
    machine refuses page-aligned direct writes, so that refusal is made here; buffered writes,
    and the direct ones before it, stay real."""
    done = 0

    def write(fd: int, data: object) -> int:
        nonlocal done
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            if done >= allowed:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            done += 1
        return real_write(fd, data)

    return write


@pytest.mark.parametrize("allowed", [0, 2])
def test_a_direct_write_refused_mid_file_continues_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, allowed: int
) -> None:
    """The rest of the file is written buffered from where the direct writes stopped: the bytes,
    size and checksum are those of an all-buffered file, and the save does not fail."""
    require_direct_io(tmp_path)
    data = _aligned_bytes(3 * DIRECT_STAGING_BYTES + 123)
    # Replaced: no device here refuses a page-aligned direct write (see the helper's doc).
    monkeypatch.setattr(os, "write", _refusing_direct_writes_after(os.write, allowed))
    target = tmp_path / "refused.bin"
    with ChecksumWriter(target, fsync=True, direct=True) as writer:
        assert writer.direct
        writer.write(b"h" * 100)
        writer.write(data[: DIRECT_ALIGNMENT * 3])
        writer.write(data)
    assert writer.direct is False
    expected = b"h" * 100 + bytes(data[: DIRECT_ALIGNMENT * 3]) + bytes(data)
    assert target.read_bytes() == expected
    assert writer.size == len(expected) and writer.checksum == file_checksum(target)


@pytest.mark.parametrize("bad", [0, 1, "yes", None])
def test_direct_io_must_be_a_bool(tmp_path: Path, bad: object) -> None:
    with pytest.raises(distckpt.InvalidArgument, match="direct_io"):
        distckpt.CheckpointManager(tmp_path / "root", direct_io=bad)  # type: ignore[arg-type]
    with pytest.raises(distckpt.InvalidArgument, match="direct_io"):
        format_named("torch", direct_io=bad)  # type: ignore[arg-type]


_LIBC = ctypes.CDLL(None, use_errno=True)


def _resident_pages(path: Path) -> tuple[int, int]:
    """(pages of the file in the page cache, pages of the file), from ``mincore`` of a mapping
    of it that is never touched (so the mapping itself brings no page in)."""
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    vector = (ctypes.c_ubyte * pages)()
    _LIBC.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    with open(path, "rb") as file, mmap.mmap(file.fileno(), size, prot=mmap.PROT_READ) as mapped:
        with memoryview(mapped) as view:
            address = buffer_address(view)
        if _LIBC.mincore(address, size, vector) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
    return sum(byte & 1 for byte in vector), pages


def test_a_direct_rank_file_leaves_none_of_its_pages_in_the_page_cache(tmp_path: Path) -> None:
    """README, async saves: a direct rank file's bytes bypass the page cache; a buffered one
    leaves its pages there (fsynced, clean, but resident)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("mincore on a file mapping: Linux")
    require_direct_io(tmp_path)
    state = _page_aligned_state({"w": (4 << 20,), "t": (5,)}, seed=3)  # 16 MiB
    direct = write_rank_file(state, tmp_path / "direct.pt", fsync=True, direct=True)
    buffered = write_rank_file(state, tmp_path / "buffered.pt", fsync=True, direct=False)
    assert direct.direct and not buffered.direct
    cached, pages = _resident_pages(tmp_path / "direct.pt")
    assert cached <= 1, (cached, pages)  # at most the tail page the ftruncate touched
    cached, pages = _resident_pages(tmp_path / "buffered.pt")
    assert cached >= pages * 0.9, (cached, pages)


def test_a_store_that_reads_its_shards_back_gets_them_buffered(tmp_path: Path) -> None:
    """An object store's spool is streamed into objects while the format writes it: its files
    stay in the page cache (no direct I/O), whatever the manager's ``direct_io``."""
    if not sys.platform.startswith("linux"):
        pytest.skip("mincore on a file mapping: Linux")
    require_direct_io(tmp_path)
    assert S3RootStore.shards_read_back and not PosixRootStore.shards_read_back
    state = _page_aligned_state({"w": (4 << 20,), "t": (5,)}, seed=4)  # 16 MiB, page-aligned
    fmt = format_named("torch", direct_io=True)
    for direct_io in (True, False):
        directory = tmp_path / f"direct-io-{direct_io}"
        directory.mkdir()
        ctx = ShardContext(rank=0, world_size=1, fsync=True, direct_io=direct_io)
        (name,) = fmt.write(state, directory, ctx)
        cached, pages = _resident_pages(directory / name)
        if direct_io:
            assert cached <= 1, (cached, pages)  # written direct: not in the cache
        else:
            assert cached >= pages * 0.9, (cached, pages)


def test_a_direct_writer_stages_many_small_writes_into_whole_pages(tmp_path: Path) -> None:
    """Writes that cannot go straight from memory (small, or not on a page) fill the staging
    buffer several times over; the file is the bytes written, in order."""
    require_direct_io(tmp_path)
    chunks = [os.urandom(size) for size in (3, 4096, 4095, 1, 70_000) * 600]
    path = tmp_path / "staged.bin"
    with ChecksumWriter(path, fsync=True, direct=True) as writer:
        for chunk in chunks:
            writer.write(chunk)
        assert writer.direct
    expected = b"".join(chunks)
    assert len(expected) > 4 * DIRECT_STAGING_BYTES
    assert path.read_bytes() == expected
    assert writer.size == len(expected) and writer.checksum == file_checksum(path)


def _state_ending_within_a_page(reference: Path) -> tuple[dict[str, object], ChecksumWriter]:
    """A state written direct (without a limit), whose file ends 192 bytes into a page, and
    the buffered file of it at ``reference``."""
    state = _page_aligned_state(CASES["not-a-page-multiple"][0], seed=3)
    buffered = write_rank_file(state, reference, fsync=False, direct=False)
    assert buffered.size % DIRECT_ALIGNMENT == 192, buffered.size
    unlimited = write_rank_file(state, reference.with_suffix(".direct"), fsync=False, direct=True)
    assert unlimited.direct, "without a limit, the file is written direct"
    reference.with_suffix(".direct").unlink()
    return state, buffered


def _direct_write_under_a_file_size_limit(
    rank: int, world_size: int, state: dict[str, object], path: str, limit: int
) -> tuple[int, str, bool] | str:
    """In a forked child (the limit is the process's): write ``state`` direct under
    RLIMIT_FSIZE ``limit``; its size, checksum and whether it stayed direct, or the error."""
    # Ignored, so that a write past the limit fails with EFBIG instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        writer = write_rank_file(state, Path(path), fsync=True, direct=True)
    except OSError as exc:
        return f"{errno.errorcode.get(exc.errno or 0)}: {exc}"
    return writer.size, writer.checksum, writer.direct


def test_a_direct_file_needs_no_room_for_its_padded_last_page_under_a_size_limit(
    tmp_path: Path,
) -> None:
    """Under a file size limit of exactly the file's true size, the padded last page does not
    fit (EFBIG): the tail is written again unpadded and buffered, and the file is the buffered
    one, bit for bit. Under a limit one byte short, the write fails as a buffered one does,
    naming the file."""
    require_direct_io(tmp_path)
    reference = tmp_path / "buffered.pt"
    state, buffered = _state_ending_within_a_page(reference)
    target = tmp_path / "direct.pt"
    (result,) = values(
        run_ranks(_direct_write_under_a_file_size_limit, 0, state, str(target), buffered.size)
    )
    assert result == (buffered.size, buffered.checksum, False)
    assert target.read_bytes() == reference.read_bytes()

    short = tmp_path / "short.pt"
    (result,) = values(
        run_ranks(_direct_write_under_a_file_size_limit, 0, state, str(short), buffered.size - 1)
    )
    assert isinstance(result, str) and result.startswith("EFBIG") and str(short) in result


def test_a_direct_file_needs_no_room_for_its_padded_last_page_on_a_full_disk(
    mounts: MountFactory, tmp_path: Path
) -> None:
    """On a volume of 1 KiB blocks left with room for the file's true bytes and one block
    more, but not for its last page padded (3 blocks more), the padded write fails (ENOSPC):
    the tail is written again unpadded and buffered, and the file is the buffered one."""
    mount = mounts.get("small-ext4")
    block = os.statvfs(mount.path).f_frsize
    if block * 4 > DIRECT_ALIGNMENT:
        skip_or_fail(f"{mount.path} has blocks of {block} bytes: a padded page takes no more")
    reference = tmp_path / "buffered.pt"
    state, buffered = _state_ending_within_a_page(reference)
    hog, target = mount.path / "hog-padded-tail", mount.path / "padded-tail.pt"
    try:
        take_every_free_block(mount.path, hog)
        room = (-(-buffered.size // block) + 1) * block  # the file's blocks, and one more
        os.truncate(hog, hog.stat().st_size - room)
        writer = write_rank_file(state, target, fsync=True, direct=True)
        assert writer.direct is False  # stopped at the tail
        assert target.read_bytes() == reference.read_bytes()
        assert writer.size == buffered.size and writer.checksum == buffered.checksum
    finally:
        hog.unlink(missing_ok=True)
        target.unlink(missing_ok=True)
