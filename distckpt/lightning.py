"""distckpt inside PyTorch Lightning: a callback that owns checkpointing and exact resume.

Install with ``pip install distckpt[lightning]``; importing :mod:`distckpt` never imports
Lightning, only importing this module does.

Use it instead of Lightning's ``ModelCheckpoint``::

    from distckpt.lightning import DistckptCallback

    trainer = lightning.Trainer(
        enable_checkpointing=False,
        callbacks=[DistckptCallback("runs/exp1", every_n_steps=500, keep_last=3)],
    )
    trainer.fit(model, datamodule)   # re-running the same command after a kill resumes

What makes a resume exact, and where each piece is restored:

* at ``on_fit_start`` (the strategy has wrapped the model and built the optimizers): the
  module, the optimizers, the LR schedulers, the precision plugin (a ``GradScaler``), the
  datamodule's ``state_dict``, a :class:`distckpt.StepTracker`, and the Trainer's loop state
  (``trainer.fit_loop.state_dict()``: the epoch, batch and optimizer-step progress trackers and,
  for a ``StatefulDataLoader``, the loader's position, which Lightning hands to the loader when
  it builds the epoch's iterator). Lightning then continues from the saved batch, as it would
  from its own checkpoint;
* at ``on_train_start``, after Lightning has built the data iterator: the random number
  generators. Building an iterator draws from torch's global generator (a loader without its
  own ``generator=``), so restoring the generators any earlier would leave them one draw off.

Checkpoints are taken at ``on_train_batch_end`` of a batch whose optimizer step completed: the
step counted is the :class:`~distckpt.StepTracker`'s (real optimizer steps, also under manual
optimization and gradient accumulation), and no gradients half-accumulated over micro-batches
exist at that moment, so none need saving. A checkpoint due in the middle of an accumulation
window (a preemption signal) is taken at the window's last micro-batch. Epoch schedules
(``every_n_epochs``) count completed epochs. After a preemption save the trainer stops.

A checkpoint of an epoch's last batch resumes at the next epoch's first batch: the loaders'
saved position is used up at ``on_train_start`` and the next epoch's iterator built afresh (a
resuming Lightning fit loop would hand it the used-up position and skip the epoch). Known
limit: the validation and ``on_train_epoch_end`` that follow that batch in the
uninterrupted run, and the next epoch's ``on_train_epoch_start``, are not run when resuming;
training itself stays exact.
"""

from __future__ import annotations

from typing import Any

import lightning
from lightning import LightningModule, Trainer
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.utilities.combined_loader import _Stateful

from distckpt.manager import CheckpointManager
from distckpt.rng import capture_rng, restore_rng
from distckpt.steps import StepTracker


