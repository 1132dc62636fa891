"""distckpt.lightning.DistckptCallback resuming from the points where it saves, in small real
fits on one device run in the test's process: every batch the resumed fit trains, and the
weights it ends with, are those of the uninterrupted fit (the fits killed with SIGKILL are in
``tests/test_lightning.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

pytest.importorskip("lightning")
pytest.importorskip("torchdata")

import lightning
from lightning.pytorch.plugins.precision import MixedPrecision
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

import distckpt
from tests.lightning_tiny import FailsInSecondEpoch, TinyModule, fit_tiny

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


def _fit(
    root: Path, fail: bool, kind: type[RecordsBatches] = RecordsBatches, **trainer_options: Any
) -> RecordsBatches:
    """A fit of the same seeded module (of class ``kind``) with ``trainer_options``; with
    ``fail``, the fit that fails in its second epoch."""
    torch.manual_seed(0)
    module = kind(fail)
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


class _TwoBatchesNoLength(torch.utils.data.IterableDataset):
    """The tiny module's 8 samples, from a dataset without ``len()``."""

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield from torch.randn(8, 4, generator=torch.Generator().manual_seed(0))


class RecordsBatchesWithoutLength(RecordsBatches):
    """Its loader has no length: Lightning counts ``num_training_batches`` as infinite and
    knows an epoch's last batch only by its data fetcher's look-ahead (``is_last_batch``)."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_TwoBatchesNoLength(), 4)


def test_a_fit_over_a_loader_without_length_saves_and_resumes_at_epoch_ends(
    tmp_path: Path,
) -> None:
    """An epoch's last batch is told by the fetcher's look-ahead where the loader has no
    length: the save is taken at the epoch's end, and the rerun after a failure starts the
    next epoch as the uninterrupted fit did. Told by the batch count alone, no epoch-end save
    was ever taken (every epoch's last batch looked like the middle of one)."""
    limits = {"max_steps": 6}
    uninterrupted = _fit(tmp_path / "uninterrupted", False, RecordsBatchesWithoutLength, **limits)
    failed = _fit(tmp_path / "resumed", True, RecordsBatchesWithoutLength, **limits)
    assert distckpt.CheckpointManager(str(tmp_path / "resumed"), read_only=True).steps() == [2]
    resumed = _fit(tmp_path / "resumed", False, RecordsBatchesWithoutLength, **limits)
    assert failed.trained + resumed.trained == uninterrupted.trained
    assert resumed.epochs_started == [1, 2]
    for name, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


class AddsNoise(RecordsBatches):
    """Adds noise from torch's global generator to each batch: its weights depend on every
    draw from it, the one each loader without a generator of its own takes for an iterator."""

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch + torch.randn_like(batch), batch_idx)


def test_the_generators_are_restored_after_the_resumed_epochs_iterator_is_built(
    tmp_path: Path,
) -> None:
    """The loader has no generator of its own: building its iterator draws from torch's
    global one, as in the uninterrupted fit after the save. Restored before that build (at the
    fit's start), the generators were a draw off and every later batch's noise differed."""
    limits = {"max_steps": 6}
    uninterrupted = _fit(tmp_path / "uninterrupted", False, AddsNoise, **limits)
    _fit(tmp_path / "resumed", True, AddsNoise, **limits)
    resumed = _fit(tmp_path / "resumed", False, AddsNoise, **limits)
    for name, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


class ShufflesStatefullyWithNoise(AddsNoise):
    """A StatefulDataLoader shuffling with torch's global generator; adds noise as AddsNoise."""

    def train_dataloader(self) -> StatefulDataLoader:
        return StatefulDataLoader(super().train_dataloader().dataset, 4, shuffle=True)


class CountsLoads(AddsNoise):
    """AddsNoise, counting its calls of ``train_dataloader()``."""

    loads = 0

    def train_dataloader(self) -> DataLoader:
        self.loads += 1
        return super().train_dataloader()


