"""distckpt.lightning.DistckptCallback resuming a DDP fit on 2 real ranks (forked processes in a
gloo group, ``strategy="ddp"``): an epoch-end checkpoint with ``max_steps`` set resumes as an
ended epoch on every rank, and what the restore hands to the callbacks' hooks after it
(their ``load_state_dict`` and ``on_load_checkpoint``) failing on one rank alone is raised on
every rank, naming that rank, instead of leaving the other rank to train on into DDP's
gradient sync and wait there for the process group's timeout; a resume at an epoch's end into
a reload epoch of ``reload_dataloaders_every_n_epochs`` reloads the train loader on every rank
as the uninterrupted fit does."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lightning")

import lightning
from lightning import LightningModule, Trainer

from distckpt.lightning import DistckptCallback
from tests.lightning_tiny import TinyModule
from tests.ports import ReservedPort
from tests.ranks import run_ranks
from tests.test_lightning_resume_points import AddsNoise, RecordsBatches

pytestmark = pytest.mark.timeout(120)

#: What a fit on 2 ranks passes to its Trainer beside its callbacks: no output, no files.
TWO_QUIET_RANKS: dict[str, Any] = {
    "accelerator": "cpu",
    "devices": 2,
    "strategy": "ddp",
    "enable_checkpointing": False,
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


class FailsToResumeOnRankOne(lightning.Callback):
    """Has a state to save; at a resume its hook named ``failing_hook`` raises on rank 1 only."""

    def __init__(self, failing_hook: str | None) -> None:
        self.failing_hook = failing_hook

    def _fail_if(self, hook: str) -> None:
        if hook == self.failing_hook and os.environ["RANK"] == "1":
            raise ValueError(f"{hook} refuses the state on rank 1")

    def state_dict(self) -> dict[str, Any]:
        return {"saved": 1}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._fail_if("load_state_dict")

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._fail_if("on_load_checkpoint")


def _tell_lightning_the_rank(rank: int, world_size: int, port: int) -> None:
    # The process group exists already (tests.ranks made it): Lightning takes it as is; these
    # tell Lightning's DDP which rank this process is.
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        NODE_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def _fit_then_resume(rank: int, world_size: int, root: str, port: int, hook: str) -> str:
    """One rank of a 1-epoch fit, then of its resume to 2 epochs whose ``hook`` fails on rank 1;
    the resume's error as ``type: message``."""
    _tell_lightning_the_rank(rank, world_size, port)

    def fit(epochs: int, failing_hook: str | None) -> None:
        callbacks = [
            DistckptCallback(root, every_n_epochs=1, fsync=False, timeout=20),
            FailsToResumeOnRankOne(failing_hook),
        ]
        lightning.Trainer(max_epochs=epochs, callbacks=callbacks, **TWO_QUIET_RANKS).fit(
            TinyModule()
        )

    fit(1, None)
    try:
        fit(2, hook)
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return "resumed"


@pytest.mark.parametrize("hook", ["load_state_dict", "on_load_checkpoint"])
def test_a_hook_failing_on_one_rank_at_resume_raises_on_every_rank(
    tmp_path: Path, hook: str
) -> None:
    with ReservedPort() as port:
        results = run_ranks(
            _fit_then_resume, 2, str(tmp_path / "root"), port.port, hook, timeout=60
        )
    errors = [result.unwrap() for result in results]
    for error in errors:
        assert error.startswith("RankFailure"), error
        assert f"rank 1: ValueError: {hook} refuses the state on rank 1" in error


