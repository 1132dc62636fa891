"""An async save whose hand-off to its background thread fails after the proposal (the renewal
of the background group, the submission to the thread): the staging area is removed at once,
not left for the next start's cleanup, the schedule does not count the save, and the error is
raised on every rank within the timeout; the next job saves on the same root."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt.layout import step_dir_name
from distckpt.objstore import ObjectStore
from tests import job_servers
from tests.ranks import run_ranks, values
from tests.s3server import S3Server
from tests.test_coord import TIMEOUT
from tests.test_coord_failures import broken_background_group

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
    manager = broken_background_group(rank, root)
    torch.distributed.barrier()  # the training loop's own group: both ranks in step again
    broke = manager._background.coord.broken
    started = time.monotonic()
    with no_descriptor_left(rank == 1), pytest.raises(distckpt.CoordinationError) as failed:
        manager.save(6, {"w": torch.ones(4)})
    elapsed = time.monotonic() - started
    left = sorted(os.listdir(Path(root, ".staging")))  # rank 0 discarded it before it raised
    retried = manager.should_save(7)  # 6 crossed since 2, the last save counted
    still_broken = manager._background.coord.broken
    in_flight = manager.save_in_flight
    torch.distributed.barrier()
    manager.close()
    return {
        "broke": broke,
        "error": type(failed.value).__name__,
        "message": str(failed.value),
        "elapsed": elapsed,
        "left": left,
        "retried": retried,
        "in_flight": in_flight,
        "still_broken": still_broken,
    }


def _saves_again(rank: int, world_size: int, root: str) -> list[int]:
    with distckpt.CheckpointManager(root, timeout=TIMEOUT, async_save=True) as manager:
        manager.save(8, {"w": torch.ones(4)})
        manager.wait()
        return manager.steps()


def test_a_failed_background_group_renewal_raises_on_every_rank_and_rank_0_removes_its_staging(
    tmp_path: Path,
) -> None:
    """docs/faults.md: "A rank that raises removes its staging itself", and README: "a save that
    raises in its own call (a sync save) is retried by the next call", also when the
    background group cannot be renewed for an async save: rank 1 raises at once, rank 0 (which
    cannot connect to it) within the timeout, each naming the step, and rank 0 removes the
    save's staging area before it raises. Each rank keeps the group it had, broken where it
    broke (the next save renews it); the next job saves."""
    root = str(tmp_path)
    results = values(run_ranks(_renewal_fails_on_rank_1, 2, root, timeout=120))
    assert results[0]["left"] == [], results[0]["left"]
    assert any(result["broke"] for result in results)
    for rank, result in enumerate(results):
        assert result["error"] in ("CoordinationError", "CoordinationTimeout"), result
        assert "for step 6" in str(result["message"]), result["message"]
        assert result["elapsed"] < TIMEOUT + RAISE_SLACK_SECONDS, (rank, result["elapsed"])
        assert result["retried"] and not result["in_flight"], result
        assert result["still_broken"] == result["broke"], result  # each rank kept its group
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
            error = f"{type(exc).__name__} (step {getattr(exc, 'step', None)}): {exc}"
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
    atexit hook), which fails because its background thread can take no work any more; README:
    "`save` raises a `CheckpointError` naming the step" then."""
    root = str(tmp_path / "root")
    done = job_servers.run_script_preloaded(
        _SAVE_IN_AN_ATEXIT_HOOK, [root], tmp_path, stderr_apart=True
    )
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["error"] is not None and "cannot schedule new futures" in outcome["error"]
    assert outcome["error"].startswith("CheckpointError (step 4): "), outcome["error"]
    assert outcome["left"] == [], outcome
    assert outcome["retried"], "the failed save of step 4 was counted by the schedule"
    assert distckpt.CheckpointManager(root, read_only=True).steps() == [2]


