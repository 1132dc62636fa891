"""Triggered saves in a loop of the README's ``Use`` loop's shape with gradient accumulation:
``save()`` after every micro-batch, 2 micro-batches per optimizer step. A step (held by the
throttle), epoch, time or signal trigger that comes due at a micro-batch in the middle of an
accumulation window (whose gradients no checkpoint holds) is held until the next call at a new
step, right after the optimizer step, so that resuming from the checkpoint it takes ends with
the weights of an uninterrupted run."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

# Optimizers import torch._dynamo when constructed (seconds): imported here, before the ranks
# fork, not once in every rank of every run.
import torch._dynamo
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler

import distckpt
from tests.ranks import run_ranks, values

ACCUMULATE = 2
BATCH_SIZE = 2
MICRO_BATCHES_PER_EPOCH = 4
EPOCHS = 3
#: the signal the tests' preemption notice is: pytest's own SIGTERM handling stays out of it
NOTICE = signal.SIGUSR1
#: a real interval for ``every_seconds`` and ``min_seconds_between_saves``: far longer than
#: the few micro-batches between two saves, and slept through once where a test says
PAUSE_SECONDS = 1.0


def train(
    rank: int,
    world_size: int,
    root: str,
    options: dict[str, Any],
    stop_after: int | None = None,
    signal_at: int | None = None,
    pause_at: int | None = None,
) -> dict[str, Any]:
    """The README's ``Use`` loop on a small model, from ``last`` if there is one, saving after
    every micro-batch. ``stop_after``: this run's micro-batches before it stops as if killed
    (nothing saved after them); ``signal_at``: the micro-batch after which the last rank gets
    the preemption notice; ``pause_at``: the micro-batch that takes :data:`PAUSE_SECONDS` longer
    (a data stall), before its save call. Returns the final parameters, each save as (step,
    epoch, the run's micro-batch), and whether the run was preempted."""
    torch.manual_seed(0)
    data = torch.randn(MICRO_BATCHES_PER_EPOCH * BATCH_SIZE, 4, generator=torch.Generator())
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sampler = RandomSampler(data, generator=torch.Generator().manual_seed(5))
    loader = StatefulDataLoader(
        data, batch_size=BATCH_SIZE, sampler=sampler, generator=torch.Generator()
    )
    tracker = distckpt.StepTracker(optimizer)
    state = {"model": model, "optim": optimizer, "steps": tracker, "loader": loader}
    saves: list[tuple[int, int | None, int]] = []
    with distckpt.CheckpointManager(root, fsync=False, timeout=20, **options) as mgr:
        checkpoint = mgr.restore("last", state=state, missing_ok=True)
        start_epoch = checkpoint.epoch if checkpoint is not None else 0
        seen = 0
        for epoch in range(start_epoch, EPOCHS):
            for batch in loader:
                (model(batch).square().mean() / ACCUMULATE).backward()
                seen += 1
                # A resume is at a window's start: counting from the run's first micro-batch.
                if seen % ACCUMULATE == 0:
                    optimizer.step()
                    optimizer.zero_grad()
                if seen == signal_at and rank == world_size - 1:
                    os.kill(os.getpid(), NOTICE)
                if seen == pause_at:
                    time.sleep(PAUSE_SECONDS)
                saved = mgr.save(tracker.step, state, epoch=epoch)
                if saved is not None:
                    saves.append((saved.step, saved.epoch, seen))
                if mgr.preempted or seen == stop_after:
                    break
            if mgr.preempted or seen == stop_after:
                break
    tracker.close()
    weights = [parameter.detach().clone() for parameter in model.parameters()]
    return {"weights": weights, "saves": saves, "preempted": mgr.preempted}


def run(
    root: Path,
    options: dict[str, Any],
    world_size: int = 1,
    stop_after: int | None = None,
    signal_at: int | None = None,
    pause_at: int | None = None,
) -> dict:
    """One job of ``world_size`` ranks; every rank trains alike: rank 0's outcome."""
    ranks = run_ranks(train, world_size, str(root), options, stop_after, signal_at, pause_at)
    return values(ranks)[0]


def same_weights(one: dict, other: dict) -> bool:
    return all(torch.equal(a, b) for a, b in zip(one["weights"], other["weights"], strict=True))


def test_a_signal_mid_window_saves_after_the_optimizer_step_and_resumes_exactly(
    tmp_path: Path,
) -> None:
    options = {"every_n_steps": 100, "save_on_signal": (NOTICE,)}
    reference = run(tmp_path / "reference", options, world_size=2)
    # The notice comes after micro-batch 3, the first of the second window (step 1).
    preempted = run(tmp_path / "job", options, world_size=2, signal_at=3)
    assert preempted["preempted"]
    assert preempted["saves"] == [(2, 0, 4)]  # held until step 2 ended that window
    resumed = run(tmp_path / "job", options, world_size=2)
    assert not resumed["preempted"]
    assert same_weights(resumed, reference)


def test_a_signal_at_a_committed_step_is_that_checkpoint_without_waiting(tmp_path: Path) -> None:
    """After a resume at step 2, the notice at the next window's first micro-batch (still step 2,
    committed) needs no wait: the resumed checkpoint is the preemption save."""
    options = {"every_n_steps": 2, "save_on_signal": (NOTICE,)}
    reference = run(tmp_path / "reference", options)
    run(tmp_path / "job", options, stop_after=5)
    preempted = run(tmp_path / "job", options, signal_at=1)
    assert preempted["preempted"] and preempted["saves"] == [(2, 0, 1)]
    assert same_weights(run(tmp_path / "job", options), reference)


def test_an_epoch_save_due_mid_window_waits_for_the_optimizer_step_and_resumes_exactly(
    tmp_path: Path,
) -> None:
    options = {"every_n_epochs": 1}
    reference = run(tmp_path / "reference", options)
    # Epoch 1 starts at micro-batch 5, in the middle of the third window: saved after 6.
    crashed = run(tmp_path / "job", options, stop_after=7)
    assert crashed["saves"] == [(3, 1, 6)]
    assert same_weights(run(tmp_path / "job", options), reference)


def test_a_time_save_due_mid_window_after_an_earlier_save_waits_for_the_optimizer_step(
    tmp_path: Path,
) -> None:
    """Saved at step 1 (micro-batch 2, listed), which ``every_seconds`` counts from; micro-batch
    5, the first of the third window, stalls past it: the save waits for micro-batch 6."""
    options = {"save_on_steps": (1,), "every_seconds": PAUSE_SECONDS}
    reference = run(tmp_path / "reference", options)
    crashed = run(tmp_path / "job", options, stop_after=7, pause_at=5)
    assert crashed["saves"] == [(1, 0, 2), (3, 1, 6)]
    assert same_weights(run(tmp_path / "job", options), reference)


def test_a_step_save_the_throttle_held_waits_for_the_next_optimizer_step(tmp_path: Path) -> None:
    """Step 2 (micro-batch 4) comes too soon after step 1's save; the throttle has expired at
    micro-batch 5, in the middle of the window: the step save it held is not lost, and is
    made at step 3 (micro-batch 6), not at micro-batch 5."""
    options = {"every_n_steps": 1, "min_seconds_between_saves": PAUSE_SECONDS}
    reference = run(tmp_path / "reference", options)
    crashed = run(tmp_path / "job", options, stop_after=7, pause_at=5)
    assert crashed["saves"] == [(1, 0, 2), (3, 1, 6)]
    assert same_weights(run(tmp_path / "job", options), reference)


def test_the_first_call_after_a_resume_is_at_the_restored_step_not_a_new_one(
    tmp_path: Path,
) -> None:
    """Resumed at step 2, saved at the last optimizer step of epoch 0: the first call (epoch 1,
    its first micro-batch, still step 2) follows no optimizer step, so the epoch save waits
    for step 3 instead of answering with the restored checkpoint and counting epoch 1 done."""
    options = {"every_n_steps": 2, "every_n_epochs": 1}
    reference = run(tmp_path / "reference", options)
    assert run(tmp_path / "job", options, stop_after=5)["saves"] == [(2, 0, 4)]
    assert run(tmp_path / "job", options, stop_after=3)["saves"] == [(3, 1, 2)]
    assert same_weights(run(tmp_path / "job", options), reference)


def test_closing_with_a_held_signal_warns_that_no_preemption_save_was_made(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The loop ends after a notice that only a mid-window call saw: nothing is saved for it,
    and the close says so instead of dropping it silently."""
    options: dict[str, Any] = {"every_n_steps": 100, "save_on_signal": (NOTICE,), "fsync": False}
    with (
        caplog.at_level(logging.WARNING, logger="distckpt"),
        distckpt.CheckpointManager(tmp_path, **options) as mgr,
    ):
        mgr.save(1, {"s": 1})  # the first call at step 1: right after its optimizer step
        os.kill(os.getpid(), NOTICE)
        assert mgr.save(1, {"s": 1}) is None  # mid-window: held
        assert not mgr.preempted
    assert "closing with a preemption signal pending" in caplog.text
    assert distckpt.CheckpointManager(tmp_path, read_only=True).steps() == []


def test_closing_with_held_epoch_and_time_saves_makes_neither(tmp_path: Path) -> None:
    """The README: a held trigger is not saved by ``close()``. An epoch and a time save that
    come due at a call repeating the previous call's step (mid-window) are held; the loop ends
    there, and the close commits nothing for them."""
    options: dict[str, Any] = {"every_n_epochs": 1, "every_seconds": PAUSE_SECONDS}
    with distckpt.CheckpointManager(tmp_path, fsync=False, **options) as mgr:
        assert mgr.save(1, {"s": 1}, epoch=0) is None  # neither is due yet
        time.sleep(PAUSE_SECONDS)
        assert mgr.save(1, {"s": 1}, epoch=1) is None  # both due, mid-window: held
    assert distckpt.CheckpointManager(tmp_path, read_only=True).steps() == []


def test_a_save_after_should_save_said_yes_saves_whatever_epoch_it_passes(tmp_path: Path) -> None:
    """``should_save(1)`` is the first call at step 1; the save that follows at step 1, with an
    epoch should_save was not given, is still at that step boundary, not a repeated call."""
    options: dict[str, Any] = {"every_n_steps": 100, "save_on_signal": (NOTICE,), "fsync": False}
    with distckpt.CheckpointManager(tmp_path, **options) as mgr:
        os.kill(os.getpid(), NOTICE)
        assert mgr.should_save(1)
        saved = mgr.save(1, {"s": 1}, epoch=0)
        assert saved is not None and (saved.step, saved.epoch) == (1, 0)
        assert mgr.preempted


def test_a_step_save_due_again_after_deleting_the_newest_waits_for_a_new_step(
    tmp_path: Path,
) -> None:
    """Deleting the newest checkpoint makes its step due again; a call at that step in the
    middle of a window does not save it (the micro-batches since its optimizer step would be
    lost), the next step does."""
    with distckpt.CheckpointManager(tmp_path, fsync=False, every_n_steps=1) as mgr:
        assert mgr.save(1, {"s": 1}) is not None  # right after step 1's optimizer step
        mgr.delete(1)
        assert mgr.save(1, {"s": 1}) is None  # a micro-batch of the next window
        assert mgr.save(2, {"s": 2}) is not None
        assert mgr.steps() == [2]


def test_should_save_holds_an_epoch_save_due_mid_window_as_save_does(tmp_path: Path) -> None:
    """README: a trigger due at a call at the previous call's step (a micro-batch inside an
    accumulation window) is held until a call at another step; ``should_save`` says so too,
    and the ``save`` right after it shares its verdict."""
    with distckpt.CheckpointManager(tmp_path, every_n_epochs=1, fsync=False) as mgr:
        assert mgr.save(1, {"s": 1}, epoch=0) is None
        # The next epoch begins in the middle of step 2's window: still at step 1.
        assert not mgr.should_save(1, epoch=1)
        assert mgr.save(1, {"s": 1}, epoch=1) is None
        assert mgr.should_save(2, epoch=1)
        saved = mgr.save(2, {"s": 2}, epoch=1)
        assert saved is not None and saved.step == 2
