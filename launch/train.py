"""A toy data-parallel training job that checkpoints with distckpt and resumes bit-exactly.

Run it under torchrun (gloo on CPU; see ``launch/run_local.sh``)::

    python -m torch.distributed.run --standalone --nproc-per-node 2 launch/train.py --root runs/demo

or as a plain ``python launch/train.py`` (world size 1). Kill it at any moment and start it again
with the same arguments: it resumes from the newest committed checkpoint, and its final loss and
weights are bit-for-bit those of a run that was never interrupted. A SIGTERM (a scheduler's
preemption notice, or ``kill -TERM`` of the torchrun agent, which forwards it) makes every rank
save the current step, print ``preempted at step=N``, and exit with status 0.

Why the resume is exact:

* every rank's batch at step ``s`` is a pure function of ``(seed, rank, s)`` (a generator seeded
  from the three), so no data-loader position needs saving;
* the only other randomness, dropout, draws from each rank's global torch generator, which is
  checkpointed per rank (``"rng"``) and restored on resume;
* gradients and the loss are averaged with one ``all_reduce`` of a flat buffer, so every rank
  applies the same update and the replicas never drift apart;
* model, optimizer, LR scheduler and step counter are all in the checkpoint.

Another job holding the root (a predecessor still shutting down, orphaned workers) makes the
start fail at once with ``RootInUse`` naming it; ``--wait-for-root SECONDS`` waits up to that
long for it to give the root up instead (``launch/slurm.sbatch`` passes it for the requeued job).

Output (rank 0 unless noted): with ``--wait-for-root``, first ``waiting up to S s for ROOT if
another job holds it``; then ``resumed from step N`` or ``starting from scratch``, then
``step=N loss=X`` every ``--log-every`` steps, ``saved step=N`` per committed checkpoint,
``preempted at step=N rank=R loss=X`` on every rank after a preemption save, and finally
``done step=N loss=X`` (the loss as Python's exact ``repr`` of the float). distckpt's own log
lines (INFO and up, ``distckpt INFO: ...``) go to stderr: ``committed ...`` per save,
``retention: removing ...`` per checkpoint pruned, and, only with ``--wait-for-root`` above 0
and the root held, ``checkpoint root ROOT is held by HOLDER: waiting up to S s for it to end``.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import distckpt
from distckpt.arguments import check_wait
from distckpt.coord_health import check_timeout

IN_FEATURES = 16
HIDDEN = 64
BATCH_PER_RANK = 32
NOISE = 0.05

# Large odd multipliers keep (seed, rank, step) -> generator seed collision-free for any
# realistic run; the exact mixing does not matter, only that it is fixed.
_MIX_A = 1_000_003
_MIX_B = 998_244_353


def print_line(line: str) -> None:
    """Print ``line`` in one write: the ranks share the launcher's output, and ``print`` writes
    a line and its newline apart, so another rank's line could land between them."""
    sys.stdout.write(f"{line}\n")
    sys.stdout.flush()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--root", default="runs/demo", help="checkpoint root (default: %(default)s)"
    )
    parser.add_argument("--steps", type=int, default=300, help="total optimizer steps")
    parser.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, init and dropout")
    parser.add_argument(
        "--sleep", type=float, default=0.0, help="seconds to sleep per step (slows the job down)"
    )
    parser.add_argument("--log-every", type=int, default=10, help="print the loss every N steps")
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds a collective may take before a hung or dead rank becomes an error",
    )
    parser.add_argument(
        "--wait-for-root",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="seconds to wait for another job that holds the root to give it up (default: 0, "
        "fail at once with RootInUse naming it; launch/slurm.sbatch passes 300)",
    )
    args = parser.parse_args(argv)
    for name in ("steps", "save_every", "log_every"):
        minimum = 0 if name == "steps" else 1
        if getattr(args, name) < minimum:
            parser.error(f"--{name.replace('_', '-')} must be >= {minimum}")
    # The manager's own checks: refused here, before any work (init_process_group included,
    # which would fail on a timeout of 0 or nan with an error of its own that says nothing).
    try:
        check_wait(args.wait_for_root)
    except distckpt.InvalidArgument as exc:
        parser.error(f"--wait-for-root: {exc}")
    try:
        check_timeout(args.timeout)
    except distckpt.InvalidArgument as exc:
        parser.error(f"--timeout: {exc}")
    return args


# ---------------------------------------------------------------------- the model and its data


def build(
    seed: int, total_steps: int
) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The model, optimizer and LR schedule, initialised identically on every rank."""
    # Seeding the global generator here (not per rank) is what makes the replicas start equal.
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(IN_FEATURES, HIDDEN),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, 1),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    return model, optimizer, scheduler


def seed_rank(seed: int, rank: int) -> None:
    """Give each rank its own dropout stream (ranks with equal masks would waste data)."""
    torch.manual_seed(seed * _MIX_A + 1 + rank)


def batch_for(seed: int, rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch for step ``step``: a pure function of its arguments, so a resumed
    run sees exactly the batches the interrupted one would have."""
    # Scaled so x @ teacher has unit variance: a target the MLP can actually learn.
    teacher = torch.randn(IN_FEATURES, 1, generator=torch.Generator().manual_seed(seed))
    teacher = teacher / math.sqrt(IN_FEATURES)
    generator = torch.Generator().manual_seed(((seed * _MIX_A + rank) * _MIX_B + step) % 2**63)
    x = torch.randn(BATCH_PER_RANK, IN_FEATURES, generator=generator)
    y = torch.sin(x @ teacher) + NOISE * torch.randn(BATCH_PER_RANK, 1, generator=generator)
    return x, y


