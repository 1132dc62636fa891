"""A small Lightning fit whose resume depends on callbacks' states and checkpoint hooks, which
``tests/test_lightning_callbacks.py`` runs, kills and runs again.

``python tests/lightning_callbacks_job.py ROOT OUT [--format torch|dcp] [--wait-at-epoch E]
[--max-time-us T] [--early-stopping-mode min|max]`` fits a linear model over 2 batches an epoch
(for at most 20 epochs), checkpointing at every epoch's end through
:class:`distckpt.lightning.DistckptCallback`. Each epoch's validation logs ``val_metric``, equal
to the epoch number, so it never improves after epoch 0, and ``EarlyStopping(patience=2)``
stops the fit after epoch 2: global step 6 (with ``mode="max"`` it improves at every epoch, and
the EarlyStopping has another ``state_key``).

Besides EarlyStopping's state, a resume needs:

* the module's ``on_save_checkpoint`` dict: it counts the saves there (3 in the whole fit) and
  puts values of kinds the "dcp" format alone would not bring back (a tuple, an int key, an empty
  dict); ``on_load_checkpoint`` writes the dict it gets to ``OUT/module-loaded.pt``;
* the datamodule's ``state_dict``: it counts the training batches (6 in the whole fit);
* the keys a callback's ``on_save_checkpoint`` adds (:class:`CountsInHooks`, a callback with no
  ``state_dict()``, as written before Lightning had one): it counts the training batches too,
  and its ``on_load_checkpoint`` writes the dict it gets to ``OUT/callback-loaded.pt``;
* the ``Timer`` of ``Trainer(max_time=T microseconds)`` (a day unless told): its training time.

``--wait-at-epoch E``: at the start of epoch E, the job writes to ``OUT/waiting.txt`` the
Timer's training time (in whole microseconds) at the end of the epoch before, taken before that
epoch's checkpoint, and waits to be killed. At the end of the fit it writes ``OUT/final.pt``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, Timer
from torch.utils.data import DataLoader

from distckpt.lightning import DistckptCallback

WAIT_FOR_KILL = 300.0
#: What the module puts in its ``on_save_checkpoint`` dict besides its count of saves.
HOOK_VALUES: dict[Any, Any] = {"pair": (1, "two"), 3: torch.tensor([1.5]), "empty": {}}

#: A Trainer on one CPU device that checkpoints only through distckpt and prints nothing but
#: warnings.
ONE_QUIET_DEVICE: dict[str, Any] = {
    "accelerator": "cpu",
    "devices": 1,
    "enable_checkpointing": False,
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


class CountingData(lightning.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.batches_seen = 0

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), 4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(torch.randn(4, 4, generator=torch.Generator().manual_seed(1)), 4)

    def state_dict(self) -> dict[str, Any]:
        return {"batches_seen": self.batches_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_seen = state_dict["batches_seen"]


class HookedModule(lightning.LightningModule):
    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out
        self.net = torch.nn.Linear(4, 1)
        self.saves = 0

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.trainer.datamodule.batches_seen += 1
        return self.net(batch).square().mean()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val_metric", float(self.current_epoch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.saves += 1
        checkpoint["saves"] = self.saves
        checkpoint["values"] = HOOK_VALUES

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.saves = checkpoint["saves"]
        torch.save(checkpoint, self.out / "module-loaded.pt")


class CountsInHooks(lightning.Callback):
    """Keeps its count of training batches through its checkpoint hooks alone; a checkpoint
    without the count (one its hook never saw) starts it again from 0."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.batches = 0

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.batches += 1

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["batches"] = self.batches

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.batches = checkpoint.get("batches", 0)
        torch.save(checkpoint, self.out / "callback-loaded.pt")


class WaitAtEpochStart(lightning.Callback):
    """``--wait-at-epoch E``: see the module doc."""

    def __init__(self, out: Path, epoch: int) -> None:
        self.out = out
        self.epoch = epoch
        self.trained_seconds = 0.0

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Before the epoch's checkpoint: Lightning runs a checkpoint callback's epoch end last.
        timer = next(callback for callback in trainer.callbacks if isinstance(callback, Timer))
        self.trained_seconds = timer.time_elapsed("train")

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            microseconds = math.floor(self.trained_seconds * 1e6)
            (self.out / "waiting.txt").write_text(f"{microseconds}\n")
            time.sleep(WAIT_FOR_KILL)
            raise AssertionError(f"not killed within {WAIT_FOR_KILL} s at epoch {self.epoch}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("out", type=Path)
    parser.add_argument("--format", choices=("torch", "dcp"), default="torch")
    parser.add_argument("--wait-at-epoch", type=int, help="wait to be killed at its start")
    parser.add_argument("--max-time-us", type=int, default=86_400_000_000)
    parser.add_argument("--early-stopping-mode", choices=("min", "max"), default="min")
    args = parser.parse_args()

    torch.set_num_threads(1)
    lightning.seed_everything(0, verbose=False)
    callbacks: list[lightning.Callback] = [
        DistckptCallback(args.root, every_n_epochs=1, format=args.format, fsync=False)
    ]
    stopping = EarlyStopping(monitor="val_metric", patience=2, mode=args.early_stopping_mode)
    counter = CountsInHooks(args.out)
    callbacks += [stopping, counter]
    if args.wait_at_epoch is not None:
        callbacks.append(WaitAtEpochStart(args.out, args.wait_at_epoch))
    trainer = lightning.Trainer(
        max_epochs=20,
        max_time={"microseconds": args.max_time_us},
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **ONE_QUIET_DEVICE,
    )
    module, data = HookedModule(args.out), CountingData()
    trainer.fit(module, data)
    final = {
        "stopped_epoch": stopping.stopped_epoch,
        "best_score": stopping.best_score.item(),
        "global_step": trainer.global_step,
        "epochs": trainer.current_epoch,
        "saves": module.saves,
        "batches_seen": data.batches_seen,
        "batches_counted_in_hooks": counter.batches,
    }
    torch.save(final, args.out / "final.pt")


if __name__ == "__main__":
    main()
