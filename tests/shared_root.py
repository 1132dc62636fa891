"""Helpers shared by the tests of processes that share a root but no process group: their
timeouts, a forked process and its result, a job saving in a loop, and what a root holds
(states saved, staging dirs, entries, committed dirs verified and ``last``)."""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import distckpt
from distckpt.fsutil import read_link
from distckpt.layout import step_dir_name

TIMEOUT = 10  # manager timeout: the commit lock waits at most half of it
JOB_TIMEOUT = 60  # a process still running past this counts as hung


def _child(fn: Callable[..., Any], args: tuple[Any, ...], queue: Any) -> None:
    torch.set_num_threads(1)
    try:
        queue.put(("ok", fn(*args)))
    except BaseException:
        queue.put(("error", traceback.format_exc()))
    finally:
        queue.close()
        queue.join_thread()
        os._exit(0)


class Proc:
    """A forked process running ``fn(*args)``; :meth:`result` is its return value."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        ctx = mp.get_context("fork")
        self.queue = ctx.Queue()
        self.process = ctx.Process(target=_child, args=(fn, args, self.queue), daemon=True)
        self.process.start()

    def result(self, timeout: float = JOB_TIMEOUT) -> Any:
        try:
            status, value = self.queue.get(timeout=timeout)
        except Exception:
            raise AssertionError(f"process {self.process.pid} hung for {timeout} s") from None
        finally:
            if self.process.is_alive():
                self.process.join(5)
            if self.process.is_alive():
                self.process.kill()
        if status == "error":
            raise AssertionError(f"process {self.process.pid} failed:\n{value}")
        return value


def state_of(step: int, job: int = 0) -> dict[str, Any]:
    return {"step": step, "job": job, "w": torch.full((4,), float(job * 1000 + step))}


def staging_dirs(root: Path) -> list[str]:
    staging = root / ".staging"
    return sorted(p.name for p in staging.iterdir() if p.is_dir()) if staging.is_dir() else []


def check_root(root: Path) -> None:
    """Every committed dir verifies, and ``last`` names the newest."""
    report = distckpt.verify(root)
    assert report.ok, str(report)
    committed = sorted(c.step for c in report.checkpoints)
    if committed:
        assert read_link(root / "last") == step_dir_name(committed[-1])


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _saving_loop(root: str, stop: Any, keep_last: int | None, limit: int) -> dict[str, Any]:
    out: dict[str, Any] = {"saved": [], "errors": []}
    with distckpt.CheckpointManager(root, keep_last=keep_last, timeout=TIMEOUT) as mgr:
        step = 0
        while not stop.is_set() and step < limit:
            step += 1
            try:
                mgr.save(step, state_of(step))
                out["saved"].append(step)
            except Exception as exc:
                out["errors"].append(describe(exc))
    return out