def local_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Forward and backward on this rank's batch; returns the gradients and the loss packed in
    one flat buffer, so averaging them across ranks takes a single ``all_reduce``."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = F.mse_loss(model(x), y)
    loss.backward()
    grads = [p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]
    return torch.cat([*grads, loss.detach().reshape(1)])


def apply_gradients(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    summed: torch.Tensor,
    world_size: int,
) -> float:
    """Average the summed buffer, step the optimizer and the schedule; returns the mean loss."""
    mean = summed / world_size
    offset = 0
    for p in model.parameters():
        if p.grad is None:
            continue
        n = p.grad.numel()
        p.grad.copy_(mean[offset : offset + n].view_as(p.grad))
        offset += n
    optimizer.step()
    scheduler.step()
    return float(mean[-1].item())


# ---------------------------------------------------------------------- the job


def init_distributed(timeout: float) -> tuple[int, int]:
    """Join torchrun's process group when launched by it; a plain run is rank 0 of 1."""
    if "RANK" not in os.environ:
        return 0, 1
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    return dist.get_rank(), dist.get_world_size()


def train(args: argparse.Namespace) -> int:
    """Resume from ``args.root`` if it holds a checkpoint, train to ``args.steps`` (or until a
    preemption save), and return the exit status: 0 both when done and when preempted."""
    rank, world_size = init_distributed(args.timeout)
    model, optimizer, scheduler = build(args.seed, args.steps)
    seed_rank(args.seed, rank)
    tracker = distckpt.StepTracker(optimizer)
    state = {
        "model": model,
        "optim": optimizer,
        "sched": scheduler,
        "steps": tracker,
        "rng": distckpt.RNGState(),  # captured at each save, not once
    }

    def say(message: str) -> None:
        if rank == 0:
            print_line(message)

    loss = math.nan
    if args.wait_for_root > 0:
        # The wait is silent otherwise: say why a requeued job's log stops here for a while.
        say(f"waiting up to {args.wait_for_root:g} s for {args.root} if another job holds it")
    with distckpt.CheckpointManager(
        args.root,
        keep_last=3,
        every_n_steps=args.save_every,
        save_on_signal=(signal.SIGTERM,),
        timeout=args.timeout,
        wait_for_root=args.wait_for_root,
    ) as mgr:
        ckpt = mgr.restore("last", state=state, missing_ok=True)
        if ckpt is None:
            say(f"starting from scratch: no checkpoint in {args.root} (world size {world_size})")
        else:
            loss = float(ckpt.metrics.get("loss", math.nan))
            say(f"resumed from step {ckpt.step} ({ckpt.path.name}, world size {world_size})")
        last_saved = ckpt.step if ckpt is not None else None

        while tracker.step < args.steps:
            # The batch index is the number of steps already taken, the same before a kill
            # and after the resume.
            x, y = batch_for(args.seed, rank, tracker.step)
            summed = local_gradients(model, x, y)
            if world_size > 1:
                dist.all_reduce(summed)
            loss = apply_gradients(model, optimizer, scheduler, summed, world_size)
            if tracker.step % args.log_every == 0:
                say(f"step={tracker.step} loss={loss:.6f}")

            # Every rank calls save() every step: the schedule (or a pending SIGTERM on any
            # rank) decides, identically on all ranks, whether this step is saved.
            result = mgr.save(tracker.step, state, metrics={"loss": loss})
            if result is not None:
                last_saved = result.step
                say(f"saved step={result.step}")
            if mgr.preempted:
                # Every rank reports, so a log shows that all of them left on their own.
                print_line(f"preempted at step={tracker.step} rank={rank} loss={loss!r}")
                break
            if args.sleep > 0:
                time.sleep(args.sleep)
        else:
            # The end of training is always checkpointed, whatever the schedule.
            if last_saved != tracker.step:
                mgr.save(tracker.step, state, metrics={"loss": loss}, force=True)
                say(f"saved step={tracker.step}")
            say(f"done step={tracker.step} loss={loss!r}")

    tracker.close()
    if dist.is_initialized():
        # Tear the group down only once every rank is done with it: a rank that leaves first
        # can make a peer's last collective fail, or abort it at interpreter shutdown (seen
        # with gloo as SIGABRT, "terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line entry point; ``argv`` defaults to ``sys.argv[1:]``."""
    args = parse_args(argv)
    return train(args)


def log_distckpt() -> None:
    """distckpt's own log lines from INFO up on stderr (a start waiting for a held root)."""
    # force: a rank forked from another program (a test) drops the handlers it inherited
    logging.basicConfig(format="%(name)s %(levelname)s: %(message)s", force=True)
    logging.getLogger("distckpt").setLevel(logging.INFO)


if __name__ == "__main__":
    log_distckpt()  # not in main(): a program that imports main() keeps its own logging
    sys.exit(main())
