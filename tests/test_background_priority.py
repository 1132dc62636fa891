"""The async save's background thread runs at a lower priority than training (a higher nice
value), read from the kernel while that thread is writing; only the scheduling changes."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt import events
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


@pytest.mark.parametrize("bad", [-1, 20, 1.5, True, "10"])
def test_background_nice_out_of_range_is_refused(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(distckpt.InvalidArgument, match="background_nice"):
        distckpt.CheckpointManager(tmp_path / "root", async_save=True, background_nice=bad)
    assert not (tmp_path / "root").exists()  # refused before touching anything
