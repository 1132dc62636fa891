"""The ``train`` contender's training step: what an async save competes with."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from bench.contenders import Marks

if TYPE_CHECKING:  # the job passes itself in; importing it here would be circular
    from bench.jobs import MainJob

#: An MLP of TRAIN_DEPTH square layers of TRAIN_WIDTH (12 MiB of parameters at 3 x 1024) on a
#: batch of TRAIN_BATCH, ~30 ms of compute on one core, plus an all_reduce of its 12 MiB of
#: gradients; TRAIN_IDLE_STEPS timed steps without a save per round, and at most
#: TRAIN_MAX_STEPS while one runs.
TRAIN_WIDTH, TRAIN_DEPTH, TRAIN_BATCH = 1024, 3, 128
TRAIN_IDLE_STEPS, TRAIN_MAX_STEPS = 12, 2000


class Trainer:
    """A DDP-like CPU training step, the same on every rank: an MLP's forward and backward
    (gradients land in one flat buffer, like DDP's gradient_as_bucket_view), one all_reduce
    of that buffer on the default gloo group, an SGD step. Its model is separate from the
    state being saved, which no step touches."""

    def __init__(self, rank: int, world: int) -> None:
        torch.manual_seed(0)  # the same model on every rank, as DDP broadcasts it
        layers: list[torch.nn.Module] = []
        for i in range(TRAIN_DEPTH):
            layers.append(torch.nn.Linear(TRAIN_WIDTH, TRAIN_WIDTH))
            if i < TRAIN_DEPTH - 1:
                layers.append(torch.nn.ReLU())
        self.model = torch.nn.Sequential(*layers)
        params = list(self.model.parameters())
        self.flat = torch.zeros(sum(p.numel() for p in params))
        offset = 0
        for param in params:
            param.grad = self.flat[offset : offset + param.numel()].view_as(param)
            offset += param.numel()
        self.optimizer = torch.optim.SGD(params, lr=1e-4)
        generator = torch.Generator().manual_seed(rank + 1)  # each rank its own batch
        self.x = torch.randn(TRAIN_BATCH, TRAIN_WIDTH, generator=generator)
        self.y = torch.randn(TRAIN_BATCH, TRAIN_WIDTH, generator=generator)
        self.world = world
        self.flag = torch.zeros(1)
        self.run(lambda: True, 3)  # warm-up: allocator, autograd, the gloo buffers

    def step(self) -> float:
        """One training step; its seconds."""
        started = time.perf_counter()
        self.flat.zero_()
        loss = torch.nn.functional.mse_loss(self.model(self.x), self.y)
        loss.backward()
        dist.all_reduce(self.flat)
        self.flat.div_(self.world)
        self.optimizer.step()
        return time.perf_counter() - started

    def run(self, busy: Callable[[], bool], limit: int) -> list[float]:
        """Steps (at least one) while ``busy()`` is true on some rank, at most ``limit``: the
        ranks decide together after each step, untimed, with a 1-element all_reduce (as
        they must: each step's all_reduce needs every rank). Returns each step's seconds."""
        times: list[float] = []
        while len(times) < limit:
            times.append(self.step())
            self.flag.fill_(1.0 if busy() else 0.0)
            dist.all_reduce(self.flag, op=dist.ReduceOp.MAX)
            if self.flag.item() == 0.0:
                break
        return times


def train_during(
    t0: float,
    trainer: Trainer,
    start: Callable[[], tuple[Callable[[], bool], Callable[[], Any]]],
    idle: float,
) -> Marks:
    """Start a background save (``start`` returns "is it still running?" and "wait for it"),
    then train until it is done on every rank: the median of those steps; ``save`` = when the
    save was seen done, to the step (seconds since ``t0``, this rank's); ``lost`` = the
    training time the save cost, the steps' sum minus as many ``idle`` steps."""
    running, finish = start()
    done_at: list[float] = []

    def still_running() -> bool:
        if running():
            return True
        if not done_at:
            done_at.append(time.perf_counter())
        return False

    steps = trainer.run(still_running, TRAIN_MAX_STEPS)
    finish()
    done = done_at[0] if done_at else time.perf_counter()
    lost = sum(steps) - len(steps) * idle
    return Marks({"": statistics.median(steps), "save": done - t0, "lost": lost, "n": len(steps)})


def measure_training_round(job: MainJob, r: int) -> None:
    """Round ``r``'s training measurements: idle steps, then steps during each async save
    (which of the two goes first alternates from round to round); each save's output is
    deleted before the next measurement, as for the save contenders."""
    ranks, trainer, mgr, state = job.ranks, job.trainer, job.mgr_a, job.state
    assert trainer is not None and mgr is not None
    idle = ranks.measure(
        lambda t0: Marks({"": statistics.median(trainer.run(lambda: True, TRAIN_IDLE_STEPS))})
    )
    job.put(r, "train_idle", idle)

    def record(name: str, marks: dict[str, float]) -> None:
        job.train_steps.setdefault(name, [0] * job.rounds)[r] = int(marks.pop("n"))
        job.put(r, name, marks)

    def distckpt_start() -> tuple[Callable[[], bool], Callable[[], Any]]:
        mgr.save(2 * r + 2, state)
        return (lambda: mgr.save_in_flight), mgr.wait

    def with_distckpt() -> None:
        try:
            marks = ranks.measure(lambda t0: train_during(t0, trainer, distckpt_start, idle[""]))
        finally:
            ranks.delete_checkpoint(mgr, 2 * r + 2)
        record("train_during_distckpt_async", marks)

    def with_dcp() -> None:
        d = ranks.fresh_dir(job.work / "train_dcp" / f"round-{r}")

        def dcp_start() -> tuple[Callable[[], bool], Callable[[], Any]]:
            future = job.dcp_async_save(state, d)
            future = getattr(future, "upload_completion", future)
            return (lambda: not future.done()), future.result

        try:
            marks = ranks.measure(lambda t0: train_during(t0, trainer, dcp_start, idle[""]))
        finally:
            ranks.remove(d)
        record("train_during_dcp_async", marks)

    both = [with_distckpt, with_dcp] if job.dcp_async_ok else [with_distckpt]
    for run in both[r % len(both) :] + both[: r % len(both)]:
        run()