#: The start of the scripts whose async saves cannot start their thread (argv: the root, the
#: storage options as JSON): every module the save path imports loaded, then running as
#: another user, with ``soft, hard`` its thread limits and ``mgr`` an async manager on the root.
_AS_ANOTHER_USER = textwrap.dedent(
    """
    import json, os, resource, sys, threading, torch, distckpt
    from distckpt import events

    root, options = sys.argv[1], json.loads(sys.argv[2])
    # An async save first, so that every module the save path imports lazily is loaded before
    # the uid changes: the other user may not read the interpreter's installation.
    warm_up = distckpt.CheckpointManager(
        root + "-warm-up", async_save=True, storage_options=options
    )
    with warm_up:
        warm_up.save(1, {"w": torch.zeros(2)})
        warm_up.wait()
    if os.geteuid() == 0:  # the kernel never applies RLIMIT_NPROC to root
        os.setgid(65534)
        os.setuid(65534)
    soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    mgr = distckpt.CheckpointManager(
        root, async_save=True, every_n_steps=2, timeout=20, fsync=False, storage_options=options
    )
    """
)

#: Saves once at step 2 while no thread can start, then at step 4 with threads back; argv: the
#: root and the storage options (JSON). Prints what it saw, as JSON.
_NO_THREAD_FOR_THE_FIRST_ASYNC_SAVE = _AS_ANOTHER_USER + textwrap.dedent(
    """
    def no_thread_once_proposed(event):
        # The user has this process's threads at least: any new one is refused, for real, also
        # when a thread the proposal started is still on its way out.
        if event.phase == "save.propose" and event.step == 2:
            resource.setrlimit(resource.RLIMIT_NPROC, (1, hard))

    stop_limiting = events.add_listener(no_thread_once_proposed)
    try:
        mgr.save(2, {"w": torch.zeros(2)})
        error = None
    except Exception as exc:
        error = [type(exc).__name__, getattr(exc, "step", None), getattr(exc, "rank", None)]
        error.append(repr(exc.__cause__))
    finally:
        resource.setrlimit(resource.RLIMIT_NPROC, (soft, hard))
        stop_limiting()
    retried = mgr.should_save(3)
    phases_of_step_2 = []
    events.add_listener(lambda event: event.step == 2 and phases_of_step_2.append(event.phase))
    mgr.save(4, {"w": torch.ones(2)})
    committed = mgr.wait().step
    steps = mgr.steps()
    mgr.close()
    print(json.dumps([error, retried, committed, phases_of_step_2, steps]))
    """
)


def _no_thread_for_the_first_async_save(root: str, options: dict[str, Any] | None) -> None:
    """Run :data:`_NO_THREAD_FOR_THE_FIRST_ASYNC_SAVE` on ``root`` as another user and check
    what it saw: step 2's save raised, never ran, is not counted; step 4's was made."""
    with tempfile.TemporaryDirectory() as scratch:
        done = job_servers.run_script_preloaded(
            _NO_THREAD_FOR_THE_FIRST_ASYNC_SAVE,
            [root, json.dumps(options)],
            Path(scratch),
            stderr_apart=True,
        )
    assert done.returncode == 0, done.stderr
    error, retried, committed, phases_of_step_2, steps = json.loads(done.stdout.splitlines()[-1])
    assert (committed, phases_of_step_2, steps) == (4, [], [4])
    assert retried, "the failed save of step 2 was counted by the schedule"
    assert error[:3] == ["CheckpointError", 2, 0], error
    assert "can't start new thread" in error[3], error


def test_an_async_save_whose_thread_cannot_start_is_not_made_later() -> None:
    """README: where the async saves' thread cannot start, "`save` raises a `CheckpointError`
    naming the step and the rank: that save is never made, not even once a later save starts
    the thread, leaves no staging behind and does not count for the schedule" (the submission
    had queued it before the start failed). The start fails for real: RLIMIT_NPROC, as under a
    container's pids limit, in a process of another user (the kernel does not apply it to
    root)."""
    with tempfile.TemporaryDirectory() as shared:
        os.chmod(shared, 0o777)  # written by the other user; tmp_path's parents are private
        root = os.path.join(shared, "root")
        _no_thread_for_the_first_async_save(root, None)
        assert os.listdir(os.path.join(root, ".staging")) == []


