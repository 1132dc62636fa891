"""distckpt.lightning.DistckptCallback in real Trainers, killed with SIGKILL and fitted again.

Each case (one device with manual optimization and validation; DDP on 2 CPU processes with
gradient accumulation, in the "torch" format and, killed after chosen saves, the "dcp" one) runs
``tests/lightning_job.py`` once uninterrupted (the reference, shared by the tests here) and again
killed at seeded random moments, or right after chosen saves, and re-run with the same command:
every batch's loss and the final parameters, optimizer, scheduler and RNG states must equal the
reference's bit for bit.
"""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("torchdata")

import lightning

from distckpt.errors import WorldSizeMismatch
from distckpt.layout import step_dir_name
from distckpt.lightning import DistckptCallback
from distckpt.manifest import read_manifest
from tests import job_servers, killing
from tests.lightning_callbacks_job import ONE_QUIET_DEVICE
from tests.lightning_job import DropoutModule

JOB = "tests/lightning_job.py"
pytestmark = pytest.mark.timeout(420)

#: One device, manual optimization, a validation after each epoch: 12 batches an epoch.
ONE_DEVICE = ["--devices", "1", "--optimization", "manual", "--validate"]
#: DDP on 2 CPU processes, automatic optimization accumulating 2 micro-batches: 40 samples are
#: 5 batches an epoch per rank, so each epoch's last batch steps alone, its accumulation window
#: ended early (3 optimizer steps an epoch).
DDP = ["--devices", "2", "--optimization", "auto", "--samples", "40"]
#: The same DDP job checkpointing in the "dcp" format: the module and optimizers through
#: ModelOptimizerState, the rest of the training state as each rank's own.
DDP_DCP = [*DDP, "--format", "dcp"]


def _reference(factory: pytest.TempPathFactory, options: list[str]) -> Path:
    """The uninterrupted fit with ``options``, one per session, shared by the tests here. The
    checkpoint format is left out: saving in either must not change the fit (the "dcp" case
    below holds a resumed "dcp" fit to the "torch" one, bit for bit)."""
    if "--format" in options:
        at = options.index("--format")
        options = options[:at] + options[at + 2 :]
    return killing.shared_reference(factory, "lightning" + "".join(options), JOB, options)


def _resumed(tmp_path: Path, options: list[str], moments: list[int]) -> tuple[Path, int]:
    out = tmp_path / "resumed"
    out.mkdir()
    command = [JOB, str(tmp_path / "root"), str(out), *options]
    return out, killing.run_killed(command, out, moments)


def _assert_same_fit(reference: Path, resumed: Path, options: list[str]) -> None:
    """Every training batch, every validation batch (with ``--validate``) and the final state
    of every rank equal the reference's."""
    devices = int(options[options.index("--devices") + 1])
    killing.assert_same_run(reference, resumed, devices, skip=["resumed_from"])
    if "--validate" in options:
        for rank in range(devices):
            validated = killing.losses(resumed, rank, "val")
            assert validated == killing.losses(reference, rank, "val"), "validation differs"