class _TrainerState:
    """The Trainer's own resumable state, as one Stateful value with fixed keys (the loop's
    state_dict gains keys, such as the loader's, that a fresh Trainer does not have yet)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.ended_epoch_loaders: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        datamodule = self.trainer.datamodule
        return {
            "fit_loop": self.trainer.fit_loop.state_dict(),
            "precision": self.trainer.precision_plugin.state_dict(),
            "datamodule": datamodule.state_dict() if datamodule is not None else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        fit_loop = self.trainer.fit_loop
        fit_loop.load_state_dict(state["fit_loop"])
        if state["fit_loop"]["epoch_loop.batch_progress"]["is_last_batch"]:
            # Saved at an epoch's last batch: Lightning resumes into the next epoch but would
            # hand the next epoch's iterator the used-up position, which yields nothing, and
            # so skip that epoch. Kept back here; ``start_next_epoch`` applies it.
            self.ended_epoch_loaders = fit_loop._combined_loader_states_to_load
            fit_loop._combined_loader_states_to_load = []
        if state["precision"]:
            self.trainer.precision_plugin.load_state_dict(state["precision"])
        if self.trainer.datamodule is not None and state["datamodule"]:
            self.trainer.datamodule.load_state_dict(state["datamodule"])

    def finish_ended_epoch(self) -> bool:
        """After a restore at an epoch's last batch, bring the loaders to where the uninterrupted
        run's were at that epoch's end: their saved position loaded and iterated to its end, so
        that a sampler's pending position (a ``StatefulDistributedSampler`` skips it lazily) is
        used up. True if there was such a restore; then call :meth:`start_next_epoch`."""
        states, self.ended_epoch_loaders = self.ended_epoch_loaders, []
        if not states:
            return False
        combined_loader = self.trainer.fit_loop._combined_loader
        assert combined_loader is not None
        combined_loader._load_state_dicts(states)
        stateful = [loader for loader in combined_loader.flattened if isinstance(loader, _Stateful)]
        for loader, state in zip(stateful, states):
            # A StatefulDataLoader whose iterator had already finished starts afresh by itself.
            if not state.get("_iterator_finished", False):
                for _ in loader:
                    pass
        return True

    def start_next_epoch(self) -> None:
        """Build the next epoch's data iterator as Lightning does at an epoch's start (after
        the samplers' ``set_epoch``), which a resuming fit loop does not."""
        fit_loop = self.trainer.fit_loop
        assert fit_loop._combined_loader is not None and fit_loop._data_fetcher is not None
        for loader in fit_loop._combined_loader.flattened:
            _set_sampler_epoch(loader, fit_loop.epoch_progress.current.processed)
        iter(fit_loop._data_fetcher)


class _DeferredRNG:
    """The RNGs, captured at each save but restored only when :meth:`apply` is called."""

    def __init__(self) -> None:
        self.pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return capture_rng()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = state

    def apply(self) -> None:
        if self.pending is not None:
            restore_rng(self.pending)
            self.pending = None


class DistckptCallback(lightning.Callback):
    """Saves through a :class:`distckpt.CheckpointManager` and resumes exactly from ``last``
    when ``trainer.fit`` starts.

    ``root`` and ``manager_options`` are the arguments of :class:`~distckpt.CheckpointManager`
    (``every_n_steps``, ``keep_last``, ``async_save``, ``save_on_signal``, ...); the manager is
    created in ``setup``, once Lightning has initialised the process group, so every rank of a
    DDP job runs it. Set ``enable_checkpointing=False`` on the Trainer.

    After fitting starts, :attr:`resumed_from` is the step restored (None on a fresh start),
    :attr:`manager` the manager and :attr:`tracker` the step counter.
    """

    def __init__(self, root: str, **manager_options: Any) -> None:
        self.root = root
        self.manager_options = manager_options
        self.manager: CheckpointManager | None = None
        self.tracker: StepTracker | None = None
        self.resumed_from: int | None = None
        self._rng = _DeferredRNG()
        self._trainer_state: _TrainerState | None = None
        self._step_at_last_batch = 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self.manager = CheckpointManager(self.root, **self.manager_options)

    def _state(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        return {
            "model": pl_module,
            "optimizers": list(trainer.optimizers),
            "schedulers": [config.scheduler for config in trainer.lr_scheduler_configs],
            "steps": self.tracker,
            "trainer": self._trainer_state,
            "rng": self._rng,
        }

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self.manager is not None
        self.tracker = StepTracker(*trainer.optimizers)
        self._trainer_state = _TrainerState(trainer)
        state = self._state(trainer, pl_module)
        checkpoint = self.manager.restore("last", state=state, missing_ok=True)
        self.resumed_from = checkpoint.step if checkpoint is not None else None
        self._step_at_last_batch = self.tracker.step
        if checkpoint is not None:
            # The train loader may already be built (``estimated_stepping_batches`` in
            # ``configure_optimizers`` builds it before fitting starts), and Lightning hands a
            # restored loader position only to a loader it builds after the restore. Lightning
            # has no public call to rebuild it: dropping the built one makes the fit loop
            # rebuild it, with the position, when it starts.
            trainer.fit_loop._combined_loader = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self._trainer_state is not None
        ended_epoch = self._trainer_state.finish_ended_epoch()
        self._rng.apply()
        if ended_epoch:
            # After the RNGs: in the uninterrupted run this iterator was built after the save,
            # so its draws (a loader without a generator of its own draws a seed from torch's
            # global one) come after the restored state too.
            self._trainer_state.start_next_epoch()

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        assert self.manager is not None and self.tracker is not None
        stepped = self.tracker.step != self._step_at_last_batch
        self._step_at_last_batch = self.tracker.step
        if not stepped:
            return  # mid-accumulation: gradients of earlier micro-batches are not saved
        epochs_done = trainer.current_epoch + int(batch_idx + 1 >= trainer.num_training_batches)
        metrics = {
            key: value.item()
            for key, value in trainer.callback_metrics.items()
            if value.numel() == 1
        }
        self.manager.save(
            self.tracker.step,
            self._state(trainer, pl_module),
            epoch=epochs_done,
            metrics=metrics,
        )
        if self.manager.preempted:
            trainer.should_stop = True

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.tracker is not None:
            self.tracker.close()
        if self.manager is not None:
            self.manager.close()
            self.manager = None
