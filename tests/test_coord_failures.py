"""The Coordinator and the manager on real gloo ranks when a rank fails to take part: a rank
that dies (mid-verb, in a write, between calls), is stopped, or comes late makes the others
raise within the manager's timeout, never hang; a timed-out group is replaced, and the next
save and a new manager save again. The verbs themselves are tested in ``tests/test_coord.py``."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import distckpt
from distckpt import faults
from distckpt.coord import Coordinator
from distckpt.coord_health import PEER_REPORT_WAIT
from tests.ranks import run_ranks, values
from tests.test_coord import TIMEOUT
from tests.test_coord_groups import all_gather_error_and_report_waits
from tests.waiting import wait_until


def _dying_rank(rank: int, world_size: int) -> tuple[str, float]:
    coord = Coordinator(None, TIMEOUT)
    coord.all_gather(lambda: rank, what="meeting")  # every rank has joined the group

    def local() -> int:
        if rank == 2:
            # Dead mid-verb, once its peers have finished the meeting and wait in the gather
            # (a rank dying sooner could fail their meeting instead): its sockets close.
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)
        return rank

    started = time.monotonic()
    try:
        coord.gather_decide(local, sum, what="gathering")
    except distckpt.CoordinationError as exc:
        return type(exc).__name__, time.monotonic() - started
    finally:
        coord.close()
    return "decided", time.monotonic() - started


def test_gather_decide_with_a_dead_rank_raises_coordination_error_on_the_others() -> None:
    results = run_ranks(_dying_rank, 3, expect_killed=True)
    assert [result.rank for result in results] == [0, 1]
    for error_type, elapsed in values(results):
        # rank 0's gather loses the dead rank; rank 1 then waits for rank 0's broadcast, which
        # fails when rank 0 is gone too, or when the timeout runs out
        assert error_type in ("CoordinationError", "CoordinationTimeout")
        assert elapsed <= TIMEOUT + 15  # the manager's timeout, not gloo's default


def _rank_1_dies_in_the_write(rank: int, world_size: int, root: str) -> tuple[str, float]:
    """Rank 1 is killed right after its shard write of save(2), having noted the instant;
    rank 0 returns its error's class and when it raised (CLOCK_MONOTONIC: one clock for all
    processes)."""
    manager = distckpt.CheckpointManager(root, timeout=TIMEOUT * 10)
    manager.save(1, {"w": torch.zeros(4)})
    real_hit = faults.hit

    def die_after_the_write(point: str, hit_rank: int) -> None:
        if point == "after_shard_write" and rank == 1:
            Path(root, "killed_at").write_text(repr(time.monotonic()))
            os.kill(os.getpid(), signal.SIGKILL)
        real_hit(point, hit_rank)

    # The fault point's own kill action (DISTCKPT_FAULT=after_shard_write:kill:1) cannot note
    # the instant it kills at, which this test measures from.
    faults.hit = die_after_the_write
    try:
        with pytest.raises(distckpt.CoordinationError) as failed:
            manager.save(2, {"w": torch.zeros(4)})
        return type(failed.value).__name__, time.monotonic()
    finally:
        faults.hit = real_hit


def _rank_1_dies_between_calls(rank: int, world_size: int, root: str) -> tuple[str, float]:
    """Rank 1 is killed after save(1) returned, having noted the instant; rank 0 returns the
    class of save(2)'s error and when it raised."""
    manager = distckpt.CheckpointManager(root, timeout=TIMEOUT * 100)
    manager.save(1, {"w": torch.zeros(4)})
    if rank == 1:
        Path(root, "killed_at").write_text(repr(time.monotonic()))
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.5)  # the peer is gone before this call starts
    with pytest.raises(distckpt.CoordinationError) as failed:
        manager.save(2, {"w": torch.zeros(4)})
    return type(failed.value).__name__, time.monotonic()


def test_a_survivor_of_a_rank_dead_between_calls_raises_at_its_next_call_within_seconds(
    tmp_path: Path,
) -> None:
    """docs/faults.md: a peer that died between two calls is noticed at the next call within
    about PEER_REPORT_WAIT, not after the manager's timeout."""
    results = run_ranks(_rank_1_dies_between_calls, 2, str(tmp_path), expect_killed=True)
    [(error_type, raised_at)] = values(results)
    killed_at = float((tmp_path / "killed_at").read_text())
    assert error_type == "CoordinationError"
    assert raised_at - killed_at < PEER_REPORT_WAIT + 0.5 + 5.0  # the timeout: 300 s


