"""Edge cases of schedules, best, arguments and the CLI, each pinned by a test (one process)."""

from __future__ import annotations

import contextlib
import math
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import distckpt
from distckpt import faults
from distckpt.cli import main
from tests.filesystems import MountFactory
from tests.ranks import run_ranks, values


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF
    path.write_bytes(bytes(data))


def test_best_with_verify_falls_back_past_a_corrupt_best(tmp_path: Path) -> None:
    with distckpt.CheckpointManager(tmp_path, monitor="loss", fsync=False) as mgr:
        for step, loss in ((1, 2.0), (2, 1.0), (3, 3.0)):
            mgr.save(step, {"w": torch.full((64,), float(step))}, metrics={"loss": loss})
        _flip_a_byte(tmp_path / "step-00000002" / "rank-00000.pt")
        ckpt = mgr.restore("best", verify=True)
    assert ckpt.step == 1 and torch.equal(ckpt.state["w"], torch.full((64,), 1.0))


def test_a_failed_save_does_not_suppress_the_next_scheduled_ones(tmp_path: Path) -> None:
    with distckpt.CheckpointManager(tmp_path, every_n_steps=5, fsync=False) as mgr:
        faults.arm("after_shard_write", "raise")
        with pytest.raises(distckpt.CheckpointError):
            mgr.save(5, {"s": 5})
        saved = [step for step in range(6, 12) if mgr.save(step, {"s": step}) is not None]
    assert saved == [6, 10]  # 6 retries the missed multiple; 10 is the next one


def test_a_failed_async_save_is_retried_by_the_schedule(tmp_path: Path) -> None:
    with distckpt.CheckpointManager(tmp_path, every_n_steps=5, async_save=True, fsync=False) as mgr:
        faults.arm("after_shard_write", "raise")
        mgr.save(5, {"s": 5})
        with pytest.raises(distckpt.CheckpointError):
            mgr.wait()
        assert mgr.save(6, {"s": 6}) is not None
        assert mgr.wait().step == 6


def test_a_failed_forced_async_save_leaves_the_schedule_at_the_save_before(tmp_path: Path) -> None:
    # A forced save off the schedule fails in the background: the schedule counts from
    # step 10 again, not from 15, so step 16 is not due and nothing of 15 is listed.
    with distckpt.CheckpointManager(
        tmp_path, every_n_steps=10, async_save=True, fsync=False
    ) as mgr:
        mgr.save(10, {"s": 10})
        mgr.wait()
        faults.arm("after_shard_write", "raise")
        mgr.save(15, {"s": 15}, force=True)
        with pytest.raises(distckpt.CheckpointError):
            mgr.wait()
        faults.disarm()
        assert mgr.save(16, {"s": 16}) is None
        assert mgr.steps() == [10]


def test_epoch_schedule_continues_after_a_restart(tmp_path: Path) -> None:
    with distckpt.CheckpointManager(tmp_path, every_n_epochs=1, fsync=False) as mgr:
        assert mgr.save(10, {"s": 1}, epoch=3) is not None
    with distckpt.CheckpointManager(tmp_path, every_n_epochs=1, fsync=False) as mgr:
        assert mgr.save(11, {"s": 2}, epoch=3) is None  # epoch 3 is saved already
        assert mgr.save(12, {"s": 3}, epoch=4) is not None


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda mgr: mgr.delete("5"), distckpt.InvalidStep),
        (lambda mgr: mgr.restore(3.5), distckpt.InvalidArgument),
        (lambda mgr: mgr.restore(None), distckpt.InvalidArgument),
        (lambda mgr: distckpt.load_checkpoint(123), distckpt.InvalidArgument),
    ],
)
def test_bad_arguments_are_checkpoint_errors(tmp_path: Path, call, error) -> None:
    with distckpt.CheckpointManager(tmp_path, fsync=False) as mgr:
        mgr.save(1, {"s": 1})
        with pytest.raises(error):
            call(mgr)


