"""distckpt.lightning.DistckptCallback with the callbacks' own ``on_save_checkpoint`` /
``on_load_checkpoint`` hooks, in small real fits on one device run in the test's process (a
second or two each), held to Lightning's own checkpoint (``ModelCheckpoint`` and ``ckpt_path``)
and to the uninterrupted fit. The fit killed with SIGKILL and resumed with such a callback is in
``tests/test_lightning_callbacks.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lightning")

import lightning
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.utilities.model_helpers import is_overridden

import distckpt
from distckpt.lightning import DistckptCallback
from distckpt.lightning_extras import LIGHTNING_ENTRIES, MODULE_STATE_MARK, from_bytes
from tests.lightning_callbacks_job import ONE_QUIET_DEVICE
from tests.lightning_tiny import FailsInSecondEpoch, TinyModule, fit_tiny

pytestmark = pytest.mark.timeout(120)

#: What the hooks of one fit and its resume did, in order.
Events = list[tuple[Any, ...]]


class CountsInHooks(lightning.Callback):
    """Counts optimizer steps, kept through its checkpoint hooks alone under ``key``, and its
    own saves through ``state_dict()``; records every checkpoint call in ``events``."""

    def __init__(self, name: str, key: str, events: Events) -> None:
        self.name = name
        self.key = key
        self.events = events
        self.steps = 0
        self.saves = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        self.saves += 1
        self.events.append(("state_dict", self.name))
        return {"saves": self.saves}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.events.append(("load_state_dict", self.name, state_dict))
        self.saves = state_dict["saves"]

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.events.append(("on_save_checkpoint", self.name))
        checkpoint[self.key] = self.steps

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.events.append(("on_load_checkpoint", self.name, checkpoint.get(self.key)))
        self.steps = checkpoint.get(self.key, 0)


class RecordsModuleHooks(FailsInSecondEpoch):
    def __init__(self, events: Events) -> None:
        super().__init__()
        self.events = events

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.events.append(("module.on_save_checkpoint",))
        checkpoint["module_key"] = "saved"

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.events.append(("module.on_load_checkpoint", checkpoint.get("module_key")))


def _failed_and_resumed(
    saver: lightning.Callback, resumed_saver: lightning.Callback, ckpt_dir: Path | None
) -> tuple[Events, list[CountsInHooks]]:
    """A 2-epoch fit that fails in epoch 1 after ``saver`` saved epoch 0, then a fresh module,
    callbacks and Trainer resuming it with ``resumed_saver`` (from Lightning's checkpoint in
    ``ckpt_dir``, if given): every checkpoint call of the hooks, and the resumed callbacks."""
    events: Events = []
    lightning_own = ckpt_dir is not None
    options = {**ONE_QUIET_DEVICE, "enable_checkpointing": lightning_own}

    def fit(module: RecordsModuleHooks, saver: lightning.Callback) -> list[CountsInHooks]:
        counters = [CountsInHooks("a", "a_steps", events), CountsInHooks("b", "b_steps", events)]
        trainer = lightning.Trainer(max_epochs=2, callbacks=[saver, *counters], **options)
        ckpt_path = next(ckpt_dir.glob("*.ckpt")) if lightning_own and not module.fail else None
        trainer.fit(module, ckpt_path=ckpt_path)
        return counters

    with pytest.raises(RuntimeError, match="failing on purpose"):
        fit(RecordsModuleHooks(events), saver)
    events.append(("failed",))
    resumed = RecordsModuleHooks(events)
    resumed.fail = False
    return events, fit(resumed, resumed_saver)


def test_callbacks_hooks_resume_a_failed_fit_as_from_lightnings_own_checkpoint(
    tmp_path: Path,
) -> None:
    """The same calls in the same order as with ``ModelCheckpoint`` and ``ckpt_path``: at a save
    every callback's ``state_dict()``, every callback's ``on_save_checkpoint``, the module's; at
    the resume the module's ``on_load_checkpoint``, every callback's (with the key it added),
    every callback's ``load_state_dict``; and the count kept in the hooks alone goes on."""
    lightning_dir = tmp_path / "lightning"
    own = _failed_and_resumed(
        ModelCheckpoint(dirpath=lightning_dir),
        ModelCheckpoint(dirpath=lightning_dir),
        lightning_dir,
    )
    root = str(tmp_path / "distckpt")
    ours = _failed_and_resumed(
        DistckptCallback(root, every_n_epochs=1, fsync=False),
        DistckptCallback(root, every_n_epochs=1, fsync=False),
        None,
    )
    assert ours[0] == own[0]
    at_save = [("state_dict", "a"), ("state_dict", "b")]
    at_save += [("on_save_checkpoint", "a"), ("on_save_checkpoint", "b")]
    at_save += [("module.on_save_checkpoint",)]
    resume = [("module.on_load_checkpoint", "saved")]
    resume += [("on_load_checkpoint", "a", 2), ("on_load_checkpoint", "b", 2)]
    resume += [("load_state_dict", "a", {"saves": 1}), ("load_state_dict", "b", {"saves": 1})]
    assert ours[0] == [*at_save, ("failed",), *resume, *at_save]
    assert [counter.steps for counter in ours[1]] == [4, 4]


