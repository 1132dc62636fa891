"""A toy FSDP2 training job with sharded ("dcp") distckpt checkpoints that resumes on any number
of ranks.

Run it under torchrun (gloo on CPU), then resume it with a different number of ranks::

    python -m torch.distributed.run --standalone --nproc-per-node 4 launch/train_fsdp.py \\
        --root runs/fsdp --steps 40 --save-every 10
    python -m torch.distributed.run --standalone --nproc-per-node 2 launch/train_fsdp.py \\
        --root runs/fsdp --steps 80 --save-every 10

(``torchrun`` is the same as ``python -m torch.distributed.run``; a plain ``python
launch/train_fsdp.py ...`` runs as one rank.) The second command restores the checkpoint the
4 ranks wrote, resharded onto 2, and continues from its step.

The model is an MLP whose every ``Linear`` and the root are wrapped with FSDP2's
``fully_shard``, so parameters and Adam's state are DTensors sharded across the ranks. The
checkpoint state is ``{"app": ModelOptimizerState(model, optimizer), "steps": StepTracker}``:
``ModelOptimizerState`` saves both through ``get_state_dict`` (FQN-keyed, still sharded), which
is what lets DCP reshard them on restore.

Why a resumed run follows the same trajectory whatever the number of ranks: the batch of step
``s`` is a pure function of ``(seed, s)`` and is split evenly between the ranks, and FSDP2
averages the gradients over the ranks, so every world size computes the full-batch gradient
(equal up to floating-point rounding, since the sums happen in a different order). There is no
dropout and no other per-rank state: a "dcp" checkpoint does save per-rank values
(``distckpt.RNGState``, ``distckpt.PerRank``) one copy per rank, but those cannot be resharded
onto another number of ranks.

A SIGTERM (a scheduler's preemption notice, or ``kill -TERM`` of the torchrun agent, which
forwards it) makes every rank save the current step, print ``preempted at step=N``, and exit
with status 0.

Another job holding the root makes the start fail at once with ``RootInUse`` naming it;
``--wait-for-root SECONDS`` waits up to that long for it to give the root up instead
(``launch/slurm.sbatch`` passes it when run with ``SCRIPT=launch/train_fsdp.py`` and
``WAIT_FOR_ROOT`` set).

Output (rank 0 unless noted): with ``--wait-for-root``, first ``waiting up to S s for ROOT if
another job holds it``; ``resumed from step N`` or ``starting from scratch``, ``step=N
loss=X`` every ``--log-every`` steps, ``saved step=N`` per committed checkpoint, ``preempted at
step=N rank=R loss=X`` on every rank after a preemption save, and otherwise finally ``done
step=N loss=X weights=W`` where ``W`` is the sum of every full parameter (compare it across
runs). distckpt's own log lines (INFO and up, ``distckpt INFO: ...``) go to stderr:
``committed ...`` per save, ``retention: removing ...`` per checkpoint pruned, and, only with
``--wait-for-root`` above 0 and the root held, ``checkpoint root ROOT is held by HOLDER:
waiting up to S s for it to end``.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import distckpt
from distckpt.arguments import check_wait
from distckpt.coord_health import check_timeout
from distckpt.formats.dcp import ModelOptimizerState

IN_FEATURES = 16
HIDDEN = 48
#: The batch of one step, split between the ranks: divisible by 1, 2, 3, 4, 6 and 8 ranks.
GLOBAL_BATCH = 48


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--root", default="runs/fsdp", help="checkpoint root (%(default)s)")
    parser.add_argument("--steps", type=int, default=40, help="total optimizer steps")
    parser.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the init")
    parser.add_argument("--keep-last", type=int, default=3, help="checkpoints to keep")
    parser.add_argument("--log-every", type=int, default=10, help="print the loss every N steps")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds before a hung rank is an error"
    )
    parser.add_argument(
        "--wait-for-root", type=float, default=0.0, metavar="SECONDS",
        help="seconds to wait for a job holding the root (0: RootInUse at once)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.steps < 0 or args.save_every < 1 or args.keep_last < 1 or args.log_every < 1:
        parser.error("--steps must be >= 0; --save-every, --keep-last, --log-every >= 1")
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


def init_distributed(timeout: float) -> tuple[int, int]:
    """Join torchrun's process group; a plain run makes a group of one (FSDP2 needs one). A
    group that already exists (the caller made it, as tests do) is used as it is."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    return dist.get_rank(), dist.get_world_size()


def build(seed: int, world_size: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model, sharded over every rank, and its optimizer. The init is the same for every
    world size (seeded before sharding), so runs on different numbers of ranks compare."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(IN_FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
        nn.Linear(HIDDEN, 1),
    )  # fmt: skip
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=3e-3)