@pytest.mark.parametrize(
    ("step", "epoch", "error"),
    [
        ("12", None, distckpt.InvalidStep),
        (12.0, None, distckpt.InvalidStep),
        (True, None, distckpt.InvalidStep),
        (-1, None, distckpt.InvalidStep),
        (12, "2", distckpt.InvalidArgument),
        (12, 1.5, distckpt.InvalidArgument),
        (12, -1, distckpt.InvalidArgument),
    ],
)
def test_schedules_never_judge_a_bad_step_or_epoch(tmp_path: Path, step, epoch, error) -> None:
    """Both should_save and save name the bad argument, whether or not a schedule is due:
    schedules used to compare a str or float and answer, or fail with a TypeError."""
    with distckpt.CheckpointManager(
        tmp_path, every_n_steps=4, every_n_epochs=1, fsync=False
    ) as mgr:
        with pytest.raises(error):
            mgr.should_save(step, epoch=epoch)
        with pytest.raises(error):
            mgr.save(step, {"s": 1}, epoch=epoch)
        assert mgr.save(12, {"s": 1}, epoch=2) is not None  # the refusals left no trace


def _saves_a_bad_step_on_rank_1(rank: int, world_size: int, root: str) -> str:
    with distckpt.CheckpointManager(root, fsync=False, timeout=20) as mgr:
        try:
            mgr.save("7" if rank == 1 else 7, {"s": rank})
        except distckpt.CheckpointError as exc:
            return type(exc).__name__
        return "saved"


def test_a_bad_step_on_one_rank_with_no_schedule_is_refused_on_every_rank(tmp_path: Path) -> None:
    """With no schedule nothing reads the step before the save's proposal, whose collective
    carries one rank's refusal to every rank (not a timeout on the others)."""
    assert values(run_ranks(_saves_a_bad_step_on_rank_1, 2, str(tmp_path))) == ["InvalidStep"] * 2


def _saves_a_bad_step_on_rank_1_in_a_vote(
    rank: int, world_size: int, root: str, options: dict[str, Any], bad_step: object
) -> str:
    # A short timeout: a rank left waiting in the vote would end in CoordinationTimeout.
    with distckpt.CheckpointManager(root, fsync=False, timeout=5, **options) as mgr:
        try:
            mgr.save(bad_step if rank == 1 else 7, {"s": rank})
        except distckpt.CheckpointError as exc:
            return type(exc).__name__
        return "saved"


def _rank_1_catches_a_bad_step_and_saves_on(rank: int, world_size: int, root: str) -> list[str]:
    """Both ranks save steps 5, 10 and 15 on a counter schedule; rank 1 passes "5" (refused on
    it alone), catches the error and goes on."""
    outcomes: list[str] = []
    # The smallest timeout that keeps this cheap: rank 0's last save waits it out.
    mgr = distckpt.CheckpointManager(root, fsync=False, every_n_steps=5, timeout=1)
    for step in ("5" if rank == 1 else 5, 10, 15):
        try:
            mgr.save(step, {"s": rank})
            outcomes.append("saved")
        except distckpt.CheckpointError as exc:
            error_type = "CoordinationError" if isinstance(exc, distckpt.CoordinationError) else ""
            outcomes.append(f"{error_type or type(exc).__name__}: {exc}")
    with contextlib.suppress(distckpt.CheckpointError):
        mgr.close()  # the ranks are a call apart: its collective may fail
    return outcomes


