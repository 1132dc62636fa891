"""The Trainer's own state that :class:`~distckpt.lightning.DistckptCallback` saves and
restores beside the module and optimizers: the fit loop's progress and loaders' positions, the
precision plugin's and datamodule's states (:class:`TrainerState`), and the RNGs, restored
only once Lightning has built the data iterator (:class:`DeferredRNG`); and the refusal of a
restore of Lightning's own over the callback's (:func:`refuse_a_second_restore`)."""

from __future__ import annotations

from typing import Any

import lightning.fabric.utilities.data as fabric_data
import lightning.pytorch.utilities.combined_loader as combined_loaders
from lightning import Trainer

from distckpt.errors import InvalidArgument
from distckpt.lightning_internals import internal, set_internal
from distckpt.rng import capture_rng, restore_rng

#: The key, in :class:`TrainerState`'s ``fit_loop`` entry, of the epoch at which the fit loop
#: last loaded the train loader (its ``_last_train_dl_reload_epoch``, which Lightning does not
#: save).
LAST_RELOAD_KEY = "distckpt_last_train_dl_reload_epoch"


class TrainerState:
    """The Trainer's own resumable state, as one Stateful value with fixed keys (the loop's
    state_dict gains keys, such as the loader's, that a fresh Trainer does not have yet; its
    entry also holds :data:`LAST_RELOAD_KEY`)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.ended_epoch = False
        # Set with ended_epoch; cleared only by finish_ended_epoch (an epoch-end checkpoint was
        # restored), as count_ended_epoch_completed clears ended_epoch before then.
        self.next_epoch_to_start = False
        self.ended_epoch_loaders: list[dict[str, Any]] = []
        self.restored = False
        # The epoch of the train loader's last load that the restored checkpoint holds (None:
        # none restored, or a checkpoint saved before it was).
        self.saved_last_reload: float | None = None

    def state_dict(self) -> dict[str, Any]:
        datamodule = self.trainer.datamodule
        fit_loop = self.trainer.fit_loop
        # Inside the loop's entry, whose own keys no restore compares: a checkpoint saved
        # before it was restores as before. Lightning's own checkpoint leaves it out.
        last_reload = internal(fit_loop, "_last_train_dl_reload_epoch")
        return {
            "fit_loop": {**fit_loop.state_dict(), LAST_RELOAD_KEY: last_reload},
            "precision": self.trainer.precision_plugin.state_dict(),
            "datamodule": datamodule.state_dict() if datamodule is not None else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restored = True
        fit_loop = self.trainer.fit_loop
        loop_state = dict(state["fit_loop"])
        self.saved_last_reload = loop_state.pop(LAST_RELOAD_KEY, None)
        fit_loop.load_state_dict(loop_state)
        epochs = state["fit_loop"]["epoch_progress"]["current"]
        if epochs["processed"] == epochs["started"]:
            # Saved at an epoch's end: Lightning starts the next epoch afresh and never hands
            # the loaders their saved (used-up) position, yet a sampler's generator must go on
            # from it. Kept back here; ``finish_ended_epoch`` applies it.
            self.ended_epoch = True
            self.next_epoch_to_start = True
            self.ended_epoch_loaders = internal(fit_loop, "_combined_loader_states_to_load")
            set_internal(fit_loop, "_combined_loader_states_to_load", [])
        if state["precision"]:
            self.trainer.precision_plugin.load_state_dict(state["precision"])
        if self.trainer.datamodule is not None and state["datamodule"]:
            self.trainer.datamodule.load_state_dict(state["datamodule"])

    def count_ended_epoch_completed(self) -> None:
        """After a restore of an epoch-end checkpoint, count the ended epoch as completed and
        the next one as not started, as Lightning counts them once an epoch's end has run.

        The save happens between Lightning counting the epoch as processed and as completed.
        Lightning completes that count itself on resume only for epoch-based training: with
        ``max_steps`` set (``FitLoop._iteration_based_training``) it resumes such a state as
        "restarted at the epoch's end", runs one more batch in the ended epoch and skips the
        next epoch's ``on_train_epoch_start``. Called after the hooks' ``on_load_checkpoint``,
        which get the saved ``epoch`` (the ended one), as from Lightning's own checkpoint."""
        if not self.ended_epoch:
            return
        self.ended_epoch = False
        fit_loop = self.trainer.fit_loop
        epochs = fit_loop.epoch_progress
        epochs.current.completed = epochs.current.processed
        epochs.total.completed = epochs.total.processed
        # What Lightning's epoch loop resets when it starts an epoch afresh.
        epoch_loop = fit_loop.epoch_loop
        epoch_loop.batch_progress.reset_on_run()
        epoch_loop.batch_progress.is_last_batch = False
        internal(epoch_loop, "scheduler_progress").reset_on_run()
        internal(epoch_loop.automatic_optimization, "optim_progress").reset_on_run()
        epoch_loop.val_loop.batch_progress.total.reset()

    def finish_ended_epoch(self) -> bool:
        """After a restore of an epoch-end checkpoint, bring the loaders to where the uninterrupted
        run's were at that epoch's end: their saved position loaded and iterated to its end, so
        that a sampler's pending position (a ``StatefulDistributedSampler`` skips it lazily) is
        used up. True if there was such a restore (a loader without a saved position too: its
        iterator, built before the RNGs are restored, drew from them a draw early); then call
        :meth:`start_next_epoch`."""
        restored, self.next_epoch_to_start = self.next_epoch_to_start, False
        states, self.ended_epoch_loaders = self.ended_epoch_loaders, []
        if not restored:
            return False
        if not states:
            return True
        combined_loader = internal(self.trainer.fit_loop, "_combined_loader")
        assert combined_loader is not None
        internal(combined_loader, "_load_state_dicts")(states)
        stateful = internal(combined_loaders, "_Stateful")
        stateful_loaders = [
            loader for loader in combined_loader.flattened if isinstance(loader, stateful)
        ]
        for loader, state in zip(stateful_loaders, states):
            # A StatefulDataLoader whose iterator had already finished starts afresh by itself.
            if not state.get("_iterator_finished", False):
                for _ in loader:
                    pass
        return True

    def start_next_epoch(self) -> None:
        """Build the next epoch's data iterator as Lightning does at an epoch's start (after
        the samplers' ``set_epoch``), which a resuming fit loop does not.

        With ``reload_dataloaders_every_n_epochs`` set, first reload the train loader where
        the uninterrupted fit reloads it (:meth:`last_reload_epoch`): that fit calls
        ``train_dataloader()`` and builds the new loader's iterator at the epoch's start, and
        builds it once more at its first batch, each drawing from the RNGs, where the
        resuming fit loop built its loader once, before the RNGs were restored (so such a
        resume calls ``train_dataloader()`` twice at that epoch: the fit loop's first load is
        dropped)."""
        fit_loop = self.trainer.fit_loop
        if self.last_reload_epoch() == self.trainer.current_epoch:
            set_internal(fit_loop, "_combined_loader", None)
            fit_loop.setup_data()
        combined_loader = internal(fit_loop, "_combined_loader")
        fetcher = internal(fit_loop, "_data_fetcher")
        assert combined_loader is not None and fetcher is not None
        set_sampler_epoch = internal(fabric_data, "_set_sampler_epoch")
        for loader in combined_loader.flattened:
            set_sampler_epoch(loader, fit_loop.epoch_progress.current.processed)
        iter(fetcher)

    def last_reload_epoch(self) -> int | None:
        """The epoch at whose start the uninterrupted fit last reloaded the train loader, as of
        the restored epoch, with ``reload_dataloaders_every_n_epochs`` (n) set (None without
        it): the fit loop's last load that the checkpoint holds (at the epoch the saving fit
        started in, from Lightning's own checkpoint or a resume, or a reload since), or the
        restored epoch where that is n epochs or more later (the fit reloads at its start). A
        checkpoint saved before that load was counts each n-th epoch from epoch 0."""
        reload_every = self.trainer.reload_dataloaders_every_n_epochs
        if not reload_every:
            return None
        epoch = self.trainer.current_epoch
        saved = self.saved_last_reload
        if saved is None:
            return epoch - epoch % reload_every
        # A saved load of -inf (never loaded) is n epochs or more before any epoch.
        return epoch if epoch - saved >= reload_every else int(saved)

    def keep_reload_schedule(self) -> None:
        """After a restore (none: nothing to do), tell the fit loop the uninterrupted fit's last
        reload of the train loader: it counts its reloads from the epoch it resumed in, its
        first load."""
        last_reload = self.last_reload_epoch()
        if self.restored and last_reload is not None:
            set_internal(self.trainer.fit_loop, "_last_train_dl_reload_epoch", last_reload)