@pytest.mark.parametrize(
    ("kind", "reload_every"),
    [(AddsNoise, 1), (AddsNoise, 2), (ShufflesStatefullyWithNoise, 1), (CountsLoads, 0)],
    ids=["plain-every-epoch", "plain-every-2-epochs", "stateful-every-epoch", "no-reloads"],
)
def test_an_epoch_end_resume_reloads_the_train_loader_as_the_uninterrupted_fit(
    tmp_path: Path, kind: type[AddsNoise], reload_every: int
) -> None:
    """With ``reload_dataloaders_every_n_epochs``, the uninterrupted fit calls
    ``train_dataloader()`` and builds the new loader's iterator twice at each n-th epoch's
    start (each build drawing from torch's global generator), and the resumed fit loop counted
    its reloads from the resume: one build and draw short at the resumed epoch (every epoch),
    or reloading a batch later than the uninterrupted fit (every 2 epochs). Without reloads,
    the resumed fit calls ``train_dataloader()`` once, as Lightning alone does."""
    limits = {"max_steps": 8, "reload_dataloaders_every_n_epochs": reload_every}
    uninterrupted = _fit(tmp_path / "uninterrupted", False, kind, **limits)
    failed = _fit(tmp_path / "resumed", True, kind, **limits)
    resumed = _fit(tmp_path / "resumed", False, kind, **limits)
    assert failed.trained + resumed.trained == uninterrupted.trained
    for name, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    if isinstance(resumed, CountsLoads):
        assert resumed.loads == 1


class FailsInTheMiddleOfTheSecondEpoch(ShufflesStatefullyWithNoise):
    """Fails in its second epoch's second batch (not its first) while ``fail``."""

    def __init__(self, fail: bool) -> None:
        super().__init__(fail=False)
        self.fails_mid_epoch = fail

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self.fails_mid_epoch and (self.current_epoch, batch_idx) == (1, 1):
            raise RuntimeError("failing on purpose")
        return super().training_step(batch, batch_idx)


def test_a_mid_epoch_resume_reloads_the_train_loader_as_the_uninterrupted_fit(
    tmp_path: Path,
) -> None:
    """Resumed in epoch 1 with ``reload_dataloaders_every_n_epochs=2``, the fit loop counted
    its reloads from there and reloaded at epoch 3, where the uninterrupted fit reloads at
    epoch 2."""
    limits = {"max_steps": 8, "reload_dataloaders_every_n_epochs": 2}
    fits: list[FailsInTheMiddleOfTheSecondEpoch] = []
    for root, fail in [("uninterrupted", False), ("resumed", True), ("resumed", False)]:
        torch.manual_seed(0)
        fits.append(FailsInTheMiddleOfTheSecondEpoch(fail))
        try:
            fit_tiny(
                fits[-1],
                tmp_path / root,
                epochs=-1,
                trainer_options=limits,
                every_n_epochs=None,
                every_n_steps=1,
            )
        except RuntimeError as error:
            assert fail and "failing on purpose" in str(error)
    uninterrupted, failed, resumed = fits
    assert failed.trained + resumed.trained == uninterrupted.trained
    for name, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


class ShufflesInAWorker(RecordsBatches):
    """Its loader shuffles by epoch (a sampler with ``set_epoch``) in a worker process, which
    draws the epoch's order as soon as the iterator is built; records each batch's samples."""

    def __init__(self, fail: bool) -> None:
        super().__init__(fail)
        self.samples: list[list[float]] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.samples.append(batch[:, 0].tolist())
        return loss

    def train_dataloader(self) -> StatefulDataLoader:
        data = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
        sampler = StatefulDistributedSampler(data, num_replicas=1, rank=0, seed=1)
        return StatefulDataLoader(
            data, 4, sampler=sampler, num_workers=1, generator=torch.Generator()
        )


def test_an_epoch_end_resume_shuffles_the_next_epoch_as_the_uninterrupted_fit(
    tmp_path: Path,
) -> None:
    """The next epoch's iterator, built at the resume of an epoch-end checkpoint, is built
    after the sampler's ``set_epoch`` of that epoch: a worker draws the order at once, and
    drew the ended epoch's order again."""
    limits = {"max_steps": 6}
    uninterrupted = _fit(tmp_path / "uninterrupted", False, ShufflesInAWorker, **limits)
    failed = _fit(tmp_path / "resumed", True, ShufflesInAWorker, **limits)
    resumed = _fit(tmp_path / "resumed", False, ShufflesInAWorker, **limits)
    assert uninterrupted.samples[:2] != uninterrupted.samples[2:4]  # epochs shuffled apart
    assert failed.samples + resumed.samples == uninterrupted.samples