class SameKey(CountsInHooks):
    """Adds ``steps`` times its ``factor`` under the key ``steps``, like every other one."""

    def __init__(self, name: str, factor: int, events: Events) -> None:
        super().__init__(name, "steps", events)
        self.factor = factor

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[self.key] = self.steps * self.factor


class AddsNothing(lightning.Callback):
    """Has both hooks; its ``on_save_checkpoint`` adds nothing. Keeps the dict it loads."""

    def __init__(self) -> None:
        self.loaded: dict[str, Any] | None = None

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["epoch"] = checkpoint["epoch"]  # the same value: nothing to save

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.loaded = checkpoint


class RewritesEntries(lightning.Callback):
    """Has no ``on_load_checkpoint``; its ``on_save_checkpoint`` replaces Lightning's
    ``state_dict`` entry (frozen weights left out), which nothing would read back."""

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        weights = checkpoint["state_dict"].items()
        checkpoint["state_dict"] = {key: value for key, value in weights if "backbone" not in key}


def test_two_callbacks_adding_the_same_key_each_get_their_own_and_adding_nothing_costs_nothing(
    tmp_path: Path,
) -> None:
    """Each callback's hook has a dict of its own, saved under its ``state_key``: both get back
    the value they added under ``steps`` (in Lightning's one dict the second overwrote the
    first's). A callback whose hook added nothing has no entry in the checkpoint, and its
    ``on_load_checkpoint`` gets Lightning's entries alone; one without ``on_load_checkpoint``
    whose hook replaced an entry of Lightning's has none either (a copy no hook reads back)."""
    events: Events = []
    first = [SameKey("one", 1, events), SameKey("ten", 10, events), AddsNothing()]
    first.append(RewritesEntries())
    trainer = lightning.Trainer(
        max_epochs=1,
        callbacks=[DistckptCallback(str(tmp_path), every_n_epochs=1, fsync=False), *first],
        **ONE_QUIET_DEVICE,
    )
    trainer.fit(TinyModule())
    manager = distckpt.CheckpointManager(str(tmp_path), read_only=True)
    saved = manager.restore("last").state["lightning"]["callback_checkpoints"]
    manager.close()
    assert from_bytes(saved, "the hooks' keys") == {
        first[0].state_key: {"steps": 2},
        first[1].state_key: {"steps": 20},
    }
    resumed = [SameKey("one", 1, events), SameKey("ten", 10, events), AddsNothing()]
    trainer = lightning.Trainer(
        max_epochs=1,
        callbacks=[DistckptCallback(str(tmp_path), every_n_epochs=1, fsync=False), *resumed],
        **ONE_QUIET_DEVICE,
    )
    trainer.fit(TinyModule())  # nothing left to train: restores only
    assert [counter.steps for counter in resumed[:2]] == [2, 20]
    assert resumed[2].loaded is not None and resumed[2].loaded.keys() == set(LIGHTNING_ENTRIES)


@pytest.mark.parametrize("checkpoint_format", ["torch", "dcp"])
def test_lightnings_ema_callback_resumes_a_failed_fit_exactly(
    tmp_path: Path, checkpoint_format: str
) -> None:
    """``EMAWeightAveraging`` saves the averaged weights by replacing ``state_dict`` in its dict
    and reads them back from there: kept for it (its class has an ``on_load_checkpoint``), the
    resumed fit ends with the uninterrupted fit's averaged weights, bit for bit. It also moves
    the given ``state_dict`` to ``current_model_state`` and loads the module from it: that one
    is refilled at resume from the restored module."""
    torch.manual_seed(0)
    uninterrupted = TinyModule()
    lightning.Trainer(
        max_epochs=2, callbacks=[EMAWeightAveraging(decay=0.5)], **ONE_QUIET_DEVICE
    ).fit(uninterrupted)
    torch.manual_seed(0)
    failing = FailsInSecondEpoch()
    with pytest.raises(RuntimeError, match="failing on purpose"):
        fit_tiny(
            failing,
            tmp_path,
            epochs=2,
            callbacks=[EMAWeightAveraging(decay=0.5)],
            format=checkpoint_format,
        )
    resumed = FailsInSecondEpoch()
    resumed.fail = False
    trainer = fit_tiny(
        resumed,
        tmp_path,
        epochs=2,
        callbacks=[EMAWeightAveraging(decay=0.5)],
        format=checkpoint_format,
    )
    assert trainer.callbacks[0].resumed_from == 2
    # At the fit's end the callback copies the averaged weights into the module.
    for name, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