def test_a_survivor_of_a_dead_rank_raises_within_a_fraction_of_a_second(tmp_path: Path) -> None:
    """docs/faults.md: "gloo notices a dead peer's closed socket at once, so a survivor raises
    CoordinationError within a fraction of a second"."""
    results = run_ranks(_rank_1_dies_in_the_write, 2, str(tmp_path), expect_killed=True)
    [(error_type, raised_at)] = values(results)
    killed_at = float((tmp_path / "killed_at").read_text())
    assert error_type == "CoordinationError"
    # Not the wait for other ranks' failure reports (what it took when every failure waited),
    # with room for a loaded machine.
    assert raised_at - killed_at < PEER_REPORT_WAIT * 0.75


def _stopped_rank(rank: int, world_size: int, root: str) -> tuple[str, float, int | None]:
    manager = distckpt.CheckpointManager(root, timeout=TIMEOUT)
    pid_file = Path(root) / "stopped.pid"
    if rank == 1:
        pid_file.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)  # stopped, not dead: its sockets stay open
    while not pid_file.exists():
        time.sleep(0.01)
    started = time.monotonic()
    try:
        manager.save(1, {"w": torch.zeros(4)})
    except distckpt.CoordinationError as exc:
        return type(exc).__name__, time.monotonic() - started, exc.rank
    finally:
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
    return "saved", time.monotonic() - started, None


def test_a_stopped_rank_makes_the_others_raise_coordination_timeout(tmp_path: Path) -> None:
    results = run_ranks(_stopped_rank, 2, str(tmp_path), expect_killed=True)
    [(error_type, elapsed, rank)] = values(results)
    assert error_type == "CoordinationTimeout"
    assert rank == 0
    assert TIMEOUT * 0.8 <= elapsed <= TIMEOUT + 15  # the manager's timeout, not gloo's default


#: How late the late rank comes to an operation no other rank waits for: well past
#: :data:`TIMEOUT`, even on a loaded machine.
LATE_SECONDS = TIMEOUT + 3
#: Only bounds a hang: how long the late rank waits for rank 0's save to time out.
TIMED_OUT_WAIT = 60.0


def _timed_out_marker(root: str) -> Path:
    return Path(root) / "rank-0-timed-out"


def note_the_timeout(rank: int, root: str) -> None:
    """Rank 0 notes that its save has raised after timing out, for :func:`after_the_timeout`."""
    if rank == 0:
        _timed_out_marker(root).touch()


def after_the_timeout(root: str) -> None:
    """The late rank comes once rank 0's save has timed out and raised (:func:`note_the_timeout`):
    late by construction, however loaded the machine, and no later than that."""
    wait_until(_timed_out_marker(root).exists, "rank 0's save timed out", TIMED_OUT_WAIT)


@contextlib.contextmanager
def late_in_the_write(rank: int, root: str) -> Iterator[None]:
    """Rank 1's next shard write comes after rank 0's save timed out (a slow disk under it):
    the way to be late inside an async save's background collectives, where a late caller
    would fail the proposal, in the calling thread, instead."""
    real_hit = faults.hit
    late: list[bool] = []

    def late_once(point: str, hit_rank: int) -> None:
        if point == "after_shard_write" and rank == 1 and not late:
            late.append(True)
            after_the_timeout(root)
        real_hit(point, hit_rank)

    # No disk here is slow for exactly one rank's one write: the fault hook holds it back.
    faults.hit = late_once
    try:
        yield
    finally:
        faults.hit = real_hit


def broken_background_group(rank: int, root: str) -> distckpt.CheckpointManager:
    """An async manager (every 2 steps) whose save 2 committed and whose save 4 failed, rank 1
    coming late to its background write: the background group broke (on one rank at least)."""
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
    return manager


