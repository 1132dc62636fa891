"""A Lightning training job that the exact-resume tests run, kill and run again, unchanged.

``python tests/lightning_job.py ROOT OUT --devices N --optimization auto|manual --loader
stateful|plain`` fits a small dropout model with AdamW and OneCycleLR (whose step count is
exact: one step too many raises) over 3 epochs, with 2 micro-batches per optimizer step, saving
through :class:`distckpt.lightning.DistckptCallback` every 2 optimizer steps. With 2 devices the
ranks are forked (Lightning's ``ddp_fork``): the same DDP, without importing Lightning once
more per rank, and in the job's process group, so a SIGKILL of the group reaches every rank.
Each rank appends
every training step's loss to ``OUT/losses-rank{r}.txt`` as ``epoch batch loss`` (the loss in
``float.hex``, exact) and, at the end, saves its final parameters, optimizer, scheduler and RNG
states to ``OUT/final-rank{r}.pt``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning import LightningModule, Trainer
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler, StatefulDistributedSampler

from distckpt.lightning import DistckptCallback

ACCUMULATE = 2


class SaveFinalState(lightning.Callback):
    """Each rank's final state, written in the rank itself (with ``ddp_fork`` the launching
    process gets back rank 0's weights only)."""

    def __init__(self, out: Path, checkpointing: DistckptCallback) -> None:
        self.out = out
        self.checkpointing = checkpointing

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        final = {
            "params": dict(pl_module.named_parameters()),
            "optimizer": trainer.optimizers[0].state_dict(),
            "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "resumed_from": self.checkpointing.resumed_from,
        }
        torch.save(final, self.out / f"final-rank{trainer.global_rank}.pt")


class DropoutModule(lightning.LightningModule):
    def __init__(self, out: Path, optimization: str, loader: str) -> None:
        super().__init__()
        self.out = out
        self.loader_kind = loader
        self.automatic_optimization = optimization == "auto"
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(16, 1)
        )

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor | None:
        loss = self.net(batch).square().mean()
        with open(self.out / f"losses-rank{self.global_rank}.txt", "a") as log:
            log.write(f"{self.current_epoch} {batch_idx} {loss.item().hex()}\n")
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        self.manual_backward(loss / ACCUMULATE)
        if (batch_idx + 1) % ACCUMULATE == 0:
            optimizer.step()
            optimizer.zero_grad()
            self.lr_schedulers().step()
        return None

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=0.01)
        steps = self.trainer.estimated_stepping_batches
        if not self.automatic_optimization:
            steps = steps // ACCUMULATE
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        data = torch.randn(48, 8, generator=torch.Generator().manual_seed(0))
        # README, exact resume: the loader draws its iterators' seeds from a generator of its
        # own (not the global one the dropout masks come from), and the sampler shuffles with
        # another one (Stateful samplers, so the loader's state holds their position).
        if self.trainer.world_size > 1:
            sampler = StatefulDistributedSampler(data, seed=1)
        else:
            sampler = RandomSampler(data, generator=torch.Generator().manual_seed(1))
        loader = StatefulDataLoader if self.loader_kind == "stateful" else DataLoader
        return loader(data, batch_size=4, sampler=sampler, generator=torch.Generator())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--optimization", choices=("auto", "manual"), default="auto")
    parser.add_argument("--loader", choices=("stateful", "plain"), default="stateful")
    args = parser.parse_args()

    torch.set_num_threads(1)
    lightning.seed_everything(0, verbose=False)
    module = DropoutModule(args.out, args.optimization, args.loader)
    callback = DistckptCallback(args.root, every_n_steps=2, keep_last=2, fsync=False)
    trainer = lightning.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp_fork" if args.devices > 1 else "auto",
        accumulate_grad_batches=ACCUMULATE if args.optimization == "auto" else 1,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the job brings its own (Stateful) one
        callbacks=[callback, SaveFinalState(args.out, callback)],
    )
    trainer.fit(module)


if __name__ == "__main__":
    main()
