"""The async save's background thread runs at a lower priority than training (a higher nice
value), read from the kernel while that thread is writing; only the scheduling changes."""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt import background, checksums, events
from tests import job_servers
from tests.ranks import run_ranks, values

#: How long a rank waits for the other thread's side of the handshake before failing.
HANDSHAKE_SECONDS = 20.0


def thread_nice(native_id: int) -> int:
    """A thread of this process's nice value, as the kernel reports it (/proc's stat, field
    19; the fields are counted after the command name, which may hold spaces)."""
    with open(f"/proc/self/task/{native_id}/stat") as file:
        after_name = file.read().rsplit(")", 1)[1].split()
    return int(after_name[19 - 3])


def _nice_while_writing(
    rank: int, world_size: int, root: str, training_nice: int, options: dict[str, Any]
) -> tuple[int, int, float]:
    """Save with ``options`` from a training thread at ``training_nice``; hold the background
    thread at the end of its write while this thread reads both threads' nice values."""
    main = threading.get_native_id()
    os.setpriority(os.PRIO_PROCESS, main, training_nice)  # this thread only, on Linux
    writing, release = threading.Event(), threading.Event()
    writer: list[int] = []

    def hold_the_writer(event: events.PhaseEvent) -> None:
        if event.phase == "save.write" and threading.get_native_id() != main:
            writer.append(threading.get_native_id())
            writing.set()
            release.wait(HANDSHAKE_SECONDS)

    remove = events.add_listener(hold_the_writer)
    try:
        with distckpt.CheckpointManager(
            root, async_save=True, fsync=False, timeout=30, **options
        ) as mgr:
            mgr.save(1, {"w": torch.full((1000,), float(rank))})
            assert writing.wait(HANDSHAKE_SECONDS), "the background write never ended"
            try:
                writer_nice = thread_nice(writer[0])
            finally:
                release.set()
            mgr.wait()
            saved = mgr.restore(1).state["w"]
        return thread_nice(main), writer_nice, float(saved[0])
    finally:
        remove()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
@pytest.mark.parametrize(
    ("options", "training_nice", "expected_writer_nice"),
    [
        ({}, 0, 10),  # the default
        ({"background_nice": 5}, 0, 5),
        ({"background_nice": 10}, 12, 19),  # raised over training's, capped at the maximum
        ({"background_nice": None}, 0, 0),
        ({"background_nice": 0}, 3, 3),
    ],
)
def test_background_thread_runs_niced_while_it_writes(
    tmp_path: Path, options: dict[str, Any], training_nice: int, expected_writer_nice: int
) -> None:
    out = values(
        run_ranks(_nice_while_writing, 2, str(tmp_path), training_nice, options, timeout=90)
    )
    assert out == [(training_nice, expected_writer_nice, float(rank)) for rank in range(2)]


def _writer_thread_nices(rank: int, world_size: int, root: str) -> tuple[int, list[int]]:
    """An async save with 2 writer threads per rank; the nice values those threads had while
    they checksummed their chunks (read through a wrapper that calls the real CRC-32)."""
    seen: set[int] = set()
    real_crc32 = checksums.crc32

    def recording_crc32(data: Any, value: int = 0) -> int:
        if threading.current_thread().name.startswith("distckpt-writer"):
            seen.add(thread_nice(threading.get_native_id()))
        return real_crc32(data, value)

    checksums.crc32 = recording_crc32  # the parallel writer looks it up in checksums at each chunk
    try:
        with distckpt.CheckpointManager(
            root, async_save=True, fsync=False, timeout=30, writer_threads=2
        ) as mgr:
            mgr.save(1, {"w": torch.full((3 << 20,), float(rank))})  # 12 MiB: several chunks
            mgr.wait()
    finally:
        checksums.crc32 = real_crc32
    return thread_nice(threading.get_native_id()), sorted(seen)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_writer_threads_of_an_async_save_run_at_the_background_threads_nice(
    tmp_path: Path,
) -> None:
    # Threads inherit their creator's nice: the writers, started by the background thread,
    # run as niced as it does (the default background_nice, 10 above training).
    for training_nice, writer_nices in values(
        run_ranks(_writer_thread_nices, 2, str(tmp_path), timeout=90)
    ):
        assert writer_nices == [min(background.MAX_NICE, training_nice + 10)]


