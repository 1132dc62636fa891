"""An async save whose hand-off to its background thread fails after the proposal (the renewal
of the background group, the submission to the thread): the staging area is removed at once,
not left for the next start's cleanup, the schedule does not count the save, and the error is
raised on every rank within the timeout; the next job saves on the same root."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import distckpt
from tests.ranks import run_ranks, values
from tests.test_coord import TIMEOUT
from tests.test_coord_failures import late_in_the_write, note_the_timeout

#: Only bounds a hang: how far past the timeout a rank whose peer could not make the group may
#: raise (gloo's connection attempts and a loaded machine).
RAISE_SLACK_SECONDS = 15.0


@contextlib.contextmanager
def no_descriptor_left(limited: bool) -> Iterator[None]:
    """Where ``limited``: the process may open no more file descriptors for the ``with`` block
    (the soft limit at its lowest free one), as a process that has reached its limit of open
    files. A gloo group's sockets then cannot be made, while the collectives of the groups made
    before, whose sockets are open, still run."""
    if not limited:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.dup(0)
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _renewal_fails_on_rank_1(rank: int, world_size: int, root: str) -> dict[str, object]:
    """Save 2 commits; rank 1 comes late to save 4's background write, which breaks the
    background group; save 6 must renew it, and rank 1 can make no socket for the new one."""
    manager = distckpt.CheckpointManager(
        root, timeout=TIMEOUT, async_save=True, every_n_steps=2, fsync=False
    )
    manager.save(2, {"w": torch.zeros(4)})
    manager.wait()
    with late_in_the_write(rank, root):
        manager.save(4, {"w": torch.zeros(4)})
        with pytest.raises(distckpt.CoordinationError):
            manager.wait()
        note_the_timeout(rank, root)
    torch.distributed.barrier()  # the training loop's own group: both ranks in step again
    broke = manager._background.coord.broken
    started = time.monotonic()
    with no_descriptor_left(rank == 1), pytest.raises(distckpt.CoordinationError) as failed:
        manager.save(6, {"w": torch.ones(4)})
    elapsed = time.monotonic() - started
    left = sorted(os.listdir(Path(root, ".staging")))  # rank 0 discarded it before it raised
    retried = manager.should_save(7)  # 6 crossed since 2, the last save counted
    torch.distributed.barrier()
    manager.close()
    return {
        "broke": broke,
        "error": type(failed.value).__name__,
        "message": str(failed.value),
        "elapsed": elapsed,
        "left": left,
        "retried": retried,
        "in_flight": manager.save_in_flight,
    }


def _saves_again(rank: int, world_size: int, root: str) -> list[int]:
    with distckpt.CheckpointManager(root, timeout=TIMEOUT, async_save=True) as manager:
        manager.save(8, {"w": torch.ones(4)})
        manager.wait()
        return manager.steps()


def test_a_failed_renewal_of_the_background_group_removes_the_staging_on_every_rank(
    tmp_path: Path,
) -> None:
    """docs/faults.md: "A rank that raises removes its staging itself", and README: "a failed
    save does not count for the schedule, so the next step retries it", also when the
    background group cannot be renewed for an async save: rank 1 raises at once, rank 0 (which
    cannot connect to it) within the timeout, each naming the step, and rank 0 removes the
    save's staging area before it raises; the next job saves."""
    root = str(tmp_path)
    results = values(run_ranks(_renewal_fails_on_rank_1, 2, root, timeout=120))
    assert results[0]["left"] == [], results[0]["left"]
    assert any(result["broke"] for result in results)
    for rank, result in enumerate(results):
        assert result["error"] in ("CoordinationError", "CoordinationTimeout"), result
        assert "for step 6" in str(result["message"]), result["message"]
        assert result["elapsed"] < TIMEOUT + RAISE_SLACK_SECONDS, (rank, result["elapsed"])
        assert result["retried"] and not result["in_flight"], result
    assert distckpt.CheckpointManager(root, read_only=True).steps() == [2]
    assert values(run_ranks(_saves_again, 2, root, timeout=60)) == [[2, 8]] * 2


#: A script whose async save is made by an atexit hook (argv: the root): Python has shut its
#: thread pools down by then, so the background thread cannot take the save.
_SAVE_IN_AN_ATEXIT_HOOK = textwrap.dedent(
    """
    import atexit, json, os, sys, torch, distckpt

    root = sys.argv[1]
    mgr = distckpt.CheckpointManager(root, async_save=True, every_n_steps=2, timeout=60)
    mgr.save(2, {"w": torch.ones(4)})
    mgr.wait()

    def save_at_exit():
        try:
            mgr.save(4, {"w": torch.ones(4)})
            error = None
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        left = sorted(os.listdir(os.path.join(root, ".staging")))
        print(json.dumps({"error": error, "left": left, "retried": mgr.should_save(5)}))

    atexit.register(save_at_exit)
    """
)


def test_an_async_save_the_background_thread_cannot_take_leaves_no_staging(
    tmp_path: Path,
) -> None:
    """docs/faults.md: "A rank that raises removes its staging itself", and README: "a failed
    save does not count for the schedule", also for an async save made at interpreter exit (an
    atexit hook), which fails because its background thread can take no work any more."""
    root = str(tmp_path / "root")
    done = subprocess.run(
        [sys.executable, "-c", _SAVE_IN_AN_ATEXIT_HOOK, root],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["error"] is not None and "cannot schedule new futures" in outcome["error"]
    assert outcome["left"] == [], outcome
    assert outcome["retried"], "the failed save of step 4 was counted by the schedule"
    assert distckpt.CheckpointManager(root, read_only=True).steps() == [2]
