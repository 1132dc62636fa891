"""``writer_threads``: a rank file's tensor bytes written by several threads at their offsets
(:meth:`distckpt.checksums.ChecksumWriter.write_in_parallel`) make the same file, size and
checksum as one thread appending them."""

from __future__ import annotations

import copy
import errno
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt.checksums import file_checksum
from distckpt.formats import format_named
from distckpt.formats.base import ReadOptions
from distckpt.formats.raw_rank_file import write_rank_file
from distckpt.formats.raw_rank_reader import load_rank_file
from distckpt.formats.torch_files import load_skeleton
from distckpt.manifest import read_manifest
from tests.filesystems import MountFactory, leaving_free
from tests.ranks import run_ranks, values

TIMEOUT = 20.0


def _mixed_state() -> dict[str, Any]:
    """Many small tensors, big ones (several chunks each), empty ones, views of one storage
    and non-contiguous views, with sizes that leave padding between storages."""
    generator = torch.Generator().manual_seed(19)
    big = torch.rand(3 * (1 << 20) + 7, generator=generator)  # about 12 MiB: 3+ chunks
    matrix = torch.rand(257, 129, generator=generator, dtype=torch.float64)
    return {
        "small": [torch.rand(n % 17 + 1, generator=generator) for n in range(600)],
        "bytes": [
            torch.randint(0, 255, (n,), dtype=torch.uint8, generator=generator) for n in (1, 3, 65)
        ],
        "big": big,
        "big_view": big[5:1000],
        "second_big": torch.rand(5 << 20, generator=generator, dtype=torch.float16),
        "empty": torch.empty(0),
        "empty_2d": torch.zeros(0, 8, dtype=torch.int64),
        "transposed": matrix.t(),
        "strided": matrix[::3, 1::2],
        "matrix": matrix,
        "step": 7,
    }


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_parallel_writers_make_the_file_one_writer_makes(tmp_path: Path, threads: int) -> None:
    state = _mixed_state()
    one = write_rank_file(state, tmp_path / "one", fsync=False)
    many = write_rank_file(state, tmp_path / "many", fsync=False, writer_threads=threads)
    assert (tmp_path / "many").read_bytes() == (tmp_path / "one").read_bytes()
    assert (many.size, many.checksum) == (one.size, one.checksum)
    assert many.checksum == file_checksum(tmp_path / "many")
    assert many.size == os.path.getsize(tmp_path / "many")
    loaded = load_rank_file(tmp_path / "many", ReadOptions(), load_skeleton)
    assert torch.equal(loaded["strided"], state["strided"])
    assert torch.equal(loaded["big_view"], state["big_view"])
    assert loaded["big_view"].untyped_storage().data_ptr() == loaded["big"].data_ptr()


@pytest.mark.parametrize(
    "state",
    [{}, {"empty": torch.empty(0)}, {"one": torch.ones(3)}, {"x": 1}],
    ids=["nothing", "only-empty", "one-small", "no-tensor"],
)
def test_parallel_writers_with_little_or_nothing_to_write(tmp_path: Path, state: Any) -> None:
    one = write_rank_file(state, tmp_path / "one", fsync=True)
    many = write_rank_file(state, tmp_path / "many", fsync=True, writer_threads=4)
    assert (tmp_path / "many").read_bytes() == (tmp_path / "one").read_bytes()
    assert (many.size, many.checksum) == (one.size, one.checksum)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2", None])