def test_a_bad_step_caught_on_one_rank_leaves_the_ranks_a_call_apart(tmp_path: Path) -> None:
    """README: with counter schedules a refused step raises on its rank alone; where that rank
    catches it and saves on, the ranks are a call apart: every later save raises InvalidStep for
    different steps on both ranks, and the save no rank meets fails after the timeout."""
    rank_0, rank_1 = values(run_ranks(_rank_1_catches_a_bad_step_and_saves_on, 2, str(tmp_path)))
    assert rank_1[0].startswith("InvalidStep: step must be an int")
    assert rank_0[0].startswith("InvalidStep: the ranks passed different steps")
    assert rank_1[1].startswith("InvalidStep: the ranks passed different steps")
    assert rank_0[1].startswith("InvalidStep: the ranks passed different steps")
    assert rank_1[2].startswith("InvalidStep: the ranks passed different steps")
    assert rank_0[2].startswith("CoordinationError")


@pytest.mark.parametrize("bad_step", ["7", -1])
@pytest.mark.parametrize(
    "options",
    [
        {"min_seconds_between_saves": 60.0},
        {"every_seconds": 60.0},
        {"save_on_signal": (signal.SIGUSR1,)},
    ],
)
def test_a_bad_step_on_one_rank_before_a_vote_is_refused_on_every_rank(
    tmp_path: Path, options: dict[str, Any], bad_step: object
) -> None:
    """The throttle, ``every_seconds`` and signals decide by a vote of the ranks: the step is
    checked inside it, so one rank's refusal raises on every rank instead of leaving the
    others in the vote until their timeout."""
    out = run_ranks(_saves_a_bad_step_on_rank_1_in_a_vote, 2, str(tmp_path), options, bad_step)
    assert values(out) == ["InvalidStep"] * 2


@pytest.mark.parametrize(
    "options",
    [
        {"save_on_signal": signal.SIGTERM},
        {"save_on_signal": ("TERM",)},
        {"save_on_signal": (signal.SIGKILL,)},
        {"timeout": math.inf},
        {"timeout": -1},
        {"timeout": 0.0001},  # 0 ms to gloo, which fails every collective
        {"timeout": 0.001},  # 2 ranks failed to connect their group in it
        {"wait_for_root": -1},
        {"timeout": 10**400},  # too large for a float
        {"wait_for_root": 10**400},
        {"every_seconds": 10**400},
        {"format": "pickle"},
        {"link": "hard"},
    ],
)
def test_bad_options_are_refused_before_anything_is_set_up(tmp_path: Path, options) -> None:
    with pytest.raises(distckpt.InvalidArgument):
        distckpt.CheckpointManager(tmp_path / "root", **options)
    assert not (tmp_path / "root").exists()


def test_timeout_and_wait_for_root_take_numpy_seconds_as_every_seconds_option_does(
    tmp_path: Path,
) -> None:
    """distckpt.arguments: one reading of seconds for every option (a NumPy number from a config
    computed in NumPy was refused as a timeout and taken as every_seconds)."""
    with distckpt.CheckpointManager(
        tmp_path, timeout=np.float32(30), wait_for_root=np.int64(0), every_seconds=np.int64(30)
    ) as mgr:
        assert mgr.timeout == 30.0 and type(mgr.timeout) is float


def test_signal_handlers_are_restored_by_close(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGUSR2)
    mgr = distckpt.CheckpointManager(tmp_path, save_on_signal=(signal.SIGUSR2,), fsync=False)
    assert signal.getsignal(signal.SIGUSR2) is not before
    mgr.close()
    mgr.close()  # idempotent
    assert signal.getsignal(signal.SIGUSR2) is before


def test_cli_gc_reports_what_it_removed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with distckpt.CheckpointManager(tmp_path, fsync=False) as mgr:
        mgr.save(1, {"s": 1})
    dead = tmp_path / ".staging" / "step-00000002.dead"
    dead.mkdir(parents=True)
    assert main(["gc", str(tmp_path)]) == 0
    assert f"removed {dead}" in capsys.readouterr().out
    assert not dead.exists()


def test_cli_verify_of_a_step_with_a_broken_manifest_exits_1(tmp_path: Path) -> None:
    with distckpt.CheckpointManager(tmp_path, fsync=False) as mgr:
        mgr.save(1, {"s": 1})
    (tmp_path / "step-00000001" / "manifest.json").write_text("{not json")
    assert main(["verify", str(tmp_path / "step-00000001")]) == 1


