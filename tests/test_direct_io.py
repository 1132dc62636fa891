"""Direct I/O: an async save's "torch" rank file is written with ``O_DIRECT`` straight from the
snapshot's page-aligned buffers (:class:`distckpt.checksums.ChecksumWriter` with
``direct=True``), a sync save's stays buffered, and the bytes are the same either way.

What the kernel is asked is read from ``strace`` of real saves; what it saves in CPU and
page cache is the benchmark's to show (``scripts/bench``), not a test's.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import distckpt
from distckpt.checksums import COALESCE_BYTES, DIRECT_STAGING_BYTES, ChecksumWriter, file_checksum
from distckpt.formats import ReadOptions, format_named
from distckpt.formats.base import ShardContext
from distckpt.formats.raw_rank_file import write_rank_file
from distckpt.formats.raw_rank_reader import load_rank_file
from distckpt.formats.torch_files import load_skeleton
from distckpt.memory import DIRECT_ALIGNMENT, anonymous_memory, buffer_address
from distckpt.snapshot import Slot, flat_buffers
from distckpt.storage.posix import PosixRootStore
from distckpt.storage.s3 import S3RootStore
from tests.filesystems import MountFactory, skip_or_fail, take_every_free_block
from tests.ranks import run_ranks, values
from tests.s3server import S3Server
from tests.syscall_trace import FileCall, async_saves_traced, run_traced, traced_file_calls


def _require_direct_io(directory: Path) -> None:
    """Skip (in CI: fail) where the file system under ``directory`` refuses ``O_DIRECT``."""
    probe = directory / ".direct-probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError as exc:
        skip_or_fail(f"the file system of the test's temporary directory refuses O_DIRECT: {exc}")
    finally:
        probe.unlink(missing_ok=True)


def _opened_direct(call: FileCall) -> bool:
    return call.name == "openat" and "O_DIRECT" in call.args[0].split("|")


def _rank_file_calls(calls: list[FileCall], root: str) -> list[FileCall]:
    """The calls that wrote the rank file of ``root``: its open for writing and what followed
    (the restore's and ``verify``'s opens for reading left out)."""
    return [
        call
        for call in calls
        if f"/{root}/" in call.path
        and call.path.endswith(".pt")
        and not (call.name == "openat" and "O_RDONLY" in call.args[0])
    ]


def test_an_async_save_writes_its_rank_file_direct_and_a_sync_save_buffered(
    tmp_path: Path,
) -> None:
    """Real saves under strace: the async save's rank file is opened with O_DIRECT, asks for no
    early writeback, and ends with an ftruncate to its true size and then its fsync; the sync
    save's is opened without O_DIRECT, and with ``direct_io=False`` no file is. Every restore
    is bit for bit the saved state, and ``verify`` passes."""
    _require_direct_io(tmp_path)
    calls = traced_file_calls(
        """
        import torch
        import distckpt
        torch.manual_seed(0)
        state = {
            "w": torch.randn(6 << 20),  # 24 MiB
            "odd": torch.randn(700),  # the file ends mid-page
            "tiny": torch.arange(3),
            "step": 7,
        }
        for root, options in (
            ("async", {"async_save": True}),
            ("sync", {}),
            ("buffered", {"async_save": True, "direct_io": False}),
        ):
            with distckpt.CheckpointManager(root, **options) as manager:
                manager.save(1, state)
                manager.wait()
                restored = manager.restore(1).state
            for key in ("w", "odd", "tiny"):
                assert restored[key].dtype == state[key].dtype, (root, key)
                saved = state[key].view(torch.uint8) if key != "tiny" else state[key]
                got = restored[key].view(torch.uint8) if key != "tiny" else restored[key]
                assert torch.equal(got, saved), (root, key)
            assert restored["step"] == 7
            assert distckpt.verify(root).ok, root
        """,
        tmp_path,
        "openat,ftruncate,fsync,sync_file_range",
    )
    direct = _rank_file_calls(calls, "async")
    opened = [call for call in direct if call.name == "openat"]
    assert len(opened) == 1 and _opened_direct(opened[0]), direct
    assert "O_EXCL" in opened[0].args[0]
    written = [call for call in direct if call.name != "openat"]
    assert not [call for call in written if call.name == "sync_file_range"], written
    assert [call.name for call in written] == ["ftruncate", "fsync"], written
    size = int(written[0].args[0])
    saved = tmp_path / "async" / "step-00000001" / "rank-00000.pt"
    assert size == saved.stat().st_size and size % DIRECT_ALIGNMENT != 0
    for root in ("sync", "buffered"):
        opened = [call for call in _rank_file_calls(calls, root) if call.name == "openat"]
        assert opened and not [call for call in opened if _opened_direct(call)], opened
    under_buffered = [call for call in calls if "/buffered/" in call.path]
    assert under_buffered and not [call for call in under_buffered if _opened_direct(call)]


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
    _require_direct_io(tmp_path)
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
    _require_direct_io(tmp_path)
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
    _require_direct_io(tmp_path)
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
    _require_direct_io(tmp_path)
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
    _require_direct_io(tmp_path)
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


def test_an_async_save_to_an_object_store_spools_its_rank_file_buffered(
    tmp_path: Path, s3_server: S3Server, s3_url: str
) -> None:
    """Through the real wiring (the manager, the protocol, the S3 store): the spool file an
    async save streams into its object is written without O_DIRECT."""
    pytest.importorskip("botocore")
    _require_direct_io(tmp_path)
    options = s3_server.storage_options()
    calls = traced_file_calls(
        f"""
        import torch
        import distckpt
        state = {{"w": torch.randn(6 << 20)}}  # 24 MiB: direct, were it a local root
        with distckpt.CheckpointManager({s3_url!r}, storage_options={options!r},
                                        async_save=True) as manager:
            manager.save(1, state)
            manager.wait()
            assert torch.equal(manager.restore(1).state["w"], state["w"])
        """,
        tmp_path,
        "openat",
    )
    written = [
        call for call in calls if call.path.endswith("rank-00000.pt") and "O_WRONLY" in call.args[0]
    ]
    assert written, calls
    assert not [call for call in written if _opened_direct(call)], written


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
    _require_direct_io(tmp_path)
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


def test_a_shared_traced_run_that_dies_names_the_directory_it_died_in(tmp_path: Path) -> None:
    """When the one interpreter the filesystem matrix traces dies on one filesystem, that
    filesystem's result says it died there, the ones after it say they were not reached, and
    the ones before it keep their results. The death is real: an immutable directory, where
    neither the save nor its ``failed.txt`` can be written (its ``started.txt`` is made
    beforehand, and a file's contents may still change in an immutable directory)."""
    before, dying, after = tmp_path / "before", tmp_path / "dying", tmp_path / "after"
    dying.mkdir()
    (dying / "started.txt").write_text("")
    immutable = subprocess.run(["chattr", "+i", dying], capture_output=True, text=True)
    if immutable.returncode != 0:
        skip_or_fail(f"the test's directory cannot be made immutable: {immutable.stderr}")
    try:
        found = async_saves_traced([before, dying, after], tmp_path)
    finally:
        subprocess.run(["chattr", "-i", dying], check=True)
    assert found[before].written_direct(commits=True)
    died = "the shared traced run died (exit status 1)"
    assert found[dying].lost == f"{died} while saving on {dying}"
    assert found[after].lost == f"not reached: {died} before {after}"
    with pytest.raises(AssertionError, match="not reached"):
        found[after].written_direct(commits=True)


def test_a_traced_run_that_hangs_is_killed_with_everything_it_traces(tmp_path: Path) -> None:
    """A traced interpreter that outlives its timeout is killed along with strace: left
    running, it would keep the files it has open, and a FUSE mount under them, busy."""
    hanging = "import os, time; open('pid.txt', 'w').write(str(os.getpid())); time.sleep(600)"
    with pytest.raises(subprocess.TimeoutExpired):
        run_traced(hanging, tmp_path, "openat", timeout=10)
    pid = int((tmp_path / "pid.txt").read_text())
    for _ in range(300):  # SIGKILL is sent when the timeout fires; this only waits out the exit
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return
        if "State:\tZ" in status:
            return
        time.sleep(0.1)
    pytest.fail(f"the traced interpreter {pid} still runs after its run timed out")
