"""What :class:`~distckpt.lightning.DistckptCallback` reads and sets of Lightning's private
state, for which Lightning has no public way: its SIGTERM flag (:class:`HeldSigterm`), its
epoch loop's decision to validate after a batch (:func:`validates_after_this_batch`), and,
through :func:`internal` and :func:`set_internal`, every private attribute the callback uses,
so that a Lightning version without one is named as such."""

from __future__ import annotations

import logging
import signal
from types import FrameType, ModuleType
from typing import Any

import lightning
from lightning import Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message

from distckpt.decisions import SignalFlag
from distckpt.errors import LightningInternalMissing

#: Lightning's signal connector's logger, whose "Received SIGTERM" line the notifier keeps.
log = logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector")


def internal(owner: object, name: str) -> Any:
    """``owner``'s (an object, class or module of Lightning's) private attribute ``name``; raises
    :class:`~distckpt.LightningInternalMissing` where the installed Lightning has none."""
    try:
        return getattr(owner, name)
    except AttributeError:
        # A module or class is named itself; an instance, by its class.
        named = owner if isinstance(owner, (ModuleType, type)) else type(owner)
        attribute = f"{named.__name__}.{name}"
        raise LightningInternalMissing(attribute, lightning.__version__) from None


def set_internal(owner: object, name: str, value: Any) -> None:
    """Sets ``owner``'s private attribute ``name`` of Lightning's, only where it exists (a new
    attribute would be set silently and read by nothing)."""
    internal(owner, name)
    setattr(owner, name, value)


def validates_after_this_batch(trainer: Trainer) -> bool:
    """Whether Lightning runs a validation after the batch whose ``on_train_batch_end`` is
    running (its epoch loop decides so after that hook, in ``on_advance_end``, as here) and
    the validation loop does not then skip it for want of a batch to validate."""
    epoch_loop = trainer.fit_loop.epoch_loop
    fetcher = internal(trainer.fit_loop, "_data_fetcher")
    if fetcher is None or internal(epoch_loop, "_skip_next_val"):
        return False
    if not internal(epoch_loop, "_should_check_val_fx")(fetcher):
        return False
    val_loop = epoch_loop.val_loop
    # Builds the validation loader as the loop's run is about to (a built one is kept): its
    # skip counts that loader's batches.
    val_loop.setup_data()
    return not val_loop.skip


class HeldSigterm:
    """Lightning's own SIGTERM handling, held back from the moment SIGTERM comes until the
    preemption save has run: Lightning raises ``SIGTERMException`` at the end of the batch (or
    the validation batch) in which SIGTERM came, which is before the save where that batch ends
    no optimizer step (the middle of an accumulation window), where the save waits for a
    validation or the epoch's end, or where SIGTERM came after this callback's hook of that
    batch (in a later callback's or the module's). Lightning's handler calls the one it found
    installed (the manager's, installed at ``setup``) after setting its flag, so the manager's
    handler clears that flag right then (:attr:`SignalFlag.on_set
    <distckpt.decisions.SignalFlag.on_set>`). Held, it is given back once the save has run, and
    Lightning raises then; a fit ending before any save raises at ``on_train_end``. A SIGTERM
    coming before Lightning installs its handler (during ``on_fit_start``) is held too.

    Lightning's handler also broadcasts from rank 0 inside the handler, on the signalled rank
    alone: where SIGTERM reaches some ranks only (a node's agent, one rank killed), that
    broadcast pairs with another rank's broadcast of the training loop, and every collective
    after it is out of step (a hang until the process group's timeout, and no save). From
    ``setup`` on (:meth:`keep_collectives_out_of_the_handler`, before Lightning installs its
    handler: during the sanity-check validation and the loaders' setup too) it runs without that
    broadcast: the manager's vote at the save tells every rank."""

    def __init__(self) -> None:
        self.trainer: Trainer | None = None
        self.held = False
        self.holding = False
        self.given_back = False

    def watch(self, trainer: Trainer, flag: SignalFlag) -> None:
        """Holds Lightning's flag at each SIGTERM ``flag`` gets, until :meth:`stop`."""
        self.trainer = trainer
        self.held = False
        self.given_back = False
        self.holding = signal.SIGTERM in flag.watched
        if self.holding:
            flag.on_set = self._hold

    def _hold(self, signum: int) -> None:
        trainer = self.trainer
        # Once given back (the save has run, every rank raises), a later SIGTERM is not held:
        # clearing the flag the vote set would leave this rank alone training on.
        if signum == signal.SIGTERM and trainer is not None and not self.given_back:
            # Held also where Lightning's flag is not set: before Lightning installs its handler
            # (after ``on_fit_start``, during the restore) the manager's handler alone runs,
            # and the signal would otherwise be swallowed.
            set_internal(internal(trainer, "_signal_connector"), "received_sigterm", False)
            self.held = True

    def keep_collectives_out_of_the_handler(self) -> None:
        """Replaces Lightning's SIGTERM notifier (call before its ``register_signal_handlers``,
        which installs the one it finds then; :meth:`stop` puts Lightning's back) with one doing
        the same but its broadcast: it logs the signal, hands it to the ranks its launcher
        started and sets its flag (which the manager's handler, run next, holds). Only where
        SIGTERM is held."""
        trainer = self.trainer
        if trainer is None or not self.holding:
            return
        connector = internal(trainer, "_signal_connector")
        internal(connector, "_sigterm_notifier_fn")  # named where this Lightning has none

        def notify(signum: int, frame: FrameType | None) -> None:
            log.info(rank_prefixed_message(f"Received SIGTERM: {signum}", trainer.local_rank))
            if not internal(connector, "received_sigterm"):
                launcher = trainer.strategy.launcher
                if launcher is not None:
                    launcher.kill(signum)
            set_internal(connector, "received_sigterm", True)

        # An instance attribute, over the class's method: register_signal_handlers reads
        # self._sigterm_notifier_fn when it installs the handler.
        connector._sigterm_notifier_fn = notify

    def give_back(self, *, held_on_any_rank: bool | None = None) -> None:
        """Puts Lightning's flag back, if held here (or, ``held_on_any_rank``, on any rank of
        the job): Lightning raises at its next check."""
        held = self.held if held_on_any_rank is None else held_on_any_rank
        if held and self.trainer is not None:
            self.held = False
            self.given_back = True
            set_internal(internal(self.trainer, "_signal_connector"), "received_sigterm", True)

    def raise_if_held(self, *, held_on_any_rank: bool | None = None) -> None:
        """Raises ``SIGTERMException`` as Lightning would have, if a SIGTERM is still held here
        (or, ``held_on_any_rank``, on any rank of the job): at the fit's end Lightning checks
        its flag no more."""
        held = self.held if held_on_any_rank is None else held_on_any_rank
        if held:
            self.give_back(held_on_any_rank=held)
            raise SIGTERMException

    def stop(self, flag: SignalFlag | None) -> None:
        """Holds no more (a SIGTERM held is dropped: the fit has failed or ended)."""
        if flag is not None:
            flag.on_set = None
        if self.trainer is not None:
            vars(internal(self.trainer, "_signal_connector")).pop("_sigterm_notifier_fn", None)
        self.trainer = None
        self.held = False
        self.given_back = False
        self.holding = False
