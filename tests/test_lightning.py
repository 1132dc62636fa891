"""The Lightning recipe (launch/lightning_callback.py) in a real Trainer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

lightning = pytest.importorskip("lightning")

import distckpt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
from lightning_callback import DistckptCallback  # noqa: E402


class ManualModule(lightning.LightningModule):
    """Manual optimization with 4 micro-batches per optimizer step: Lightning's own step-based
    ModelCheckpoint follows trainer.global_step, which manual optimization does not advance
    the way automatic optimization does."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        optimizer = self.optimizers()
        loss = self.layer(batch).square().mean() / 4
        self.manual_backward(loss)
        if batch_idx % 4 == 3:
            optimizer.step()
            optimizer.zero_grad()
        self.log("loss", loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        data = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(data, batch_size=1)


def _fit(root: Path, epochs: int) -> tuple[DistckptCallback, ManualModule]:
    callback = DistckptCallback(str(root), every_n_steps=3, keep_last=2, fsync=False)
    module = ManualModule()
    trainer = lightning.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(module)
    return callback, module


def test_step_schedule_fires_under_manual_optimization_and_resumes(tmp_path: Path) -> None:
    first, _ = _fit(tmp_path, epochs=1)  # 32 micro-batches = 8 optimizer steps
    assert first.resumed_from is None
    assert distckpt.CheckpointManager(tmp_path).steps() == [3, 6]  # keep_last=2 of 3, 6
    saved = distckpt.load_checkpoint(tmp_path / "last")
    assert saved.step == 6 and saved.state["steps"]["step"] == 6

    second, _ = _fit(tmp_path, epochs=1)  # a new run resumes from the last checkpoint
    assert second.resumed_from == 6
    assert distckpt.CheckpointManager(tmp_path).latest_step() == 12  # 6 + 8 steps: 9, 12
