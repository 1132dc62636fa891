"""Triggered saves in the README's ``Use`` loop with gradient accumulation: ``save()`` after every
micro-batch, 2 micro-batches per optimizer step. An epoch, time or signal trigger that comes due
at a micro-batch in the middle of an accumulation window (whose gradients no checkpoint holds)
is held until the next call at a new step, right after the optimizer step, so that resuming
from the checkpoint it takes ends with the weights of an uninterrupted run."""

from __future__ import annotations

import logging
import os
import signal
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


def train(
    rank: int,
    world_size: int,
    root: str,
    options: dict[str, Any],
    stop_after: int | None = None,
    signal_at: int | None = None,
) -> dict[str, Any]:
    """The README's ``Use`` loop on a small model, from ``last`` if there is one, saving after
    every micro-batch. ``stop_after``: this run's micro-batches before it stops as if killed
    (nothing saved after them); ``signal_at``: the micro-batch after which the last rank gets
    the preemption notice. Returns the final parameters, each save as (step, epoch, the run's
    micro-batch), and whether the run was preempted."""
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
) -> dict:
    """One job of ``world_size`` ranks; every rank trains alike: rank 0's outcome."""
    ranks = run_ranks(train, world_size, str(root), options, stop_after, signal_at)
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


def test_a_time_save_waits_for_the_optimizer_step_from_the_first_call_of_a_fresh_run(
    tmp_path: Path,
) -> None:
    """``every_seconds`` far shorter than a micro-batch: due at every call past the last saved
    step, and at the very first (step 0, after one micro-batch of the first window)."""
    options = {"every_seconds": 1e-9}
    reference = run(tmp_path / "reference", options)
    assert all(micro_batch % ACCUMULATE == 0 for _, _, micro_batch in reference["saves"])
    crashed = run(tmp_path / "job", options, stop_after=1)
    assert crashed["saves"] == []
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