class WideModule(TinyModule):
    """:class:`TinyModule` with a head of 64 KiB of weights, which a checkpoint's size shows."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Sequential(torch.nn.Linear(4, 4096), torch.nn.Linear(4096, 1))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.head(self.backbone(batch)).square().mean()


#: The most ``EMAWeightAveraging`` may add to a checkpoint, in module sizes, per format: the
#: averaged weights once, raw in "torch", pickled in "dcp" (as bytes, half as large again).
EMA_COST_IN_MODULE_SIZES = {"torch": 1.25, "dcp": 1.75}


def _checkpoint_bytes(root: Path, checkpoint_format: str, callbacks: list[Any]) -> int:
    """The size of the data files of the checkpoint of a 1-epoch fit of :class:`WideModule`."""
    torch.manual_seed(0)
    fit_tiny(WideModule(), root, epochs=1, callbacks=callbacks, format=checkpoint_format)
    (step,) = root.glob("step-*")
    return sum(path.stat().st_size for path in step.iterdir() if path.suffix != ".json")


@pytest.mark.parametrize("checkpoint_format", ["torch", "dcp"])
def test_the_ema_callback_costs_its_averaged_weights_alone(
    tmp_path: Path, checkpoint_format: str
) -> None:
    """``EMAWeightAveraging`` adds the averaged weights to a checkpoint, once: its
    ``current_model_state``, the module's ``state_dict`` itself, is saved as a mark (the module
    is saved whole already). In "torch" the callbacks' states and hook keys are ``uint8``
    tensors, written raw, not ``bytes`` pickled as text."""
    plain = _checkpoint_bytes(tmp_path / "plain", checkpoint_format, [])
    root = tmp_path / "ema"
    with_ema = _checkpoint_bytes(root, checkpoint_format, [EMAWeightAveraging(decay=0.5)])
    module_bytes = sum(
        value.numel() * value.element_size() for value in WideModule().state_dict().values()
    )
    assert with_ema - plain < EMA_COST_IN_MODULE_SIZES[checkpoint_format] * module_bytes
    if checkpoint_format == "dcp":
        return  # read back whole by "torch" alone: DCP needs the saved structure given
    with distckpt.CheckpointManager(str(root), read_only=True) as manager:
        loaded = manager.restore("last")
    assert loaded is not None
    saved = loaded.state["lightning"]
    assert all(isinstance(value, torch.Tensor) for value in saved.values())
    (kept,) = from_bytes(saved["callback_checkpoints"], "the hooks' keys").values()
    assert kept["current_model_state"] == MODULE_STATE_MARK
    assert kept["state_dict"].keys() == WideModule().state_dict().keys()


def test_a_model_checkpoint_beside_it_is_resumed_as_any_other_callback(tmp_path: Path) -> None:
    """With ``enable_checkpointing=True``, a ``ModelCheckpoint`` may save beside it: its
    ``state_dict()`` is saved and loaded like every callback's (the resumed one knows the best
    checkpoint it wrote, as after Lightning's own ``ckpt_path``), and it has no checkpoint hooks
    of its own to call."""
    assert not is_overridden("on_save_checkpoint", ModelCheckpoint, lightning.Callback)
    assert not is_overridden("on_load_checkpoint", ModelCheckpoint, lightning.Callback)
    options = {**ONE_QUIET_DEVICE, "enable_checkpointing": True}
    writers = []
    for _ in range(2):  # the second fit has nothing left to train: restores only
        writer = ModelCheckpoint(dirpath=tmp_path / "lightning")
        saving = DistckptCallback(str(tmp_path / "distckpt"), every_n_epochs=1, fsync=False)
        lightning.Trainer(max_epochs=1, callbacks=[saving, writer], **options).fit(TinyModule())
        writers.append(writer)
    assert saving.resumed_from == 2
    assert writers[1].best_model_path == writers[0].best_model_path != ""