def _late_then_in_step(
    rank: int, world_size: int, root: str, async_save: bool
) -> tuple[str, bool, int, int]:
    """Rank 1 comes late to save(1) (a slow step; with ``async_save``, a slow write inside the
    background thread's save), then both ranks are in step again. With ``async_save`` it also
    returns whether the background coordinator's group was replaced before save(2)."""
    manager = distckpt.CheckpointManager(root, timeout=TIMEOUT, async_save=async_save)
    if async_save:
        first_group = manager._background.coord.group
        with late_in_the_write(rank, root), pytest.raises(distckpt.CoordinationError) as failed:
            manager.save(1, {"w": torch.zeros(4)})
            manager.wait()
        note_the_timeout(rank, root)
    else:
        if rank == 1:
            after_the_timeout(root)
        with pytest.raises(distckpt.CoordinationError) as failed:
            manager.save(1, {"w": torch.zeros(4)})
        note_the_timeout(rank, root)
    # the training loop's own group: both ranks back in step
    torch.distributed.barrier()
    retried = manager.save(2, {"w": torch.ones(4)})
    if async_save:
        renewed = manager._background.coord.group is not first_group
        retried = manager.wait()
        assert renewed, "the background coordinator's broken group was not replaced"
    manager.close()
    fresh = distckpt.CheckpointManager(root, timeout=TIMEOUT, async_save=async_save)
    saved = fresh.save(3, {"w": torch.ones(4)})
    fresh.close()
    assert retried is not None and saved is not None
    return type(failed.value).__name__, retried.done, retried.step, saved.step


@pytest.mark.parametrize("async_save", [False, True])
def test_after_a_collective_timeout_the_next_save_and_a_new_manager_save_again(
    tmp_path: Path, async_save: bool
) -> None:
    """README: "a failed save does not count for the schedule" (the next call retries it);
    a timed-out collective leaves gloo's connections closed, so the group is replaced."""
    results = values(run_ranks(_late_then_in_step, 2, str(tmp_path), async_save, timeout=90))
    # the rank that waited timed out; the late one found the connection closed by it and
    # raises the same class
    assert results == [("CoordinationTimeout", True, 2, 3)] * 2
    assert distckpt.CheckpointManager(tmp_path, read_only=True).steps() == [2, 3]


def _late_inside_the_background_write(rank: int, world_size: int, root: str) -> dict[str, object]:
    """Rank 1's background write of save(2) comes late, so the background coordinator's
    group breaks; save(3) is handed to the background thread and a second manager is made
    right after, in the calling thread, while that save runs."""
    manager = distckpt.CheckpointManager(Path(root) / "a", timeout=TIMEOUT, async_save=True)
    manager.save(1, {"w": torch.zeros(4)})
    manager.wait()
    first_group = manager._background.coord.group
    with late_in_the_write(rank, root):
        manager.save(2, {"w": torch.zeros(4)})
        with pytest.raises(distckpt.CoordinationError) as failed:
            manager.wait()
        note_the_timeout(rank, root)
    # the training loop's own group: both ranks back in step
    torch.distributed.barrier()
    broke = manager._background.coord.broken
    manager.save(3, {"w": torch.ones(4)})
    renewed = manager._background.coord.group is not first_group
    second = distckpt.CheckpointManager(Path(root) / "b", timeout=TIMEOUT)
    second_saved = second.save(1, {"w": torch.ones(4)})
    second.close()
    saved = manager.wait()
    manager.close()
    assert saved is not None and second_saved is not None
    return {
        "failed": type(failed.value).__name__,
        "broke": broke,
        "renewed": renewed,
        "saved": (saved.step, saved.done),
        "second": second_saved.step,
    }


def test_a_background_save_late_in_its_write_renews_its_group_in_the_calling_thread(
    tmp_path: Path,
) -> None:
    """After a timeout inside the background thread's collectives, the next async save commits
    on a fresh group made by the caller's thread, and a manager made while it runs works: the
    background thread never makes a group whose name a group of the caller's thread could
    take."""
    results = values(run_ranks(_late_inside_the_background_write, 2, str(tmp_path), timeout=90))
    for result in results:
        assert result["failed"] in ("CoordinationTimeout", "CoordinationError")
        assert result["renewed"] and result["saved"] == (3, True) and result["second"] == 1
    assert any(result["broke"] for result in results)
    assert distckpt.CheckpointManager(tmp_path / "a", read_only=True).steps() == [1, 3]
    assert distckpt.CheckpointManager(tmp_path / "b", read_only=True).steps() == [1]


