"""distckpt.lightning.DistckptCallback with ``save_on_signal=(SIGTERM,)`` in a DDP fit on 2 real
ranks (forked processes in a gloo group, ``strategy="ddp"``), where SIGTERM reaches some ranks
only, as a node's agent or a scheduler stopping one node sends it: every rank takes the
preemption save and raises ``SIGTERMException``. Lightning's own handler broadcasts inside the
handler on the signalled rank alone, which put the ranks' collectives out of step: no save,
and both ranks waiting until the process group's timeout."""

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
    (only) batch (``when="training"``), or in the sanity-check validation that comes before
    training, after Lightning installed its handler (``when="sanity"``)."""

    def __init__(self, signalled: tuple[int, ...], when: str) -> None:
        super().__init__()
        self.signalled = signalled
        self.when = when

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self.when == "training" and self.current_epoch == 1:
            self._signal()
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        if self.when == "sanity" and self.trainer.sanity_checking:
            self._signal()

    def val_dataloader(self) -> DataLoader:
        return DataLoader(torch.randn(8, 4), 4)

    def _signal(self) -> None:
        if self.global_rank in self.signalled:
            os.kill(os.getpid(), signal.SIGTERM)


def _fit_signalled(
    rank: int, world_size: int, root: str, port: int, signalled: tuple[int, ...], when: str
) -> tuple[str, int | None, int]:
    """One rank of a 3-epoch fit (one batch an epoch on each rank) saving on SIGTERM alone;
    how it ended, the step of its last save and the step it stopped at."""
    _tell_lightning_the_rank(rank, world_size, port)
    callback = DistckptCallback(
        root, every_n_steps=100, fsync=False, timeout=20, save_on_signal=(signal.SIGTERM,)
    )
    trainer = lightning.Trainer(
        max_epochs=3, callbacks=[callback], num_sanity_val_steps=1, **TWO_QUIET_RANKS
    )
    try:
        trainer.fit(SendsSigtermOnRanks(signalled, when))
        ended = "finished"
    except SIGTERMException:
        ended = "SIGTERMException"
    saved = callback.last_save.step if callback.last_save is not None else None
    return ended, saved, trainer.global_step


@pytest.mark.parametrize(
    ("signalled", "when", "step"),
    [((0,), "training", 2), ((1,), "training", 2), ((1,), "sanity", 1)],
    ids=["rank-0-alone", "rank-1-alone", "rank-1-alone-in-the-sanity-check"],
)
def test_sigterm_reaching_one_rank_is_saved_and_raised_on_every_rank(
    tmp_path: Path, signalled: tuple[int, ...], when: str, step: int
) -> None:
    with ReservedPort() as port:
        results = run_ranks(
            _fit_signalled, 2, str(tmp_path), port.port, signalled, when, timeout=90
        )
    # Saved at the first epoch's end after the signal (its only batch is its last), then the
    # fit stops.
    assert [result.unwrap() for result in results] == [("SIGTERMException", step, step)] * 2
    assert os.readlink(tmp_path / "last") == f"step-{step:08d}"