def test_a_resume_restores_the_precision_plugins_grad_scaler(tmp_path: Path) -> None:
    """The GradScaler of 16-bit mixed precision (here on CPU) doubles its scale after every
    step without overflow: the resumed fit goes on from the saved scale, and ends with the
    uninterrupted fit's (a fresh scaler ended a resumed fit at a quarter of it)."""

    def fit(root: Path, epochs: int) -> float:
        scaler = torch.amp.GradScaler("cpu", init_scale=16.0, growth_interval=1)
        precision = MixedPrecision("16-mixed", "cpu", scaler)
        fit_tiny(TinyModule(), root, epochs, trainer_options={"plugins": [precision]})
        return scaler.get_scale()

    assert fit(tmp_path / "resumed", epochs=1) == 16.0 * 2**2
    assert fit(tmp_path / "resumed", epochs=2) == fit(tmp_path / "uninterrupted", epochs=2)


class ValidatesEveryTwoBatches(RecordsBatches):
    """6 batches an epoch (from a loader whose position is saved) and a validation after every
    second one (with the Trainer's ``val_check_interval=2``); records each validation's
    ``val_loss`` by the optimizer step it followed, and fails in the validation after step
    ``fail_in_validation_at``, if set."""

    def __init__(self, fail_in_validation_at: int | None = None) -> None:
        super().__init__(fail=False)
        self.fail_in_validation_at = fail_in_validation_at
        self.validated: dict[int, float] = {}

    def train_dataloader(self) -> StatefulDataLoader:
        # Its position is saved: a resume in the middle of the epoch goes on from its batch.
        data = torch.randn(24, 4, generator=torch.Generator().manual_seed(0))
        return StatefulDataLoader(data, 4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), 4)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        if self.global_step == self.fail_in_validation_at:
            raise RuntimeError("failing in validation on purpose")
        self.log("val_loss", self.head(self.backbone(batch)).square().mean())

    def on_validation_epoch_end(self) -> None:
        self.validated[self.global_step] = self.trainer.callback_metrics["val_loss"].item()


class CountsValidations(lightning.Callback):
    """A callback whose state its ``on_validation_end`` changes: the validations it saw."""

    def __init__(self) -> None:
        self.count = 0

    def on_validation_end(self, trainer: lightning.Trainer, pl_module: Any) -> None:
        self.count += 1

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.count = state_dict["count"]


#: Validation after every second batch, none before fitting, a save every 2 optimizer steps.
VALIDATING: dict[str, Any] = {"val_check_interval": 2, "num_sanity_val_steps": 0}


def _fit_validating(
    root: Path, module: ValidatesEveryTwoBatches, counter: CountsValidations, **options: Any
) -> Any:
    """One epoch validating every second batch, saving every 2 steps (with ``options``), with
    ``counter`` listed after the saving callback."""
    return fit_tiny(
        module,
        root,
        epochs=1,
        callbacks=[counter],
        trainer_options=VALIDATING,
        every_n_epochs=None,
        every_n_steps=2,
        **options,
    )


def test_a_checkpoint_due_before_a_mid_epoch_validation_holds_that_validations_metrics(
    tmp_path: Path,
) -> None:
    """Saved once the validation that follows its batch has run: each checkpoint's
    ``val_loss`` is the one measured on its weights, so ``best`` is the best (it carried the
    validation before it, one step behind)."""
    module = ValidatesEveryTwoBatches()
    _fit_validating(tmp_path, module, CountsValidations(), monitor="val_loss")
    manager = distckpt.CheckpointManager(str(tmp_path), read_only=True)
    saved = {info.step: info.metrics["val_loss"] for info in manager.checkpoints()}
    assert saved == module.validated and sorted(saved) == [2, 4, 6]