def test_retention_leaves_no_trash_behind(tmp_path: Path) -> None:
    with distckpt.CheckpointManager(tmp_path, keep_last=1, fsync=False) as mgr:
        for step in range(1, 5):
            mgr.save(step, {"w": torch.zeros(1000)})
        mgr.delete(4)
        assert mgr.steps() == []
    assert list((tmp_path / ".trash").iterdir()) == []


def _one_rank_fails_preparing(rank: int, world_size: int, root: str, fmt: str) -> tuple[str, float]:
    import time

    from tests.test_dcp import fsdp, make_model

    model = fsdp(make_model(0), world_size)
    state = {"app": distckpt.ModelOptimizerState(model)}
    with distckpt.CheckpointManager(root, format=fmt, timeout=20) as mgr:
        mgr.save(1, state)
        started = time.monotonic()
        try:
            # Rank 1 forgets state= (the "dcp" format reads in place): rank 0 alone would
            # enter DCP's collective read and wait for rank 1 until the timeout.
            mgr.restore("last", state=state if rank == 0 else None)
        except distckpt.CheckpointError as exc:
            return type(exc).__name__, time.monotonic() - started
    return "no error", 0.0


def test_a_rank_failing_to_prepare_a_restore_fails_every_rank_at_once(tmp_path: Path) -> None:
    import torch._dynamo  # noqa: F401  -- imported once here, not in every forked rank

    from tests.ranks import run_ranks, values

    out = values(run_ranks(_one_rank_fails_preparing, 2, str(tmp_path), "dcp", timeout=60))
    assert [kind for kind, _ in out] == ["InvalidArgument", "InvalidArgument"]
    assert all(seconds < 10 for _, seconds in out), out  # well before the 20 s timeout


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-exchange", "two-renames"])
def test_overwrite_replaces_the_committed_checkpoint(
    tmp_path: Path, mounts: MountFactory, exchange: bool
) -> None:
    from distckpt import fsutil

    if not exchange:  # bindfs (FUSE) cannot swap two names, like NFS or an older kernel
        tmp_path = mounts.get("bindfs").path / "edge-overwrite"
        assert not fsutil.exchange_dirs(*_two_dirs(tmp_path / "probe"), fsync=False)
    elif not fsutil.exchange_dirs(*_two_dirs(tmp_path / "probe"), fsync=False):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not supported here")
    with distckpt.CheckpointManager(tmp_path / "root", fsync=False) as mgr:
        mgr.save(1, {"v": 1})
        mgr.save(2, {"v": 2})
        mgr.save(2, {"v": 3}, overwrite=True)
        assert mgr.restore(2).state["v"] == 3
        assert mgr.steps() == [1, 2]
    assert distckpt.verify(tmp_path / "root").ok
    trash = tmp_path / "root" / ".trash"
    assert not trash.exists() or list(trash.iterdir()) == []
    assert not any(p.is_dir() for p in (tmp_path / "root" / ".staging").iterdir())


def _killed_right_after_the_exchange(rank: int, world_size: int, root: str) -> None:
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        mgr.save(2, {"v": 2})
        faults.arm("after_rename", "kill")  # after the exchange: the commit point
        mgr.save(2, {"v": 3}, overwrite=True)


def test_overwrite_killed_after_the_exchange_keeps_the_new_checkpoint(tmp_path: Path) -> None:
    from distckpt import fsutil
    from tests.ranks import run_ranks

    if not fsutil.exchange_dirs(*_two_dirs(tmp_path / "probe"), fsync=False):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not supported here")
    root = tmp_path / "root"
    assert run_ranks(_killed_right_after_the_exchange, 0, str(root), expect_killed=True) == []
    assert distckpt.load_checkpoint(root / "step-00000002").state["v"] == 3
    with distckpt.CheckpointManager(root) as mgr:  # the next start removes the old one
        assert mgr.restore("last").state["v"] == 3
    assert not any(p.is_dir() for p in (root / ".staging").iterdir())
    assert distckpt.verify(root).ok


