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

from distckpt.lightning import DistckptCallback
from tests.lightning_tiny import TinyModule
from tests.ports import ReservedPort
from tests.ranks import run_ranks
from tests.test_lightning_ddp_resume import TWO_QUIET_RANKS, _tell_lightning_the_rank

pytestmark = pytest.mark.timeout(120)


class SendsSigtermOnRanks(TinyModule):
    """Sends SIGTERM to its own process in its second epoch's (only) batch, on the ranks
    ``signalled``."""

    def __init__(self, signalled: tuple[int, ...]) -> None:
        super().__init__()
        self.signalled = signalled

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self.current_epoch == 1 and self.global_rank in self.signalled:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().training_step(batch, batch_idx)


def _fit_signalled(
    rank: int, world_size: int, root: str, port: int, signalled: tuple[int, ...]
) -> tuple[str, int | None, int]:
    """One rank of a 3-epoch fit (one batch an epoch on each rank) saving on SIGTERM alone;
    how it ended, the step of its last save and the step it stopped at."""
    _tell_lightning_the_rank(rank, world_size, port)
    callback = DistckptCallback(
        root, every_n_steps=100, fsync=False, timeout=20, save_on_signal=(signal.SIGTERM,)
    )
    trainer = lightning.Trainer(max_epochs=3, callbacks=[callback], **TWO_QUIET_RANKS)
    try:
        trainer.fit(SendsSigtermOnRanks(signalled))
        ended = "finished"
    except SIGTERMException:
        ended = "SIGTERMException"
    saved = callback.last_save.step if callback.last_save is not None else None
    return ended, saved, trainer.global_step


@pytest.mark.parametrize("signalled", [(0,), (1,)], ids=["rank-0-alone", "rank-1-alone"])
def test_sigterm_reaching_one_rank_is_saved_and_raised_on_every_rank(
    tmp_path: Path, signalled: tuple[int, ...]
) -> None:
    with ReservedPort() as port:
        results = run_ranks(_fit_signalled, 2, str(tmp_path), port.port, signalled, timeout=90)
    # The second epoch's batch is its last: saved at the epoch's end, then the fit stops.
    assert [result.unwrap() for result in results] == [("SIGTERMException", 2, 2)] * 2
    assert os.readlink(tmp_path / "last") == "step-00000002"
