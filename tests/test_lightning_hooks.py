"""distckpt.lightning.DistckptCallback with the module's checkpoint hooks and the Trainer's own
checkpoint paths, in small real fits on one device run in the test's process (a second or two
each; the fits killed and resumed bit for bit are in ``tests/test_lightning.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lightning")

import lightning
import numpy as np
from lightning.pytorch.callbacks import ModelCheckpoint

import distckpt
from distckpt.errors import UnloadableState
from distckpt.lightning import DistckptCallback
from distckpt.lightning_extras import LIGHTNING_ENTRIES
from tests.lightning_callbacks_job import ONE_QUIET_DEVICE
from tests.lightning_tiny import FailsInSecondEpoch, TinyModule, fit_tiny
from tests.test_async_interrupts import _held_after_writing, _interrupted_in_the_wait

pytestmark = pytest.mark.timeout(120)


class DropsFrozenWeights(TinyModule):
    """Lightning's idiom for a fine-tune: leave the frozen weights out of the checkpoint."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.seen_at_save = sorted(checkpoint)
        checkpoint["state_dict"] = {
            key: value
            for key, value in checkpoint["state_dict"].items()
            if not key.startswith("backbone.")
        }
        checkpoint["seen_keys"] = sorted(checkpoint)


class ReadsEntries(TinyModule):
    """Reads Lightning's entries back when loading, as a hook written for Lightning does."""

    def __init__(self) -> None:
        super().__init__()
        self.loaded: dict[str, Any] | None = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mine"] = 7

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.loaded = checkpoint


def test_on_save_checkpoint_sees_lightning_entries_and_its_changes_to_them_are_not_saved(
    tmp_path: Path,
) -> None:
    """The hook finds ``state_dict`` (and the other cheap entries) and may rewrite it; the model
    is still saved whole, from the module itself: the frozen weights come back on resume."""
    first = DropsFrozenWeights()
    fit_tiny(first, tmp_path, epochs=1)
    assert first.seen_at_save == sorted(LIGHTNING_ENTRIES)  # all of them, as in Lightning's
    resumed = DropsFrozenWeights()
    trainer = fit_tiny(resumed, tmp_path, epochs=1)  # nothing left to train: restores only
    assert trainer.callbacks[0].resumed_from == 2
    assert torch.equal(resumed.backbone.weight, first.backbone.weight)
    assert torch.equal(resumed.head.weight, first.head.weight)


def test_on_load_checkpoint_gets_lightning_entries_after_the_restore_and_the_added_keys(
    tmp_path: Path,
) -> None:
    """``epoch``, ``global_step``, ``pytorch-lightning_version`` and ``state_dict`` (the restored
    module's), and exactly what ``on_save_checkpoint`` added."""
    fit_tiny(ReadsEntries(), tmp_path, epochs=1)
    resumed = ReadsEntries()
    fit_tiny(resumed, tmp_path, epochs=2)
    assert resumed.loaded is not None
    assert set(resumed.loaded) == {*LIGHTNING_ENTRIES, "mine"}
    assert resumed.loaded["mine"] == 7
    assert resumed.loaded["global_step"] == 2 and resumed.loaded["epoch"] == 0
    assert resumed.loaded["pytorch-lightning_version"] == lightning.__version__
    assert resumed.loaded["state_dict"].keys() == resumed.state_dict().keys()