def _one_rank_leaves_an_operation(rank: int, world_size: int) -> tuple[str, list[int]]:
    """Rank 1 leaves an operation before its second collective (a local error raised outside
    a verb): rank 0 times out in it alone, and rank 1 only finds the closed group at the first
    collective of its next operation."""
    coord = Coordinator(None, TIMEOUT)
    coord.all_gather(lambda: rank, what="the first collective")
    first = "left"
    if rank == 0:
        with pytest.raises(distckpt.CoordinationTimeout) as failed:
            coord.all_gather(lambda: rank, what="the second collective")
        first = type(failed.value).__name__
    # the training loop's own collective: rank 0 timed out (and closed the connections) before
    torch.distributed.barrier()
    coord.begin_operation()
    try:
        return first, coord.all_gather(lambda: rank, what="the next operation")
    finally:
        coord.close()


def test_a_rank_that_missed_a_failed_operation_joins_the_fresh_group_at_the_next() -> None:
    results = values(run_ranks(_one_rank_leaves_an_operation, 2, timeout=60))
    assert results == [("CoordinationTimeout", [0, 1]), ("left", [0, 1])]


def _one_rank_never_comes_back(rank: int, world_size: int) -> tuple[str, float]:
    coord = Coordinator(None, TIMEOUT)
    if rank == 1:
        time.sleep(LATE_SECONDS)
        with pytest.raises(distckpt.CoordinationError):
            coord.all_gather(lambda: rank, what="the late operation")
        return "gone", 0.0  # and never calls the coordinator again
    with pytest.raises(distckpt.CoordinationTimeout):
        coord.all_gather(lambda: rank, what="the first operation")
    coord.begin_operation()
    started = time.monotonic()
    with pytest.raises(distckpt.CoordinationError) as failed:
        coord.all_gather(lambda: rank, what="the next operation")
    return str(failed.value), time.monotonic() - started


def test_a_fresh_group_no_other_rank_makes_fails_after_the_timeout() -> None:
    """A rank that replaces its broken group while the others do not raises, never hangs."""
    (message, elapsed), _gone = values(run_ranks(_one_rank_never_comes_back, 2, timeout=60))
    assert "replacing distckpt's gloo group" in message
    assert elapsed <= TIMEOUT + 10


#: How long rank 0's failure report of the operation it timed out in takes to reach the store:
#: long enough that rank 1, timing out in its next operation at about the same moment, cannot
#: find it there at once; well within the wait for reports (PEER_REPORT_WAIT): each margin is
#: half that wait.
SLOW_REPORT_SECONDS = PEER_REPORT_WAIT / 2
#: The coordinators' timeout there: shorter than the other tests' (ranks wait it out), and no
#: shorter than PEER_REPORT_WAIT, which it caps. The margins make the ranks join mostly, not
#: always, for the wait's sake (without the wait they still joined 1 run in 9): the test tells
#: a wait from none by what the ranks a call ahead asked to wait, which fails every time.
A_CALL_AHEAD_TIMEOUT = PEER_REPORT_WAIT


def _rank_1_a_call_ahead_times_out_with_rank_0(
    rank: int, world_size: int, root: str
) -> tuple[str, list[int], list[tuple[bool, float]]]:
    """Rank 2 is stopped before rank 0's broadcast (an operation's last collective) until rank 0
    timed out in it; rank 1 (and rank 3, at 4 ranks) received it and runs its next operation
    at once, where it times out at the moment rank 0 times out in the broadcast, whose failure
    report comes a moment later."""
    import distckpt.coord_health as coord_health

    coord = Coordinator(None, A_CALL_AHEAD_TIMEOUT)
    coord.all_gather(lambda: rank, what="meeting")  # every rank has joined the group
    pid_file = Path(root) / "stopped.pid"
    if rank == 0:
        real_report = coord_health.report_failure

        def slow_report(*args: object, **kwargs: object) -> None:
            time.sleep(SLOW_REPORT_SECONDS)
            real_report(*args, **kwargs)  # type: ignore[arg-type]

        # No store answers slowly on demand, and without a delay the race this test is about
        # (rank 1's timeout against rank 0's report) goes either way: the report is held back,
        # which decides it most of the time.
        coord_health.report_failure = slow_report
    if rank == 2:
        pid_file.write_text(str(os.getpid()))
        # Stopped, not sleeping: a sleeping rank's gloo threads would close its connection to
        # rank 1 once it failed, and rank 1 would then not time out itself.
        os.kill(os.getpid(), signal.SIGSTOP)
    wait_until(pid_file.exists, "rank 2 stopped", TIMED_OUT_WAIT)
    reads: list[tuple[bool, float]] = []
    if rank not in (0, 2):
        real_peer_failures = coord_health.peer_failures

        def recording_peer_failures(*args: object, **kwargs: float) -> object:
            reads.append((bool(kwargs["timed_out_here"]), kwargs["wait"]))
            return real_peer_failures(*args, **kwargs)  # type: ignore[arg-type]

        # A spy, not a stand-in (the real reads run): whether a rank a call ahead waited for
        # the reports is what this test is about; the ranks joining afterwards depends on a race
        # the delayed report only mostly decides, and telling a wait from none by the clock
        # would be a timed assertion.
        coord_health.peer_failures = recording_peer_failures  # type: ignore[assignment]
    coord.begin_operation()
    first = "decided"
    try:
        coord.decide(lambda: "commit", what="the stalled broadcast")
    except distckpt.CoordinationError as exc:
        first = type(exc).__name__
    if rank == 0:
        os.kill(int(pid_file.read_text()), signal.SIGCONT)
    coord.begin_operation()
    try:
        return first, coord.all_gather(lambda: rank, what="the next operation"), reads
    finally:
        coord.close()