def test_writer_threads_must_be_a_count(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(distckpt.InvalidArgument, match="writer_threads"):
        distckpt.CheckpointManager(tmp_path / "root", writer_threads=bad)
    with pytest.raises(ValueError):  # InvalidArgument is a ValueError too
        format_named("torch", writer_threads=bad)


def test_more_than_one_writer_needs_pwritev(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every system this suite runs on has os.pwritev; taking it away is the only way to meet a
    # system without it (Windows) here.
    monkeypatch.delattr(os, "pwritev")
    with pytest.raises(distckpt.InvalidArgument, match="pwritev"):
        distckpt.CheckpointManager(tmp_path / "root", writer_threads=2)
    assert format_named("torch", writer_threads=1).name == "torch"


def test_the_dcp_format_refuses_more_than_one_writer_thread(tmp_path: Path) -> None:
    with pytest.raises(distckpt.InvalidArgument, match="'torch' format"):
        distckpt.CheckpointManager(tmp_path / "root", format="dcp", writer_threads=2)
    assert format_named("dcp", writer_threads=1).name == "dcp"


def _save_with(rank: int, world_size: int, root: str, fmt: str, writer_threads: int) -> object:
    with distckpt.CheckpointManager(
        root, format=fmt, writer_threads=writer_threads, timeout=TIMEOUT
    ) as mgr:
        # DCP saves a plain tensor once, as every rank's: the same on each rank here
        state = _mixed_state() if fmt == "torch" else {"w": torch.arange(1000.0)}
        mgr.save(1, state)
        template = copy.deepcopy(state)  # DCP loads in place: it needs one
        for tensor in (template["w"] if fmt == "dcp" else template["big"],):
            tensor.zero_()
        restored = mgr.restore("last", state=template)
        assert restored is not None
        key = "w" if fmt == "dcp" else "big"
        return torch.equal(template[key], state[key])


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_the_manifest_records_the_same_files_with_any_writer_threads(
    tmp_path: Path, fmt: str
) -> None:
    """The "torch" format with 1 and 3 threads (and DCP, which the setting leaves alone)."""
    counts = [1, 3] if fmt == "torch" else [1, 1]
    records = []
    for n, count in enumerate(counts):
        root = tmp_path / f"root-{n}"
        assert (
            values(run_ranks(_save_with, 2, os.fspath(root), fmt, count, timeout=90)) == [True] * 2
        )
        (checkpoint,) = [p for p in root.iterdir() if p.name.startswith("step-")]
        manifest = read_manifest(checkpoint)
        # every file's size, and the checksum of each but DCP's .metadata (it differs between
        # any two saves: DCP writes a fresh save id into it)
        records.append(
            {
                name: (r.size, None if name == ".metadata" else r.checksum)
                for name, r in manifest.files.items()
            }
        )
    assert records[0] == records[1] and records[0]


def _async_save_and_restore(rank: int, world_size: int, root: str) -> object:
    state = _mixed_state()
    with distckpt.CheckpointManager(
        root, async_save=True, writer_threads=3, timeout=TIMEOUT
    ) as mgr:
        mgr.save(1, state)
        mgr.wait()
        restored = mgr.restore("last")
        assert restored is not None
        return all(
            torch.equal(restored.state[key], state[key]) for key in ("big", "strided", "empty")
        )


def test_an_async_save_writes_with_parallel_writers_in_its_background_thread(
    tmp_path: Path,
) -> None:
    assert (
        values(run_ranks(_async_save_and_restore, 2, os.fspath(tmp_path), timeout=90)) == [True] * 2
    )


def test_a_full_disk_under_parallel_writers_names_the_file(mounts: MountFactory) -> None:
    """Every thread stops; the error is the "no space" OSError one writer raises, named after
    the file (the manager turns it into InsufficientSpace: tests/test_filesystems_space.py)."""
    mount = mounts.get("small-ext4")
    target = mount.path / "victim-threads"
    try:
        with (
            leaving_free(mount.path, 2 << 20, filler_name="hog-threads"),
            pytest.raises(OSError) as info,
        ):
            write_rank_file({"w": torch.ones(4 << 20)}, target, fsync=True, writer_threads=4)
        assert info.value.errno == errno.ENOSPC
        assert info.value.filename == os.fspath(target)
    finally:
        target.unlink(missing_ok=True)


@pytest.mark.parametrize("threads", [1, 3])
def test_one_writer_appends_with_write_and_more_use_pwritev(tmp_path: Path, threads: int) -> None:
    """The default (1) makes the same system calls as before the setting existed, which the
    crash-state explorer's traces were made of; more threads write with ``pwritev``."""
    try:
        from tests.crashsim.trace import StraceUnavailable, record_forked
    except ImportError as exc:  # pragma: no cover - the explorer's tracer ships with the tests
        pytest.skip(str(exc))
    state = {"a": torch.ones(1000), "b": torch.zeros(5), "c": torch.arange(70, dtype=torch.int8)}
    trace = tmp_path / "trace"
    try:
        record_forked(
            lambda: write_rank_file(state, tmp_path / "rank", fsync=True, writer_threads=threads),
            trace,
            cwd=tmp_path,
            timeout=60,
        )
    except StraceUnavailable as exc:
        pytest.skip(str(exc))
    calls = [line.split("(", 1)[0].split()[-1] for line in trace.read_text().splitlines()]
    positioned = {name for name in calls if name.startswith("pwrite")}
    assert "fsync" in calls
    if threads == 1:
        assert not positioned
    else:  # glibc may make os.pwritev's call as pwritev2
        assert positioned and positioned <= {"pwritev", "pwritev2"}