class FailsOnce(FailsInSecondEpoch):
    """Fails in its second epoch's first batch until told otherwise; records what
    ``trainer.checkpoint_callback`` is in its hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.seen_checkpoint_callbacks: list[Any] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)  # raises first while failing
        self.seen_checkpoint_callbacks.append(self.trainer.checkpoint_callback)
        return loss

    def on_train_epoch_end(self) -> None:
        self.seen_checkpoint_callbacks.append(self.trainer.checkpoint_callback)


def test_a_failed_fit_leaves_the_trainer_as_lightning_does_and_a_second_fit_resumes(
    tmp_path: Path,
) -> None:
    """After a fit that raised, the Trainer has no checkpoint callback (Lightning calls only
    ``on_exception`` then, not ``teardown``), so ``test(ckpt_path="best")`` raises Lightning's
    own ValueError, and a second fit on the same Trainer resumes from the saved epoch (the root
    was still held by the first fit's manager). During the fits, a Trainer without a
    ``ModelCheckpoint`` has no ``checkpoint_callback`` but at an epoch-end save, when it is one
    that saved nothing (empty ``best_model_path``)."""
    module = FailsOnce()
    callback = DistckptCallback(str(tmp_path), every_n_epochs=1, fsync=False)
    trainer = lightning.Trainer(max_epochs=2, callbacks=[callback], **ONE_QUIET_DEVICE)
    with pytest.raises(RuntimeError, match="failing on purpose"):
        trainer.fit(module)
    assert trainer.checkpoint_callbacks == []
    with pytest.raises(ValueError, match="`ModelCheckpoint` is not configured"):
        trainer.test(module, ckpt_path="best", dataloaders=module.train_dataloader())
    module.fail = False
    trainer.fit(module)
    assert callback.resumed_from == 2 and trainer.global_step == 4
    assert trainer.checkpoint_callback is None
    # Each fit's epoch 0 or 1: 2 batches, then the epoch's end.
    seen = module.seen_checkpoint_callbacks
    assert [callback is None for callback in seen] == [True, True, False] * 2
    assert seen[2].best_model_path == seen[2].last_model_path == ""


def test_a_fit_given_a_lightning_checkpoint_over_a_restored_root_is_refused_before_training(
    tmp_path: Path,
) -> None:
    """Lightning restores ``ckpt_path``'s optimizers, schedulers and loop progress after
    ``on_fit_start``, over the callback's restore of ``last``: the fit would train on a mix of
    two checkpoints. Refused on the fit's start, nothing trained or saved; a callback on a
    root without checkpoints lets the fit start from Lightning's checkpoint."""
    root = tmp_path / "root"
    lightning_checkpoint = tmp_path / "lightning.ckpt"
    fit_tiny(TinyModule(), root, epochs=1).save_checkpoint(lightning_checkpoint)
    fit_tiny(TinyModule(), root, epochs=2)  # the root's last is step 4, the file's step 2

    def fit_from(callback_root: Path) -> tuple[lightning.Trainer, DistckptCallback]:
        callback = DistckptCallback(str(callback_root), every_n_epochs=1, fsync=False)
        trainer = lightning.Trainer(max_epochs=3, callbacks=[callback], **ONE_QUIET_DEVICE)
        trainer.fit(TinyModule(), ckpt_path=lightning_checkpoint)
        return trainer, callback

    with pytest.raises(distckpt.InvalidArgument, match="Leave ckpt_path out") as refused:
        fit_from(root)
    assert refused.value.path == str(lightning_checkpoint) and refused.value.step == 4
    assert sorted(path.name for path in root.glob("step-*")) == ["step-00000002", "step-00000004"]
    trainer, callback = fit_from(tmp_path / "fresh")
    assert callback.resumed_from is None and trainer.global_step == 6


def test_a_fit_given_a_lightning_checkpoint_of_the_restored_progress_resumes(
    tmp_path: Path,
) -> None:
    """A ``ModelCheckpoint(save_last=True)`` beside the callback, saving at the same epochs,
    and a job script that always calls ``fit(ckpt_path="last")``: Lightning's ``last.ckpt`` is
    of the step the callback restored, no mix, and every run resumes."""
    options = {
        key: value for key, value in ONE_QUIET_DEVICE.items() if key != "enable_checkpointing"
    }

    def fit_for(epochs: int) -> tuple[lightning.Trainer, DistckptCallback]:
        callback = DistckptCallback(str(tmp_path / "root"), every_n_epochs=1, fsync=False)
        beside = ModelCheckpoint(dirpath=tmp_path / "lightning", save_last=True)
        trainer = lightning.Trainer(
            max_epochs=epochs, callbacks=[callback, beside], enable_checkpointing=True, **options
        )
        trainer.fit(TinyModule(), ckpt_path="last")
        return trainer, callback

    fit_for(1)
    for epochs in (2, 3):
        trainer, callback = fit_for(epochs)
        assert callback.resumed_from == 2 * (epochs - 1) and trainer.global_step == 2 * epochs


class NumpyState(lightning.Callback):
    """A callback whose state holds a numpy scalar, which torch's weights-only load refuses."""

    def state_dict(self) -> dict[str, Any]:
        return {"best": np.float64(0.5)}


class NumpyHook(TinyModule):
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["best"] = np.float64(0.5)


class AddsNumpy(lightning.Callback):
    """A callback whose ``on_save_checkpoint`` adds a numpy scalar."""

    def on_save_checkpoint(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        checkpoint: dict[str, Any],
    ) -> None:
        checkpoint["best"] = np.float64(0.5)


@pytest.mark.parametrize("checkpoint_format", ["torch", "dcp"])
def test_a_state_a_resume_could_not_load_is_refused_at_the_save(
    tmp_path: Path, checkpoint_format: str
) -> None:
    """It saved, and then every resume failed with advice (allow_pickle=True) the callback does
    not take: now the first save raises UnloadableState naming it (a callback's state, what a
    callback's ``on_save_checkpoint`` added, what the module's added), and nothing is
    committed."""
    with pytest.raises(UnloadableState, match="the callback 'NumpyState'") as refused:
        fit_tiny(TinyModule(), tmp_path, 1, callbacks=[NumpyState()], format=checkpoint_format)
    assert refused.value.state_key == "NumpyState" and "numpy" in refused.value.refused
    assert "allow_pickle" not in str(refused.value)
    with pytest.raises(UnloadableState, match="callback 'AddsNumpy' added") as refused:
        fit_tiny(TinyModule(), tmp_path, 1, callbacks=[AddsNumpy()], format=checkpoint_format)
    assert refused.value.state_key == "AddsNumpy" and "numpy" in refused.value.refused
    with pytest.raises(UnloadableState, match="on_save_checkpoint added") as refused:
        fit_tiny(NumpyHook(), tmp_path, epochs=1, format=checkpoint_format)
    assert refused.value.state_key == "on_save_checkpoint"
    manager = distckpt.CheckpointManager(str(tmp_path))
    assert manager.steps() == []
    manager.close()


@pytest.mark.parametrize(("first", "then"), [("torch", "dcp"), ("dcp", "torch")])
def test_a_run_that_changes_its_format_resumes(tmp_path: Path, first: str, then: str) -> None:
    """The checkpoint is read in the layout of its own format, not of the one the resumed run
    saves in (the keys did not match), and the run goes on saving in its new format."""
    saved = ReadsEntries()
    fit_tiny(saved, tmp_path, epochs=1, format=first)
    resumed = ReadsEntries()
    trainer = fit_tiny(resumed, tmp_path, epochs=2, format=then)
    assert trainer.callbacks[0].resumed_from == 2 and resumed.loaded is not None
    assert resumed.loaded["mine"] == 7
    assert trainer.callbacks[0].last_save.step == 4
    manager = distckpt.CheckpointManager(str(tmp_path))
    assert [info.format for info in manager.checkpoints()] == [first, then]
    manager.close()


def test_last_save_is_the_newest_checkpoint_saved_not_a_later_call_that_saved_nothing(
    tmp_path: Path,
) -> None:
    """``last_save`` is the result of the newest checkpoint the fit saved: step 3 (the second
    epoch's first batch), not the epoch-end call at step 4 that was not due (it read None)."""
    trainer = fit_tiny(TinyModule(), tmp_path, epochs=2, every_n_epochs=None, every_n_steps=3)
    callback = trainer.callbacks[0]
    assert trainer.global_step == 4
    assert callback.last_save is not None and callback.last_save.step == 3


def test_a_teardown_whose_close_was_interrupted_keeps_the_manager_to_close_again(
    tmp_path: Path,
) -> None:
    """A Ctrl-C in the manager's close() during teardown (its wait for the async save) leaves
    the callback's manager there, so that teardown (or the manager's close()) again finishes
    the close and the next fit can take the root."""
    callback = DistckptCallback(str(tmp_path), async_save=True, fsync=False)
    trainer = lightning.Trainer(callbacks=[callback], logger=False, enable_progress_bar=False)
    module = TinyModule()
    callback.setup(trainer, module, "fit")
    assert callback.manager is not None
    with _held_after_writing(1) as release:
        callback.manager.save(1, {"w": torch.ones(4)})
        _interrupted_in_the_wait(
            lambda: callback.teardown(trainer, module, "fit"), lambda save: release.set()
        )
    assert callback.manager is not None
    callback.teardown(trainer, module, "fit")
    assert callback.manager is None
    with distckpt.CheckpointManager(tmp_path) as successor:
        assert successor.steps() == [1]