def _two_dirs(parent: Path) -> tuple[Path, Path]:
    (parent / "a").mkdir(parents=True)
    (parent / "b").mkdir()
    return parent / "a", parent / "b"


@pytest.mark.parametrize(
    ("fmt", "name", "allowed"),
    [
        ("torch", "rank-00000.pt", False),
        ("torch", "manifest.json", False),
        ("torch", "sub/dir.txt", False),
        ("torch", "config.json", True),
        ("dcp", ".metadata", False),
        ("dcp", "__0_0.distcp", False),
        ("dcp", "rank-00000.pt", True),  # not a dcp checkpoint's own file
    ],
)
def test_extra_files_may_not_take_the_formats_own_names(
    tmp_path: Path, fmt: str, name: str, allowed: bool
) -> None:
    with distckpt.CheckpointManager(tmp_path, format=fmt, fsync=False) as mgr:
        if allowed:
            mgr.save(1, {"a": torch.ones(2)}, files={name: b"x"})
            assert (tmp_path / "step-00000001" / name).read_bytes() == b"x"
        else:
            with pytest.raises(distckpt.InvalidArgument):
                mgr.save(1, {"a": torch.ones(2)}, files={name: b"x"})
            assert mgr.steps() == []


def _one_rank_fails_reading(rank: int, world_size: int, root: str) -> tuple[str, int]:
    collectives: list[str] = []
    with distckpt.CheckpointManager(root, format="torch", timeout=20) as mgr:
        mgr.save(1, {"w": torch.zeros(1000)})
        mgr.restore(1)  # a restore that works, first
        stop = distckpt.events.add_listener(
            lambda event: (
                collectives.append(event.phase) if event.phase.startswith("collective.") else None
            )
        )
        try:
            # Rank 1's template has the wrong shape: only its read fails.
            mgr.restore(1, state={"w": torch.zeros(1000 if rank == 0 else 3)})
        except distckpt.CheckpointError as exc:
            return type(exc).__name__, len(collectives)
        finally:
            stop()
    return "no error", len(collectives)


def test_a_rank_failing_to_read_a_torch_checkpoint_fails_every_rank(tmp_path: Path) -> None:
    """The "torch" format reads without collectives: prepare and read share one agreement
    (after rank 0's broadcast of what to read), and one rank's failure still reaches both."""
    from tests.ranks import run_ranks, values

    out = values(run_ranks(_one_rank_fails_reading, 2, str(tmp_path), timeout=60))
    (kind,) = {kind for kind, _ in out}
    assert kind != "no error"
    assert [count for _, count in out] == [2, 2]


@pytest.mark.parametrize("name", ["step-5", "step-0000000005", "step-000000005"])
def test_a_step_dir_of_another_width_is_listed_and_restored(tmp_path: Path, name: str) -> None:
    """Committed dirs are named with at least 8 digits, but any width parses: a dir renamed
    by hand (or written by another tool) still counts as its step."""
    with distckpt.CheckpointManager(tmp_path, fsync=False) as mgr:
        mgr.save(3, {"w": torch.full((2,), 3.0)})
        mgr.save(5, {"w": torch.full((2,), 5.0)})
    (tmp_path / "step-00000005").rename(tmp_path / name)  # "last" now names nothing
    with distckpt.CheckpointManager(tmp_path, fsync=False) as mgr:
        assert mgr.steps() == [3, 5]
        assert [info.step for info in mgr.checkpoints()] == [3, 5]
        assert mgr.latest_step() == 5
        assert torch.equal(mgr.restore(5).state["w"], torch.full((2,), 5.0))
        assert mgr.restore("last").step == 5
        assert mgr.gc() == [] and (tmp_path / name).is_dir()  # a step, no leftover
        assert main(["verify", str(tmp_path)]) == 0
        # Steps above 8 digits are the same rule the other way: a wider name of distckpt's own.
        wide = mgr.save(123_456_789, {"w": torch.zeros(2)})
        assert wide.path == tmp_path / "step-123456789"
        assert mgr.steps() == [3, 5, 123_456_789]
        mgr.delete(5)
        assert not (tmp_path / name).exists()
    assert distckpt.load_checkpoint(tmp_path / "step-123456789").step == 123_456_789


