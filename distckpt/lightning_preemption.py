"""What :class:`~distckpt.lightning.DistckptCallback` does after a preemption save
(:func:`after_preemption_save`): hands a held SIGTERM back to Lightning, and requeues the SLURM
job in place of Lightning's auto-requeue where its requeue signal asked for the save
(:class:`SlurmRequeue`)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import warnings

from lightning import Trainer
from lightning.fabric.plugins.environments import SLURMEnvironment

from distckpt.decisions import SignalFlag
from distckpt.lightning_internals import HeldSigterm, internal
from distckpt.manager import CheckpointManager

logger = logging.getLogger("distckpt")


class SlurmRequeue:
    """Requeues the SLURM job once a preemption save that Lightning's requeue signal asked for
    has committed, in place of Lightning's auto-requeue.

    Under SLURM, Lightning installs its requeue handler (``SLURMEnvironment(auto_requeue=True)``,
    its default; ``SIGUSR1`` unless ``requeue_signal`` says otherwise) only where that signal has
    no handler yet: a manager saving on it (``save_on_signal``, installed at ``setup``) turned it
    off, and the job stopped after its preemption save, exited 0 and was never requeued. This
    does its work instead, after the save rather than in the handler (Lightning's also writes an
    ``hpc_ckpt_N.ckpt`` there, and its next fit restores from it by itself): rank 0 runs
    ``scontrol requeue`` with the job's id, formed as Lightning forms it. Unlike Lightning's, it
    does not retry through a shell where ``scontrol`` is not found (that failure, and a non-zero
    exit, are logged as warnings), and it logs the requeue itself as a warning too, so that it
    shows at the logging level preemption messages are seen at."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.signalled = False

    def watch(self, trainer: Trainer, flag: SignalFlag) -> None:
        """Notes each of ``flag``'s signals that is Lightning's requeue signal, where Lightning
        would requeue on it and ``flag`` watches it; chains ``flag.on_set``. Warns where Lightning
        would requeue on a signal ``flag`` does not watch while ``flag`` watches others (the
        user chose preemption saves)."""
        environment = internal(trainer, "_accelerator_connector").cluster_environment
        self.signalled = False
        self.signum = None
        if not isinstance(environment, SLURMEnvironment) or not environment.auto_requeue:
            return
        if environment.requeue_signal not in flag.watched:
            if not flag.watched:
                # No preemption saves chosen: Lightning's SLURM handling is left as it is.
                return
            name = signal.Signals(environment.requeue_signal).name
            # Lightning's handler saves hpc_ckpt_N.ckpt, which its next fit restores over the
            # callback's restore: refused, at every requeue.
            warnings.warn(
                f"Lightning's SLURM auto-requeue saves an hpc_ckpt_N.ckpt on {name}, which its "
                "next fit restores and DistckptCallback then refuses: add "
                f"signal.{name} to save_on_signal (the callback then saves and requeues), or "
                "turn the auto-requeue off with plugins=[SLURMEnvironment(auto_requeue=False)]",
                stacklevel=2,
            )
            return
        self.signum = environment.requeue_signal
        chained = flag.on_set

        def on_set(signum: int) -> None:
            if signum == self.signum:
                self.signalled = True
            if chained is not None:
                chained(signum)

        flag.on_set = on_set

    def requeue(self, trainer: Trainer) -> None:
        """Runs ``scontrol requeue`` on rank 0 (the job id as Lightning forms it); a failure to
        run it or a non-zero exit is logged as a warning, and so is the requeue."""
        if not trainer.is_global_zero:
            return
        array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
        if array_job is not None:
            job_id = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        else:
            job_id = os.environ["SLURM_JOB_ID"]
        try:
            status = subprocess.call(["scontrol", "requeue", job_id])
        except OSError as error:
            logger.warning("requeuing SLURM job %s failed: %s", job_id, error)
            return
        if status != 0:
            logger.warning("requeuing SLURM job %s failed: scontrol exited %d", job_id, status)
        else:
            logger.warning("requeued SLURM job %s after its preemption save", job_id)


def after_preemption_save(
    trainer: Trainer, manager: CheckpointManager, sigterm: HeldSigterm, requeue: SlurmRequeue
) -> None:
    """Hands a held SIGTERM back to Lightning and requeues the SLURM job where its requeue
    signal came, each where any rank got that signal (it may reach some ranks only): every rank
    raises ``SIGTERMException`` then, as Lightning's loop makes them (it broadcasts rank 0's
    flag), not the signalled ranks alone while the others' fits return. Collective where
    either is watched (the same on every rank: the same options); the job is requeued once a
    fit."""
    if not sigterm.holding and requeue.signum is None:
        return
    # The manager's coordinator, this package's own: the public agree_on returns each rank's
    # own value, and this needs the ranks' values combined.
    held, requeued = manager._coord.all_reduce(
        lambda: (sigterm.held, requeue.signalled),
        lambda by_rank: tuple(map(any, zip(*by_rank))),
        what="handing the preemption signals on",
    )
    requeue.signalled = False  # requeued once, even where a later save is preempted too
    sigterm.give_back(held_on_any_rank=held)
    if requeued:
        requeue.requeue(trainer)


def raise_at_train_end(manager: CheckpointManager, sigterm: HeldSigterm) -> None:
    """Raises ``SIGTERMException`` on every rank where any rank still holds a SIGTERM at the
    fit's end (it came after the fit's last save point, on some ranks only), as Lightning's loop
    would have raised it on every rank. Collective where SIGTERM is held (the same on every
    rank: the same options); every rank reaches ``on_train_end`` once a fit, unless all raised
    before it together. A rank failing there before the callback's hook (in an earlier
    callback's ``on_train_end``) leaves the other ranks raising ``CoordinationError`` in this
    vote, after at most the manager's ``timeout``, instead of returning."""
    if not sigterm.holding:
        return
    # As in after_preemption_save: agree_on cannot return the ranks' values combined.
    held = manager._coord.all_reduce(
        lambda: sigterm.held, any, what="telling a SIGTERM held at the fit's end"
    )
    sigterm.raise_if_held(held_on_any_rank=held)