def batch_for(seed: int, step: int, rank: int, world_size: int) -> tuple[torch.Tensor, ...]:
    """This rank's share of the batch of ``step``: a pure function of the arguments, so a
    resumed run, on any number of ranks, sees the data the interrupted one would have."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    teacher = torch.randn(IN_FEATURES, 1, generator=torch.Generator().manual_seed(seed))
    x = torch.randn(GLOBAL_BATCH, IN_FEATURES, generator=generator)
    y = torch.sin(x @ teacher / IN_FEATURES**0.5)
    share = GLOBAL_BATCH // world_size
    return x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]


def train(args: argparse.Namespace) -> int:
    """Resume from ``args.root`` if it holds a checkpoint, train to ``args.steps`` (or until a
    preemption save), and return the exit status: 0 both when done and when preempted."""
    owns_group = not dist.is_initialized()
    rank, world_size = init_distributed(args.timeout)
    if GLOBAL_BATCH % world_size:
        raise SystemExit(f"the batch of {GLOBAL_BATCH} does not split over {world_size} ranks")
    model, optimizer = build(args.seed, world_size)
    tracker = distckpt.StepTracker(optimizer)
    state = {"app": ModelOptimizerState(model, optimizer), "steps": tracker}

    def say(message: str) -> None:
        if rank == 0:
            print(message, flush=True)

    loss = float("nan")
    if args.wait_for_root > 0:
        # The wait is silent otherwise: say why a requeued job's log stops here for a while.
        say(f"waiting up to {args.wait_for_root:g} s for {args.root} if another job holds it")
    with distckpt.CheckpointManager(
        args.root,
        format="dcp",
        every_n_steps=args.save_every,
        keep_last=args.keep_last,
        save_on_signal=(signal.SIGTERM,),
        timeout=args.timeout,
        wait_for_root=args.wait_for_root,
    ) as mgr:
        ckpt = mgr.restore("last", state=state, missing_ok=True)
        if ckpt is None:
            say(f"starting from scratch: no checkpoint in {args.root} (world size {world_size})")
        else:
            loss = float(ckpt.metrics.get("loss", loss))
            saved_by = ckpt.manifest.world_size
            say(f"resumed from step {ckpt.step} (saved by {saved_by} ranks, now {world_size})")
        last_saved = ckpt.step if ckpt is not None else None

        preempted = False
        while tracker.step < args.steps:
            x, y = batch_for(args.seed, tracker.step, rank, world_size)
            optimizer.zero_grad(set_to_none=True)
            local = F.mse_loss(model(x), y)
            local.backward()  # FSDP2 reduce-scatters the gradients, averaged over the ranks
            optimizer.step()
            mean = local.detach().clone()
            dist.all_reduce(mean)
            loss = float(mean) / world_size
            if tracker.step % args.log_every == 0:
                say(f"step={tracker.step} loss={loss:.6f}")
            # Collective on every rank; the schedule (or a pending SIGTERM on any rank)
            # decides, identically everywhere.
            result = mgr.save(tracker.step, state, metrics={"loss": loss})
            if result is not None:
                last_saved = result.step
                say(f"saved step={result.step}")
            if mgr.preempted:
                # Every rank reports, in one write (the ranks share the launcher's output), so
                # a log shows that all of them left on their own.
                sys.stdout.write(f"preempted at step={tracker.step} rank={rank} loss={loss!r}\n")
                sys.stdout.flush()
                preempted = True
                break
        else:
            # The end of training is always checkpointed (not step 0: nothing was trained).
            if tracker.step and last_saved != tracker.step:
                mgr.save(tracker.step, state, metrics={"loss": loss}, force=True)
                say(f"saved step={tracker.step}")

    if not preempted:  # a preempted job leaves at once: torchrun SIGKILLs it within 30 s
        with torch.no_grad():  # full_tensor() is collective: every rank takes part
            weights = sum(float(p.full_tensor().sum()) for p in model.parameters())
        say(f"done step={tracker.step} loss={loss!r} weights={weights!r}")
    tracker.close()
    if owns_group:
        dist.destroy_process_group()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return train(parse_args(argv))


def log_distckpt() -> None:
    """distckpt's own log lines from INFO up on stderr (a start waiting for a held root)."""
    # force: a rank forked from another program (a test) drops the handlers it inherited
    logging.basicConfig(format="%(name)s %(levelname)s: %(message)s", force=True)
    logging.getLogger("distckpt").setLevel(logging.INFO)


if __name__ == "__main__":
    log_distckpt()  # not in main(): a program that imports main() keeps its own logging
    sys.exit(main())
