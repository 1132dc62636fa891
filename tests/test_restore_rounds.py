"""How many collectives a restore on real ranks pays, and that reading before rank 0 has
decided changes no outcome: while rank 0 resolves the checkpoint, the other ranks read what
they guess it will be, and one collective carries the decision and every rank's verdict."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import distckpt
from tests.ranks import run_ranks, values


def _outcome(restore: Callable[[], distckpt.Checkpoint | None]) -> tuple[Any, int]:
    """What ``restore()`` gave (its step and this rank's tensor, or its error's type and
    message) and how many collectives it ran on this rank."""
    collectives: list[str] = []
    stop = distckpt.events.add_listener(
        lambda event: (
            collectives.append(event.phase) if event.phase.startswith("collective.") else None
        )
    )
    try:
        loaded = restore()
        result: Any = None if loaded is None else (loaded.step, loaded.state["w"].tolist())
    except distckpt.CheckpointError as exc:
        result = (type(exc).__name__, str(exc))
    finally:
        stop()
    return result, len(collectives)


def _restores(rank: int, world_size: int, root: str) -> dict[str, tuple[Any, int]]:
    out: dict[str, tuple[Any, int]] = {}
    with distckpt.CheckpointManager(root, fsync=False, timeout=20) as mgr:
        out["nothing yet"] = _outcome(lambda: mgr.restore(missing_ok=True))
        for step in (1, 2, 3, 4, 5):
            mgr.save(step, {"w": torch.full((2,), 10.0 * step + rank)})
        out["step"] = _outcome(lambda: mgr.restore(2, mmap=True))
        out["last"] = _outcome(lambda: mgr.restore())
        out["with state"] = _outcome(lambda: mgr.restore(5, state={"w": torch.zeros(2)}))
        out["verify"] = _outcome(lambda: mgr.restore(5, verify=True))
        out["a location"] = _outcome(lambda: mgr.restore(os.path.join(root, "step-00000003")))
        out["the root"] = _outcome(lambda: mgr.restore(root))
        dist.barrier()
        if rank == 0:  # a manifest no rank can read: rank 1's guess fails, rank 0's resolution
            Path(root, "step-00000005", "manifest.json").write_text("{")
        dist.barrier()
        out["unreadable manifest"] = _outcome(lambda: mgr.restore(5))
        if rank == 0:  # a stale pointer: rank 1 guesses step 1, rank 0 resolves the newest
            # Step 5 goes first: rank 0 would set the damaged step aside inside the restore,
            # moving `last` off it, and a rank 1 slow to start could then read the new `last`.
            shutil.rmtree(os.path.join(root, "step-00000005"))
            os.symlink("step-00000001", os.path.join(root, "last.new"))
            os.replace(os.path.join(root, "last.new"), os.path.join(root, "last"))
            # rank 0's own file of step 3 loses its last byte: its check refuses step 3
            with open(os.path.join(root, "step-00000003", "rank-00000.pt"), "r+b") as file:
                file.truncate(os.fstat(file.fileno()).st_size - 1)
        if rank == 1:  # rank 1's own file of step 2 is damaged at its size: only its read fails
            with open(os.path.join(root, "step-00000002", "rank-00001.pt"), "r+b") as file:
                file.write(b"NOTARANK")
        dist.barrier()
        out["stale pointer"] = _outcome(lambda: mgr.restore())
        out["refused by rank 0"] = _outcome(lambda: mgr.restore(3))
        out["failed on rank 1"] = _outcome(lambda: mgr.restore(2))
    return out


def test_a_restore_pays_one_collective_and_fails_alike_on_every_rank(tmp_path: Path) -> None:
    out = values(run_ranks(_restores, 2, str(tmp_path), timeout=120))
    for rank, results in enumerate(out):
        assert results["nothing yet"] == (None, 1)
        # rank 0 decided, the other rank read at once: one collective
        assert results["step"] == ((2, [20.0 + rank] * 2), 1)
        assert results["last"] == ((5, [50.0 + rank] * 2), 1)
        assert results["a location"] == ((3, [30.0 + rank] * 2), 1)
        assert results["the root"] == ((5, [50.0 + rank] * 2), 1)
        # nothing read before the ranks agree (state=, verify): the decision, then the read;
        # with state= also the outcome of loading into it (its load_state_dict calls)
        assert results["with state"] == ((5, [50.0 + rank] * 2), 3)
        assert results["verify"] == ((5, [50.0 + rank] * 2), 2)
        # rank 1 read what the stale pointer named; rank 0's decision is read again
        assert results["stale pointer"] == ((4, [40.0 + rank] * 2), 3)
        (kind, message), count = results["unreadable manifest"]
        assert (kind, count) == ("CorruptCheckpoint", 1) and "not valid JSON" in message
        (kind, message), count = results["refused by rank 0"]
        assert (kind, count) == ("CorruptCheckpoint", 1) and "manifest check" in message
        (_, message), count = results["failed on rank 1"]
        assert count == 1 and "rank-00001.pt" in message and "(on rank 1)" in message
    for name in ("unreadable manifest", "refused by rank 0", "failed on rank 1"):
        assert out[0][name] == out[1][name]  # the same error on every rank
