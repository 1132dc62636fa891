"""distckpt.lightning.DistckptCallback resuming a fit with ``reload_dataloaders_every_n_epochs``
that did not start at epoch 0 (started from Lightning's own checkpoint), and from a checkpoint
saved before the fit loop's last load of the train loader was saved, in small real fits on one
device run in the test's process: the resumed fit reloads the train loader where the fit it
continues does, and trains the same batches to the same weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("torchdata")

from torchdata.stateful_dataloader import StatefulDataLoader

import distckpt
from distckpt.lightning_state import LAST_RELOAD_KEY
from tests.lightning_tiny import fit_tiny
from tests.test_lightning_resume_points import ShufflesStatefullyWithNoise

pytestmark = pytest.mark.timeout(120)

#: Reloads every 2 epochs, until epoch 7; a save at every optimizer step (2 an epoch).
RELOADING: dict[str, Any] = {"reload_dataloaders_every_n_epochs": 2}
EVERY_STEP: dict[str, Any] = {"every_n_epochs": None, "every_n_steps": 1}


class RecordsLoads(ShufflesStatefullyWithNoise):
    """Records the epoch of each ``train_dataloader()`` call; fails at batch ``fail_at``
    (``(epoch, batch_idx)``), if given."""

    def __init__(self, fail_at: tuple[int, int] | None = None) -> None:
        super().__init__(fail=False)
        self.fail_at = fail_at
        self.loads: list[int] = []

    def train_dataloader(self) -> StatefulDataLoader:
        self.loads.append(self.current_epoch)
        return super().train_dataloader()

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if (self.current_epoch, batch_idx) == self.fail_at:
            raise RuntimeError("failing on purpose")
        return super().training_step(batch, batch_idx)


def _fit(
    root: Path, fail_at: tuple[int, int] | None = None, **options: Any
) -> tuple[RecordsLoads, Any]:
    """The seeded module fitted until epoch 8 (``options``: :func:`fit_tiny`'s), failing at
    ``fail_at`` if given; the module and the Trainer."""
    torch.manual_seed(0)
    module = RecordsLoads(fail_at)
    if fail_at is None:
        return module, fit_tiny(module, root, 8, trainer_options=RELOADING, **options)
    with pytest.raises(RuntimeError, match="failing on purpose"):
        fit_tiny(module, root, 8, trainer_options=RELOADING, **options)
    return module, None


def _assert_resumed_as(uninterrupted: RecordsLoads, failed: RecordsLoads, resumed: Any) -> None:
    assert failed.trained + resumed.trained == uninterrupted.trained
    for name, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


@pytest.mark.parametrize(
    ("fail_at", "resumed_from", "resumed_loads", "checkpoint_format"),
    [
        ((6, 0), 6, [6, 7], "torch"),
        ((5, 0), 4, [5, 5, 7], "torch"),
        ((5, 1), 5, [5, 7], "dcp"),
    ],
    ids=["epoch-end-torch", "epoch-end-into-a-reload-epoch-torch", "mid-epoch-dcp"],
)
def test_a_resume_of_a_fit_started_from_a_lightning_checkpoint_keeps_its_reload_epochs(
    tmp_path: Path,
    fail_at: tuple[int, int],
    resumed_from: int,
    resumed_loads: list[int],
    checkpoint_format: str,
) -> None:
    """Started from Lightning's checkpoint of epoch 3 with ``n = 2``, the fit loads the train
    loader at epoch 3 and reloads it at epochs 5 and 7. Its resume after epoch 5's end (or in
    epoch 5) builds the loader at its start and reloads at epoch 7; resumed after epoch 4's
    end, it reloads at epoch 5 too (a second call there: the fit loop's first build is
    dropped). Counted from epoch 0, the resume reloaded at epoch 6 instead of 7 (and not at
    5), and the weights differed."""
    lightning_checkpoint = tmp_path / "lightning.ckpt"
    fit_tiny(RecordsLoads(), tmp_path / "before", 3).save_checkpoint(lightning_checkpoint)
    options = {**EVERY_STEP, "format": checkpoint_format, "ckpt_path": lightning_checkpoint}
    uninterrupted, _ = _fit(tmp_path / "uninterrupted", **options)
    failed, _ = _fit(tmp_path / "resumed", fail_at, **options)
    del options["ckpt_path"]  # the rerun resumes from the callback's root alone
    resumed, trainer = _fit(tmp_path / "resumed", **options)
    assert trainer.callbacks[0].resumed_from == resumed_from
    assert uninterrupted.loads == [3, 5, 7]
    assert resumed.loads == resumed_loads
    _assert_resumed_as(uninterrupted, failed, resumed)


def test_a_checkpoint_without_the_last_load_reloads_each_nth_epoch_from_epoch_0(
    tmp_path: Path,
) -> None:
    """The failed fit's last checkpoint (epoch 2's end), saved again without the fit loop's
    last load, as a checkpoint saved before it was: the resume keeps the rule from before,
    each n-th epoch counted from epoch 0, which is the schedule of a fit started at epoch 0.
    It reloads at epoch 4, not at its first epoch (3) as a load of the fit loop counted as
    never made would have it, and trains the weights of the uninterrupted fit."""
    uninterrupted, _ = _fit(tmp_path / "uninterrupted", **EVERY_STEP)
    failed, _ = _fit(tmp_path / "failed", (3, 0), **EVERY_STEP)
    with distckpt.CheckpointManager(str(tmp_path / "failed"), read_only=True) as failed_root:
        saved = failed_root.restore("last")
    assert saved is not None and saved.step == 6
    assert saved.state["trainer"]["fit_loop"].pop(LAST_RELOAD_KEY) == 2
    with distckpt.CheckpointManager(str(tmp_path / "resumed"), fsync=False) as manager:
        manager.save(saved.step, saved.state, epoch=saved.epoch, metrics=saved.metrics)
    resumed, trainer = _fit(tmp_path / "resumed", **EVERY_STEP)
    assert trainer.callbacks[0].resumed_from == 6
    assert uninterrupted.loads == [0, 2, 4, 6]
    assert resumed.loads == [3, 4, 6]
    _assert_resumed_as(uninterrupted, failed, resumed)