class DeferredRNG:
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


def progress(trainer: Trainer) -> tuple[int, int]:
    """The Trainer's loop progress that a restore sets: its ``global_step`` and epoch."""
    return trainer.global_step, trainer.current_epoch


def refuse_a_second_restore(
    trainer: Trainer, root: str, resumed_from: int | None, restored: tuple[int, int] | None
) -> None:
    """Raises :class:`~distckpt.InvalidArgument` (``path``: Lightning's checkpoint, ``step``:
    ``resumed_from``, the one :class:`~distckpt.lightning.DistckptCallback` restored from
    ``root``, whose :func:`progress` was ``restored``) where Lightning restored a checkpoint of
    its own (``fit(ckpt_path=...)``, or an ``hpc_ckpt_N.ckpt`` that its SLURM auto-requeue saved
    and it picks by itself) of another progress after the callback restored ``last``: Lightning
    restores the optimizers, schedulers and loop progress after ``on_fit_start``, over the
    restored ones, so the fit would train on a mix of two checkpoints. One of the same progress
    (a ``ModelCheckpoint(save_last=True)`` beside the callback, saving at the same epochs, and
    ``fit(ckpt_path="last")``) is let through. Call it before any batch, so that nothing is
    trained or saved; it decides the same on every rank (each sees the same root and
    ``ckpt_path``)."""
    ckpt_path = trainer.ckpt_path
    if resumed_from is None or ckpt_path is None or progress(trainer) == restored:
        return
    raise InvalidArgument(
        f"trainer.fit() restored Lightning's checkpoint {ckpt_path} (global step "
        f"{trainer.global_step}) over step {resumed_from} of "
        f"{root}, which DistckptCallback restored: the fit would train on the optimizers, "
        "schedulers and loop progress of the one and the module of the other. Leave ckpt_path "
        "out (the callback resumes from its root's last), or give the callback a root without "
        "checkpoints to start from that checkpoint (an hpc_ckpt_N.ckpt is one Lightning's SLURM "
        "auto-requeue saved and picks by itself: turn it off with "
        "plugins=[SLURMEnvironment(auto_requeue=False)])",
        path=str(ckpt_path),
        step=resumed_from,
    )