@pytest.mark.parametrize("bad", [-1, 20, 1.5, True, "10"])
def test_background_nice_out_of_range_is_refused(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(distckpt.InvalidArgument, match="background_nice"):
        distckpt.CheckpointManager(tmp_path / "root", async_save=True, background_nice=bad)
    assert not (tmp_path / "root").exists()  # refused before touching anything


def _nice_after_lowering(increment: int) -> tuple[int, int]:
    """This thread's nice before and after ``lower_priority(increment)``, in a thread of its
    own so the caller's priority is never touched."""
    seen: list[tuple[int, int]] = []

    def run() -> None:
        before = thread_nice(threading.get_native_id())
        background.lower_priority(increment)
        seen.append((before, thread_nice(threading.get_native_id())))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return seen[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
@pytest.mark.parametrize("increment", [1, 19])
def test_background_nice_takes_each_increment_from_1_to_19(tmp_path: Path, increment: int) -> None:
    """README: "1 to 19 is the increment", both bounds included: the manager's background
    thread runs that much above the thread that started it (read by that thread itself as it
    writes)."""
    main = threading.get_native_id()
    writer_nices: list[int] = []

    def record_the_writers_nice(event: events.PhaseEvent) -> None:
        if event.phase == "save.write" and threading.get_native_id() != main:
            writer_nices.append(thread_nice(threading.get_native_id()))

    remove = events.add_listener(record_the_writers_nice)
    try:
        with distckpt.CheckpointManager(
            tmp_path, async_save=True, fsync=False, background_nice=increment
        ) as mgr:
            mgr.save(1, {"w": torch.ones(4)})
            assert mgr.wait() is not None
    finally:
        remove()
    assert writer_nices == [min(background.MAX_NICE, thread_nice(main) + increment)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc")
def test_lower_priority_is_a_logged_no_op_where_threads_have_no_nice_of_their_own(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The platform is patched: no other platform runs here, and elsewhere setpriority would
    # renice the whole process.
    monkeypatch.setattr(background.sys, "platform", "darwin")
    with caplog.at_level(logging.DEBUG, logger="distckpt"):
        before, after = _nice_after_lowering(10)
    assert after == before
    assert "background_nice ignored" in caplog.text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc")
def test_a_refused_setpriority_is_logged_and_the_save_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Patched: raising a thread's own nice is never refused on this machine; a sandbox whose
    # seccomp filter forbids setpriority is what this stands for.
    def refuse(which: int, who: int, value: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(background.os, "setpriority", refuse)
    with caplog.at_level(logging.WARNING, logger="distckpt"):
        before, after = _nice_after_lowering(10)
    assert after == before
    assert "could not lower the background save thread's priority" in caplog.text


def _save_while_every_core_is_busy(rank: int, world_size: int, root: str) -> tuple[bool, float]:
    """An async save at the default background_nice while this rank keeps a core busy with
    nice-0 work until the save is done (with as many ranks as cores, every core is busy)."""
    a = torch.randn(256, 256)
    with distckpt.CheckpointManager(root, async_save=True, fsync=False, timeout=60) as mgr:
        mgr.save(1, {"w": torch.full((1 << 20,), float(rank))})
        while mgr.save_in_flight:
            torch.mm(a, a)
        committed = mgr.wait()
        return committed is not None and committed.done, float(mgr.restore(1).state["w"][0])


def test_a_niced_save_finishes_while_training_keeps_every_core_busy(tmp_path: Path) -> None:
    # As many ranks as cores (capped, so a big machine does not start dozens of them).
    ranks = min(max(2, os.cpu_count() or 1), 4)
    out = values(run_ranks(_save_while_every_core_is_busy, ranks, str(tmp_path), timeout=120))
    assert out == [(True, float(rank)) for rank in range(ranks)]


def test_saturated_save_script_runs_end_to_end(tmp_path: Path) -> None:
    """scripts/saturated_save.py at its smallest, so it cannot silently rot. It runs in a job
    server that has imported torch already (a fresh interpreter's imports are not the point)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "saturated_save.py"
    saves = tmp_path / "saves"
    saves.mkdir()
    args = ["--mib", "1", "--nice", "0,10", "--rounds", "1", "--ranks", "2", "--dir", str(saves)]
    log = tmp_path / "script.log"
    done = job_servers.run_preloaded([str(script), *args], log, stderr_log=log.with_suffix(".err"))
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| 0 |", "| 10 |"))]
    assert len(rows) == 2, done.stdout
    assert not list(saves.iterdir())  # its checkpoints went with their temporary directory
