"""distckpt inside PyTorch Lightning: a callback that owns checkpointing.

Use it instead of Lightning's ModelCheckpoint (``Trainer(enable_checkpointing=False,
callbacks=[DistckptCallback("runs/exp1", every_n_steps=500, keep_last=3)])``). It counts real
optimizer steps with :class:`distckpt.StepTracker`, so step-based saving also fires under manual
optimization and gradient accumulation (where ModelCheckpoint's ``every_n_train_steps``, which
follows the trainer's step counter, may never fire), resumes from ``last`` when fitting starts,
and stops the trainer cleanly after a preemption save (``save_on_signal=(signal.SIGTERM,)``).
It works the same under Lightning's DDP strategy: every rank runs the callback.
"""

from __future__ import annotations

from typing import Any

import lightning
from lightning import LightningModule, Trainer

import distckpt


class DistckptCallback(lightning.Callback):
    """Saves and resumes through a :class:`distckpt.CheckpointManager` created in ``setup``
    (after Lightning has initialised the process group); ``manager_options`` go to it."""

    def __init__(self, root: str, **manager_options: Any) -> None:
        self.root = root
        self.manager_options = manager_options
        self.manager: distckpt.CheckpointManager | None = None
        self.tracker: distckpt.StepTracker | None = None
        self.resumed_from: int | None = None

    def setup(self, trainer: Trainer, module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self.manager = distckpt.CheckpointManager(self.root, **self.manager_options)

    def _state(self, trainer: Trainer, module: LightningModule) -> dict:
        return {
            "model": module,
            "optimizers": list(trainer.optimizers),
            "schedulers": [config.scheduler for config in trainer.lr_scheduler_configs],
            "steps": self.tracker,
            "rng": distckpt.RNGState(),
        }

    def on_fit_start(self, trainer: Trainer, module: LightningModule) -> None:
        assert self.manager is not None
        self.tracker = distckpt.StepTracker(*trainer.optimizers)
        ckpt = self.manager.restore("last", state=self._state(trainer, module), missing_ok=True)
        self.resumed_from = ckpt.step if ckpt is not None else None

    def on_train_batch_end(
        self,
        trainer: Trainer,
        module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        assert self.manager is not None and self.tracker is not None
        metrics = {
            key: value for key, value in trainer.callback_metrics.items() if value.numel() == 1
        }
        self.manager.save(self.tracker.step, self._state(trainer, module), metrics=metrics)
        if self.manager.preempted:
            trainer.should_stop = True

    def teardown(self, trainer: Trainer, module: LightningModule, stage: str) -> None:
        if self.tracker is not None:
            self.tracker.close()
        if self.manager is not None:
            self.manager.close()
            self.manager = None
