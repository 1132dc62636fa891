"""What distckpt.lightning.DistckptCallback restores besides the module, optimizers and loops:
the callbacks' states (EarlyStopping, the Timer of ``max_time``), the keys a callback's and the
module's ``on_save_checkpoint`` add and the datamodule's ``state_dict``, in real Trainers killed
with SIGKILL and fitted again (``tests/lightning_callbacks_job.py``)."""

from __future__ import annotations

import copy
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lightning")

import lightning

import distckpt
from distckpt import reader
from distckpt.errors import InvalidArgument
from distckpt.lightning import DistckptCallback
from distckpt.lightning_extras import LIGHTNING_ENTRIES
from tests import killing, lightning_callbacks_job

JOB = "tests/lightning_callbacks_job.py"
FIXTURES = Path(__file__).parent / "fixtures"
pytestmark = pytest.mark.timeout(300)

#: The uninterrupted fit: EarlyStopping stops it after epoch 2 (its best metric: epoch 0's), 3
#: epochs of 2 batches, saved at each epoch's end. Its job's ``final.pt``, as the module doc of
#: ``tests/lightning_callbacks_job.py`` works it out (a constant: no reference run needed).
UNINTERRUPTED = {
    "stopped_epoch": 2,
    "best_score": 0.0,
    "global_step": 6,
    "epochs": 3,
    "saves": 3,
    "batches_seen": 6,
    "batches_counted_in_hooks": 6,
}
#: Its checkpoints: one at each epoch's end, at the steps the optimizer really took (plain SGD,
#: whose empty state torch's ``get_state_dict`` creates by a step of its own at every "dcp"
#: save: a step no tracker may count).
UNINTERRUPTED_CHECKPOINT_STEPS = [2, 4, 6]


def checkpoint_steps(root: Path) -> list[int]:
    """The steps of the checkpoints committed in ``root``."""
    with distckpt.CheckpointManager(str(root)) as manager:
        return manager.steps()


def _killed_at_epoch_2(
    factory: pytest.TempPathFactory, tmp_path: Path, options: list[str]
) -> tuple[list[str], Path]:
    """The job's command with ``options``, and its output directory, after it ran until the
    start of epoch 2 (after epoch 1's checkpoint) and was killed there: that run is made once
    per session for each ``options``, and copied into ``tmp_path`` for the test to go on."""

    def killed(root: Path, out: Path) -> None:
        waiting = [JOB, str(root), str(out), *options, "--wait-at-epoch", "2"]
        assert killing.run(waiting, out, kill_after=1, counted="waiting.txt")

    name = "lightning-callbacks-killed" + "".join(options)
    shared_out, shared_root = killing.shared_output(factory, name, killed)
    out, root = tmp_path / "out", tmp_path / "root"
    shutil.copytree(shared_out, out)
    shutil.copytree(shared_root, root)
    return [JOB, str(root), str(out), *options], out


@pytest.mark.parametrize("checkpoint_format", ["torch", "dcp"])
def test_a_fit_killed_between_epochs_stops_early_where_the_uninterrupted_one_does(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, checkpoint_format: str
) -> None:
    """Resumed from epoch 1's checkpoint, EarlyStopping goes on counting epochs without
    improvement from 1 (it stopped the fit 2 epochs late without its state), the module's
    count of saves, the datamodule's of batches and the count of batches a callback keeps in
    its checkpoint hooks alone go on from the checkpoint's, that callback's
    ``on_load_checkpoint`` gets Lightning's entries and the key its ``on_save_checkpoint``
    added, and the dict
    the module's ``on_load_checkpoint`` gets holds exactly what its ``on_save_checkpoint`` added
    (a tuple, an int key, an empty dict: the "dcp" format alone would not bring them back).
    The checkpoints, before the kill and after the resume, land at the uninterrupted fit's
    steps."""
    command, out = _killed_at_epoch_2(tmp_path_factory, tmp_path, ["--format", checkpoint_format])
    assert checkpoint_steps(tmp_path / "root") == UNINTERRUPTED_CHECKPOINT_STEPS[:2]
    assert not killing.run(command, out)
    assert torch.load(out / "final.pt") == UNINTERRUPTED
    assert checkpoint_steps(tmp_path / "root") == UNINTERRUPTED_CHECKPOINT_STEPS
    loaded = torch.load(out / "module-loaded.pt", weights_only=True)
    assert loaded.keys() == {*LIGHTNING_ENTRIES, "saves", "values"} and loaded["saves"] == 2
    values = loaded["values"]
    assert values.keys() == {"pair", 3, "empty"}
    assert type(values["pair"]) is tuple and values["pair"] == (1, "two")
    assert torch.equal(values[3], torch.tensor([1.5])) and values["empty"] == {}
    callback_loaded = torch.load(out / "callback-loaded.pt", weights_only=True)
    assert callback_loaded.keys() == {*LIGHTNING_ENTRIES, "batches"}
    assert callback_loaded["batches"] == 4 and callback_loaded["global_step"] == 4


