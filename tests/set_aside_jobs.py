"""What the set-aside tests on a local root (``tests/test_set_aside.py``) and on an ``s3://``
root (``tests/test_s3_set_aside.py``) share: a job of 2 ranks that saves steps 90 and 100, and a
requeued job that restores "last" and saves past it; on an ``s3://`` root, the same steps saved by
one process, step 100's save made damaged, and the digests of a save's objects."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from typing import Any

import torch

import distckpt
from distckpt.cli import main
from distckpt.layout import rank_file_name
from distckpt.objstore import ObjectStore
from tests.ranks import Collected

JOB_TIMEOUT = 120.0
DAMAGED = "step-00000100"


def weights(step: int, rank: int) -> torch.Tensor:
    """What rank ``rank`` saves at ``step``: distinct for every step and rank."""
    return torch.full((256,), float(step * 10 + rank))


def save_90_and_100(rank: int, world_size: int, root: str, options: dict[str, Any]) -> None:
    """A job's rank: saves steps 90 and 100 to ``root`` (a path or an ``s3://`` URL)."""
    with distckpt.CheckpointManager(root, fsync=False, storage_options=options) as manager:
        for step in (90, 100):
            manager.save(step, {"w": weights(step, rank)})


def restart(
    rank: int, world_size: int, root: str, options: dict[str, Any], verify: bool
) -> dict[str, Any]:
    """A requeued job: restore "last", then save 91..100 on its schedule (as a job whose saves
    raise would crash-loop, and whose scheduled save of a committed step 100 would return it),
    and read back what "last" names afterwards."""
    collected = Collected()
    logging.getLogger("distckpt").addHandler(collected)
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(
        root, fsync=False, storage_options=options, every_n_steps=1
    ) as manager:
        restored = manager.restore(state={"w": torch.zeros(256)}, verify=verify)
        assert restored is not None
        out["restored"] = restored.step
        out["steps_after_restore"] = manager.steps()
        if manager.layout is not None:
            out["last_after_restore"] = os.readlink(manager.layout.link_path("last"))
        try:
            out["saved"] = [
                saved.step
                for step in range(91, 101)
                if (saved := manager.save(step, {"w": weights(step, rank)})) is not None
            ]
        except distckpt.CheckpointError as exc:
            out["save_error"] = (type(exc).__name__, str(exc))
        last = manager.restore(state={"w": torch.zeros(256)}, verify=True)
        assert last is not None
        out["last"] = (last.step, last.state["w"].tolist())
    out["logged"] = [record.getMessage() for record in collected.records]
    return out


def run_cli(*args: str) -> tuple[int, str]:
    """The command line run in this process: its exit status and what it printed."""
    out = io.StringIO()
    return main(list(args), out=out), out.getvalue()


def s3_digests(url: str, options: dict[str, Any], prefix: str) -> dict[str, str]:
    """The SHA-256 of each object under ``prefix``, by its name below it."""
    with ObjectStore(url, options) as store:
        return {
            info.key[len(prefix) :]: hashlib.sha256(store.get_bytes(info.key)).hexdigest()
            for info in store.list(prefix)
        }


def s3_save_90_and_100(url: str, options: dict[str, Any]) -> str:
    """Save steps 90 and 100 in one process; step 100's attempt."""
    with distckpt.CheckpointManager(url, storage_options=options) as manager:
        for step in (90, 100):
            manager.save(step, {"w": weights(step, 0)})
    with ObjectStore(url, options) as store:
        return str(json.loads(store.get_bytes(f"{DAMAGED}/COMMIT"))["attempt"])


def s3_save_90_and_damaged_100(url: str, options: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """Steps 90 and 100 saved by one process, step 100's rank file cut short: its attempt,
    and the digests of its objects."""
    attempt = s3_save_90_and_100(url, options)
    with ObjectStore(url, options) as store:
        rank_file = f"{DAMAGED}/{attempt}/{rank_file_name(0)}"
        store.put_bytes(rank_file, store.get_bytes(rank_file)[:100])
    return attempt, s3_digests(url, options, f"{DAMAGED}/{attempt}/")
