"""A Lightning training job that the exact-resume tests run, kill and run again, unchanged.

``python tests/lightning_job.py ROOT OUT --devices N --optimization auto|manual --loader
stateful|plain --samples S --format torch|dcp [--validate] [--wait-after-step N]`` fits a small
dropout model with AdamW and OneCycleLR (whose step count is exact: one step too many raises)
over 3 epochs of S samples (48 unless told) in batches of 4, with 2 micro-batches per optimizer
step (Lightning's automatic optimization also steps on an epoch's last batch when it ends a
window early), saving through :class:`distckpt.lightning.DistckptCallback` every 2 optimizer
steps, in the checkpoint format given ("torch" unless told). With 2 devices the ranks are
forked (Lightning's ``ddp_fork``): the same DDP, without importing Lightning once more per rank,
and in the job's process group, so a SIGKILL of the group reaches every rank.
Each rank appends every training step's loss to ``OUT/losses-rank{r}.txt`` as ``epoch batch
loss`` (the loss in ``float.hex``, exact; with ``--validate`` every validation batch's to
``OUT/val-rank{r}.txt``) and, at the end, saves its final parameters, optimizer, scheduler and
RNG states to ``OUT/final-rank{r}.pt``. The module's ``on_save_checkpoint`` and a callback's
``state_dict`` save the saving rank's number; at each resume, each rank appends the numbers it
gets back to ``OUT/loaded-rank{r}.txt`` (``callback R`` and ``hook R``).
"""

from __future__ import annotations

import argparse
import time
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
WAIT_FOR_KILL = 300.0


def _record_loaded(out: Path, rank: int, line: str) -> None:
    with open(out / f"loaded-rank{rank}.txt", "a") as log:
        log.write(f"{line}\n")


class SaveFinalState(lightning.Callback):
    """Each rank's final state, written in the rank itself (with ``ddp_fork`` the launching
    process gets back rank 0's weights only)."""

    def __init__(self, out: Path, checkpointing: DistckptCallback) -> None:
        self.out = out
        self.checkpointing = checkpointing
        self.rank = 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.rank = trainer.global_rank

    def state_dict(self) -> dict[str, Any]:
        return {"saved_by_rank": self.rank}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _record_loaded(self.out, self.rank, f"callback {state_dict['saved_by_rank']}")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        final = {
            "params": dict(pl_module.named_parameters()),
            "optimizer": trainer.optimizers[0].state_dict(),
            "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "resumed_from": self.checkpointing.resumed_from,
        }
        torch.save(final, self.out / f"final-rank{trainer.global_rank}.pt")


class WaitForKillAfterSave(lightning.Callback):
    """``--wait-after-step N``: once the checkpoint of optimizer step N has committed, each rank
    appends ``epoch batch`` (the batch after which it was saved) to ``OUT/saved-rank{r}.txt``
    and waits to be killed, so a SIGKILL lands right after that save, before another batch
    runs, never a few batches later."""

    def __init__(self, out: Path, checkpointing: DistckptCallback, step: int) -> None:
        self.out = out
        self.checkpointing = checkpointing
        self.step = step
        self.last_batch = ""

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Runs after DistckptCallback's hooks (callbacks run in list order), whose saves are
        # synchronous: the checkpoint of step N has committed when its result is there.
        self.last_batch = f"{trainer.current_epoch} {batch_idx}"
        self._wait_if_saved(trainer)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # An epoch's last batch is saved at the epoch's end, after every callback's
        # ``on_train_epoch_end`` (this one's too): the next epoch's start is the first hook after.
        self._wait_if_saved(trainer)

    def _wait_if_saved(self, trainer: Trainer) -> None:
        saved = self.checkpointing.last_save
        if saved is not None and saved.step == self.step:
            with open(self.out / f"saved-rank{trainer.global_rank}.txt", "a") as log:
                log.write(f"{self.last_batch}\n")
            time.sleep(WAIT_FOR_KILL)
            raise AssertionError(f"not killed within {WAIT_FOR_KILL} s of saving step {self.step}")


class DropoutModule(lightning.LightningModule):
    def __init__(self, out: Path, optimization: str, loader: str, samples: int) -> None:
        super().__init__()
        self.out = out
        self.loader_kind = loader
        self.samples = samples
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

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["saved_by_rank"] = self.global_rank

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        _record_loaded(self.out, self.global_rank, f"hook {checkpoint['saved_by_rank']}")

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
        data = torch.randn(self.samples, 8, generator=torch.Generator().manual_seed(0))
        # README, exact resume: the loader draws its iterators' seeds from a generator of its
        # own (not the global one the dropout masks come from), and the sampler shuffles with
        # another one (Stateful samplers, so the loader's state holds their position).
        if self.trainer.world_size > 1:
            sampler = StatefulDistributedSampler(data, seed=1)
        else:
            sampler = RandomSampler(data, generator=torch.Generator().manual_seed(1))
        loader = StatefulDataLoader if self.loader_kind == "stateful" else DataLoader
        return loader(data, batch_size=4, sampler=sampler, generator=torch.Generator())


class ValidatedModule(DropoutModule):
    """``--validate``: a small validation loop after each epoch's last batch (so between that
    batch and its checkpoint, taken at the epoch's end), logging ``val_loss``. Its loader has no
    generator of its own: building its iterator draws from torch's global generator, so a
    validation that a resumed run skipped or repeated would shift every later dropout mask."""

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        loss = self.net(batch).square().mean()
        with open(self.out / f"val-rank{self.global_rank}.txt", "a") as log:
            log.write(f"{self.current_epoch} {batch_idx} {loss.item().hex()}\n")
        self.log("val_loss", loss, sync_dist=True)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        data = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
        return DataLoader(data, batch_size=4)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--optimization", choices=("auto", "manual"), default="auto")
    parser.add_argument("--loader", choices=("stateful", "plain"), default="stateful")
    parser.add_argument("--samples", type=int, default=48, help="training samples (batches of 4)")
    parser.add_argument("--format", choices=("torch", "dcp"), default="torch")
    parser.add_argument("--validate", action="store_true", help="validate after each epoch")
    parser.add_argument("--wait-after-step", type=int, help="wait to be killed after saving it")
    args = parser.parse_args()

    torch.set_num_threads(1)
    lightning.seed_everything(0, verbose=False)
    kind = ValidatedModule if args.validate else DropoutModule
    module = kind(args.out, args.optimization, args.loader, args.samples)
    callback = DistckptCallback(
        args.root,
        every_n_steps=2,
        keep_last=2,
        monitor="val_loss",
        fsync=False,
        format=args.format,
    )
    callbacks: list[lightning.Callback] = [callback, SaveFinalState(args.out, callback)]
    if args.wait_after_step is not None:
        callbacks.append(WaitForKillAfterSave(args.out, callback, args.wait_after_step))
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
        callbacks=callbacks,
    )
    trainer.fit(module)


if __name__ == "__main__":
    main()