def test_a_resumed_fit_counts_the_training_time_before_the_kill_against_max_time(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Killed at the start of epoch 2 (the same killed run as the "torch" test above) and run
    again with ``max_time`` no longer than the training time the first run had at epoch 1's
    checkpoint: the restored Timer finds the time used up and the fit stops before its first
    batch (without its state, the Timer counted from 0 and the fit trained on). That run's
    EarlyStopping has ``mode="max"``, so another ``state_key``: as in Lightning, the
    checkpoint's state of the "min" one is warned about, and the "max" one keeps its own (its
    best score is still its initial one, not the "min" one's), while the rest restores."""
    command, out = _killed_at_epoch_2(tmp_path_factory, tmp_path, ["--format", "torch"])
    trained_microseconds = int((out / "waiting.txt").read_text())
    assert trained_microseconds > 0
    limited = [*command, "--max-time-us", str(trained_microseconds), "--early-stopping-mode", "max"]
    assert not killing.run(limited, out)
    final = torch.load(out / "final.pt")
    counts = ("global_step", "batches_seen", "saves", "batches_counted_in_hooks")
    assert tuple(final[count] for count in counts) == (4, 4, 2, 4)
    assert final["best_score"] == -math.inf
    log = (out / "job.log").read_text()
    assert "The checkpoint holds the state of callbacks this Trainer does not have" in log
    assert "Missing: [\"EarlyStopping{'monitor': 'val_metric', 'mode': 'min'}\"]" in log


def test_a_checkpoint_saved_before_callback_states_were_saved_still_resumes(tmp_path: Path) -> None:
    """``tests/fixtures/lightning-before-callback-states``: epoch 1's checkpoint of the job, saved
    by the callback before it saved callbacks' states and the module's ``on_save_checkpoint``
    dict. It resumes (from step 4, the datamodule's count with it), with nothing to give
    EarlyStopping, whose count starts again: it stops the fit after epoch 4, not 2, and neither
    the module's ``on_load_checkpoint`` nor the callbacks' are called (the callback counting
    batches in its hooks counts from 0 again: the 6 batches after step 4)."""
    root = tmp_path / "root"
    shutil.copytree(FIXTURES / "lightning-before-callback-states", root)
    out = tmp_path / "out"
    out.mkdir()
    assert not killing.run([JOB, str(root), str(out)], out)
    final = torch.load(out / "final.pt")
    assert final == {
        "stopped_epoch": 4,
        "best_score": 2.0,
        "global_step": 10,
        "epochs": 5,
        "saves": 3,
        "batches_seen": 10,
        "batches_counted_in_hooks": 6,
    }
    assert not (out / "module-loaded.pt").exists()
    assert not (out / "callback-loaded.pt").exists()


@pytest.mark.parametrize("checkpoint_format", ["torch", "dcp"])
def test_a_checkpoint_saved_before_callback_hooks_were_called_still_resumes(
    tmp_path: Path, checkpoint_format: str
) -> None:
    """``tests/fixtures/lightning-before-callback-hooks``: epoch 1's checkpoint of the job in
    each format, saved by the callback before it called the callbacks' ``on_save_checkpoint``
    (with the callbacks' states and the module's dict). It resumes as the uninterrupted fit
    does, EarlyStopping's and the module's state included, but for the callback keeping its
    count in its hooks alone: its ``on_load_checkpoint`` gets Lightning's entries only, so its
    count starts again from 0 (the 2 batches of epoch 2). The "dcp" one is at step 5, not 4:
    it was saved when the step tracker still counted the step torch's ``get_state_dict`` takes
    at every save of a plain SGD; the trainer's own loop state, restored with it, is right.
    The callback counts on from the checkpoint's step, not from the tracker's count saved in
    it (one more, that step counted), so the next checkpoint is 2 steps (one epoch) after it."""
    root = tmp_path / "root"
    shutil.copytree(FIXTURES / "lightning-before-callback-hooks" / checkpoint_format, root)
    out = tmp_path / "out"
    out.mkdir()
    assert not killing.run([JOB, str(root), str(out), "--format", checkpoint_format], out)
    assert torch.load(out / "final.pt") == {**UNINTERRUPTED, "batches_counted_in_hooks": 2}
    assert torch.load(out / "module-loaded.pt", weights_only=True)["saves"] == 2
    callback_loaded = torch.load(out / "callback-loaded.pt", weights_only=True)
    assert callback_loaded.keys() == set(LIGHTNING_ENTRIES)
    assert callback_loaded["global_step"] == 4 and callback_loaded["epoch"] == 1
    assert checkpoint_steps(root) == ([4, 6] if checkpoint_format == "torch" else [5, 7])


def test_a_checkpoint_lacking_a_key_no_older_layout_lacks_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The torch fixture above without its module's dict: the callbacks' states alone, a key
    under the optional whole of the callback's own keys but none an older layout lacks. Its
    resume is refused, naming the key, as a strict restore refuses a key on one side only:
    before anything is loaded, the trainer's loops, the module and the step tracker as the
    fit built them."""
    with distckpt.CheckpointManager(
        str(FIXTURES / "lightning-before-callback-hooks" / "torch"), read_only=True
    ) as fixture:
        saved = fixture.restore("last")
    assert saved is not None
    del saved.state["lightning"]["module_checkpoint"]
    root, out = tmp_path / "root", tmp_path / "out"
    out.mkdir()
    with distckpt.CheckpointManager(str(root), fsync=False) as manager:
        manager.save(saved.step, saved.state, epoch=saved.epoch, metrics=saved.metrics)
    at_refusal: dict[str, Any] = {}
    fit_start = DistckptCallback.on_fit_start

    def noting_what_the_refusal_left(
        callback: DistckptCallback, trainer: lightning.Trainer, module: lightning.LightningModule
    ) -> None:
        before = _fit_state(callback, trainer, module)
        try:
            fit_start(callback, trainer, module)
        finally:
            at_refusal.update(before=before, after=_fit_state(callback, trainer, module))

    # Wrapped, not replaced: the callback's own on_fit_start runs, observed on both sides.
    monkeypatch.setattr(DistckptCallback, "on_fit_start", noting_what_the_refusal_left)
    monkeypatch.setattr(sys, "argv", [JOB, str(root), str(out), "--format", "torch"])
    with pytest.raises(InvalidArgument, match=r"\['lightning\.module_checkpoint'\]"):
        lightning_callbacks_job.main()
    before, after = at_refusal["before"], at_refusal["after"]
    assert after.pop("tracker_step") == 0  # built afresh, not the checkpoint's count (4)
    before.pop("tracker_step")
    before_parameters, after_parameters = before.pop("parameters"), after.pop("parameters")
    assert before_parameters.keys() == after_parameters.keys()
    for name, value in before_parameters.items():
        assert torch.equal(after_parameters[name], value), name
    assert after == before


def _fit_state(
    callback: DistckptCallback, trainer: lightning.Trainer, module: lightning.LightningModule
) -> dict[str, Any]:
    """What a resume restores into the trainer, the module, its datamodule and the callback's
    step tracker (None before the callback builds it), copied."""
    return {
        "global_step": trainer.global_step,
        "fit_loop": copy.deepcopy(trainer.fit_loop.state_dict()),
        "parameters": {name: value.detach().clone() for name, value in module.state_dict().items()},
        "datamodule": dict(trainer.datamodule.state_dict()),
        "tracker_step": callback.tracker.step if callback.tracker is not None else None,
    }


@pytest.mark.parametrize(
    "fixture",
    [
        "lightning-before-callback-states",
        "lightning-before-callback-hooks/torch",
        "lightning-before-callback-hooks/dcp",
    ],
)
def test_a_checkpoint_of_an_older_layout_is_read_once_at_its_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fixture: str
) -> None:
    """The fixtures of the tests above, resumed in this process (the job's ``main``): each
    checkpoint is read once, though it lacks the keys of the callbacks' hooks (or the
    callbacks' states with them), not once per layout tried. Counted at both steps of a read:
    the preparation (where "dcp" reads its metadata and refuses a key on one side only) and
    the read of the state (where "torch" refuses it)."""
    root, out = tmp_path / "root", tmp_path / "out"
    shutil.copytree(FIXTURES / fixture, root)
    out.mkdir()
    # Nothing in distckpt counts reads: counted at the functions every rank's read of a
    # checkpoint goes through (a fit saves but never reads otherwise).
    prepared: list[str] = []
    reads: list[str] = []
    prepare_read, read_state = reader.prepare_read, reader.read_state

    def counted_prepare(source: Any, *args: Any, **kwargs: Any) -> Any:
        prepared.append(source.name)
        return prepare_read(source, *args, **kwargs)

    def counted_read(source: Any, *args: Any, **kwargs: Any) -> Any:
        reads.append(source.name)
        return read_state(source, *args, **kwargs)

    monkeypatch.setattr(reader, "prepare_read", counted_prepare)
    monkeypatch.setattr(reader, "read_state", counted_read)
    checkpoint_format = fixture.split("/")[1] if "/" in fixture else "torch"
    monkeypatch.setattr(sys, "argv", [JOB, str(root), str(out), "--format", checkpoint_format])
    lightning_callbacks_job.main()
    assert len(prepared) == 1 and len(reads) == 1, (prepared, reads)
    assert (out / "final.pt").exists()  # the fit ran on; the tests above hold what it resumed
