"""A tiny Lightning module and fit for the in-process tests of
:class:`distckpt.lightning.DistckptCallback` (a second or two each)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning
import torch
from torch.utils.data import DataLoader

from distckpt.lightning import DistckptCallback
from tests.lightning_callbacks_job import ONE_QUIET_DEVICE


class TinyModule(lightning.LightningModule):
    """A linear model over 2 batches an epoch, with a frozen ``backbone``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.nn.Linear(4, 4).requires_grad_(False)
        self.head = torch.nn.Linear(4, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.head(self.backbone(batch)).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.head.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), 4)


class FailsInSecondEpoch(TinyModule):
    """Fails in its second epoch's first batch (before its optimizer step) while ``fail``."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = True

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self.fail and self.current_epoch == 1:
            raise RuntimeError("failing on purpose")
        return super().training_step(batch, batch_idx)


def fit_tiny(
    module: lightning.LightningModule,
    root: Path,
    epochs: int,
    callbacks: Sequence[lightning.Callback] = (),
    trainer_options: Mapping[str, Any] | None = None,
    ckpt_path: Path | None = None,
    **options: Any,
) -> Any:
    """Fits ``module`` for ``epochs`` on one quiet CPU device, saving to ``root`` at every
    epoch's end unless ``options`` (the manager's) say otherwise (its other ``callbacks`` after
    the saving one; ``trainer_options``, such as ``max_steps``, passed to the Trainer), from
    Lightning's checkpoint ``ckpt_path`` if given; the Trainer."""
    saving = DistckptCallback(str(root), **{"every_n_epochs": 1, "fsync": False, **options})
    trainer = lightning.Trainer(
        max_epochs=epochs,
        callbacks=[saving, *callbacks],
        **ONE_QUIET_DEVICE,
        **(trainer_options or {}),
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer
