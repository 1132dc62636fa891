"""distckpt inside PyTorch Lightning: a callback that owns checkpointing and exact resume.

Install with ``pip install distckpt[lightning]``; importing :mod:`distckpt` never imports
Lightning, only importing this module does.

Use it instead of Lightning's ``ModelCheckpoint`` (``enable_checkpointing=False``), or beside
one that keeps writing Lightning's own checkpoints (``enable_checkpointing=True``; that
``ModelCheckpoint`` is resumed as any other callback, through its ``state_dict()``)::

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
  from its own checkpoint. Also there, as Lightning's own restore does: every callback's
  ``state_dict()`` (``EarlyStopping``'s count of epochs without improvement, the training time
  of ``Trainer(max_time=...)``'s ``Timer``), saved keyed by its ``state_key`` (empty states
  left out) and loaded into the callback of the same ``state_key`` (a saved state whose
  callback is gone is warned about; a callback without a saved state keeps its own). Once all
  of the rest is restored, as Lightning's restore orders them: the module's
  ``on_load_checkpoint``, every callback's ``on_load_checkpoint``, then every callback's
  ``load_state_dict`` (agreed on by the ranks, :meth:`CheckpointManager.agree_on
  <distckpt.CheckpointManager.agree_on>`: one of them raising on any rank raises on every rank,
  :class:`~distckpt.RankFailure` naming the ranks, or the distckpt error they share, in a
  single process too);
* at ``on_train_start``, after Lightning has built the data iterator: the random number
  generators. Building an iterator draws from torch's global generator (a loader without its
  own ``generator=``), so restoring the generators any earlier would leave them one draw off.

With ``format="dcp"`` the module and the optimizers are saved through
:class:`~distckpt.ModelOptimizerState` (keyed by parameter name, as the format needs: an optimizer's
own ``state_dict()`` numbers the parameters), and the rest of the training state as each rank's own
value (its loaders' positions, its RNGs, its callbacks' states, the keys its callbacks'
``on_save_checkpoint`` add and its module's ``on_save_checkpoint`` keys): a resume by another
number of ranks is refused with
:class:`~distckpt.WorldSizeMismatch`. A run may change its format between fits: ``last`` is
read in the layout of the format it was saved in.

The checkpoint hooks, called as Lightning calls them (at a save: every callback's
``state_dict()``, every callback's ``on_save_checkpoint``, then the module's), get dicts holding
Lightning's cheap entries (:data:`~distckpt.lightning_extras.LIGHTNING_ENTRIES`: ``epoch``,
``global_step``, ``pytorch-lightning_version`` and ``state_dict``, the module's
``state_dict()``), not the costly ones (``optimizer_states``, ``loops``, ``callbacks``, ...). Only
the keys a hook adds are saved: changes it makes to those entries have no effect (rewriting
``state_dict`` to drop frozen weights does not drop them), as the module is saved from itself,
whole; but a callback whose class also has an ``on_load_checkpoint`` keeps the entries it
replaced too, and gets them back (Lightning's ``WeightAveraging`` puts the averaged weights in
``state_dict``). Each callback's hook has a dict of its own, and what it adds is saved under its
``state_key``: two callbacks adding the same key each get their own value back, and a callback
adding nothing costs nothing. On resume each ``on_load_checkpoint`` gets the same entries, taken
after the restore, and the keys its own ``on_save_checkpoint`` added exactly as added (tuples,
int keys and empty dicts included); changes it makes to ``state_dict`` have no effect either.
A value a callback's hook puts in its dict that is the given ``state_dict`` entry itself
(``WeightAveraging`` moves it to ``current_model_state``) is saved as a mark, not a second
time, and is that hook's restored ``state_dict`` entry again at resume: so
``EMAWeightAveraging`` adds its averaged weights alone to each rank's checkpoint.
``DistckptCallback``'s own hooks are not called (they do nothing). A ``ModelCheckpoint`` saving
beside it (``enable_checkpointing=True``) is treated as any other callback: its
``state_dict()`` saved and loaded, no hooks of its own to call. The callbacks' states and the
hooks' added keys are saved with ``torch.save`` (with "torch", those bytes as ``uint8``
tensors, written raw) and loaded as torch loads weights: tensors, numbers, strings and
containers of them; a value a resume would refuse so (a numpy scalar) is refused at
the save instead, before anything is written, with :class:`~distckpt.UnloadableState` naming its
``state_key`` (the callback's, or ``"on_save_checkpoint"`` for the module's hook). A checkpoint
saved before the callbacks' hooks were called still resumes, the callbacks' states and the
module's keys included: each callback's ``on_load_checkpoint`` then gets Lightning's entries
alone. One saved before the callbacks' states were saved resumes without any of these: no
``on_load_checkpoint`` is called and the callbacks keep their own state. The callbacks whose
``on_fit_start`` runs before this callback's (listed before it) see their state before the
restore.

Checkpoints are taken at ``on_train_batch_end`` of a batch whose optimizer step completed: the
step counted is the :class:`~distckpt.StepTracker`'s (real optimizer steps, also under manual
optimization and gradient accumulation), and no gradients half-accumulated over micro-batches
exist at that moment, so none need saving. A checkpoint due in the middle of an accumulation
window (a preemption signal) is taken at the window's last micro-batch. Epoch schedules
(``every_n_epochs``) count completed epochs. After a preemption save the trainer stops, also
before the Trainer's ``min_epochs`` or ``min_steps`` (lifted for the rest of that fit), and
without the validation Lightning runs before stopping after a batch in the middle of an epoch.
With
SIGTERM in ``save_on_signal``, Lightning's own handling of it (``SIGTERMException``, raised
after the batch or validation batch in which it came) is held back from the moment it comes
until the save has run (at the window's last micro-batch, the end of a validation or of the
epoch, or the next optimizer step where it came after this callback's hook of a batch): the
fit then raises ``SIGTERMException``, as Lightning does, also when it ends before any save.
Under DDP, a SIGTERM that reached some ranks only makes every rank save and raise: from
``setup`` on, Lightning's handler runs without the broadcast it makes inside the
handler (on a rank signalled alone, it put the ranks' collectives out of step), and after the
save the ranks tell each other whether any got SIGTERM. Under SLURM, with Lightning's
requeue signal in ``save_on_signal`` (its auto-requeue then installs no handler of its own), rank
0 runs ``scontrol requeue`` once the preemption save has committed
(:class:`~distckpt.lightning_preemption.SlurmRequeue`).

A checkpoint due at a batch that Lightning validates after (``val_check_interval``) is taken
once that validation has run, at the end of its ``on_validation_end`` hooks (this callback adds
the same checkpoint callback as below for it, so every other callback's hook has run): its
metrics are that validation's (``monitor`` and ``keep_best`` judge the weights it measured),
and Lightning resumes it without running the validation again. A failure during the validation
leaves the checkpoint before it as ``last``, and the rerun validates again. The module's own
``on_validation_end``, which Lightning calls after the callbacks', runs after the save.

A checkpoint due at an epoch's last batch is taken at the epoch's end instead, once the epoch's
validation has run (and drawn from the RNGs), the loop counts the epoch as processed, and every
``on_train_epoch_end`` hook has run: the module's and every callback's, ``EarlyStopping``'s
check included (Lightning runs checkpoint callbacks' last; this one adds such a callback for
it, from its own ``on_train_epoch_end`` until the save: so ``trainer.checkpoint_callback``, None
without a ``ModelCheckpoint``, is that one there, and during every mid-epoch validation that
follows an optimizer step, whether or not a save is due at that step (the manager decides at
the save),
with empty ``best_model_path`` and ``last_model_path``). After a failed fit, ``on_exception``
closes the manager as ``teardown`` does, so a next ``fit`` on the same Trainer resumes.

An epoch-end checkpoint resumes as an ended epoch, with ``max_steps`` set too (Lightning
completes the count of such an epoch itself only without it): the next epoch starts with its
``on_train_epoch_start`` and from its first batch, and a checkpoint taken later in that epoch
resumes mid-epoch like any other. The loaders' saved position, which Lightning does not hand
back for an ended epoch, is used up at ``on_train_start`` and the next epoch's iterator built
afresh after it. Known limit: what Lightning does at an epoch's end after those hooks (a
``ReduceLROnPlateau`` scheduler's step) is not in the checkpoint and not run again when
resuming.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint

from distckpt.lightning_extras import AsBytes, BytesAsTensors, LightningExtras
from distckpt.lightning_internals import HeldSigterm, set_internal, validates_after_this_batch
from distckpt.lightning_preemption import SlurmRequeue, after_preemption_save, raise_at_train_end
from distckpt.lightning_state import DeferredRNG, TrainerState, progress, refuse_a_second_restore
from distckpt.manager import CheckpointManager
from distckpt.per_rank import PerRank
from distckpt.results import Checkpoint as LoadedCheckpoint
from distckpt.results import SaveResult
from distckpt.steps import BY_OPTIMIZER_KEY, STEP_KEY, StepTracker

#: The state's key of :class:`~distckpt.lightning_extras.LightningExtras`, which checkpoints
#: saved before it existed lack.
_EXTRAS_KEY = "lightning"


class _SaveAfterMonitors(Checkpoint):
    """Takes :class:`DistckptCallback`'s checkpoints due at an epoch's end or after a
    validation in the middle of an epoch. Lightning runs the ``on_train_epoch_end`` of its
    checkpoint callbacks (and of ``EarlyStopping``) after every other callback's and the
    module's, and this one's ``on_validation_end`` comes after every other callback's (it is
    the last of them), so that what those hooks change (an ``EarlyStopping``'s count of
    validations without improvement) is in the checkpoint. ``DistckptCallback`` cannot be a
    checkpoint callback itself: Lightning refuses one with ``enable_checkpointing=False``.

    Lightning takes the first checkpoint callback as ``trainer.checkpoint_callback``, so this
    one is in the Trainer's callbacks (last) only while such a save may be due (the manager
    decides at the save whether it is): from ``DistckptCallback``'s ``on_train_epoch_end`` of
    an epoch whose last batch ended an optimizer step until its own, or from
    ``DistckptCallback``'s ``on_train_batch_end`` of a batch ending an optimizer step that
    Lightning validates after in the middle of the epoch, whether or not a save is due at that
    step, until the ``on_validation_end`` that follows; either removes it. A Trainer without a
    ``ModelCheckpoint`` has no ``checkpoint_callback`` otherwise. Within that span, it answers
    what Lightning's code asks of a checkpoint callback as one that saved nothing:
    ``best_model_path`` and ``last_model_path`` are empty."""

    def __init__(self, owner: DistckptCallback) -> None:
        self.owner = owner
        self.best_model_path = ""
        self.last_model_path = ""

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        _remove_callback(trainer, self)
        self.owner.save_at_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        _remove_callback(trainer, self)
        self.owner.save_after_validation(trainer, pl_module)


def _add_callback(trainer: Trainer, callback: lightning.Callback) -> None:
    """Appends ``callback`` (this very object) to the Trainer's callbacks, unless there."""
    if all(present is not callback for present in trainer.callbacks):
        trainer.callbacks.append(callback)


def _remove_callback(trainer: Trainer, callback: lightning.Callback) -> None:
    """Removes ``callback`` (this very object) from the Trainer's callbacks, if there."""
    trainer.callbacks[:] = [present for present in trainer.callbacks if present is not callback]


class DistckptCallback(lightning.Callback):
    """Saves through a :class:`distckpt.CheckpointManager` and resumes exactly from ``last``
    when ``trainer.fit`` starts.

    ``root`` and ``manager_options`` are the arguments of :class:`~distckpt.CheckpointManager`
    (``every_n_steps``, ``keep_last``, ``async_save``, ``save_on_signal``, ...); the manager is
    created in ``setup``, once Lightning has initialised the process group, so every rank of a
    DDP job runs it. Set ``enable_checkpointing=False`` on the Trainer, unless Lightning's own
    checkpoints are wanted too: a ``ModelCheckpoint`` beside it (``enable_checkpointing=True``)
    writes its files as usual and is resumed as any other callback, through its
    ``state_dict()``.

    After fitting starts, :attr:`resumed_from` is the step restored (None on a fresh start),
    :attr:`manager` the manager, :attr:`tracker` the step counter and :attr:`last_save` the
    :class:`~distckpt.SaveResult` of the newest checkpoint this fit started (None before).

    A fit that Lightning also restores a checkpoint of its own into (``fit(ckpt_path=...)``) of
    another global step or epoch is refused with :class:`~distckpt.InvalidArgument` before any
    batch where this callback restored ``last``: Lightning's restore of the optimizers,
    schedulers and loop progress comes after this one's, over it (one of the same progress, a
    ``ModelCheckpoint(save_last=True)``'s ``"last"``, is let through). On a root without
    checkpoints the fit starts from that file.
    """

    def __init__(self, root: str, **manager_options: Any) -> None:
        self.root = root
        self.manager_options = manager_options
        self.manager: CheckpointManager | None = None
        self.tracker: StepTracker | None = None
        self.resumed_from: int | None = None
        self._rng = DeferredRNG()
        self._trainer_state: TrainerState | None = None
        self._extras: LightningExtras | None = None
        self._monitors_saver = _SaveAfterMonitors(self)
        self._step_at_last_batch = 0
        self._save_at_epoch_end = False
        self._save_after_validation = False
        self._sigterm = HeldSigterm()
        self._requeue = SlurmRequeue()
        self._min_limits: tuple[int | None, int | None] | None = None
        self._restored_progress: tuple[int, int] | None = None
        self.last_save: SaveResult | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self.manager = CheckpointManager(self.root, **self.manager_options)
            # The manager's own flag: this package's, not a public part of the manager.
            self._sigterm.watch(trainer, self.manager._signals)
            # Before Lightning installs its SIGTERM handler (after on_fit_start).
            self._sigterm.keep_collectives_out_of_the_handler()
            self._requeue.watch(trainer, self.manager._signals)

    def _state(
        self, trainer: Trainer, pl_module: LightningModule, extras: Any, layout: str
    ) -> dict[str, Any]:
        """The state saved and restored, laid out for the format ``layout`` (the one saved
        in, or the restored checkpoint's); ``extras`` is :class:`LightningExtras` to save, or
        the dict its saved bytes are restored into."""
        assert self.manager is not None
        training = {
            "schedulers": [config.scheduler for config in trainer.lr_scheduler_configs],
            "steps": self.tracker,
            "trainer": self._trainer_state,
            "rng": self._rng,
        }
        state: dict[str, Any]
        if layout == "dcp":
            # Imported on use: torch.distributed.checkpoint costs half a second to import.
            from distckpt.model_state import ModelOptimizerState

            state = {
                # Keyed by parameter name: DCP loads an optimizer's state in place, and a
                # fresh optimizer has no state under its parameters' numbers to load into.
                "model_and_optimizers": ModelOptimizerState(pl_module, trainer.optimizers),
                # Each rank's own: its loaders' positions, its random number generators.
                "training": PerRank(AsBytes(training)),
            }
        else:
            state = {"model": pl_module, "optimizers": list(trainer.optimizers), **training}
        # Each rank's own callbacks' states and hook dict ("torch" saves every value so). The
        # bytes go as tensors in "torch", whose restore puts them in place of the template's
        # bytes; "dcp" loads a tensor only into a tensor of its size, which no template knows.
        if layout == "dcp":
            state[_EXTRAS_KEY] = PerRank(extras)
        else:
            saving = isinstance(extras, LightningExtras)
            state[_EXTRAS_KEY] = BytesAsTensors(extras) if saving else extras
        return state

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self.manager is not None
        self.tracker = StepTracker(*trainer.optimizers)
        self._trainer_state = TrainerState(trainer)
        self._extras = LightningExtras(trainer, skipped=(self, self._monitors_saver))
        checkpoint, extras = self._restore_last(trainer, pl_module)

        def finish_restore() -> None:
            assert self._extras is not None
            if extras is not None:
                self._extras.load_state_dict(extras)
            self._extras.finish_restore()

        # The callbacks' and the module's hooks may fail on one rank alone: agreed on, so that
        # every rank raises then, not that rank alone while the others train on into DDP's
        # next collective, to wait there for it until the process group's timeout.
        self.manager.agree_on(finish_restore, what="handing the restored state to the hooks")
        self._trainer_state.count_ended_epoch_completed()
        self.resumed_from = checkpoint.step if checkpoint is not None else None
        if checkpoint is not None and self.tracker.step != checkpoint.step:
            # This callback saves at tracker.step, so the restored count is the checkpoint's
            # step; a "dcp" checkpoint saved before steps_not_counted held one more (the
            # zero-learning-rate step DCP takes inside its state calls was counted), which
            # would leave every later checkpoint one step ahead.
            counts = self.tracker.state_dict()[BY_OPTIMIZER_KEY]
            self.tracker.load_state_dict(
                {STEP_KEY: checkpoint.step, BY_OPTIMIZER_KEY: [checkpoint.step, *counts[1:]]}
            )
        self._step_at_last_batch = self.tracker.step
        self._restored_progress = progress(trainer) if checkpoint is not None else None
        if checkpoint is not None:
            # The train loader may already be built (``estimated_stepping_batches`` in
            # ``configure_optimizers`` builds it before fitting starts), and Lightning hands a
            # restored loader position only to a loader it builds after the restore. Lightning
            # has no public call to rebuild it: dropping the built one makes the fit loop
            # rebuild it, with the position, when it starts.
            set_internal(trainer.fit_loop, "_combined_loader", None)

    def _restore_last(
        self, trainer: Trainer, pl_module: LightningModule
    ) -> tuple[LoadedCheckpoint | None, dict[str, Any] | None]:
        """Restores ``last``, if any, in one read; with it, the saved bytes of
        :class:`LightningExtras` for :meth:`LightningExtras.load_state_dict` (None: the
        checkpoint has none). An older checkpoint lacks what later versions added to them:
        the whole of them (saved before the callbacks' states were), or the callbacks'
        ``on_save_checkpoint`` keys (:attr:`LightningExtras.NEWER_KEYS`). Those keys, and only
        those, may be missing: any other key on one side only is refused on every rank before
        anything is loaded, as a strict restore refuses it."""
        assert self.manager is not None
        # A run may change its format: the checkpoint is read in the layout it was saved in.
        saved = self.manager.checkpoints()  # the manifests of the committed ones, oldest first
        layout = saved[-1].format if saved else self.manager.format
        # Plain bytes leaves, not an object with a state_dict(): the restore then reports each
        # key the checkpoint lacks, where it would report (and skip) the object as a whole.
        extras = dict.fromkeys(LightningExtras.KEYS, b"")
        checkpoint = self.manager.restore(
            "last",
            state=self._state(trainer, pl_module, extras, layout),
            missing_ok=True,
            optional_keys=[f"{_EXTRAS_KEY}.{key}" for key in LightningExtras.NEWER_KEYS],
            # Only as a whole: a checkpoint lacking some of the other keys of LightningExtras
            # matches no older layout, and is refused before anything is loaded.
            optional_whole_keys=[_EXTRAS_KEY],
        )
        if checkpoint is None or _EXTRAS_KEY in checkpoint.missing_keys:
            return checkpoint, None
        missing = set(checkpoint.missing_keys)
        return checkpoint, {
            key: value for key, value in extras.items() if f"{_EXTRAS_KEY}.{key}" not in missing
        }

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self._trainer_state is not None
        refuse_a_second_restore(trainer, self.root, self.resumed_from, self._restored_progress)
        ended_epoch = self._trainer_state.finish_ended_epoch()
        self._rng.apply()
        if ended_epoch:
            # After the RNGs: in the uninterrupted run this iterator was built after the save,
            # so its draws (a loader without a generator of its own draws a seed from torch's
            # global one) come after the restored state too.
            self._trainer_state.start_next_epoch()
        self._trainer_state.keep_reload_schedule()

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        assert self.tracker is not None
        if self._save_after_validation:
            # Deferred to a validation Lightning then did not run, which the check below is
            # meant to foresee: the state has moved on since, so that save is dropped.
            self._save_after_validation = False
            _remove_callback(trainer, self._monitors_saver)
        stepped = self.tracker.step != self._step_at_last_batch
        self._step_at_last_batch = self.tracker.step
        if not stepped:
            return  # mid-accumulation: gradients of earlier micro-batches are not saved
        # The loader's end, or ``limit_train_batches`` ending the epoch before it.
        last_batch = batch_idx + 1 >= trainer.num_training_batches
        if last_batch or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # The epoch's last batch: saved at ``on_train_epoch_end`` instead, once the epoch's
            # validation has run and the loop counts the epoch as processed. A checkpoint taken
            # here would resume into the next epoch without its ``on_train_epoch_start`` and
            # with the epoch counters one behind, so that the next checkpoint in that epoch
            # would resume as a fresh epoch and train its first batches again.
            self._save_at_epoch_end = True
            return
        if validates_after_this_batch(trainer):
            # Lightning validates after this hook: saved once the validation has run, so that
            # the checkpoint holds its metrics (``monitor``, ``keep_best``) and what the
            # monitoring callbacks' ``on_validation_end`` changed. Lightning resumes a state
            # saved after a validation without running it again.
            self._save_after_validation = True
            _add_callback(trainer, self._monitors_saver)
            return
        self._save(trainer, pl_module, epochs_done=trainer.current_epoch)
        if self.manager is not None and self.manager.preempted:
            # ``should_stop`` makes Lightning validate after this batch before it stops: time
            # the grace period has no room for, and metrics the checkpoint does not hold.
            set_internal(trainer.fit_loop.epoch_loop, "_skip_next_val", True)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._save_at_epoch_end:
            # Runs before the monitoring callbacks' hooks, which Lightning lists afterwards.
            _add_callback(trainer, self._monitors_saver)

    def save_at_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The epoch-end save, if one is due; run by :class:`_SaveAfterMonitors`."""
        if self._save_at_epoch_end:
            self._save_at_epoch_end = False
            # ``current_epoch`` still names the epoch that has just ended here.
            self._save(trainer, pl_module, epochs_done=trainer.current_epoch + 1)

    def save_after_validation(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The save due after a validation in the middle of an epoch, if one is due; run by
        :class:`_SaveAfterMonitors`."""
        if self._save_after_validation:
            self._save_after_validation = False
            self._save(trainer, pl_module, epochs_done=trainer.current_epoch)

    def _save(self, trainer: Trainer, pl_module: LightningModule, epochs_done: int) -> None:
        assert self.manager is not None and self.tracker is not None
        metrics = {
            key: value.item()
            for key, value in trainer.callback_metrics.items()
            if value.numel() == 1
        }
        saved = self.manager.save(
            self.tracker.step,
            self._state(trainer, pl_module, self._extras, self.manager.format),
            epoch=epochs_done,
            metrics=metrics,
        )
        if saved is not None:
            self.last_save = saved
        if self.manager.preempted:
            trainer.should_stop = True
            # Lightning ignores should_stop until min_epochs and min_steps are met: lifted for
            # the rest of this fit (``_close`` puts them back for the Trainer's next fit).
            fit_loop = trainer.fit_loop
            if self._min_limits is None:
                self._min_limits = (fit_loop.min_epochs, fit_loop.epoch_loop.min_steps)
            fit_loop.min_epochs = None
            fit_loop.epoch_loop.min_steps = None
            after_preemption_save(trainer, self.manager, self._sigterm, self._requeue)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A SIGTERM that came after the fit's last save point (a last batch ending no optimizer
        # step), on any rank: Lightning, checking its flag no more, would have raised on each.
        assert self.manager is not None
        raise_at_train_end(self.manager, self._sigterm)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._close(trainer)

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        """Does ``teardown``'s work, which Lightning does not call after a failure: without it a
        next ``fit`` on the same Trainer found the root still held by this manager. An error
        while closing is warned about, so that the failure itself is what is raised."""
        try:
            self._close(trainer)
        except Exception as error:  # the fit's own exception is the one to raise
            warnings.warn(
                f"closing the checkpoint manager after the fit failed raised {error!r}",
                stacklevel=2,
            )

    def _close(self, trainer: Trainer) -> None:
        """Removes the epoch-end saver, stops holding SIGTERM, puts back the Trainer's
        ``min_epochs`` and ``min_steps`` a preemption lifted, and closes the step tracker and
        the manager."""
        _remove_callback(trainer, self._monitors_saver)
        self._sigterm.stop(self.manager._signals if self.manager is not None else None)
        self._save_at_epoch_end = False
        self._save_after_validation = False
        if self._min_limits is not None:
            trainer.fit_loop.min_epochs, trainer.fit_loop.epoch_loop.min_steps = self._min_limits
            self._min_limits = None
        if self.tracker is not None:
            self.tracker.close()  # its count stays readable after the fit
        if self.manager is not None:
            self.manager.close()
            self.manager = None  # only once closed: a close a Ctrl-C interrupted can be repeated