def test_an_async_save_whose_thread_cannot_start_is_not_published_later(
    s3_server: S3Server, s3_url: str
) -> None:
    """The same on an object store, where the save run later would publish step 2 after its
    save() raised: nothing of step 2 is left, staged or published."""
    options = s3_server.storage_options()
    _no_thread_for_the_first_async_save(s3_url, options)
    with ObjectStore(s3_url, options) as store:
        assert list(store.list(f"{step_dir_name(2)}/")) == []


#: How many async saves fail to start their thread while another thread waits all along: each
#: gives the waiter a chance to see the failed save between two statements of its submission.
FAILED_SUBMISSIONS = 60

#: Another thread calls wait() all along while the async save of step 2 is made
#: FAILED_SUBMISSIONS times, each refused a thread; then step 4 is saved with threads back.
#: argv: the root, the storage options (JSON), FAILED_SUBMISSIONS. Prints what it saw, as JSON.
_WAITING_WHILE_NO_THREAD_STARTS = _AS_ANOTHER_USER + textwrap.dedent(
    """
    attempts = int(sys.argv[3])
    waiter_saw, stop_waiting = [], threading.Event()

    def wait_all_along():
        while not stop_waiting.is_set():
            try:
                mgr.wait()
            except BaseException as exc:
                waiter_saw.append(repr(exc))

    waiter = threading.Thread(target=wait_all_along)
    waiter.start()  # before the limit: no thread starts after
    stop_limiting = events.add_listener(
        lambda event: event.phase == "save.propose"
        and resource.setrlimit(resource.RLIMIT_NPROC, (1, hard))
    )
    # Switch threads as often as the interpreter can: the waiter runs between any two of the
    # saving thread's statements, where a save published too early would show.
    sys.setswitchinterval(1e-6)
    raised, retried = [], []
    for _ in range(attempts):
        try:
            mgr.save(2, {"w": torch.zeros(2)})
            raised.append(None)
        except distckpt.CheckpointError as exc:
            raised.append(exc.step)
        finally:
            resource.setrlimit(resource.RLIMIT_NPROC, (soft, hard))
        retried.append(mgr.should_save(3))
    stop_limiting()
    sys.setswitchinterval(0.005)
    stop_waiting.set()
    waiter.join()
    mgr.save(4, {"w": torch.ones(2)})
    committed = mgr.wait().step
    counted = not mgr.should_save(5)
    steps = mgr.steps()
    left = sorted(os.listdir(os.path.join(root, ".staging")))
    mgr.close()
    print(json.dumps([waiter_saw, raised, retried, committed, counted, steps, left]))
    """
)


def test_a_thread_waiting_while_an_async_save_cannot_start_its_thread_sees_no_save() -> None:
    """Any thread may wait() (README); one waiting all along while async saves fail to start
    their thread sees no save in flight: never one that is not made, nor its cancellation
    (``concurrent.futures.CancelledError``). Each failed save raises its CheckpointError, is
    not counted (the next step retries it, also after the waiter's waits), and the next save
    is made and counted. The start fails for real: RLIMIT_NPROC, in a process of another user,
    as in test_an_async_save_whose_thread_cannot_start_is_not_made_later."""
    with tempfile.TemporaryDirectory() as shared:
        os.chmod(shared, 0o777)  # written by the other user; tmp_path's parents are private
        root = os.path.join(shared, "root")
        done = job_servers.run_script_preloaded(
            _WAITING_WHILE_NO_THREAD_STARTS,
            [root, "null", str(FAILED_SUBMISSIONS)],
            Path(shared),
            stderr_apart=True,
        )
        assert done.returncode == 0, done.stderr
        waiter_saw, raised, retried, committed, counted, steps, left = json.loads(
            done.stdout.splitlines()[-1]
        )
    assert waiter_saw == []
    assert raised == [2] * FAILED_SUBMISSIONS
    assert retried == [True] * FAILED_SUBMISSIONS
    assert (committed, counted, steps, left) == (4, True, [4], [])