def _batches_uninterrupted_and_resumed(
    rank: int, world_size: int, root: str, port: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """One rank's batches, as ``(epoch, batch_idx)``, of a fit to ``max_steps=3`` (one batch an
    epoch on each rank), and of a fit to ``max_steps=1`` (the first epoch's end) then again to
    3, resumed from it."""
    _tell_lightning_the_rank(rank, world_size, port)

    def fit(max_steps: int, run: str) -> list[tuple[int, int]]:
        module = RecordsBatches(fail=False)
        saving = DistckptCallback(f"{root}/{run}", every_n_epochs=1, fsync=False, timeout=20)
        trainer = lightning.Trainer(
            max_steps=max_steps, max_epochs=-1, callbacks=[saving], **TWO_QUIET_RANKS
        )
        trainer.fit(module)
        return module.trained

    return fit(3, "uninterrupted"), fit(1, "resumed") + fit(3, "resumed")


def test_a_ddp_fit_with_max_steps_resumes_an_epoch_end_checkpoint_exactly(tmp_path: Path) -> None:
    """Every rank starts the next epoch from its first batch, where it trained a batch more
    in the ended epoch (Lightning resumes an ended epoch so only without ``max_steps``)."""
    with ReservedPort() as port:
        results = run_ranks(
            _batches_uninterrupted_and_resumed, 2, str(tmp_path), port.port, timeout=90
        )
    for result in results:
        uninterrupted, resumed = result.unwrap()
        assert uninterrupted == [(0, 0), (1, 0), (2, 0)]
        assert resumed == uninterrupted


class RecordsLoads(AddsNoise):
    """AddsNoise, recording the epoch of each ``train_dataloader()`` call."""

    def __init__(self) -> None:
        super().__init__(fail=False)
        self.loads: list[int] = []

    def train_dataloader(self) -> Any:
        self.loads.append(self.current_epoch)
        return super().train_dataloader()


#: What one rank's fit ended with: its batches, its loads of the train loader, its weights.
FitRecord = tuple[list[tuple[int, int]], list[int], dict[str, torch.Tensor]]


def _loads_uninterrupted_and_resumed(
    rank: int, world_size: int, root: str, port: int
) -> tuple[FitRecord, FitRecord, FitRecord]:
    """One rank's record of a fit to ``max_steps=4`` (one batch an epoch on each rank)
    reloading every 2 epochs, of a fit to ``max_steps=2`` (epoch 1's end), and of its resume
    to 4."""
    _tell_lightning_the_rank(rank, world_size, port)

    def fit(max_steps: int, run: str) -> FitRecord:
        torch.manual_seed(0)  # the same initial weights in every run
        module = RecordsLoads()
        saving = DistckptCallback(f"{root}/{run}", every_n_epochs=1, fsync=False, timeout=20)
        trainer = lightning.Trainer(
            max_steps=max_steps,
            max_epochs=-1,
            callbacks=[saving],
            reload_dataloaders_every_n_epochs=2,
            **TWO_QUIET_RANKS,
        )
        trainer.fit(module)
        weights = {name: value.clone() for name, value in module.state_dict().items()}
        return module.trained, module.loads, weights

    return fit(4, "uninterrupted"), fit(2, "resumed"), fit(4, "resumed")


def test_a_ddp_resume_into_a_reload_epoch_reloads_as_the_uninterrupted_fit(
    tmp_path: Path,
) -> None:
    """The uninterrupted fit loads the train loader at epoch 0 and reloads it at epoch 2; the
    resume after epoch 1's end, in reload epoch 2, calls ``train_dataloader()`` there twice
    (the fit loop's first build is dropped) on every rank, trains the uninterrupted fit's
    batches and ends with its weights (which the noise makes depend on each iterator built,
    reloaded or not)."""
    with ReservedPort() as port:
        results = run_ranks(
            _loads_uninterrupted_and_resumed, 2, str(tmp_path), port.port, timeout=90
        )
    for result in results:
        uninterrupted, failed, resumed = result.unwrap()
        assert uninterrupted[1] == [0, 2]
        assert resumed[1] == [2, 2]
        assert failed[0] + resumed[0] == uninterrupted[0]
        for name, value in uninterrupted[2].items():
            assert torch.equal(resumed[2][name], value), name
