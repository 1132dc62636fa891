"""The ``train`` contender's training step: what an async save competes with."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

from bench.contenders import Marks

if TYPE_CHECKING:  # the job passes itself in; importing it here would be circular
    from bench.jobs import MainJob

#: An MLP of TRAIN_DEPTH square layers of TRAIN_WIDTH (12 MiB of parameters at 3 x 1024) on a
#: batch of TRAIN_BATCH, ~30 ms of compute on one core, plus an all_reduce of its 12 MiB of
#: gradients; TRAIN_IDLE_STEPS timed steps without a save per round, and at most
#: TRAIN_MAX_STEPS while one runs.
TRAIN_WIDTH, TRAIN_DEPTH, TRAIN_BATCH = 1024, 3, 128
TRAIN_IDLE_STEPS, TRAIN_MAX_STEPS = 12, 2000
#: Saves run back to back in one measurement until at least this many steps overlapped them:
#: a small state's save overlaps only 1-3 steps, whose median alone is mostly noise.
TRAIN_MIN_STEPS = 8
#: What a measurement's ``start`` does: start save number ``i`` of the measurement, and return
#: "is it still running?" and "wait for it".
Start = Callable[[int], tuple[Callable[[], bool], Callable[[], Any]]]


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


def train_through(trainer: Trainer, running: Callable[[], bool]) -> tuple[list[float], float]:
    """Train until ``running()`` is false on every rank: the steps' seconds, and when this
    rank first saw it false (at a step)."""
    done_at: list[float] = []

    def still_running() -> bool:
        if running():
            return True
        if not done_at:
            done_at.append(time.perf_counter())
        return False

    steps = trainer.run(still_running, TRAIN_MAX_STEPS)
    return steps, done_at[0] if done_at else time.perf_counter()


def train_during(t0: float, trainer: Trainer, start: Start, idle: float) -> Marks:
    """Start a background save (``start``), train until it is done on every rank, and repeat
    (the next save starts right after that step) until at least :data:`TRAIN_MIN_STEPS` steps
    overlapped a save: the median of those steps; ``save`` = a save's mean seconds from its
    start to when it was seen done, at a step; ``lost`` = the training time a save cost, on
    average (the steps' sum minus as many ``idle`` steps, over the saves); ``saves`` = how
    many ran. Every rank runs as many steps, so they all start the same saves."""
    steps: list[float] = []
    durations: list[float] = []
    while not durations or len(steps) < TRAIN_MIN_STEPS:
        started = time.perf_counter() if durations else t0
        running, finish = start(len(durations))
        overlapped, done = train_through(trainer, running)
        finish()
        steps += overlapped
        durations.append(done - started)
    saves = len(durations)
    return Marks(
        {
            "": statistics.median(steps),
            "save": sum(durations) / saves,
            "lost": (sum(steps) - len(steps) * idle) / saves,
            "n": len(steps),
            "saves": saves,
        }
    )


def measure_training_round(job: MainJob, r: int) -> None:
    """Round ``r``'s training measurements: idle steps, then steps during each kind of async
    save (the order rotates from round to round); a measurement's saves are deleted before the
    next measurement, as for the save contenders."""
    ranks, trainer, state = job.ranks, job.trainer, job.state
    assert trainer is not None and job.mgr_a is not None
    idle = ranks.measure(
        lambda t0: Marks({"": statistics.median(trainer.run(lambda: True, TRAIN_IDLE_STEPS))})
    )
    job.put(r, "train_idle", idle)

    def record(name: str, marks: dict[str, float]) -> None:
        job.train_steps.setdefault(name, [0] * job.rounds)[r] = int(marks.pop("n"))
        job.train_saves.setdefault(name, [0] * job.rounds)[r] = int(marks.pop("saves"))
        job.put(r, name, marks)

    def with_distckpt(name: str, mgr: Any) -> Callable[[], None]:
        def run() -> None:
            # Above the steps of every earlier save (their checkpoints are gone): steps only
            # grow in a root.
            first_step = job.next_train_step

            def distckpt_start(i: int) -> tuple[Callable[[], bool], Callable[[], Any]]:
                job.next_train_step = first_step + i + 1
                mgr.save(first_step + i, state)
                return (lambda: mgr.save_in_flight), mgr.wait

            try:
                marks = ranks.measure(
                    lambda t0: train_during(t0, trainer, distckpt_start, idle[""])
                )
            finally:
                for step in range(first_step, job.next_train_step):
                    ranks.delete_checkpoint(mgr, step)
            record(name, marks)

        return run

    def with_dcp(name: str, mode: AsyncCheckpointerType | None) -> Callable[[], None]:
        def run() -> None:
            d = ranks.fresh_dir(job.work / name / f"round-{r}")

            def dcp_start(i: int) -> tuple[Callable[[], bool], Callable[[], Any]]:
                future = job.dcp_async_save(state, d / f"save-{i}", mode)
                future = getattr(future, "upload_completion", future)
                return (lambda: not future.done()), future.result

            try:
                marks = ranks.measure(lambda t0: train_during(t0, trainer, dcp_start, idle[""]))
            finally:
                ranks.remove(d)
            record(name, marks)

        return run

    runs = [with_distckpt("train_during_distckpt_async", job.mgr_a)]
    if job.mgr_a_nice0 is not None:
        runs.append(with_distckpt("train_during_distckpt_async_nice0", job.mgr_a_nice0))
    if job.dcp_async_ok:
        runs.append(with_dcp("train_during_dcp_async", None))
    if job.dcp_thread_ok:  # the thread mode beside the process mode
        runs.append(with_dcp("train_during_dcp_async_thread", AsyncCheckpointerType.THREAD))
    for run in runs[r % len(runs) :] + runs[: r % len(runs)]:
        run()
