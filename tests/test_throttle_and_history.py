"""The schedules and retention rules added to the manager: ``save_on_steps``,
``min_seconds_between_saves`` (on real gloo ranks, with an async save held in flight),
``keep_every_n_seconds`` rebuilt from the manifests across restarts, ``keep_unranked``, and
``wait()`` called by several threads while a save is in flight."""

from __future__ import annotations

import datetime
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt import faults
from distckpt.errors import InjectedFault, InvalidArgument
from tests.hostile_cases import edit_manifest
from tests.ranks import run_ranks, values

TIMEOUT = 30.0


def _save_step_10(rank: int, world_size: int, root: str) -> None:
    with distckpt.CheckpointManager(root, fsync=False, timeout=20) as mgr:
        mgr.save(10, {"w": torch.zeros(2)})


def _requeued_every_seconds(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """A job with ``every_seconds=1`` whose previous run committed step 10 over a second ago
    (it was killed and waited in the queue): the interval counts from that checkpoint."""
    with distckpt.CheckpointManager(root, every_seconds=1.0, fsync=False, timeout=20) as mgr:
        mgr.restore("last", state={"w": torch.zeros(2)})  # the resume does not restart it either
        due_at_start = mgr.should_save(11)
        saved = mgr.save(11, {"w": torch.zeros(2)})
        return {
            "due_at_start": due_at_start,
            "saved": saved and saved.step,
            "due_right_after": mgr.should_save(12),
        }


def test_every_seconds_counts_from_the_newest_checkpoint_across_restarts(tmp_path: Path) -> None:
    """A job killed more often than ``every_seconds`` still saves: a start does not restart
    the interval when the root's newest checkpoint is older than it."""
    values(run_ranks(_save_step_10, 2, str(tmp_path)))
    time.sleep(1.1)  # the requeued job waits in the queue longer than the interval
    results = values(run_ranks(_requeued_every_seconds, 2, str(tmp_path)))
    assert results == [{"due_at_start": True, "saved": 11, "due_right_after": False}] * 2


def _requeued_saving_every_micro_batch(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """A requeued job with ``every_seconds=1`` and gradient accumulation: it saves after every
    micro-batch, so its first calls are at the step it resumed from, already committed."""
    with distckpt.CheckpointManager(root, every_seconds=1.0, fsync=False, timeout=20) as mgr:
        step = mgr.restore("last", state={"w": torch.zeros(2)}).step
        at_resumed_step = [mgr.save(step, {"w": torch.zeros(2)}) for _micro_batch in range(2)]
        saved = mgr.save(step + 1, {"w": torch.zeros(2)})
        return {
            "at_resumed_step": at_resumed_step,
            "saved": saved and saved.step,
            "steps": mgr.steps(),
        }


def test_every_seconds_is_not_restarted_by_calls_at_the_resumed_step(tmp_path: Path) -> None:
    """A call at the step the schedule counts from has nothing new to save: it returns None and
    leaves the interval running, so the first call past it saves (a job killed more often than
    the interval still saves)."""
    values(run_ranks(_save_step_10, 2, str(tmp_path)))
    time.sleep(1.1)  # the requeued job waits in the queue longer than the interval
    results = values(run_ranks(_requeued_saving_every_micro_batch, 2, str(tmp_path)))
    assert results == [{"at_resumed_step": [None, None], "saved": 11, "steps": [10, 11]}] * 2


class HeldValue:
    """A plain value whose pickling waits for :attr:`release`: an async save writing it stays
    in flight, really blocked inside its write, until the test lets it go."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def __deepcopy__(self, memo: dict[int, Any]) -> HeldValue:
        return self  # the async snapshot copies plain values; this one must stay the same

    def __reduce__(self) -> tuple[Any, ...]:
        if not self.release.wait(TIMEOUT):
            raise TimeoutError("the held save was never released")
        return (int, (0,))


# ------------------------------------------------------------------ schedules on two ranks


def _listed_steps(rank: int, world_size: int, root: str) -> list[int]:
    saved = []
    with distckpt.CheckpointManager(
        root, save_on_steps=(3, 7, 8), every_n_steps=10, fsync=False, timeout=TIMEOUT
    ) as mgr:
        for step in (1, 2, 4, 5, 9, 10, 11, 12):  # 3 and 7-8 are jumped over
            if mgr.save(step, {"w": torch.full((2,), float(step))}) is not None:
                saved.append(step)
    return saved


def test_save_on_steps_crosses_listed_steps_and_combines_with_every_n(tmp_path: Path) -> None:
    # 4 crosses 3; 9 crosses 7 and 8 (one save); 10 is every_n_steps.
    assert values(run_ranks(_listed_steps, 2, str(tmp_path))) == [[4, 9, 10]] * 2


def _throttled(rank: int, world_size: int, root: str, plain: bool) -> list[int | None]:
    """Saves at steps 1..5, forced at 4, under a throttle no call outlives."""
    schedule: dict[str, Any] = {} if plain else {"every_n_steps": 1}
    with distckpt.CheckpointManager(
        root, min_seconds_between_saves=3600, fsync=False, timeout=TIMEOUT, **schedule
    ) as mgr:
        return [
            getattr(mgr.save(step, {"s": step}, force=step == 4), "step", None)
            for step in range(1, 6)
        ]


@pytest.mark.parametrize("plain", [False, True], ids=["scheduled", "plain-save"])
def test_throttle_skips_scheduled_and_plain_saves_but_not_forced(
    tmp_path: Path, plain: bool
) -> None:
    out = values(run_ranks(_throttled, 2, str(tmp_path), plain))
    assert out == [[1, None, None, 4, None]] * 2


def _continuous_with_accumulation(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """Continuous checkpointing (the throttle alone) called after every micro-batch of
    gradient accumulation, two micro-batches a step, then again after a restart. The throttle is
    so short that no call is held back by it."""
    state = {"w": torch.zeros(2)}
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(
        root, min_seconds_between_saves=1e-9, fsync=False, timeout=TIMEOUT
    ) as mgr:
        out["first run"] = [getattr(mgr.save(s, state), "step", None) for s in (1, 1, 3, 3)]
    with distckpt.CheckpointManager(
        root, min_seconds_between_saves=1e-9, fsync=False, timeout=TIMEOUT
    ) as mgr:
        resumed = mgr.restore("last", state=state).step
        out["at resumed step"] = mgr.save(resumed, state)
        out["at an older committed step"] = getattr(mgr.save(1, state), "step", None)
        with pytest.raises(distckpt.InvalidStep):
            mgr.save(2, state)  # a lower step is still refused, not skipped
    with distckpt.CheckpointManager(root, fsync=False, timeout=TIMEOUT) as mgr:
        with pytest.raises(distckpt.CheckpointExists):
            mgr.save(3, state)  # an explicit save (no schedule, no throttle) still refuses
        out["steps"] = mgr.steps()
    return out


def test_continuous_checkpointing_skips_calls_at_the_step_saved_last(tmp_path: Path) -> None:
    """A save the throttle governs is not explicit: a second call at a committed step (the
    next micro-batch, the first call after a resume) returns None instead of raising
    ``CheckpointExists``."""
    out = values(run_ranks(_continuous_with_accumulation, 2, str(tmp_path)))
    assert (
        out
        == [
            {
                "first run": [1, None, 3, None],
                "at resumed step": None,
                "at an older committed step": 1,
                "steps": [1, 3],
            }
        ]
        * 2
    )


def test_overwrite_at_the_step_saved_last_overwrites_under_the_throttle(tmp_path: Path) -> None:
    """``overwrite=True`` asks for the step saved last anew: the throttle's rule that a call at
    that step has nothing new does not hold it back (it used to return None, saving nothing),
    after a save in this run, after ``should_save``, and after a resume."""
    with distckpt.CheckpointManager(tmp_path, min_seconds_between_saves=1e-9, fsync=False) as mgr:
        mgr.save(5, {"w": torch.zeros(2)})
        assert mgr.save(5, {"w": torch.ones(2)}, overwrite=True).step == 5
        assert not mgr.should_save(5)
        assert mgr.save(5, {"w": torch.full((2,), 2.0)}, overwrite=True).step == 5
    with distckpt.CheckpointManager(tmp_path, min_seconds_between_saves=1e-9, fsync=False) as mgr:
        mgr.restore("last", state={"w": torch.zeros(2)})
        assert mgr.save(5, {"w": torch.full((2,), 3.0)}, overwrite=True).step == 5
        assert mgr.restore(5).state["w"].tolist() == [3.0, 3.0]
        assert mgr.steps() == [5]


def _deferred_past_throttle(rank: int, world_size: int, root: str) -> list[int | None]:
    with distckpt.CheckpointManager(
        root, every_n_steps=2, min_seconds_between_saves=1.5, fsync=False, timeout=TIMEOUT
    ) as mgr:
        mgr.save(2, {"s": 2}, force=True)  # the save the throttle counts from
        saved = [getattr(mgr.save(4, {"s": 4}), "step", None)]  # due, held back
        time.sleep(1.6)
        saved.append(getattr(mgr.save(5, {"s": 5}), "step", None))  # still due: 4 was crossed
        return saved


def test_held_back_save_is_deferred_to_the_next_call_after_the_wait(tmp_path: Path) -> None:
    # A held-back save leaves the schedule's counters alone: 5 is due, having crossed 4.
    assert values(run_ranks(_deferred_past_throttle, 2, str(tmp_path))) == [[None, 5]] * 2


def _async_in_flight(rank: int, world_size: int, root: str) -> dict[str, Any]:
    held = HeldValue()
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(
        root,
        every_n_steps=1,
        min_seconds_between_saves=0.05,
        async_save=True,
        fsync=False,
        timeout=TIMEOUT,
    ) as mgr:
        first = mgr.save(1, {"s": 1, "held": held if rank == 0 else 0})
        time.sleep(0.2)  # past min_seconds_between_saves: only the save in flight holds back
        began = time.monotonic()
        out["skipped"] = mgr.save(2, {"s": 2}) is None
        out["returned in"] = time.monotonic() - began
        out["in flight"] = mgr.save_in_flight if rank == 0 else True
        held.release.set()
        out["first"] = (first.step, first.done, mgr.wait().step)
        out["next"] = mgr.save(3, {"s": 3}).step  # due again (2 was skipped), nothing in flight
        mgr.wait()
        out["steps"] = mgr.steps()
    return out


def test_async_save_in_flight_makes_a_throttled_save_skip_not_block(tmp_path: Path) -> None:
    for out in values(run_ranks(_async_in_flight, 2, str(tmp_path), timeout=TIMEOUT * 2)):
        assert out["skipped"] and out["in flight"]
        assert out["returned in"] < 5.0  # blocking would last until the release, TIMEOUT
        assert out["first"] == (1, False, 1)
        assert out["next"] == 3 and out["steps"] == [1, 3]


# ------------------------------------------------------------------ retention by time, unranked


def _set_created(root: Path, step: int, created: datetime.datetime | None) -> None:
    """Give a committed checkpoint a known creation time (None: a manifest without one)."""

    def change(data: dict[str, Any]) -> None:
        if created is None:
            del data["created_utc"]
        else:
            data["created_utc"] = created.isoformat()

    edit_manifest(distckpt.CheckpointManager(root).layout.step_dir(step), change)


def test_time_history_is_rebuilt_from_manifests_across_restarts(root: Path) -> None:
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        for step in range(1, 7):
            mgr.save(step, {"s": step})
    start = datetime.datetime(2024, 5, 1, tzinfo=datetime.timezone.utc)
    offsets = {1: 0, 2: None, 3: 90, 4: 120, 5: 200, 6: 210}
    for step, offset in offsets.items():
        moment = None if offset is None else start + datetime.timedelta(seconds=offset)
        _set_created(root, step, moment)
    options = {"keep_last": 1, "keep_every_n_seconds": 100, "fsync": False}

    # A restarted job: one per 100 s from the oldest (1 at 0 s, 4 at 120 s), 2 has no time.
    with distckpt.CheckpointManager(root, **options) as mgr:
        assert mgr.checkpoints()[1].created_utc is None
        assert mgr.prune() == [2, 3, 5]
        mgr.save(7, {"s": 7})  # created now: years after 4, kept by time; 6 goes
        assert mgr.steps() == [1, 4, 7]
    # Another restart rebuilds the same history: 8 is seconds after 7, kept only while newest.
    with distckpt.CheckpointManager(root, **options) as mgr:
        assert mgr.prune() == []
        mgr.save(8, {"s": 8})
        mgr.save(9, {"s": 9})
        assert mgr.steps() == [1, 4, 7, 9]


def test_time_history_with_real_clock(root: Path) -> None:
    with distckpt.CheckpointManager(
        root, keep_last=1, keep_every_n_seconds=1.0, fsync=False
    ) as mgr:
        mgr.save(1, {"s": 1})
        mgr.save(2, {"s": 2})  # well within 1 s of 1 (a save of a tiny state)
        time.sleep(1.05)
        mgr.save(3, {"s": 3})
        mgr.save(4, {"s": 4})
    created = {
        info.step: info.created_utc for info in distckpt.CheckpointManager(root).checkpoints()
    }
    assert sorted(created) == [1, 3, 4], created


@pytest.mark.parametrize("keep_unranked, removed", [(False, [1, 2]), (True, [1])])
def test_keep_unranked(root: Path, keep_unranked: bool, removed: list[int]) -> None:
    with distckpt.CheckpointManager(root, monitor="loss", fsync=False) as mgr:
        for step, metrics in ((1, {"loss": 3.0}), (2, {}), (3, {"loss": 1.0}), (4, {"loss": 2.0})):
            mgr.save(step, {"s": step}, metrics=metrics)
    with distckpt.CheckpointManager(
        root, keep_best=1, monitor="loss", keep_unranked=keep_unranked, fsync=False
    ) as mgr:
        assert mgr.prune() == removed


@pytest.mark.parametrize(
    "option",
    ["every_n_steps", "keep_last", "keep_every_n_seconds", "min_seconds_between_saves"],
)
def test_zero_is_refused_with_the_off_value(root: Path, option: str) -> None:
    with pytest.raises(InvalidArgument, match=f"{option}=0 is not accepted: use None"):
        distckpt.CheckpointManager(root, **{option: 0})


# ------------------------------------------------------------------ wait() from several threads


def _wait_in_threads(mgr: distckpt.CheckpointManager, held: HeldValue) -> list[Any]:
    """Start three threads calling ``mgr.wait()``, check they all block while the save is
    held, release it, and return what each got (a result or an exception)."""
    outcomes: list[Any] = [None] * 3

    def waiter(index: int) -> None:
        try:
            outcomes[index] = mgr.wait()
        except Exception as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=waiter, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    assert all(thread.is_alive() for thread in threads)  # every waiter blocks
    assert mgr.save_in_flight
    held.release.set()
    for thread in threads:
        thread.join(TIMEOUT)
    assert not any(thread.is_alive() for thread in threads)
    return outcomes


def test_every_thread_waiting_sees_the_result(root: Path) -> None:
    held = HeldValue()
    with distckpt.CheckpointManager(root, async_save=True, fsync=False) as mgr:
        mgr.save(1, {"w": torch.ones(3), "held": held})
        outcomes = _wait_in_threads(mgr, held)
        assert [o.step for o in outcomes] == [1, 1, 1] and all(o.done for o in outcomes)
        assert not mgr.save_in_flight and mgr.wait() is None  # seen: no longer in flight
        assert mgr.steps() == [1]


def test_every_thread_waiting_sees_the_same_error(root: Path) -> None:
    held = HeldValue()
    with distckpt.CheckpointManager(root, async_save=True, fsync=False) as mgr:
        faults.arm("after_shard_write", "raise")
        mgr.save(1, {"w": torch.ones(3), "held": held})
        outcomes = _wait_in_threads(mgr, held)
        assert all(isinstance(o, InjectedFault) for o in outcomes), outcomes
        assert len({str(o) for o in outcomes}) == 1
        # Raised to every waiter, then done with: the next save starts afresh.
        assert mgr.save(1, {"w": torch.ones(3)}).step == 1
        assert mgr.wait().step == 1


# ------------------------------------------------------------------ preemption under a throttle

#: the preemption signal of these tests (SIGUSR1 is the test ranks' stack-dump signal)
PREEMPT = signal.SIGUSR2


def _preempted_under_throttle(rank: int, world_size: int, root: str, how: str) -> dict[str, Any]:
    """Saves at steps 1..5 under a throttle no call outlives; SIGUSR2 reaches rank 1 at step 3.
    ``how``: a schedule due at every step, plain saves, or plain async saves with step 1 still
    in flight when the signal comes."""
    held = HeldValue()
    holds = how == "in flight" and rank == 0  # rank 0's step 1 stays in flight until released
    schedule: dict[str, Any] = {"every_n_steps": 1} if how == "scheduled" else {}
    saved: list[int] = []
    with distckpt.CheckpointManager(
        root,
        min_seconds_between_saves=3600,
        save_on_signal=(PREEMPT,),
        async_save=how == "in flight",
        fsync=False,
        timeout=TIMEOUT,
        **schedule,
    ) as mgr:
        for step in range(1, 6):
            if step == 3 and rank == 1:
                os.kill(os.getpid(), PREEMPT)  # a real signal, to one rank only
            if holds and step == 3:
                assert mgr.save_in_flight  # the signal comes while step 1 is being written
                # The preemption save must wait for this one, not be skipped: let it end soon.
                threading.Timer(0.3, held.release.set).start()
            state = {"s": step, "held": held if holds and step == 1 else 0}
            if mgr.save(step, state) is not None:
                saved.append(step)
            if mgr.preempted:
                break
        mgr.wait()
        return {"saved": saved, "preempted": mgr.preempted, "steps": mgr.steps()}


@pytest.mark.parametrize("how", ["scheduled", "plain-save", "in flight"])
def test_throttle_never_skips_a_preemption_save(tmp_path: Path, how: str) -> None:
    out = values(run_ranks(_preempted_under_throttle, 2, str(tmp_path), how))
    assert out == [{"saved": [1, 3], "preempted": True, "steps": [1, 3]}] * 2
