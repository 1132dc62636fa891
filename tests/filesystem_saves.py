"""Helpers shared by the tests on real mounts: the manager timeout, the state a rank saves, the
CLI run in a rank, a 2-rank save of steps 1-3 (best 2), and the ``.fuse_hidden*`` files left
once FUSE had time to handle the closes."""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path

import torch

import distckpt
from distckpt.cli import main

TIMEOUT = 20.0


def _state(rank: int, step: int) -> dict[str, object]:
    return {"w": torch.full((256,), float(100 * step + rank)), "step": step}


def _cli_job(rank: int, world_size: int, args: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(args)
    return code, out.getvalue()


def _save_one(rank: int, world_size: int, root: str) -> object:
    with distckpt.CheckpointManager(root, monitor="loss", timeout=TIMEOUT) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, _state(rank, step), metrics={"loss": {1: 0.9, 2: 0.5, 3: 0.7}[step]})
    return True


#: how long a FUSE daemon may take to handle a close it is told of asynchronously
FUSE_RELEASE_SECONDS = 5.0


def _hidden_files_settle(root: Path) -> list[Path]:
    """The ``.fuse_hidden*`` files under ``root`` once FUSE had time to handle the closes
    before now (it deletes a hidden file when told of its last close, asynchronously): none,
    unless a file is still open or was lost to the daemon."""
    deadline = time.monotonic() + FUSE_RELEASE_SECONDS
    while True:
        hidden = sorted(root.rglob(".fuse_hidden*"))
        if not hidden or time.monotonic() > deadline:
            return hidden
        time.sleep(0.05)
