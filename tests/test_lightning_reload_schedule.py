"""distckpt.lightning.DistckptCallback resuming a fit with ``reload_dataloaders_every_n_epochs``
that did not start at epoch 0 (started from Lightning's own checkpoint), with another n than
the run that saved, and from a checkpoint saved before the fit loop's last load of the train
loader was saved, in small real fits on one device run in the test's process: the resumed
fit reloads the train loader where the fit it continues does, and trains the same batches to
the same weights."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("torchdata")

import lightning
from torchdata.stateful_dataloader import StatefulDataLoader

from distckpt.lightning_state import LAST_RELOAD_KEY, TrainerState
from tests.lightning_tiny import fit_tiny
from tests.test_lightning_resume_points import ShufflesStatefullyWithNoise

pytestmark = pytest.mark.timeout(120)

#: Epochs 0 to 4, reloading every 2 epochs; a save at every optimizer step (2 an epoch).
EPOCHS = 5
RELOAD_EVERY = 2
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
    root: Path,
    fail_at: tuple[int, int] | None = None,
    epochs: int = EPOCHS,
    reload_every: int = RELOAD_EVERY,
    **options: Any,
) -> tuple[RecordsLoads, lightning.Trainer | None]:
    """The seeded module fitted for ``epochs``, reloading every ``reload_every`` epochs
    (``options``: :func:`fit_tiny`'s), failing at ``fail_at`` if given; the module and the
    Trainer (None when it failed)."""
    torch.manual_seed(0)
    module = RecordsLoads(fail_at)
    reloading = {"reload_dataloaders_every_n_epochs": reload_every}
    if fail_at is None:
        return module, fit_tiny(module, root, epochs, trainer_options=reloading, **options)
    with pytest.raises(RuntimeError, match="failing on purpose"):
        fit_tiny(module, root, epochs, trainer_options=reloading, **options)
    return module, None


def _assert_resumed_as(
    uninterrupted: RecordsLoads, runs: list[RecordsLoads], resumed: RecordsLoads
) -> None:
    """The runs before ``resumed`` and it trained the uninterrupted fit's batches, once each,
    to its weights."""
    trained = [batch for run in [*runs, resumed] for batch in run.trained]
    assert trained == uninterrupted.trained
    for name, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


@pytest.fixture(scope="module")
def started_from_a_lightning_checkpoint(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, RecordsLoads]:
    """Lightning's own checkpoint of epoch 1, and the fit started from it uninterrupted, which
    loads the train loader at epoch 1 and reloads it at epoch 3."""
    root = tmp_path_factory.mktemp("started_from_a_lightning_checkpoint")
    lightning_checkpoint = root / "lightning.ckpt"
    fit_tiny(RecordsLoads(), root / "before", 1).save_checkpoint(lightning_checkpoint)
    uninterrupted, _ = _fit(root / "uninterrupted", ckpt_path=lightning_checkpoint, **EVERY_STEP)
    assert uninterrupted.loads == [1, 3]
    return lightning_checkpoint, uninterrupted


@pytest.mark.parametrize(
    ("runs", "checkpoint_format"),
    [
        ([((3, 0), None, [1, 3]), ((4, 0), None, [3, 3]), (None, 6, [4])], "torch"),
        ([((3, 1), None, [1, 3]), (None, 5, [3])], "dcp"),
    ],
    ids=["epoch-end-into-a-reload-epoch-then-out-of-it-torch", "mid-epoch-dcp"],
)
def test_a_resume_of_a_fit_started_from_a_lightning_checkpoint_keeps_its_reload_epochs(
    tmp_path: Path,
    started_from_a_lightning_checkpoint: tuple[Path, RecordsLoads],
    runs: list[tuple[tuple[int, int] | None, int | None, list[int]]],
    checkpoint_format: str,
) -> None:
    """Started from Lightning's checkpoint of epoch 1 with ``n = 2``, the fit loads the train
    loader at epoch 1 and reloads it at epoch 3; each of ``runs`` (where it fails, the step it
    resumed from, its loads) reruns the fit on the same root. Resumed after epoch 2's end, the
    fit reloads at epoch 3 (a second call there: the fit loop's first build is dropped); that
    resume, failing in epoch 4, is resumed after epoch 3's end from the load it saved and does
    not reload at epoch 4. Resumed in epoch 3, the fit does not reload at epoch 4 either. Each
    resume trains the uninterrupted fit's batches to its weights. Counted from epoch 0, the
    resume after epoch 2 did not reload at epoch 3, the resume after epoch 3 and the one in
    epoch 3 reloaded at epoch 4."""
    lightning_checkpoint, uninterrupted = started_from_a_lightning_checkpoint
    options: dict[str, Any] = {**EVERY_STEP, "format": checkpoint_format}
    done: list[RecordsLoads] = []
    for fail_at, resumed_from, loads in runs:
        from_lightning = {} if done else {"ckpt_path": lightning_checkpoint}
        run, trainer = _fit(tmp_path / "resumed", fail_at, **options, **from_lightning)
        assert run.loads == loads
        if trainer is not None:  # a failed run's callback is out of reach
            assert trainer.callbacks[0].resumed_from == resumed_from
        done.append(run)
    _assert_resumed_as(uninterrupted, done[:-1], done[-1])


@pytest.fixture(scope="module")
def started_at_epoch_0(tmp_path_factory: pytest.TempPathFactory) -> RecordsLoads:
    """The fit started at epoch 0 uninterrupted, which loads the train loader at epochs 0, 2
    and 4."""
    uninterrupted, _ = _fit(tmp_path_factory.mktemp("started_at_epoch_0"), **EVERY_STEP)
    assert uninterrupted.loads == [0, 2, 4]
    return uninterrupted


@pytest.mark.parametrize("checkpoint_format", ["torch", "dcp"])
def test_a_checkpoint_without_the_last_load_reloads_each_nth_epoch_from_epoch_0(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    started_at_epoch_0: RecordsLoads,
    checkpoint_format: str,
) -> None:
    """The failed fit saves as distckpt did before the fit loop's last load was saved: its
    resume after epoch 2's end keeps the rule from before, each n-th epoch counted from epoch
    0 (the schedule of a fit started at epoch 0). It reloads at epoch 4, not again at its
    first epoch (3) as a load counted as never made would have it, and trains the weights of
    the uninterrupted fit."""
    with_last_load = TrainerState.state_dict
    saves_without_it: list[int] = []

    def state_dict_of_an_older_distckpt(self: TrainerState) -> dict[str, Any]:
        state = with_last_load(self)
        del state["fit_loop"][LAST_RELOAD_KEY]
        saves_without_it.append(self.trainer.global_step)
        return state

    # No older distckpt can be installed beside this one in a test: the failed fit saves
    # through the real save path with the entry that older versions never wrote left out.
    monkeypatch.setattr(TrainerState, "state_dict", state_dict_of_an_older_distckpt)
    options: dict[str, Any] = {**EVERY_STEP, "format": checkpoint_format}
    failed, _ = _fit(tmp_path, (3, 0), **options)
    monkeypatch.undo()
    assert saves_without_it[-1] == 6
    resumed, trainer = _fit(tmp_path, **options)
    assert trainer is not None and trainer.callbacks[0].resumed_from == 6
    assert resumed.loads == [3, 4]
    _assert_resumed_as(started_at_epoch_0, [failed], resumed)


def test_a_resume_with_another_n_counts_it_from_the_saved_load(tmp_path: Path) -> None:
    """Run A (``n = 2``) loads at epochs 0 and 2 and fails in epoch 3; run B, the same fit
    with ``n = 3`` from A's checkpoint, counts 3 epochs from A's load at epoch 2 and reloads
    at epoch 5. B killed in epoch 4 and resumed reloads at epoch 5 too, and ends with the
    weights of B uninterrupted; counted from epoch 0 (or from B's first epoch), it reloaded
    at epoch 6."""
    options: dict[str, Any] = {**EVERY_STEP, "epochs": 7}
    run_a, _ = _fit(tmp_path / "a", (3, 1), **options)
    assert run_a.loads == [0, 2]
    shutil.copytree(tmp_path / "a", tmp_path / "b_killed")
    uninterrupted_b, trainer = _fit(tmp_path / "a", reload_every=3, **options)
    assert trainer is not None and trainer.callbacks[0].resumed_from == 7
    assert uninterrupted_b.loads == [3, 5]
    killed_b, _ = _fit(tmp_path / "b_killed", (4, 1), reload_every=3, **options)
    resumed_b, trainer = _fit(tmp_path / "b_killed", reload_every=3, **options)
    assert trainer is not None and trainer.callbacks[0].resumed_from == 9
    assert resumed_b.loads == [4, 5]
    _assert_resumed_as(uninterrupted_b, [killed_b], resumed_b)