@pytest.mark.parametrize("rank", ["0", 0.0, True, -1])
def test_load_checkpoint_and_export_refuse_a_rank_that_is_no_rank(tmp_path: Path, rank) -> None:
    """rank= is None or an int from 0: a str, a float, a bool (an int to Python, whose True
    would read rank 1) or a negative int is InvalidArgument, from one check both share."""
    with distckpt.CheckpointManager(tmp_path / "root", fsync=False) as mgr:
        mgr.save(1, {"w": torch.ones(1)})
    with pytest.raises(distckpt.InvalidArgument, match="rank must be"):
        distckpt.load_checkpoint(tmp_path / "root", rank=rank)
    with pytest.raises(distckpt.InvalidArgument, match="rank must be"):
        distckpt.export(tmp_path / "root", tmp_path / "out.pt", rank=rank)
    assert distckpt.load_checkpoint(tmp_path / "root", rank=0).step == 1


@pytest.mark.parametrize("map_location", ["nonsense", {"cpu": 5}, {"cpu": "nowhere"}, 3.5])
def test_a_map_location_torch_cannot_take_is_refused_before_reading(
    tmp_path: Path, map_location
) -> None:
    """Refused as InvalidArgument by load_checkpoint and restore alike, before anything is
    read (not torch's RuntimeError from inside the read, nor a RankFailure)."""
    with distckpt.CheckpointManager(tmp_path, fsync=False) as mgr:
        mgr.save(1, {"w": torch.ones(1)})
        with pytest.raises(distckpt.InvalidArgument, match="map_location"):
            mgr.restore(map_location=map_location)
    with pytest.raises(distckpt.InvalidArgument, match="map_location"):
        distckpt.load_checkpoint(tmp_path, map_location=map_location)


@pytest.mark.parametrize(
    "map_location",
    [None, "cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda storage, location: storage],
)
def test_every_kind_of_map_location_torch_takes_is_accepted(tmp_path: Path, map_location) -> None:
    with distckpt.CheckpointManager(tmp_path, fsync=False) as mgr:
        mgr.save(1, {"w": torch.ones(1)})
        restored = mgr.restore(map_location=map_location)
    assert restored is not None and torch.equal(restored.state["w"], torch.ones(1))
    loaded = distckpt.load_checkpoint(tmp_path, map_location=map_location)
    assert torch.equal(loaded.state["w"], torch.ones(1))


def _restore_with_map_location_bad_on_rank_1(
    rank: int, world_size: int, root: str
) -> tuple[str, int | None]:
    with distckpt.CheckpointManager(root, fsync=False, timeout=30) as mgr:
        mgr.save(1, {"w": torch.ones(3)})
        try:
            mgr.restore(map_location="nonsense" if rank == 1 else "cpu")
        except distckpt.CheckpointError as exc:
            return type(exc).__name__, exc.rank
    raise AssertionError("a restore with a bad map_location on rank 1 succeeded")


def test_a_bad_map_location_on_one_rank_is_raised_on_every_rank(tmp_path: Path) -> None:
    # Checked inside the restore's agreement: the rank with good arguments is told at once
    # instead of waiting for its peer until the timeout.
    out = values(run_ranks(_restore_with_map_location_bad_on_rank_1, 2, str(tmp_path)))
    assert [rank for _, rank in out] == [1, 1]
    assert out[1][0] == "InvalidArgument"
