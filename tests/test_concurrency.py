"""Processes that share a root but no process group: two jobs, a job next to maintenance
commands, a reader next to a writer's retention, and a checkpoint that retention removes while
it is read.

Every process here is a real, separate process (forked; a maintenance command is the command
line's ``main`` in a forked process, which finds torch imported); they meet only through the
root's file lock and its directory layout. The lock holders, a filesystem without ``flock`` and
the probes beside the writer locks are in test_concurrency_locks.py."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt import reader
from distckpt.layout import RootLayout, step_dir_name
from distckpt.storage import open_store
from tests.cli_runner import report_as_a_fresh_process, run_cli
from tests.fault_checks import entries
from tests.ranks import Collected
from tests.shared_root import (
    JOB_TIMEOUT,
    TIMEOUT,
    Proc,
    _saving_loop,
    check_root,
    describe,
    staging_dirs,
    state_of,
)

# ---------------------------------------------------------------------------------- helpers


def state_ok(state: Any, step: int, job: int) -> bool:
    want = state_of(step, job)
    return (
        state["step"] == want["step"]
        and state["job"] == want["job"]
        and torch.equal(state["w"], want["w"])
    )


# ---------------------------------------------------------------------------------- two jobs


def _competing_job(root: str, job: int, steps: int, barrier: Any) -> dict[str, Any]:
    """Save steps 1..``steps`` (the other job saves the same ones, so they collide on
    every step), opening a new manager every 4 saves, which waits for the other job's manager
    to close (one writing job at a time holds the root's lease)."""
    out: dict[str, Any] = {"saved": [], "refused": Counter(), "errors": []}
    barrier.wait()
    mgr = None
    try:
        for step in range(1, steps + 1):
            if step % 4 == 1:
                if mgr is not None:
                    mgr.close()
                mgr = distckpt.CheckpointManager(root, timeout=TIMEOUT, wait_for_root=JOB_TIMEOUT)
            try:
                mgr.save(step, state_of(step, job), metadata={"job": job})
                out["saved"].append(step)
            except (distckpt.InvalidStep, distckpt.CheckpointExists) as exc:
                out["refused"][type(exc).__name__] += 1
            except distckpt.CheckpointError as exc:
                out["errors"].append(describe(exc))
    finally:
        if mgr is not None:
            mgr.close()
    return out


def test_two_jobs_share_a_root(root: Path) -> None:
    barrier = mp.get_context("fork").Barrier(2)
    jobs = [Proc(_competing_job, str(root), job, 24, barrier) for job in (1, 2)]
    outs = [job.result() for job in jobs]
    print("refused saves:", [dict(out["refused"]) for out in outs])

    assert [out["errors"] for out in outs] == [[], []]  # only the clear refusals
    saved = [set(out["saved"]) for out in outs]
    assert not saved[0] & saved[1], "both jobs think they committed the same step"
    check_root(root)
    committed = {c.step for c in distckpt.verify(root).checkpoints}
    assert committed == saved[0] | saved[1]  # every save that returned is there
    for job, steps in zip((1, 2), saved):  # ... and holds what that job saved
        for step in steps:
            ckpt = distckpt.load_checkpoint(root / step_dir_name(step))
            assert ckpt.metadata == {"job": job} and state_ok(ckpt.state, step, job)
    assert sum(sum(out["refused"].values()) for out in outs) > 0  # they did collide
    assert staging_dirs(root) == []


# ---------------------------------------------------------------------------------- maintenance


def _deleting_loop(root: str, stop: Any, seed: int) -> dict[str, Any]:
    """The store's ``delete(step)`` of a random committed step (the newest too) and its
    ``collect_leftovers()``, each from a newly made store, over and over: what an operator's
    tool does next to a live job, with no manager (a second manager would be a second writing
    job, refused while the first holds the root's lease)."""
    rng = random.Random(seed)
    out: dict[str, Any] = {"deleted": [], "gc": 0, "clear": Counter(), "errors": []}
    while not stop.is_set():
        try:
            store = open_store(root, lock_timeout=TIMEOUT / 2)
            steps = RootLayout.at(root).committed_steps()
            if steps:
                step = rng.choice(steps)
                store.delete(step)
                out["deleted"].append(step)
            for _ in range(5):
                store.collect_leftovers()
                out["gc"] += 1
        except distckpt.CheckpointNotFound as exc:  # retention removed it first: clear
            out["clear"][type(exc).__name__] += 1
        except Exception as exc:
            out["errors"].append(describe(exc))
        time.sleep(0.01)
    return out


#: how many steps the job saves while the maintenance commands run, over and over: a count of
#: saves, so that the overlap does not shrink with how fast the machine runs a command
SAVES_DURING_COMMANDS = 200


def _newest_step(root: str) -> int:
    return max(RootLayout.at(root).committed_steps(), default=0)


def _command_rounds(root: str, args: tuple[str, ...]) -> list[tuple[str, int, str]]:
    """``distckpt *args`` over and over in this forked process until the job saving in
    ``root`` has saved :data:`SAVES_DURING_COMMANDS` more steps, reporting to stderr what a
    fresh process would: each run's command name, exit status and stderr."""
    report_as_a_fresh_process()
    until = _newest_step(root) + SAVES_DURING_COMMANDS
    done = [run_cli(*args)]
    while _newest_step(root) < until:
        done.append(run_cli(*args))
    return [(run.args[1], run.returncode, run.stderr) for run in done]


def test_maintenance_next_to_a_saving_job(root: Path) -> None:
    """While a job saves with ``keep_last=2``: ``distckpt prune --keep-last 1`` and
    ``distckpt gc``, in two processes each, all at once and over and over until the job has
    saved :data:`SAVES_DURING_COMMANDS` more steps, and in another process the store's
    ``delete(step)`` and ``collect_leftovers()`` over and over. Every command succeeds, no
    save fails, nothing breaks."""
    stop = mp.get_context("fork").Event()
    writer = Proc(_saving_loop, str(root), stop, 2, 100_000)
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (root / "last").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    deleter = Proc(_deleting_loop, str(root), stop, 0)
    # Each command in a forked process of its own: a fresh Python would spend about 2 s of CPU
    # importing torch (test_python_dash_m_runs_the_real_entry_point runs the real entry point).
    batch = [
        Proc(_command_rounds, str(root), args)
        for args in [("prune", str(root), "--keep-last", "1"), ("gc", str(root))] * 2
    ]
    commands = [run for command in batch for run in command.result()]
    stop.set()
    wrote, deleted = writer.result(), deleter.result()
    print(
        f"{len(commands)} commands; saved {len(wrote['saved'])}; deleted "
        f"{len(deleted['deleted'])} ({dict(deleted['clear'])}), {deleted['gc']} gc; "
        f"errors: {wrote['errors']}"
    )

    for name, code, stderr in commands:
        assert code == 0 and "Traceback" not in stderr, f"distckpt {name}: {code}\n{stderr}"
    assert wrote["errors"] == [], wrote["errors"]
    assert deleted["errors"] == [], deleted["errors"]
    assert len(wrote["saved"]) > SAVES_DURING_COMMANDS and deleted["gc"] >= 100  # they overlap
    check_root(root)
    assert staging_dirs(root) == [] and entries(root / ".trash") == []


# ---------------------------------------------------------------------------------- readers


def _reading_loop(root: str, seconds: float, slow_listing: bool = False) -> dict[str, Any]:
    """``load_checkpoint(root)`` (which resolves "last") over and over. ``slow_listing``: 20 ms
    pass between listing the root's step dirs and reading them, as on a loaded NFS server."""
    if slow_listing:
        real_listing = RootLayout.committed_steps

        def committed_steps(self: RootLayout) -> list[int]:
            steps = real_listing(self)
            time.sleep(0.02)
            return steps

        RootLayout.committed_steps = committed_steps  # type: ignore[method-assign]
    collected = Collected()
    logging.getLogger("distckpt").addHandler(collected)
    out: dict[str, Any] = {"loads": 0, "steps": set(), "errors": Counter(), "wrong": []}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            ckpt = distckpt.load_checkpoint(root)
        except Exception as exc:
            out["errors"][describe(exc)[:300]] += 1
            continue
        out["loads"] += 1
        out["steps"].add(ckpt.step)
        if not state_ok(ckpt.state, ckpt.step, 0):
            out["wrong"].append(ckpt.step)
    out["retries"] = sum("vanished" in record.getMessage() for record in collected.records)
    return out


def test_reader_next_to_retention(root: Path) -> None:
    """Two readers loop ``load_checkpoint(root)`` while a writer saves with ``keep_last=1``,
    so the checkpoint a reader resolved is often deleted under it: every load succeeds (it
    resolves again when its checkpoint vanished) with a whole, matching state. One reader
    lists the root slowly, which widens the window between listing and reading."""
    stop = mp.get_context("fork").Event()
    writer = Proc(_saving_loop, str(root), stop, 1, 100_000)
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (root / "last").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    readers = [Proc(_reading_loop, str(root), 3.0, slow) for slow in (False, True)]
    reads = [reader.result() for reader in readers]
    stop.set()
    wrote = writer.result()
    for read in reads:
        print(
            f"{read['loads']} loads of {len(read['steps'])} steps, {read['retries']} "
            f"retried after a vanish; writer saved {len(wrote['saved'])}"
        )
    assert wrote["errors"] == []
    for read in reads:
        assert read["wrong"] == []  # never a mix of two checkpoints, never a partial one
        assert dict(read["errors"]) == {}, dict(read["errors"])
        assert read["loads"] > 10 and len(read["steps"]) > 3
    check_root(root)


# ---------------------------------------------------------------------------------- vanished


def _save_with_retention(root: str, step: int) -> None:
    """Another job's save of ``step`` with ``keep_last=1``: its retention deletes the rest."""
    with distckpt.CheckpointManager(root, keep_last=1, fsync=False, timeout=TIMEOUT) as mgr:
        mgr.save(step, {"w": torch.full((4,), float(step))})


def _deleted_once_resolved(monkeypatch: pytest.MonkeyPatch, root: Path) -> list[int]:
    """Make the next reads of ``root`` meet retention in the window between resolving a
    checkpoint and reading it: right after the first resolve, another process saves a newer
    step with ``keep_last=1``, which deletes the resolved one. Returns the steps it saved."""
    real_resolve, saved = reader.resolve, []

    def retention_strikes_after_resolve(*args: Any, **kwargs: Any) -> Any:
        found = real_resolve(*args, **kwargs)
        if not saved:  # once: the reader's retry must then succeed
            saved.append(2)
            Proc(_save_with_retention, os.fspath(root), 2).result()
        return found

    # A hook in the reader's own process: no other process can be timed into that window.
    monkeypatch.setattr(reader, "resolve", retention_strikes_after_resolve)
    return saved


def _load_root(root: Path) -> distckpt.Checkpoint:
    return distckpt.load_checkpoint(root)


def _restore_last_read_only(root: Path) -> distckpt.Checkpoint:
    # Read-only: a reading manager takes no lease, so the other job can save and retain.
    with distckpt.CheckpointManager(root, read_only=True, timeout=TIMEOUT) as mgr:
        return mgr.restore("last")


@pytest.mark.parametrize(
    "read", [_load_root, _restore_last_read_only], ids=["load_checkpoint", "restore-last"]
)
def test_a_checkpoint_vanishing_mid_read_is_resolved_again(
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    read: Callable[[Path], distckpt.Checkpoint],
) -> None:
    _save_with_retention(os.fspath(root), 1)
    saved = _deleted_once_resolved(monkeypatch, root)
    caplog.set_level(logging.WARNING, logger="distckpt")
    ckpt = read(root)
    assert saved == [2]  # the retention really ran between resolving and reading
    assert ckpt.step == 2 and torch.equal(ckpt.state["w"], torch.full((4,), 2.0))
    retries = [r.getMessage() for r in caplog.records if "vanished" in r.getMessage()]
    named = "'last'" if read is _restore_last_read_only else repr(os.fspath(root))
    vanished = root / step_dir_name(1)
    assert retries == [f"{vanished} vanished while being read; resolving {named} again"]


def test_a_step_named_explicitly_that_vanishes_mid_read_is_not_replaced(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _save_with_retention(os.fspath(root), 1)
    _deleted_once_resolved(monkeypatch, root)
    try:
        distckpt.load_checkpoint(root / step_dir_name(1))
    except distckpt.CheckpointVanished as exc:
        assert isinstance(exc, FileNotFoundError)
        assert f"{root / step_dir_name(1)} was deleted while it was being read" in str(exc)
    else:
        raise AssertionError("a vanished step named explicitly was replaced by another one")
