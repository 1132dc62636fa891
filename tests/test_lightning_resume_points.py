"""distckpt.lightning.DistckptCallback resuming from the points where it saves, in small real
fits on one device run in the test's process: every batch the resumed fit trains, and the
weights it ends with, are those of the uninterrupted fit (the fits killed with SIGKILL are in
``tests/test_lightning.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lightning")

from tests.lightning_tiny import FailsInSecondEpoch, fit_tiny

pytestmark = pytest.mark.timeout(120)


class RecordsBatches(FailsInSecondEpoch):
    """Records each batch it trains as ``(epoch, batch_idx)`` and each epoch it starts; fails
    in its second epoch's first batch while ``fail``."""

    def __init__(self, fail: bool) -> None:
        super().__init__()
        self.fail = fail
        self.trained: list[tuple[int, int]] = []
        self.epochs_started: list[int] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)  # raises first while failing
        self.trained.append((self.current_epoch, batch_idx))
        return loss

    def on_train_epoch_start(self) -> None:
        self.epochs_started.append(self.current_epoch)


def _fit(root: Path, fail: bool, **trainer_options: Any) -> RecordsBatches:
    """A fit of the same seeded module with ``trainer_options``; with ``fail``, the fit that
    fails in its second epoch."""
    torch.manual_seed(0)
    module = RecordsBatches(fail)
    if fail:
        with pytest.raises(RuntimeError, match="failing on purpose"):
            fit_tiny(module, root, epochs=-1, trainer_options=trainer_options)
    else:
        fit_tiny(module, root, epochs=-1, trainer_options=trainer_options)
    return module


@pytest.mark.parametrize(
    "accumulation",
    [{}, {"accumulate_grad_batches": 2}],
    ids=["one-batch-a-step", "accumulating-the-epoch"],
)
def test_a_fit_with_max_steps_rerun_after_a_failure_resumes_an_epoch_end_checkpoint_exactly(
    tmp_path: Path, accumulation: dict[str, Any]
) -> None:
    """The fit fails in its second epoch, after the first epoch's end was saved, and the same
    fit (``max_steps`` set) runs again: it starts the second epoch (its ``on_train_epoch_start``
    and its first batch). Lightning resumes a state saved at an epoch's end as an ended epoch
    only without ``max_steps``: with it, it trained a batch more in the ended epoch, skipped the
    next epoch's start, and lost that epoch's last batch (or micro-batch) to ``max_steps``."""
    limits = {"max_steps": 3 if accumulation else 6, **accumulation}
    uninterrupted = _fit(tmp_path / "uninterrupted", fail=False, **limits)
    failed = _fit(tmp_path / "resumed", fail=True, **limits)
    resumed = _fit(tmp_path / "resumed", fail=False, **limits)
    assert failed.trained == [(0, 0), (0, 1)]
    assert uninterrupted.trained == [(epoch, batch) for epoch in range(3) for batch in range(2)]
    assert failed.trained + resumed.trained == uninterrupted.trained
    assert resumed.epochs_started == [1, 2]
    for name, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