def test_a_fit_failing_in_a_mid_epoch_validation_resumes_before_it_and_runs_it_again(
    tmp_path: Path,
) -> None:
    """The validation after step 4 fails: step 4 was not saved before it, so the rerun resumes
    from step 2 (saved after its validation and every callback's ``on_validation_end``; the
    validation is not run again) and runs the training and validation after it as the
    uninterrupted fit did. Saved before its validation, step 4 was
    resumed and its validation never run."""
    torch.manual_seed(0)
    uninterrupted = ValidatesEveryTwoBatches()
    _fit_validating(tmp_path / "uninterrupted", uninterrupted, CountsValidations())
    torch.manual_seed(0)
    failed = ValidatesEveryTwoBatches(fail_in_validation_at=4)
    with pytest.raises(RuntimeError, match="failing in validation on purpose"):
        _fit_validating(tmp_path / "resumed", failed, CountsValidations())
    resumed, counter = ValidatesEveryTwoBatches(), CountsValidations()
    trainer = _fit_validating(tmp_path / "resumed", resumed, counter)
    assert trainer.callbacks[0].resumed_from == 2
    # Saved after every callback's on_validation_end, the one listed after it too.
    assert counter.count == 3
    assert failed.trained == [(0, 0), (0, 1), (0, 2), (0, 3)] and list(failed.validated) == [2]
    assert failed.trained[:2] + resumed.trained == uninterrupted.trained
    assert {**failed.validated, **resumed.validated} == uninterrupted.validated
    assert list(resumed.validated) == [4, 6]
    for name, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


class EmptyValidationLoader(ValidatesEveryTwoBatches):
    """Lightning decides to validate after every second batch, and its loop then skips: the
    validation loader has no batch."""

    def val_dataloader(self) -> DataLoader:
        return DataLoader(torch.randn(0, 4), 4)


def test_a_checkpoint_due_before_a_skipped_validation_is_taken_at_its_batch(
    tmp_path: Path,
) -> None:
    """Deferred to a validation that never ran, each save was dropped and the next batch's
    taken in its place (steps 3 and 5); the epoch-end saver was added at each of them."""
    counter = CountsCheckpointCallbacks()
    _fit_validating(tmp_path, EmptyValidationLoader(), counter)
    assert distckpt.CheckpointManager(str(tmp_path), read_only=True).steps() == [2, 4, 6]
    assert counter.most == 1  # the epoch-end saver alone, at the epoch's end


class CountsCheckpointCallbacks(CountsValidations):
    """The most checkpoint callbacks the Trainer held at a training batch's start or the
    epoch's end."""

    def __init__(self) -> None:
        super().__init__()
        self.most = 0

    def _count(self, trainer: lightning.Trainer) -> None:
        self.most = max(self.most, len(trainer.checkpoint_callbacks))

    def on_train_batch_start(self, trainer: lightning.Trainer, *hook_args: Any) -> None:
        self._count(trainer)

    def on_train_epoch_end(self, trainer: lightning.Trainer, pl_module: Any) -> None:
        self._count(trainer)


class RecordsCheckpointCallback(ValidatesEveryTwoBatches):
    """Records ``trainer.checkpoint_callback`` at each validation batch."""

    def __init__(self) -> None:
        super().__init__()
        self.seen_checkpoint_callbacks: list[Any] = []

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.seen_checkpoint_callbacks.append(self.trainer.checkpoint_callback)
        super().validation_step(batch, batch_idx)


def test_every_validation_after_an_optimizer_step_has_a_checkpoint_callback_saving_or_not(
    tmp_path: Path,
) -> None:
    """The saver waits for every mid-epoch validation that follows an optimizer step, the
    manager deciding only at the save: here, with no save due, the Trainer without a
    ``ModelCheckpoint`` has one that saved nothing in each of them, and none in the epoch-end
    validation (the epoch-end save comes after it)."""
    module = RecordsCheckpointCallback()
    fit_tiny(
        module,
        tmp_path,
        epochs=1,
        trainer_options=VALIDATING,
        every_n_epochs=None,
        every_n_steps=100,
    )
    assert distckpt.CheckpointManager(str(tmp_path), read_only=True).steps() == []
    seen = module.seen_checkpoint_callbacks
    assert len(seen) == 3 * 2  # 3 validations of 2 batches
    assert all(callback is not None and callback.best_model_path == "" for callback in seen[:4])
    assert seen[4:] == [None, None]
