"""A plain DDP training loop that the exact-resume tests run, kill and run again, unchanged.

``python tests/ddp_job.py ROOT OUT [--async-save] [--ballast-mib N] [--leave-out PIECE]``
starts 2 gloo ranks (forked, so they share the job's process group and a SIGKILL of the group
reaches every rank and every loader worker) and runs the README's ``Use`` recipe on each, with
``save`` called after each optimizer step (``tests/test_accumulation_saves.py`` calls it after
every micro-batch): a DDP model with dropout, AdamW and OneCycleLR (whose step count is exact:
one step too many raises), 2 micro-batches per optimizer step, a dataset whose ``__getitem__``
adds random noise (augmentation) drawn from a generator seeded from the seed, the epoch and the
sample's index, a ``StatefulDataLoader`` with a ``StatefulDistributedSampler(shuffle=True)`` and
2 workers, :class:`distckpt.StepTracker`, :class:`distckpt.RNGState`, a
:class:`distckpt.CheckpointManager` saving every 2 optimizer steps, and
``restore("last", state=state, missing_ok=True)``.

Each rank appends every micro-batch's loss to ``OUT/losses-rank{r}.txt`` as ``epoch sample
loss`` (``sample``: the batch's first sample index, so a key names one batch of one epoch; the
loss in ``float.hex``, exact) and, at the end, saves its final parameters, optimizer, scheduler
and RNG states to ``OUT/final-rank{r}.pt``. With ``--async-save``, rank 0 appends the step of
every save still in flight when ``save`` returns to ``OUT/saves-rank0.txt``, the moment a test
kills the job to land inside a save. ``--loader plain`` follows the README's rule for a plain
``DataLoader`` instead: a ``DistributedSampler``, the loader's generator seeded per epoch,
checkpoints at epoch ends only (``every_n_epochs=1``). ``--leave-out
loader|rng|generator|sample-generator`` leaves one piece of the recipe out (the loader or the
RNGs from the state, the loader's own generator, the augmentation's generator per sample: it
then draws from the loader worker's own RNG), for the tests that show each one is needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

import distckpt
from tests.ranks import JOB_TIMEOUT_SECONDS, run_job_ranks

WORLD_SIZE = 2
EPOCHS = 3
SAMPLES = 64
BATCH_SIZE = 4
ACCUMULATE = 2
#: optimizer steps per epoch on every rank: 64 samples / 2 ranks / batches of 4 / 2 micro-batches
STEPS_PER_EPOCH = SAMPLES // WORLD_SIZE // BATCH_SIZE // ACCUMULATE
#: how much random noise the augmentation adds to each feature
NOISE = 0.1
#: the augmentation's seed, which each sample's generator is seeded from with its epoch and index
AUGMENTATION_SEED = 2


class AugmentedData(Dataset[tuple[int, torch.Tensor]]):
    """Fixed features, each sample returned with random noise added at every ``__getitem__``:
    a random augmentation, run in the loader's worker processes. With ``per_sample_generator``
    (the README's recipe) the noise comes from a generator seeded from (seed, epoch, index), so
    a sample's noise does not depend on which worker drew it or what that worker drew before;
    without, from the worker's own global RNG, which no checkpoint can restore mid-epoch."""

    def __init__(self, seed: int, *, per_sample_generator: bool) -> None:
        self.features = torch.randn(SAMPLES, 8, generator=torch.Generator().manual_seed(0))
        self.seed = seed
        self.per_sample_generator = per_sample_generator
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called before each epoch's loop: the workers, started for the epoch, copy it."""
        self.epoch = epoch

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        generator = None
        if self.per_sample_generator:
            # hash() of a tuple of ints is the same in every process (no hash randomization).
            seed = hash((self.seed, self.epoch, index))
            generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(8, generator=generator)
        return index, self.features[index] + NOISE * noise


def train(rank: int, args: argparse.Namespace) -> None:
    """The README's recipe on one rank, from a fresh start or from ``last``."""
    torch.manual_seed(0)  # the same initial weights on every rank
    net = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(16, 1)
    )
    model = DistributedDataParallel(net)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=0.05, total_steps=EPOCHS * STEPS_PER_EPOCH
    )
    per_sample_generator = args.leave_out != "sample-generator"
    dataset = AugmentedData(AUGMENTATION_SEED, per_sample_generator=per_sample_generator)
    # README, exact resume: a Stateful sampler, and a generator of the loader's own.
    plain = args.loader == "plain"
    sampler = (DistributedSampler if plain else StatefulDistributedSampler)(dataset, seed=1)
    generator = None if args.leave_out == "generator" else torch.Generator()
    loader = (DataLoader if plain else StatefulDataLoader)(
        dataset, batch_size=BATCH_SIZE, sampler=sampler, num_workers=2, generator=generator
    )
    torch.manual_seed(100 + rank)  # each rank its own dropout masks
    tracker = distckpt.StepTracker(optimizer)
    state: dict[str, Any] = {
        "model": model,
        "optim": optimizer,
        "sched": scheduler,
        "steps": tracker,
        "rng": distckpt.RNGState(),
        "loader": loader,
    }
    # "generator" and "sample-generator" are no keys: no-op
    state.pop("loader" if plain else args.leave_out, None)
    if args.ballast_mib:
        # Only makes each save take long enough for a test to kill the job inside it.
        state["ballast"] = torch.zeros(args.ballast_mib * 2**18)

    losses = open(args.out / f"losses-rank{rank}.txt", "a", buffering=1)  # noqa: SIM115
    saves = open(args.out / "saves-rank0.txt", "a", buffering=1) if rank == 0 else None  # noqa: SIM115
    mgr = distckpt.CheckpointManager(
        args.root,
        keep_last=2,
        every_n_steps=None if plain else 2,
        every_n_epochs=1 if plain else None,
        async_save=args.async_save,
        fsync=args.async_save,  # a longer save in flight for the kill to land in; else speed
        timeout=JOB_TIMEOUT_SECONDS,  # a hang fails within the test's wait, naming where
    )
    checkpoint = mgr.restore("last", state=state, missing_ok=True)
    # ``epoch`` is saved as the epoch in progress; the loader's state has the position in it
    # (a plain loader's checkpoint is taken at the end of an epoch, as the next one's start).
    start_epoch = checkpoint.epoch if checkpoint is not None else 0
    for epoch in range(start_epoch, EPOCHS):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        if plain and generator is not None:
            generator.manual_seed(epoch)  # the workers' seeds, whichever epoch a run starts at
        for micro_batch, (indices, batch) in enumerate(loader):
            last_micro_batch = (micro_batch + 1) % ACCUMULATE == 0
            if last_micro_batch:
                loss = model(batch).square().mean()
                (loss / ACCUMULATE).backward()
            else:
                with model.no_sync():  # gradients are all-reduced once per optimizer step
                    loss = model(batch).square().mean()
                    (loss / ACCUMULATE).backward()
            losses.write(f"{epoch} {indices[0].item()} {loss.item().hex()}\n")
            if not last_micro_batch:
                continue
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            if plain:
                continue  # no position to save mid-epoch
            result = mgr.save(tracker.step, state, epoch=epoch, metrics={"loss": loss.item()})
            if saves is not None and result is not None and not result.done:
                saves.write(f"{result.step}\n")
        if plain:
            mgr.save(tracker.step, state, epoch=epoch + 1)
    mgr.close()
    tracker.close()
    final = {
        "params": dict(net.named_parameters()),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
    }
    torch.save(final, args.out / f"final-rank{rank}.pt")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("out", type=Path)
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--ballast-mib", type=int, default=0)
    parser.add_argument("--loader", choices=("stateful", "plain"), default="stateful")
    parser.add_argument("--leave-out", choices=("loader", "rng", "generator", "sample-generator"))
    args = parser.parse_args()
    return run_job_ranks(train, WORLD_SIZE, args, args.out)


if __name__ == "__main__":
    sys.exit(main())
