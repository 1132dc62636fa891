"""distckpt.lightning.DistckptCallback with ``save_on_signal=(SIGTERM,)`` in a DDP fit on 2 real
ranks (forked processes in a gloo group, ``strategy="ddp"``), where SIGTERM reaches some ranks
only, as a node's agent or a scheduler stopping one node sends it: every rank takes the
preemption save and raises ``SIGTERMException``. Lightning's own handler broadcasts inside the
handler on the signalled rank alone, which put the ranks' collectives out of step: no save,
and both ranks waiting until the process group's timeout. Under SLURM, Lightning's requeue
signal saved on reaching some ranks requeues the job once, from rank 0."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

pytest.importorskip("lightning")

import lightning
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader

from distckpt.lightning import DistckptCallback
from tests.lightning_tiny import TinyModule
from tests.ports import ReservedPort
from tests.ranks import run_ranks
from tests.test_lightning_ddp_resume import TWO_QUIET_RANKS, _tell_lightning_the_rank

pytestmark = pytest.mark.timeout(120)


class SendsSigtermOnRanks(TinyModule):
    """Sends SIGTERM to its own process on the ranks ``signalled``: in its second epoch's
    first batch (``when="training"``, ``"after-the-vote"``), or in the sanity-check validation
    that comes before training, after Lightning installed its handler (``when="sanity"``).
    One batch an epoch on each of 2 ranks; two with ``"after-the-vote"``."""

    def __init__(self, signalled: tuple[int, ...], when: str) -> None:
        super().__init__()
        self.signalled = signalled
        self.when = when

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        training = self.when in ("training", "after-the-vote")
        if training and self.current_epoch == 1 and batch_idx == 0:
            self._signal()
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        if self.when == "sanity" and self.trainer.sanity_checking:
            self._signal()

    def train_dataloader(self) -> DataLoader:
        samples = 16 if self.when == "after-the-vote" else 8
        return DataLoader(torch.randn(samples, 4, generator=torch.Generator().manual_seed(0)), 4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(torch.randn(8, 4), 4)

    def _signal(self) -> None:
        if self.global_rank in self.signalled:
            os.kill(os.getpid(), signal.SIGTERM)


class SendsSigtermLate(lightning.Callback):
    """Sends SIGTERM on rank 1: listed after the saving callback, with ``when="after-the-vote"``,
    at the first batch end after a preemption save (after the ranks told each other whether
    any got SIGTERM); listed before it, with ``when="at-train-end"``, in ``on_train_end``, after
    the fit's last save point. Notes the step of each epoch's end it sees."""

    def __init__(self, saving: DistckptCallback, when: str) -> None:
        self.saving = saving
        self.when = when
        self.sent = False
        self.epoch_ends: list[int] = []

    def on_train_batch_end(self, trainer: lightning.Trainer, *_: object) -> None:
        manager = self.saving.manager
        late = self.when == "after-the-vote" and trainer.global_rank == 1 and not self.sent
        if late and manager is not None and manager.preempted:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_epoch_end(self, trainer: lightning.Trainer, *_: object) -> None:
        self.epoch_ends.append(trainer.global_step)

    def on_train_end(self, trainer: lightning.Trainer, *_: object) -> None:
        if self.when == "at-train-end" and trainer.global_rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)


def _fit_signalled(
    rank: int, world_size: int, root: str, port: int, signalled: tuple[int, ...], when: str
) -> tuple[str, int | None, int, list[int]]:
    """One rank of a 3-epoch fit saving on SIGTERM alone; how it ended, the step of its last
    save, the step it stopped at and those of the epoch ends it ran."""
    _tell_lightning_the_rank(rank, world_size, port)
    callback = DistckptCallback(
        root, every_n_steps=100, fsync=False, timeout=20, save_on_signal=(signal.SIGTERM,)
    )
    late = SendsSigtermLate(callback, when)
    callbacks = [late, callback] if when == "at-train-end" else [callback, late]
    trainer = lightning.Trainer(
        max_epochs=3, callbacks=callbacks, num_sanity_val_steps=1, **TWO_QUIET_RANKS
    )
    try:
        trainer.fit(SendsSigtermOnRanks(signalled, when))
        ended = "finished"
    except SIGTERMException:
        ended = "SIGTERMException"
    saved = callback.last_save.step if callback.last_save is not None else None
    return ended, saved, trainer.global_step, late.epoch_ends


@pytest.mark.parametrize(
    ("signalled", "when", "step", "epoch_ends"),
    [
        ((0,), "training", 2, [1, 2]),
        ((1,), "training", 2, [1, 2]),
        ((1,), "sanity", 1, [1]),
        # Saved mid-epoch; rank 1's own SIGTERM, after the vote, neither undoes the flag the
        # vote gave back there nor runs that epoch's end on rank 1 alone.
        ((0,), "after-the-vote", 3, [2]),
        # Nothing saved after it, but the fit raises on rank 0 too.
        ((), "at-train-end", None, [1, 2, 3]),
    ],
    ids=[
        "rank-0-alone",
        "rank-1-alone",
        "rank-1-alone-in-the-sanity-check",
        "rank-0-then-rank-1-after-the-vote",
        "rank-1-alone-after-the-last-save-point",
    ],
)
def test_sigterm_reaching_one_rank_is_saved_and_raised_on_every_rank(
    tmp_path: Path,
    signalled: tuple[int, ...],
    when: str,
    step: int | None,
    epoch_ends: list[int],
) -> None:
    with ReservedPort() as port:
        results = run_ranks(
            _fit_signalled, 2, str(tmp_path), port.port, signalled, when, timeout=90
        )
    # Saved at the first save point after the signal (with one batch an epoch, the epoch's
    # end), then the fit stops.
    stopped_at = step if step is not None else epoch_ends[-1]
    expected = ("SIGTERMException", step, stopped_at, epoch_ends)
    assert [result.unwrap() for result in results] == [expected] * 2
    if step is not None:
        assert os.readlink(tmp_path / "last") == f"step-{step:08d}"


class SendsSigusr1OnRanks(TinyModule):
    """Sends SIGUSR1 (Lightning's SLURM requeue signal) to its own process in its second epoch's
    (only) batch, on the ranks ``signalled``."""

    def __init__(self, signalled: tuple[int, ...]) -> None:
        super().__init__()
        self.signalled = signalled

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self.current_epoch == 1 and self.global_rank in self.signalled:
            os.kill(os.getpid(), signal.SIGUSR1)
        return super().training_step(batch, batch_idx)


def _fit_under_slurm(
    rank: int, world_size: int, root: str, port: int, bin_dir: str, signalled: tuple[int, ...]
) -> tuple[str, str, int | None]:
    """One rank of a 3-epoch fit under SLURM (its variables: no SLURM here) saving on SIGUSR1;
    the cluster environment Lightning took, how the fit ended and the step of its last save."""
    _tell_lightning_the_rank(rank, world_size, port)
    # This forked rank's own environment: what makes Lightning take SLURMEnvironment, and the
    # job's scontrol, a stand-in program on PATH that notes which rank ran it.
    os.environ.update(
        SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_NNODES="1",
        SLURM_JOB_NAME="train",
        SLURM_JOB_ID="4242",
        SLURM_PROCID=str(rank),
        SLURM_LOCALID=str(rank),
        SLURM_NODEID="0",
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    )
    callback = DistckptCallback(
        root, every_n_steps=100, fsync=False, timeout=20, save_on_signal=(signal.SIGUSR1,)
    )
    trainer = lightning.Trainer(max_epochs=3, callbacks=[callback], **TWO_QUIET_RANKS)
    environment = type(trainer._accelerator_connector.cluster_environment).__name__
    trainer.fit(SendsSigusr1OnRanks(signalled))
    saved = callback.last_save.step if callback.last_save is not None else None
    return environment, f"stopped at {trainer.global_step}", saved


@pytest.mark.parametrize("signalled", [(1,), (0, 1)], ids=["rank-1-alone", "both-ranks"])
def test_under_slurm_the_requeue_signal_on_some_ranks_requeues_the_job_once(
    tmp_path: Path, signalled: tuple[int, ...]
) -> None:
    """The ranks tell each other after the preemption save whether any got the requeue signal:
    rank 0 runs ``scontrol requeue`` once, also where the signal reached rank 1 alone."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol-calls.txt"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "rank $SLURM_PROCID: $@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    with ReservedPort() as port:
        results = run_ranks(
            _fit_under_slurm, 2, str(tmp_path / "root"), port.port, str(bin_dir), signalled
        )
    expected = ("SLURMEnvironment", "stopped at 2", 2)
    assert [result.unwrap() for result in results] == [expected] * 2
    assert calls.read_text() == "rank 0: requeue 4242\n"
