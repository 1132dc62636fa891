"""Exact resume of a plain DDP loop that follows the README's recipe, killed with SIGKILL.

``tests/ddp_job.py`` (2 gloo ranks, a ``StatefulDataLoader`` with 2 workers) runs once
uninterrupted, shared by every test here, and again killed at seeded moments — mid-epoch, at an
epoch's end, inside an async save — and re-run with the same command: every micro-batch's loss
on every rank and the final parameters, optimizer, scheduler and RNG states must equal the
reference's bit for bit. Leaving any one piece of the recipe out breaks it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

pytest.importorskip("torchdata")

from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler

import distckpt
from distckpt.layout import step_dir_name
from tests import killing
from tests.ddp_job import STEPS_PER_EPOCH, WORLD_SIZE

JOB = "tests/ddp_job.py"
#: rank 0's loss lines per epoch: one per micro-batch
BATCHES_PER_EPOCH = STEPS_PER_EPOCH * 2
pytestmark = pytest.mark.timeout(420)


@pytest.fixture
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return killing.shared_reference(tmp_path_factory, "ddp", JOB)


def _command(tmp_path: Path, *options: str) -> tuple[list[str], Path]:
    out = tmp_path / "resumed"
    out.mkdir()
    return [JOB, str(tmp_path / "root"), str(out), *options], out


def test_killed_ddp_job_resumes_exactly(tmp_path: Path, reference: Path) -> None:
    command, out = _command(tmp_path)
    # The first kill right after the last batch of epoch 0, then two seeded moments.
    moments = [BATCHES_PER_EPOCH, *killing.kill_moments(5, 2, 3, 9)]
    assert killing.run_killed(command, out, moments) == 3
    killing.assert_same_run(reference, out, WORLD_SIZE)


def test_ddp_job_killed_during_async_saves_resumes_exactly(tmp_path: Path, reference: Path) -> None:
    """Killed as soon as ``save`` returns with the save still in flight (a ballast tensor in
    the state makes the background write long enough): the checkpoint being written is lost,
    the previous one is resumed from, and the run still matches."""
    command, out = _command(tmp_path, "--async-save", "--ballast-mib", "16")
    root = tmp_path / "root"
    in_flight = 0
    for moment in killing.kill_moments(4, 2, 1, 3):  # the n-th save started in this run
        assert killing.run(command, out, kill_after=moment, counted="saves-rank0.txt")
        started = int((out / "saves-rank0.txt").read_text().split()[-1])
        in_flight += not (root / step_dir_name(started)).exists()
    killing.run(command, out)
    assert in_flight >= 1, "no kill landed inside a save"
    killing.assert_same_run(reference, out, WORLD_SIZE)


@pytest.mark.parametrize("piece", ["loader", "rng", "generator", "sample-generator"])
def test_ddp_job_without_one_piece_of_the_recipe_is_not_exact(
    tmp_path: Path, reference: Path, piece: str
) -> None:
    """The loader left out of the state restarts the epoch from its first batch; the RNGs left
    out give other dropout masks; a loader without its own generator draws its workers' seed
    from the global generator, once more in the resumed run than in the reference; an
    augmentation drawing from the loader workers' own RNG instead of a generator per sample
    gets other noise for the rest of the interrupted epoch (its restarted workers draw from
    their seeds' start again)."""
    command, out = _command(tmp_path, "--leave-out", piece)
    # Past the save at step 2 (line 4 of epoch 0) and before the next one: resumed mid-epoch.
    # Without the loader the resumed run trains the epoch's first batches again, so it even
    # steps OneCycleLR more often than its total and fails; either way it is not the reference.
    with pytest.raises(AssertionError, match=r"losses differ|Tried to step 13 times"):
        assert killing.run_killed(command, out, [6]) == 1
        killing.assert_same_run(reference, out, WORLD_SIZE)


def test_plain_dataloader_saved_at_epoch_ends_resumes_exactly(
    tmp_path: Path, reference: Path
) -> None:
    """The README's rule for a plain ``DataLoader`` (no position to save): checkpoint at epoch
    ends only and seed its generator per epoch. Killed mid-epoch, the run repeats the epoch
    from its start, exactly; uninterrupted it is the StatefulDataLoader run, the reference."""
    command, out = _command(tmp_path, "--loader", "plain")
    moments = [BATCHES_PER_EPOCH + 3, BATCHES_PER_EPOCH + 5]  # mid-epoch 1, then mid-epoch 2
    assert killing.run_killed(command, out, moments) == 2
    killing.assert_same_run(reference, out, WORLD_SIZE)


class _NoiseFromTheWorkersRng(Dataset[tuple[int, torch.Tensor]]):
    """An augmentation the README's recipe warns against: noise from the loader worker's own
    global RNG."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return index, torch.randn(2)


def _loader() -> StatefulDataLoader:
    data = _NoiseFromTheWorkersRng()
    sampler = RandomSampler(data, generator=torch.Generator().manual_seed(1))
    return StatefulDataLoader(
        data, batch_size=2, sampler=sampler, num_workers=2, generator=torch.Generator()
    )


Batches = list[tuple[int, list[int], torch.Tensor]]


def _run(loader: StatefulDataLoader, epochs: range, *, stop_after: int | None = None) -> Batches:
    """(epoch, indices, noise) of each batch; with ``stop_after``, only that many batches."""
    batches: Batches = []
    for epoch in epochs:
        for indices, noise in loader:
            batches.append((epoch, indices.tolist(), noise))
            if len(batches) == stop_after:
                return batches
    return batches


def test_workers_rng_is_not_restored_mid_epoch_but_later_epochs_get_the_same_seeds(
    tmp_path: Path,
) -> None:
    """The README's limit, measured: restored mid-epoch (a fresh loader and generator, as in a
    new process), an augmentation drawing from the workers' own RNG differs for the rest of the
    interrupted epoch, on the same samples; from the next epoch on, it draws exactly what the
    uninterrupted run drew, without the loader's generator in the checkpoint (the restored
    iterator draws its seed from it once, as the interrupted one did)."""
    epochs = range(3)
    reference = _run(_loader(), epochs)
    interrupted = _loader()
    first = _run(interrupted, epochs, stop_after=3)
    with distckpt.CheckpointManager(tmp_path, fsync=False) as mgr:
        mgr.save(1, {"loader": interrupted})
        resumed = _loader()
        untouched = resumed.generator.get_state()
        mgr.restore("last", state={"loader": resumed})
    assert torch.equal(resumed.generator.get_state(), untouched)  # the restore drew nothing
    rest = _run(resumed, epochs)  # the rest of epoch 0, then epochs 1 and 2
    run = first + rest
    assert [batch[:2] for batch in run] == [batch[:2] for batch in reference]  # same samples
    same = [torch.equal(ours[2], theirs[2]) for ours, theirs in zip(run, reference)]
    in_epoch_0 = len([batch for batch in reference if batch[0] == 0])
    assert all(same[:3]) and not all(same[3:in_epoch_0])
    assert all(same[in_epoch_0:])


def test_loader_left_out_of_a_restore_runs_as_a_fresh_one(tmp_path: Path) -> None:
    """A restore that asks a fresh loader for its template but never loads into it (its
    checkpoint lacks the loader, ``strict=False``) leaves it as a fresh one: every epoch has
    the order and the workers' noise of an untouched loader's (a kept iterator gave the second
    epoch the first one's noise again)."""
    epochs = range(2)
    reference = _run(_loader(), epochs)
    with distckpt.CheckpointManager(tmp_path, fsync=False) as mgr:
        mgr.save(1, {"w": torch.ones(1)})  # saved before the loader was in the state
        left_out = _loader()
        mgr.restore("last", state={"w": torch.zeros(1), "loader": left_out}, strict=False)
    run = _run(left_out, epochs)
    assert [batch[:2] for batch in run] == [batch[:2] for batch in reference]
    assert all(torch.equal(ours[2], theirs[2]) for ours, theirs in zip(run, reference))


class _NoiseFromTheMainProcessRng(Dataset[tuple[int, torch.Tensor]]):
    """An augmentation drawn from torch's global RNG, which with ``num_workers=0`` is the main
    process's: an ``RNGState`` in the state restores it."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return index, torch.rand(2)


def _single_process_loader(shuffle: str) -> StatefulDataLoader:
    data = _NoiseFromTheMainProcessRng()
    generator = torch.Generator().manual_seed(0)
    if shuffle == "shuffle=True":  # its sampler draws the order from the loader's generator
        return StatefulDataLoader(data, batch_size=2, shuffle=True, generator=generator)
    sampler = RandomSampler(data, generator=torch.Generator().manual_seed(1))
    return StatefulDataLoader(data, batch_size=2, sampler=sampler, generator=generator)


@pytest.mark.parametrize("shuffle", ["sampler-with-own-generator", "shuffle=True"])
def test_a_single_process_loader_resumes_the_next_epoch_only_with_a_sampler_of_its_own(
    tmp_path: Path, shuffle: str
) -> None:
    """The README's second rule with ``num_workers=0``, saved mid-epoch and restored into a
    fresh loader (a new process's global RNG): with the sampler it names, the rest of the epoch
    and the next one are the uninterrupted run's, order and noise; with ``shuffle=True`` the
    rest of the epoch is, but the next epoch is shuffled differently."""
    epochs = range(2)
    torch.manual_seed(7)
    reference = _run(_single_process_loader(shuffle), epochs)
    torch.manual_seed(7)
    interrupted = _single_process_loader(shuffle)
    first = _run(interrupted, epochs, stop_after=3)  # of 4 batches an epoch
    with distckpt.CheckpointManager(tmp_path, fsync=False) as mgr:
        mgr.save(1, {"loader": interrupted, "rng": distckpt.RNGState()})
        torch.manual_seed(99)
        resumed = _single_process_loader(shuffle)
        mgr.restore("last", state={"loader": resumed, "rng": distckpt.RNGState()})
    run = first + _run(resumed, epochs)  # the rest of epoch 0, then epoch 1
    assert [batch[:2] for batch in run[:4]] == [batch[:2] for batch in reference[:4]]
    if shuffle == "shuffle=True":
        assert [batch[1] for batch in run[4:]] != [batch[1] for batch in reference[4:]]
    else:
        assert [batch[:2] for batch in run] == [batch[:2] for batch in reference]
        assert all(torch.equal(ours[2], theirs[2]) for ours, theirs in zip(run, reference))


def test_the_first_save_of_a_loader_whose_sampler_shares_its_generator_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The ``shuffle=True`` set-up of the test above, saved twice, nested, and unbatched (no
    batch sampler): one WARNING, naming their keys and the remedy; the README's set-up, and the
    ``shuffle=True`` one with workers, none."""
    shared = _single_process_loader("shuffle=True")
    own = _single_process_loader("sampler-with-own-generator")
    data = _NoiseFromTheMainProcessRng()
    unbatched = StatefulDataLoader(data, batch_size=None, shuffle=True, generator=torch.Generator())
    with_workers = StatefulDataLoader(
        data, shuffle=True, num_workers=1, generator=torch.Generator()
    )
    state = {"data": [own, {"train": shared}], "unbatched": unbatched, "workers": with_workers}
    with (
        distckpt.CheckpointManager(tmp_path, fsync=False) as mgr,
        caplog.at_level(logging.WARNING, logger="distckpt"),
    ):
        mgr.save(1, state)
        mgr.save(2, state)
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1
    assert warnings[0].startswith("data.1.train, unbatched: a data loader with num_workers=0")
    assert "sampler=torchdata.stateful_dataloader.sampler.RandomSampler(" in warnings[0]


def _shared_generator_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The messages of the shared-generator warning, apart from the save's other warnings
    (a plain loader is also a value a default restore refuses)."""
    return [record.getMessage() for record in caplog.records if record.module == "loader_warnings"]


def test_a_plain_loader_sharing_its_generator_is_told_to_switch_to_a_stateful_loader(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A plain ``DataLoader`` with ``shuffle=True`` and ``generator=`` is warned about too, and
    the remedy names the switch to ``StatefulDataLoader`` (README rule 3), not only a sampler
    it could not save a position of."""
    plain = DataLoader(_NoiseFromTheMainProcessRng(), shuffle=True, generator=torch.Generator())
    with (
        distckpt.CheckpointManager(tmp_path, fsync=False) as mgr,
        caplog.at_level(logging.WARNING, logger="distckpt"),
    ):
        mgr.save(1, {"loader": plain})
    [warning] = _shared_generator_warnings(caplog)
    assert warning.startswith("loader: a data loader with num_workers=0")
    assert "Use a torchdata StatefulDataLoader (a plain DataLoader has no position" in warning


class _GeneratorNotBuiltYet:
    """A Stateful whose ``generator`` property raises something other than AttributeError."""

    def state_dict(self) -> dict[str, int]:
        return {"x": 1}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        pass

    @property
    def generator(self) -> torch.Generator:
        raise RuntimeError("not built yet")


class _LooksUpAttributesInADict:
    """A Stateful whose ``__getattr__`` raises KeyError for a name it does not hold."""

    def state_dict(self) -> dict[str, int]:
        return {"x": 1}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        pass

    def __getattr__(self, name: str) -> object:
        raise KeyError(name)


def test_a_value_whose_attribute_lookup_raises_does_not_fail_the_save(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The shared-generator check asks every value of the state for attributes; a value whose
    lookup raises (a property's RuntimeError, a ``__getattr__``'s KeyError) is no loader, and
    the save goes on without a warning."""
    state = {"property": _GeneratorNotBuiltYet(), "getattr": _LooksUpAttributesInADict()}
    with (
        distckpt.CheckpointManager(tmp_path, fsync=False) as mgr,
        caplog.at_level(logging.WARNING, logger="distckpt"),
    ):
        assert mgr.save(1, state).step == 1
    assert _shared_generator_warnings(caplog) == []
