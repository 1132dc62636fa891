"""Early writeback: a checkpoint file that will be fsynced has its bytes sent to the disk while
the rest of it is written (``sync_file_range(SYNC_FILE_RANGE_WRITE)``), not only in the fsync.

What the kernel is asked is read from ``strace`` of a real process (one for all the traced
tests); the speed it buys is the benchmark's to show (``scripts/bench``), not a test's.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys
from pathlib import Path

import pytest

from distckpt import fsutil
from distckpt.checksums import COALESCE_BYTES, ChecksumWriter
from distckpt.fsutil import WRITEBACK_BYTES, start_writeback
from tests.crashsim.trace import TRACED_CALLS
from tests.syscall_trace import TracedParts, trace_parts

#: conftest readies the job servers first: the traced runs are their children
NEEDS_JOB_SERVERS = True

#: the sizes of the files the first two parts of :data:`TRACED_PARTS` write
STRETCHES_SIZE, ONE_WRITE_SIZE = 3 * WRITEBACK_BYTES + 12345, 3 * WRITEBACK_BYTES + 5

#: what the traced interpreter runs, each part in a directory of its own named by its key
TRACED_PARTS = {
    # small writes, large ones and a tail
    "stretches": f"""
import os
from pathlib import Path
from distckpt.checksums import ChecksumWriter
data = os.urandom({STRETCHES_SIZE})
with ChecksumWriter(Path("file.bin"), fsync=True) as writer:
    writer.write(data[:100])
    for start in range(100, {STRETCHES_SIZE}, 300_000):  # gathered into runs of ~1 MiB
        writer.write(data[start : min(start + 300_000, {STRETCHES_SIZE // 2})])
        if start >= {STRETCHES_SIZE // 2}:
            break
    writer.write(memoryview(data)[{STRETCHES_SIZE // 2} :])  # one large write
assert Path("file.bin").read_bytes() == data
""",
    "one-write": f"""
import os
from pathlib import Path
from distckpt.checksums import ChecksumWriter
data = os.urandom({ONE_WRITE_SIZE})
with ChecksumWriter(Path("file.bin"), fsync=True) as writer:
    writer.write(data)
assert Path("file.bin").read_bytes() == data
""",
    "parallel": """
import os
from pathlib import Path
from distckpt.checksums import ChecksumWriter
head = b"h" * 1000
chunks = [[memoryview(os.urandom(9 << 20))] for _ in range(4)]
with ChecksumWriter(Path("file.bin"), fsync=True) as writer:
    writer.write(head)
    writer.write_in_parallel(chunks, 2)
assert Path("file.bin").read_bytes() == head + b"".join(bytes(c[0]) for c in chunks)
""",
    "saves": """
import torch
import distckpt
state = {"w": torch.randn(6 << 20)}  # 24 MiB
with distckpt.CheckpointManager("durable") as manager:
    manager.save(1, state)
with distckpt.CheckpointManager("durable_dcp", format="dcp") as manager:
    manager.save(1, state)
with distckpt.CheckpointManager("volatile", fsync=False) as manager:
    manager.save(1, state)
""",
    "export": """
import torch
import distckpt
with distckpt.CheckpointManager("root") as manager:
    manager.save(1, {"w": torch.randn(6 << 20)})  # 24 MiB
distckpt.export("root", "durable.pt", rank=0)
distckpt.export("root", "volatile.pt", rank=0, fsync=False)
""",
}

Calls = list[tuple[str, str, list[str]]]


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> TracedParts:
    """The sync_file_range and fsync calls of :data:`TRACED_PARTS`, all run in one traced
    run (:func:`~tests.syscall_trace.trace_parts`), not one per part."""
    if platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip("elsewhere the system call may be sync_file_range2, which this does not read")
    workdir = tmp_path_factory.mktemp("writeback")
    return trace_parts(TRACED_PARTS, workdir, "sync_file_range,fsync")


def _part(traced: TracedParts, part: str) -> Calls:
    """(call, path, other arguments) of the calls ``part`` made on files in its directory, in
    order."""
    return [(call.name, call.path, call.args) for call in traced.of(part)]


def _hinted_ranges(calls: Calls, path: str) -> list[tuple[int, int]]:
    ranges = []
    for name, where, args in calls:
        if name == "sync_file_range" and where.endswith(path):
            assert args[2] == "SYNC_FILE_RANGE_WRITE", args  # never a wait: fsync decides
            ranges.append((int(args[0]), int(args[1])))
    return ranges


def test_a_fsyncing_writer_starts_the_disk_on_every_stretch_before_its_fsync(
    traced: TracedParts,
) -> None:
    """Small writes, large ones and a tail: every hint is for the next stretch of at least
    WRITEBACK_BYTES in order, and together they leave less than one stretch (plus what was
    still gathered) to the fsync, which comes after them."""
    calls = _part(traced, "stretches")
    ranges = _hinted_ranges(calls, "/file.bin")
    assert ranges, calls
    expected_start = 0
    for offset, length in ranges:
        assert offset == expected_start
        assert length >= WRITEBACK_BYTES
        expected_start = offset + length
    assert STRETCHES_SIZE - expected_start < WRITEBACK_BYTES + COALESCE_BYTES
    names = [name for name, where, _ in calls if where.endswith("/file.bin")]
    assert names[-1] == "fsync" and "fsync" not in names[:-1]


def test_one_large_write_is_handed_over_and_hinted_in_stretches(traced: TracedParts) -> None:
    """A tensor of several stretches, written with one call, gets a hint per stretch before the
    fsync, not one at its end (when there would be nothing left to overlap)."""
    ranges = _hinted_ranges(_part(traced, "one-write"), "/file.bin")
    assert ranges == [(k * WRITEBACK_BYTES, WRITEBACK_BYTES) for k in range(3)], ranges


def test_parallel_writers_start_the_disk_on_each_chunk_they_write(
    traced: TracedParts,
) -> None:
    """With several writer threads, each chunk is hinted once it is written: the hints cover
    exactly the chunks' bytes, whatever order the threads finish in."""
    ranges = sorted(_hinted_ranges(_part(traced, "parallel"), "/file.bin"))
    assert ranges == [(1000 + k * (9 << 20), 9 << 20) for k in range(4)]


def test_a_save_starts_the_disk_early_and_a_writer_that_does_not_fsync_never_does(
    traced: TracedParts,
) -> None:
    """Real saves in both formats (the "torch" format's rank file and DCP's files go through
    the same writer) ask for early writeback; a manager that does not fsync asks for none."""
    calls = _part(traced, "saves")
    for root in ("durable", "durable_dcp"):
        durable = [(name, where) for name, where, _ in calls if f"/{root}/" in where]
        assert any(name == "sync_file_range" for name, _ in durable), (root, durable)
    volatile = [(name, where) for name, where, _ in calls if "/volatile/" in where]
    assert not [where for name, where in volatile if name == "sync_file_range"], volatile


def test_an_export_starts_the_disk_early_and_small_atomic_files_never_do(
    traced: TracedParts,
) -> None:
    """``export`` writes one large ``torch.save`` file through ``atomic_write``, which hints as
    a checkpoint file's writer does when it fsyncs, a large write in stretches; a manifest,
    written the same way, is too small for a hint, and an export without fsync asks for none."""
    hinted = [where for name, where, _ in _part(traced, "export") if name == "sync_file_range"]
    # Its temporary name; the 24 MiB tensor, one write of torch.save's, is hinted in stretches.
    assert len([where for where in hinted if "/.durable.pt." in where]) >= 2, hinted
    assert not any("volatile.pt" in where or "manifest" in where for where in hinted), hinted


def test_start_writeback_declines_where_there_is_nothing_to_write_back() -> None:
    """A pipe has no file pages: the kernel refuses (ESPIPE) and the writer just stops asking;
    a real failure (a closed descriptor) is raised like a failed write."""
    if not sys.platform.startswith("linux"):
        pytest.skip("sync_file_range is Linux's; elsewhere start_writeback always declines")
    read_end, write_end = os.pipe()
    try:
        assert start_writeback(write_end, 0, 4096) is False
    finally:
        os.close(read_end)
        os.close(write_end)
    with pytest.raises(OSError) as info:
        start_writeback(-1, 0, 4096)
    assert info.value.errno == errno.EBADF


def test_the_crash_explorer_counts_fsyncs_not_early_writeback() -> None:
    """docs/faults.md: the explorer's persistence model leaves early writeback out, as it makes
    nothing durable; only fsyncs count."""
    traced = TRACED_CALLS.split(",")
    assert "sync_file_range" not in traced
    assert {"fsync", "fdatasync"} <= set(traced)


class _RefusingSyncFileRange:
    """Stands in for libc's sync_file_range, failing with ``code``: no file system on this
    machine refuses the call or fails it alone (a sandbox's seccomp filter, another kernel or
    a failing disk would), so the refusal is made here; the writes and fsyncs stay real."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.calls = 0

    def __call__(self, fd: int, offset: int, length: int, flags: int) -> int:
        self.calls += 1
        ctypes.set_errno(self.code)
        return -1


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EPERM, errno.EINVAL])
def test_a_writer_stops_asking_where_the_hint_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    refusing = _RefusingSyncFileRange(code)
    monkeypatch.setattr(fsutil, "_SYNC_FILE_RANGE", refusing)
    data = os.urandom(5 * WRITEBACK_BYTES)
    with ChecksumWriter(tmp_path / "file.bin", fsync=True) as writer:
        for start in range(0, len(data), WRITEBACK_BYTES):
            writer.write(data[start : start + WRITEBACK_BYTES])
    assert refusing.calls == 1
    assert (tmp_path / "file.bin").read_bytes() == data


@pytest.mark.parametrize("parallel", [False, True], ids=["one-writer", "parallel-writers"])
def test_a_failing_hint_fails_the_write_named_after_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parallel: bool
) -> None:
    """EIO from the hint is the file's data in trouble: raised as a failed write would be,
    naming the file, and kept as the writer's error."""
    monkeypatch.setattr(fsutil, "_SYNC_FILE_RANGE", _RefusingSyncFileRange(errno.EIO))
    target = tmp_path / "file.bin"
    data = memoryview(os.urandom(2 * WRITEBACK_BYTES))
    with pytest.raises(OSError) as info, ChecksumWriter(target, fsync=True) as writer:
        if parallel:
            writer.write_in_parallel([[data[:WRITEBACK_BYTES]], [data[WRITEBACK_BYTES:]]], 2)
        else:
            writer.write(data)
    assert info.value.errno == errno.EIO
    assert os.fspath(target) in str(info.value)
    assert writer.error is info.value
