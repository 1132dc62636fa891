"""distckpt.lightning.DistckptCallback with ``save_on_signal``, in real Trainer fits: the
signals' handlers after a fit, and preemption: the save where SIGTERM came before a point
where one can be taken, and the stop after it. Real signals, sent to the fitting process."""

from __future__ import annotations

import os
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning
import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("torchdata")

from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

import distckpt
from distckpt.lightning import DistckptCallback
from tests import job_servers
from tests.lightning_callbacks_job import ONE_QUIET_DEVICE
from tests.lightning_tiny import TinyModule, fit_tiny
from tests.test_lightning_resume_points import (
    VALIDATING,
    RecordsBatches,
    ValidatesEveryTwoBatches,
)

pytestmark = pytest.mark.timeout(120)

#: A failed fit saving on SIGTERM, then a SIGTERM to its own process: ``sys.argv[1]`` is the root.
FAILED_FIT_THEN_SIGTERM = """
import os, signal, sys
import lightning
from distckpt.lightning import DistckptCallback
from tests.lightning_callbacks_job import ONE_QUIET_DEVICE
from tests.lightning_tiny import FailsInSecondEpoch

callback = DistckptCallback(sys.argv[1], save_on_signal=(signal.SIGTERM,), fsync=False)
trainer = lightning.Trainer(max_epochs=2, callbacks=[callback], **ONE_QUIET_DEVICE)
try:
    trainer.fit(FailsInSecondEpoch())
except RuntimeError:
    print("the fit failed", flush=True)
os.kill(os.getpid(), signal.SIGTERM)
print("survived SIGTERM", flush=True)
sys.exit(3)
"""


def test_sigterm_after_a_failed_fit_terminates_the_process(tmp_path: Path) -> None:
    """Lightning wraps the callback's handler in its own during the fit and puts the closed
    manager's handler back at its teardown: the signal's default action must still be taken
    (the process went on, its SIGTERM swallowed)."""
    # In a job server: a process of its own, with the default signal handlers of a fresh
    # interpreter, which finds torch and Lightning imported already.
    finished = job_servers.run_script_preloaded(
        FAILED_FIT_THEN_SIGTERM, [str(tmp_path / "root")], tmp_path, stderr_apart=True
    )
    assert finished.stdout == "the fit failed\n", finished.stderr
    assert finished.returncode == -signal.SIGTERM, finished.stderr