# Not at 4 ranks yet: there the two ranks a call ahead sometimes fail on a closed connection
# rather than a timeout, stop at each other's report and stay a call behind (1 run in 4).
@pytest.mark.parametrize("world_size", [3], ids=["3 ranks"])
def test_a_rank_a_call_ahead_that_times_out_as_the_others_fail_joins_them(
    tmp_path: Path, world_size: int
) -> None:
    """docs/faults.md: a rank that completed a call while a third rank stalled past the timeout
    waits for the failure reports when its next call times out, and joins the others on a
    fresh group instead of staying a call behind them (every later save failing). At 4 ranks
    the two ranks a call ahead time out together and must not stop at each other's report."""
    # Now and then a rank a call ahead finds a closed connection before its own timeout, and
    # the run shows nothing of the wait: it is run again, up to 3 times in all.
    for attempt in range(3):
        root = tmp_path / str(attempt)
        root.mkdir()
        results = values(
            run_ranks(_rank_1_a_call_ahead_times_out_with_rank_0, world_size, str(root), timeout=90)
        )
        timed_out_reads = [read for _, _, reads in results for read in reads if read[0]]
        if timed_out_reads:
            break
    assert timed_out_reads, "no rank a call ahead timed out in 3 runs"
    assert timed_out_reads == [(True, min(PEER_REPORT_WAIT, A_CALL_AHEAD_TIMEOUT))] * len(
        timed_out_reads
    )
    ahead = ["decided"] * (world_size - 2)
    assert [first for first, _, _ in results] == [
        "CoordinationTimeout",
        ahead[0],
        "CoordinationTimeout",
        *ahead[1:],
    ]
    assert [gathered for _, gathered, _ in results] == [list(range(world_size))] * world_size


def _rank_1_stops_calling(rank: int, world_size: int, root: str) -> tuple[str, list[float]]:
    """Rank 1 stops calling distckpt after one call; rank 0's next call times out."""
    coord = Coordinator(None, 1.0)
    coord.begin_operation()
    coord.all_gather(lambda: rank, what="meeting")
    raised = Path(root) / "rank-0-raised"
    if rank == 1:
        # Alive until rank 0's call ended, so that it times out rather than finding a closed
        # connection, and no longer: a fixed sleep past its timeout cost seconds.
        wait_until(raised.exists, "rank 0's call ended", TIMED_OUT_WAIT)
        return "stopped calling", []
    coord.begin_operation()
    try:
        return all_gather_error_and_report_waits(coord, rank)
    finally:
        raised.touch()
        coord.close()


def test_with_two_ranks_a_timed_out_rank_does_not_wait_for_its_only_peer(tmp_path: Path) -> None:
    """docs/faults.md: with 2 ranks a rank whose call times out raises after the timeout, not up
    to PEER_REPORT_WAIT later: its only peer is the one that did not come, and never reports."""
    (error, waits), _stopped = values(
        run_ranks(_rank_1_stops_calling, 2, str(tmp_path), timeout=60)
    )
    assert error == "CoordinationTimeout"
    assert waits == [0.0]