@pytest.mark.parametrize(
    ("options", "seed"),
    [(ONE_DEVICE, 1), (DDP, 5)],
    ids=["one-device-manual-optimization", "ddp-accumulation"],
)
def test_killed_fit_resumes_exactly(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, options: list[str], seed: int
) -> None:
    reference = _reference(tmp_path_factory, options)
    batches = killing.losses(reference, 0).keys()  # rank 0's, over the whole fit
    # Within the first third of a run, so that a kill the test notices a few batches late
    # still leaves the resumed run enough batches to be killed in.
    moments = killing.kill_moments(seed, 2, 3, len(batches) // 3)
    resumed, killed = _resumed(tmp_path, options, moments)
    assert killed == 2
    _assert_same_fit(reference, resumed, options)


@pytest.mark.parametrize(
    ("options", "saved_at"),
    [(ONE_DEVICE, ["0 11", "1 3"]), (DDP, ["1 4", "2 3"]), (DDP_DCP, ["1 4", "2 3"])],
    ids=["one-device-manual-optimization", "ddp-accumulation", "ddp-accumulation-dcp"],
)
def test_fit_killed_after_an_epoch_end_save_and_after_the_next_save_resumes_exactly(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    options: list[str],
    saved_at: list[str],
) -> None:
    """Step 6 is saved at the end of an epoch (``saved_at``: epoch and last batch), once the
    epoch's validation has run; the job waits after that save and is SIGKILLed there, runs
    again, is SIGKILLed right after its next save (step 8, mid-epoch), and runs to the end.
    Every batch and validation must be run exactly as in the uninterrupted run: an epoch-end
    checkpoint once resumed into the epoch after next, once skipped the validation that followed
    it, and a checkpoint taken after resuming from one left the epoch counters a step behind, so
    that resuming from it trained the epoch's first batches again (OneCycleLR: "Tried to step
    10 times")."""
    reference = _reference(tmp_path_factory, options)
    out = tmp_path / "resumed"
    out.mkdir()
    command = [JOB, str(tmp_path / "root"), str(out), *options]
    for step in (6, 8):
        waiting = [*command, "--wait-after-step", str(step)]
        assert killing.run(waiting, out, kill_after=1, counted="saved-rank0.txt")
        if step == 6 and "--validate" in options:
            # Saved after the epoch's validation: its metric is there, and step 4's was not.
            root = tmp_path / "root"
            assert "val_loss" not in read_manifest(root / step_dir_name(4)).metrics
            assert "val_loss" in read_manifest(root / step_dir_name(6)).metrics
    assert (out / "saved-rank0.txt").read_text().splitlines() == saved_at
    assert not killing.run(command, out)
    _assert_same_fit(reference, out, options)
    for rank in range(int(options[1])):
        assert torch.load(out / f"final-rank{rank}.pt", weights_only=False)["resumed_from"] == 8
    for rank in range(int(options[1])):
        # Each rank's own on_save_checkpoint dict and callback state, at both resumes, in
        # Lightning's order: the module's on_load_checkpoint before the callbacks' states.
        loaded = (out / f"loaded-rank{rank}.txt").read_text().splitlines()
        assert loaded == [f"hook {rank}", f"callback {rank}"] * 2
    if "dcp" in options:
        # README: besides the module and optimizers, each rank's own training state (its loader
        # position, its RNGs) is saved, so one rank does not resume the 2 ranks' checkpoint.
        # The job's fit on one device, here in the test's process (a launch costs seconds).
        alone = lightning.Trainer(
            max_epochs=3,
            callbacks=[DistckptCallback(str(tmp_path / "root"), format="dcp")],
            use_distributed_sampler=False,
            **ONE_QUIET_DEVICE,
        )
        with pytest.raises(WorldSizeMismatch, match="saved by 2 ranks"):
            alone.fit(DropoutModule(out, "auto", "stateful", samples=40))


def test_plain_dataloader_mid_epoch_resume_is_not_exact(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The same job with a plain DataLoader (no loader position in the checkpoint) resumes the
    epoch from its first batch: the check above catches it. Uninterrupted, the plain loader
    gives the StatefulDataLoader's run exactly, so that run is the reference."""
    reference = _reference(tmp_path_factory, ONE_DEVICE)
    resumed, killed = _resumed(tmp_path, [*ONE_DEVICE, "--loader", "plain"], [10])  # mid-epoch 0
    assert killed == 1
    with pytest.raises(AssertionError, match="losses differ"):
        killing.assert_same_run(reference, resumed, 1, skip=["resumed_from"])


def test_importing_distckpt_does_not_import_lightning() -> None:
    code = "import sys, distckpt; assert 'lightning' not in sys.modules, sorted(sys.modules)"
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=job_servers.ROOT, env=job_servers._env()
    )


def test_the_launch_directorys_lightning_callback_is_the_packages() -> None:
    """launch/README.md: ``launch/lightning_callback.py`` imports the package's callback."""
    script = job_servers.ROOT / "launch" / "lightning_callback.py"
    assert runpy.run_path(str(script))["DistckptCallback"] is DistckptCallback