@pytest.fixture
def sigterm_handler_kept() -> Iterator[None]:
    """The test process's SIGTERM handler, put back after a fit that Lightning's SIGTERM ended."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def fit_saving_on_signal_alone(
    module: lightning.LightningModule,
    root: Path,
    signum: signal.Signals,
    epochs: int = 1,
    callbacks: list[Any] | None = None,
    trainer_options: dict[str, Any] | None = None,
) -> Any:
    """:func:`fit_tiny` saving on ``signum`` alone (a step schedule that never saves here)."""
    return fit_tiny(
        module,
        root,
        epochs=epochs,
        callbacks=callbacks or [],
        trainer_options=trainer_options,
        every_n_epochs=None,
        every_n_steps=100,
        save_on_signal=(signum,),
    )


class SendsSigterm(ValidatesEveryTwoBatches):
    """Sends SIGTERM to its own process in the training batch ``(epoch, batch_idx)`` of
    ``in_training``, or in the first batch of the validation after optimizer step
    ``in_validation_after``."""

    def __init__(
        self, in_training: tuple[int, int] | None = None, in_validation_after: int | None = None
    ) -> None:
        super().__init__()
        self.in_training = in_training
        self.in_validation_after = in_validation_after

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if (self.current_epoch, batch_idx) == self.in_training:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        if self.global_step == self.in_validation_after and batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        super().validation_step(batch, batch_idx)


@pytest.mark.parametrize(
    ("sent", "trainer_options", "saved"),
    [
        ({"in_training": (0, 0)}, {"accumulate_grad_batches": 2}, 1),
        ({"in_validation_after": 2}, VALIDATING, 2),
        ({"in_validation_after": 6}, VALIDATING, 6),
    ],
    ids=["first-micro-batch-of-a-window", "mid-epoch-validation", "epoch-end-validation"],
)
@pytest.mark.usefixtures("sigterm_handler_kept")
def test_sigterm_where_no_save_can_be_taken_is_saved_at_the_next_point_then_lightning_raises(
    tmp_path: Path, sent: dict[str, Any], trainer_options: dict[str, Any], saved: int
) -> None:
    """Lightning raises ``SIGTERMException`` after the batch (or validation batch) in which
    SIGTERM came, which was before the save: in the middle of an accumulation window (saved at
    the window's last micro-batch) and during a validation (saved after it, at the epoch's end
    for the epoch's last one). Nothing was saved; now the preemption save is taken there, and
    Lightning raises after it."""
    module = SendsSigterm(**sent)
    with pytest.raises(SIGTERMException):
        fit_saving_on_signal_alone(
            module,
            tmp_path,
            signal.SIGTERM,
            trainer_options=trainer_options,
        )
    assert distckpt.CheckpointManager(str(tmp_path), read_only=True).steps() == [saved]
    assert len(module.trained) == saved * trainer_options.get("accumulate_grad_batches", 1)


class SendsSigusr1(RecordsBatches):
    """Sends SIGUSR1 to its own process in its first epoch's second batch."""

    def __init__(self) -> None:
        super().__init__(fail=False)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if (self.current_epoch, batch_idx) == (0, 1):
            os.kill(os.getpid(), signal.SIGUSR1)
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("minimum", [{"min_epochs": 3}, {"min_steps": 6}])
def test_the_trainer_stops_after_a_preemption_save_before_its_minimum_is_met(
    tmp_path: Path, minimum: dict[str, int]
) -> None:
    """Lightning ignores ``should_stop`` until ``min_epochs`` and ``min_steps`` are met: the
    fit trained on to them after the preemption save. They are lifted for the rest of that fit
    alone: the Trainer has them back for its next fit."""
    module = SendsSigusr1()
    trainer = fit_saving_on_signal_alone(
        module,
        tmp_path,
        signal.SIGUSR1,
        epochs=3,
        trainer_options=minimum,
    )
    assert module.trained == [(0, 0), (0, 1)]
    assert distckpt.CheckpointManager(str(tmp_path), read_only=True).steps() == [2]
    for limit, value in minimum.items():
        assert getattr(trainer.fit_loop, limit) == value


class SigtermAfterSaverHooks(lightning.Callback):
    """Listed after the saving callback (as Lightning lists a ``ModelCheckpoint``): sends SIGTERM
    in its ``on_train_batch_end`` after optimizer step ``after_step``."""

    def __init__(self, after_step: int) -> None:
        self.after_step = after_step

    def on_train_batch_end(self, trainer: lightning.Trainer, *hook_args: Any) -> None:
        if trainer.global_step == self.after_step:
            os.kill(os.getpid(), signal.SIGTERM)


class SigtermAtValidationEnd(ValidatesEveryTwoBatches):
    """Sends SIGTERM in its own ``on_validation_end`` (after the callbacks', so after a save
    deferred to that validation) after optimizer step ``after_step``."""

    def __init__(self, after_step: int) -> None:
        super().__init__()
        self.after_step = after_step

    def on_validation_end(self) -> None:
        if self.global_step == self.after_step:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize(
    ("module", "callbacks", "saved"),
    [
        (ValidatesEveryTwoBatches(), [SigtermAfterSaverHooks(after_step=3)], 4),
        (SigtermAtValidationEnd(after_step=2), [], 3),
    ],
    ids=["later-callback-at-batch-end", "module-validation-end-after-the-save"],
)
@pytest.mark.usefixtures("sigterm_handler_kept")
def test_sigterm_after_the_callbacks_hook_is_saved_at_the_next_step_then_lightning_raises(
    tmp_path: Path, module: ValidatesEveryTwoBatches, callbacks: list[Any], saved: int
) -> None:
    """SIGTERM coming after the saving callback's hooks of a batch, before Lightning checks its
    flag at that batch's end, is held as it comes: Lightning raised at that batch's end, with
    nothing saved; now it is saved at the next step (after its validation), then Lightning
    raises."""
    with pytest.raises(SIGTERMException):
        fit_saving_on_signal_alone(
            module,
            tmp_path,
            signal.SIGTERM,
            callbacks=callbacks,
            trainer_options=VALIDATING,
        )
    assert distckpt.CheckpointManager(str(tmp_path), read_only=True).steps() == [saved]


class StepsAtFirstBatchOnly(TinyModule):
    """Manual optimization stepping at each epoch's first batch alone, SIGTERM in its second
    (last) batch: the fit ends with no save point after the signal."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        optimizer = self.optimizers()
        self.manual_backward(super().training_step(batch, batch_idx))
        if batch_idx == 0:
            optimizer.step()
            optimizer.zero_grad()
        else:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.usefixtures("sigterm_handler_kept")
def test_sigterm_held_when_the_fit_ends_before_a_save_raises_at_its_end(tmp_path: Path) -> None:
    """Lightning alone raises ``SIGTERMException`` here; a SIGTERM held for a save that never
    came made the fit return normally."""
    with pytest.raises(SIGTERMException):
        fit_saving_on_signal_alone(
            StepsAtFirstBatchOnly(),
            tmp_path,
            signal.SIGTERM,
        )
    assert distckpt.CheckpointManager(str(tmp_path), read_only=True).steps() == []


class SigtermAtFitStart(lightning.Callback):
    """Listed after the saving callback: sends SIGTERM in its ``on_fit_start``, as during a
    long restore, before Lightning installs its own SIGTERM handler."""

    def on_fit_start(self, *hook_args: Any) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.usefixtures("sigterm_handler_kept")
def test_sigterm_during_fit_start_is_saved_at_the_first_step_then_lightning_raises(
    tmp_path: Path,
) -> None:
    """Lightning's handler, installed after ``on_fit_start``, never saw this SIGTERM: the fit
    returned normally, its signal swallowed."""
    with pytest.raises(SIGTERMException):
        fit_saving_on_signal_alone(
            TinyModule(),
            tmp_path,
            signal.SIGTERM,
            callbacks=[SigtermAtFitStart()],
        )
    assert distckpt.CheckpointManager(str(tmp_path), read_only=True).steps() == [1]


class SendsSigusr1AtFirstBatch(ValidatesEveryTwoBatches):
    """Validates after every second batch; sends SIGUSR1 to its own process in its first."""

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if (self.current_epoch, batch_idx) == (0, 0):
            os.kill(os.getpid(), signal.SIGUSR1)
        return super().training_step(batch, batch_idx)


def test_no_validation_runs_after_a_preemption_save_in_the_middle_of_an_epoch(
    tmp_path: Path,
) -> None:
    """``should_stop`` makes Lightning validate after the batch before it stops: a validation
    ran after the preemption save at step 1, spending the grace period."""
    module = SendsSigusr1AtFirstBatch()
    fit_saving_on_signal_alone(
        module,
        tmp_path,
        signal.SIGUSR1,
        trainer_options=VALIDATING,
    )
    assert distckpt.CheckpointManager(str(tmp_path), read_only=True).steps() == [1]
    assert module.trained == [(0, 0)]
    assert module.validated == {}


@pytest.mark.usefixtures("sigterm_handler_kept")
def test_sigterm_not_in_save_on_signal_is_lightnings_alone(tmp_path: Path) -> None:
    """Saving on SIGUSR1 alone, SIGTERM is not held: Lightning raises ``SIGTERMException`` at
    the end of the batch in which it came, with nothing saved."""
    module = SendsSigterm(in_training=(0, 1))
    with pytest.raises(SIGTERMException):
        fit_saving_on_signal_alone(module, tmp_path, signal.SIGUSR1)
    assert module.trained == [(0, 0), (0, 1)]
    assert distckpt.CheckpointManager(str(tmp_path), read_only=True).steps() == []


class RecordsSigtermHandlers(lightning.Callback):
    """Records, at ``on_train_start``, the functions Lightning's installed SIGTERM handler
    calls (bound methods as their functions, comparable across Trainers)."""

    def __init__(self) -> None:
        self.handlers: list[Any] = []

    def on_train_start(self, trainer: lightning.Trainer, pl_module: Any) -> None:
        installed = signal.getsignal(signal.SIGTERM)
        self.handlers = [
            getattr(handler, "__func__", handler) for handler in installed.signal_handlers
        ]


def test_sigterm_not_in_save_on_signal_keeps_lightnings_own_handler(tmp_path: Path) -> None:
    """Saving on SIGUSR1 alone, the SIGTERM handler Lightning installs calls what it calls in a
    fit without the callback: Lightning's own notifier (which, under DDP, broadcasts the signal
    from rank 0), not the callback's replacement without that broadcast."""
    lightnings_alone = RecordsSigtermHandlers()
    trainer = lightning.Trainer(max_epochs=1, callbacks=[lightnings_alone], **ONE_QUIET_DEVICE)
    trainer.fit(TinyModule())
    with_the_callback = RecordsSigtermHandlers()
    fit_saving_on_signal_alone(
        TinyModule(), tmp_path, signal.SIGUSR1, callbacks=[with_the_callback]
    )
    assert lightnings_alone.handlers  # the fits ran and Lightning installed a handler
    assert with_the_callback.handlers == lightnings_alone.handlers


#: A stand-in for SLURM's ``scontrol``: appends its arguments, and the step ``$ROOT/last`` names
#: then, to the file ``$SCONTROL_CALLS``.
SCONTROL = '#!/bin/sh\necho "$@ after $(readlink "$ROOT/last")" >> "$SCONTROL_CALLS"\n'


def _pretend_slurm(monkeypatch: pytest.MonkeyPatch, **more: str) -> None:
    """Sets the variables that make Lightning take SLURMEnvironment (one task), and ``more``."""
    # No SLURM here: its variables are what makes Lightning take SLURMEnvironment.
    variables = {
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "train",
        "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }
    # A runner that is itself a SLURM array task has these set: they would name its array.
    for name in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {**variables, **more}.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize(
    ("save_on_signal", "auto_requeue", "warned"),
    [
        ((signal.SIGTERM,), True, True),
        ((signal.SIGTERM, signal.SIGUSR1), True, False),
        ((signal.SIGTERM,), False, False),
        ((), True, False),
    ],
    ids=["sigterm-alone", "requeue-signal-saved-on", "auto-requeue-off", "no-preemption-saves"],
)
def test_under_slurm_a_requeue_signal_not_saved_on_is_warned_about(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    save_on_signal: tuple[signal.Signals, ...],
    auto_requeue: bool,
    warned: bool,
) -> None:
    """Lightning's SLURM recipe (``--signal=USR1@90``, auto-requeue on) with SIGTERM alone in
    ``save_on_signal``: Lightning's handler writes an ``hpc_ckpt_N.ckpt`` that every requeued
    fit restores and the callback refuses. Warned about at setup, saying what to do; not where
    the requeue signal is saved on too, the auto-requeue is off, or no preemption saves were
    chosen (``save_on_signal=()``, the default)."""
    _pretend_slurm(monkeypatch)
    callback = DistckptCallback(str(tmp_path), save_on_signal=save_on_signal, fsync=False)
    trainer = lightning.Trainer(
        max_steps=1,
        callbacks=[callback],
        plugins=[SLURMEnvironment(auto_requeue=auto_requeue)],
        **ONE_QUIET_DEVICE,
    )
    if warned:
        with pytest.warns(UserWarning, match=r"add signal\.SIGUSR1 to save_on_signal"):
            callback.setup(trainer, TinyModule(), "fit")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            callback.setup(trainer, TinyModule(), "fit")
    callback.teardown(trainer, TinyModule(), "fit")


@pytest.mark.parametrize(
    ("array", "job_id"),
    [({}, "4242"), ({"SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3"}, "77_3")],
    ids=["job", "array-task"],
)
def test_under_slurm_the_requeue_signal_saved_on_requeues_the_job_after_the_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, array: dict[str, str], job_id: str
) -> None:
    """Lightning installs its SLURM auto-requeue handler only where SIGUSR1 has none: the
    manager's (installed at ``setup``) turned it off, and the fit stopped after the preemption
    save with the job never requeued (it then exits 0, and SLURM counts it done). The callback
    runs ``scontrol requeue`` once the save has committed, with the job's id as Lightning forms
    it (an array task's: the array's id and the task's)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    calls = tmp_path / "scontrol-calls.txt"
    # The job's scontrol is the stand-in above, a real program on PATH.
    _pretend_slurm(
        monkeypatch,
        SCONTROL_CALLS=str(calls),
        ROOT=str(tmp_path / "root"),
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        **array,
    )
    module = SendsSigusr1()
    trainer = fit_saving_on_signal_alone(module, tmp_path / "root", signal.SIGUSR1, epochs=2)
    assert type(trainer._accelerator_connector.cluster_environment).__name__ == "SLURMEnvironment"
    assert module.trained == [(0, 0), (0, 1)]
    assert distckpt.CheckpointManager(str(tmp_path / "root"), read_only=True).steps() == [2]
    assert calls.read_text() == f"requeue {job_id} after step-00000002\n"
