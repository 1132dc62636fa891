"""Async saves on real ranks: errors reach every rank, nothing leaks, nothing hangs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import distckpt
from distckpt import faults
from distckpt.formats import format_named
from distckpt.layout import TRASH_DIR_NAME, step_dir_name
from distckpt.per_rank import PerRank
from distckpt.snapshot import SnapshotBuffers
from distckpt.state import to_plain
from tests.ranks import Collected, run_ranks, values
from tests.waiting import after_rank_0_removals, wait_until


def _snapshot_isolated(rank: int, world_size: int, root: str) -> tuple[bool, float, float]:
    weights = torch.zeros(4096)
    with distckpt.CheckpointManager(root, async_save=True, fsync=False, timeout=20) as mgr:
        pending = mgr.save(1, {"w": weights})
        weights.add_(7.0)  # the training step right after save returns
        committed = mgr.wait()
        saved = mgr.restore(1).state["w"]
        return (
            not pending.done and committed.done and committed.path == pending.path,
            float(saved.sum()),
            float(weights.sum()),
        )


def test_state_mutated_after_save_does_not_leak(tmp_path: Path) -> None:
    out = values(run_ranks(_snapshot_isolated, 2, str(tmp_path)))
    assert out == [(True, 0.0, 7.0 * 4096)] * 2


def _quick_succession(rank: int, world_size: int, root: str) -> list[int]:
    with distckpt.CheckpointManager(
        root, async_save=True, keep_last=2, fsync=False, timeout=20
    ) as mgr:
        for step in range(1, 6):
            mgr.save(step, {"w": torch.full((1000,), float(step)), "rank": rank})
        mgr.wait()
        ckpt = mgr.restore("last")
        assert float(ckpt.state["w"][0]) == 5.0 and ckpt.state["rank"] == rank
        return mgr.steps()


def test_saves_in_quick_succession_commit_in_order(tmp_path: Path) -> None:
    assert values(run_ranks(_quick_succession, 2, str(tmp_path))) == [[4, 5]] * 2


def _background_failure(rank: int, world_size: int, root: str) -> tuple[str, str, list[int]]:
    with distckpt.CheckpointManager(root, async_save=True, fsync=False, timeout=20) as mgr:
        mgr.save(1, {"w": torch.ones(10)})
        mgr.wait()
        faults.arm("after_shard_write", "raise", rank=1)
        mgr.save(2, {"w": torch.ones(10)})  # returns: the failure happens in the background
        try:
            mgr.wait()
        except distckpt.CheckpointError as exc:
            error = (type(exc).__name__, str(exc))
        else:
            error = ("none", "")
        faults.disarm()
        mgr.save(3, {"w": torch.ones(10)})  # the manager is usable after a failure
        mgr.wait()
        return (*error, mgr.steps())


def test_background_failure_on_one_rank_is_raised_on_every_rank(tmp_path: Path) -> None:
    out = values(run_ranks(_background_failure, 2, str(tmp_path)))
    for kind, message, steps in out:
        assert kind == "InjectedFault" and "rank 1" in message
        assert steps == [1, 3]
    assert not list((tmp_path / ".staging").glob("step-*"))


def _failure_raised_by_next_save(rank: int, world_size: int, root: str) -> str:
    with distckpt.CheckpointManager(root, async_save=True, fsync=False, timeout=20) as mgr:
        faults.arm("after_shard_write", "raise", rank=0)  # fires once (its first hit)
        mgr.save(1, {"w": torch.ones(10)})
        try:
            mgr.save(2, {"w": torch.ones(10)})
        except distckpt.CheckpointError as exc:
            return "rank 0" in str(exc) and "raised by save"
        return "not raised"


def test_background_failure_is_raised_by_the_next_save(tmp_path: Path) -> None:
    assert (
        values(run_ranks(_failure_raised_by_next_save, 2, str(tmp_path))) == ["raised by save"] * 2
    )


def _close_with_failure_in_flight(rank: int, world_size: int, root: str) -> str:
    mgr = distckpt.CheckpointManager(root, async_save=True, fsync=False, timeout=20)
    # Rank 1 fails before it reports to the others, like a crash at that instant.
    faults.arm("before_agreement", "raise", rank=1)
    mgr.save(1, {"w": torch.ones(10)})
    try:
        mgr.close()
    except distckpt.CheckpointError as exc:
        return type(exc).__name__
    return "not raised"


def test_close_raises_a_failure_in_flight(tmp_path: Path) -> None:
    # Rank 1 raises its own error; rank 0 learns of it as a failed collective, not a hang.
    out = values(run_ranks(_close_with_failure_in_flight, 2, str(tmp_path)))
    assert out == ["CoordinationError", "InjectedFault"]
    assert distckpt.CheckpointManager(tmp_path).steps() == []


def _training_collectives_meanwhile(rank: int, world_size: int, root: str) -> float:
    total = 0.0
    with distckpt.CheckpointManager(root, async_save=True, fsync=False, timeout=20) as mgr:
        for step in range(1, 6):
            mgr.save(step, {"w": torch.randn(20000)})
            for _ in range(20):  # the training loop's own collectives on the default group
                value = torch.ones(1)
                dist.all_reduce(value)
                total += float(value)
        mgr.wait()
    return total


def test_training_collectives_during_background_commit_do_not_deadlock(tmp_path: Path) -> None:
    assert values(run_ranks(_training_collectives_meanwhile, 2, str(tmp_path))) == [200.0] * 2


def _preempted_async(rank: int, world_size: int, root: str) -> tuple[bool, bool]:
    import os
    import signal

    with distckpt.CheckpointManager(
        root, async_save=True, every_n_steps=100, save_on_signal=(signal.SIGUSR1,), timeout=20
    ) as mgr:
        for step in range(1, 5):
            if step == 3 and rank == 0:
                os.kill(os.getpid(), signal.SIGUSR1)
            result = mgr.save(step, {"w": torch.ones(5)})
            if mgr.preempted:
                # Reported only once durable: the dir is committed right now.
                return result.done, (Path(root) / "step-00000003" / "manifest.json").exists()
    return False, False


def test_preemption_save_is_durable_before_preempted_is_reported(tmp_path: Path) -> None:
    assert values(run_ranks(_preempted_async, 2, str(tmp_path))) == [(True, True)] * 2


def _async_fsdp2(rank: int, world_size: int, root: str) -> tuple[bool, bool, bool]:
    from distckpt import ModelOptimizerState
    from tests.test_dcp import fsdp, make_model, train

    model = fsdp(make_model(0), world_size)
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    train(model, optim, range(2))
    saved = [p.to_local().clone() for p in model.parameters()]
    with distckpt.CheckpointManager(root, format="dcp", async_save=True, timeout=30) as mgr:
        pending = mgr.save(2, {"app": ModelOptimizerState(model, optim)})
        train(model, optim, range(2, 4))  # keeps training while the save is written
        committed = mgr.wait()
        fresh = fsdp(make_model(1), world_size)
        fresh_optim = torch.optim.Adam(fresh.parameters(), lr=0.01)
        mgr.restore(2, state={"app": ModelOptimizerState(fresh, fresh_optim)})
    restored_equal = all(torch.equal(a, b.to_local()) for a, b in zip(saved, fresh.parameters()))
    return not pending.done, committed.done, restored_equal


def test_async_dcp_save_of_fsdp2_model_is_a_snapshot(tmp_path: Path) -> None:
    import torch._dynamo  # noqa: F401  -- imported once here, not in every forked rank

    assert (
        values(run_ranks(_async_fsdp2, 2, str(tmp_path), timeout=120)) == [(True, True, True)] * 2
    )
    assert distckpt.verify(tmp_path).ok


def test_save_in_flight_tells_whether_the_background_save_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from distckpt.formats.torch_files import TorchFilesFormat

    # Kept as a patch: the test needs a write that is provably still running when save()
    # returns, and stays so until it says; no real filesystem here stalls a write on demand
    # (a slow disk would make the test a race).
    release = threading.Event()
    real_write = TorchFilesFormat.write

    def held_write(self, state, directory, ctx):  # type: ignore[no-untyped-def]
        release.wait(30)  # the disk is slow: the write is still going on
        return real_write(self, state, directory, ctx)

    monkeypatch.setattr(TorchFilesFormat, "write", held_write)
    with distckpt.CheckpointManager(tmp_path, async_save=True, fsync=False) as mgr:
        assert not mgr.save_in_flight
        mgr.save(1, {"w": torch.ones(3)})
        assert mgr.save_in_flight
        release.set()
        # Ended, though no wait() has its result yet: polled, as a wait() would end its being
        # in flight by itself.
        wait_until(lambda: not mgr.save_in_flight, "the background save's end", timeout=30)
        assert mgr.wait().step == 1
        assert not mgr.save_in_flight


def _failure_raised_by(rank: int, world_size: int, root: str, call: str) -> dict[str, object]:
    """A background save that fails on rank 1, then ``call``: the call that waits for it. The
    root holds work for every call but restore: steps 1 and 2 (``keep_last=1`` would prune
    step 1, which a manager without retention kept) and a leftover in the trash (for gc)."""
    out: dict[str, object] = {}
    trash_leftover = Path(root) / TRASH_DIR_NAME / "leftover"

    def root_state() -> tuple[list[int], bool]:
        return mgr.steps(), trash_leftover.exists()

    with distckpt.CheckpointManager(root, fsync=False, timeout=20) as mgr:  # keeps every step
        mgr.save(1, {"w": torch.ones(10)})
        mgr.save(2, {"w": torch.ones(10)})
    with distckpt.CheckpointManager(
        root, async_save=True, fsync=False, keep_last=1, timeout=20
    ) as mgr:
        if rank == 0:  # after the manager's start, which would collect it
            after_rank_0_removals(mgr)  # the start's, which would collect it too
            trash_leftover.mkdir(parents=True)
        faults.arm("after_shard_write", "raise", rank=1)
        mgr.save(3, {"w": torch.ones(10)})  # returns: the failure happens in the background
        calls = {
            "restore": lambda: mgr.restore("last").step,
            "delete": lambda: mgr.delete(1),
            "prune": mgr.prune,
            "gc": lambda: [Path(removed).name for removed in mgr.gc()],
        }
        try:
            calls[call]()
        except distckpt.CheckpointError as exc:
            out["error"] = (type(exc).__name__, "rank 1" in str(exc))
        # the call raised instead of running: the root is as it was (restore changes nothing,
        # so for restore the raised error is all there is to see)
        out["before"] = root_state()
        dist.barrier()  # every rank has looked before rank 0 runs the call again
        out["again"] = calls[call]()  # raised once, then done with: the call runs
        if rank == 0:  # it empties the trash in the background, once every rank has the outcome
            after_rank_0_removals(mgr)
        dist.barrier()
        out["after"] = root_state()
    return out


@pytest.mark.parametrize("call", ["restore", "delete", "prune", "gc"])
def test_background_failure_is_raised_by_the_next_call_that_waits(
    tmp_path: Path, call: str
) -> None:
    out = values(run_ranks(_failure_raised_by, 2, str(tmp_path), call))
    again, after = {
        "restore": (2, ([1, 2], True)),
        "delete": (None, ([2], False)),  # a delete empties the trash too
        "prune": ([1], ([2], False)),
        "gc": (["leftover"], ([1, 2], False)),
    }[call]
    expected = {
        "error": ("InjectedFault", True),
        "before": ([1, 2], True),
        "again": again,
        "after": after,
    }
    assert out == [expected] * 2


def _views_reaching_few_bytes() -> dict[str, torch.Tensor]:
    """Views showing many more elements than their storage holds (expanded, overlapping
    windows), and fewer (a slice with gaps, a narrow slice of a large tensor)."""
    return {
        "expanded": torch.randn(1, 1024).expand(1024, 1024),
        "unfolded": torch.randn(2048).unfold(0, 512, 1),
        "every_other": torch.randn(64, 256)[:, ::2],
        "narrow": torch.randn(1 << 16)[10:20],
    }


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
@pytest.mark.parametrize("async_save", [False, True])
def test_the_space_estimate_covers_what_the_save_writes(
    tmp_path: Path, fmt: str, async_save: bool
) -> None:
    """A save demands free space for its format's estimate of this rank's state, as it will
    write it (an async save's: its snapshot's): "dcp" writes every element of a view (an
    expanded one in full), "torch" each storage the state holds."""
    state = _views_reaching_few_bytes()
    written_format = format_named(fmt)
    to_write = SnapshotBuffers().prepare(state).state if async_save else state
    estimate = written_format.estimate_bytes(to_write)
    with distckpt.CheckpointManager(
        tmp_path, format=fmt, fsync=False, async_save=async_save
    ) as mgr:
        mgr.save(1, state)
        mgr.wait()
    written = sum(
        path.stat().st_size
        for path in (tmp_path / step_dir_name(1)).iterdir()
        if written_format.owns_file(path.name)
    )
    if fmt == "dcp":  # the expanded view in full, not its one row
        assert written >= state["expanded"].numel() * state["expanded"].element_size()
    assert estimate >= written


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_the_space_estimate_counts_values_saved_as_bytes(tmp_path: Path, fmt: str) -> None:
    """Bytes values (the Lightning callback saves callback states and the loop state as the
    torch.save bytes of them: an EMA copy of the weights, say) count in the estimate."""
    blob = bytes(4 << 20)
    state = {"w": torch.zeros(4), "extras": PerRank({"callbacks": blob})}
    written_format = format_named(fmt)
    assert written_format.estimate_bytes(to_plain(state, mark_per_rank=True)) >= len(blob)


#: Elements of the state each rank saves while the process group is destroyed: 64 MiB, whose
#: write and fsync outlast the destroy that follows the save at once.
IN_FLIGHT_ELEMENTS = 16 << 20


def _destroyed_under_a_save(rank: int, world_size: int, root: str, order: str) -> tuple[str, bool]:
    mgr = distckpt.CheckpointManager(root, async_save=True, timeout=20)
    mgr.save(1, {"w": torch.ones(IN_FLIGHT_ELEMENTS)})
    in_flight = mgr.save_in_flight
    if order == "close first":  # the README's order
        mgr.close()
        dist.destroy_process_group()
        return "closed", in_flight
    dist.destroy_process_group()
    if order == "exit":  # no close(): what the interpreter's exit hook logs
        collected = Collected()
        logging.getLogger("distckpt").addHandler(collected)
        assert mgr._background is not None
        mgr._background._finish_at_exit()  # the hook atexit runs (a rank here skips atexit)
        return "\n".join(r.getMessage() for r in collected.records), in_flight
    try:
        mgr.close()
    except distckpt.CheckpointError as exc:
        return f"{type(exc).__name__}: {exc}", in_flight
    return "closed", in_flight


def test_destroying_the_process_group_under_a_save_in_flight_says_to_close_first(
    tmp_path: Path,
) -> None:
    """README: call ``mgr.wait()`` or ``mgr.close()`` before ``destroy_process_group()``; a
    save in flight then is lost, and ``close()`` (or the exit, in the log) says so."""
    results = values(run_ranks(_destroyed_under_a_save, 2, str(tmp_path / "late"), "destroy first"))
    for message, in_flight in results:
        assert in_flight
        assert message.startswith("ProcessGroupDestroyed: "), message
        assert "call mgr.wait() or mgr.close()" in message
    assert distckpt.CheckpointManager(tmp_path / "late", read_only=True).steps() == []
    results = values(run_ranks(_destroyed_under_a_save, 2, str(tmp_path / "exit"), "exit"))
    for logged, in_flight in results:
        assert in_flight
        assert "the checkpoint save in flight at exit failed: the process group was destroyed" in (
            logged
        ), logged
    results = values(run_ranks(_destroyed_under_a_save, 2, str(tmp_path / "ok"), "close first"))
    assert results == [("closed", True)] * 2
    assert distckpt.CheckpointManager(tmp_path / "ok", read_only=True).steps() == [1]


def _user_error_over_a_failed_save(rank: int, world_size: int, root: str) -> tuple[str, str, str]:
    faults.arm("after_shard_write", "raise", rank=1)  # the save in flight fails
    try:
        with distckpt.CheckpointManager(root, async_save=True, fsync=False, timeout=20) as mgr:
            mgr.save(1, {"w": torch.ones(4)})
            raise ValueError("the training loop's own error")
    except Exception as exc:
        return type(exc).__name__, str(exc), "\n".join(getattr(exc, "__notes__", []))
    finally:
        faults.disarm()
    return "nothing raised", "", ""


def test_an_error_inside_with_is_not_replaced_by_a_failed_save(tmp_path: Path) -> None:
    """The user's exception leaves the ``with`` block; the failed save is added as a note."""
    for error_type, message, notes in values(
        run_ranks(_user_error_over_a_failed_save, 2, str(tmp_path))
    ):
        assert (error_type, message) == ("ValueError", "the training loop's own error")
        assert "closing the checkpoint manager also failed: InjectedFault" in notes, notes


def _saves_past_a_failure(rank: int, world_size: int, root: str, async_save: bool) -> list[str]:
    """``every_n_steps=5``, calls at steps 1..17, the save of step 10 failing on rank 1; what
    each call did."""
    calls = []
    with distckpt.CheckpointManager(
        root, every_n_steps=5, async_save=async_save, fsync=False, timeout=20
    ) as mgr:
        faults.arm("after_shard_write", "raise", rank=1, nth=2)  # the second save's
        try:
            for step in range(1, 18):
                try:
                    result = mgr.save(step, {"w": torch.zeros(4)})
                    calls.append("saved" if result is not None else "-")
                except distckpt.CheckpointError:
                    calls.append("raised")
        finally:
            faults.disarm()
        mgr.wait()
        calls.append(",".join(map(str, mgr.steps())))
    return calls


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_failed_save_is_retried_where_the_readme_says(tmp_path: Path, async_save: bool) -> None:
    """README, "Schedules": a failed save does not count for the schedule. A sync save's
    failure is raised by its own call (step 10), and the next call saves (11). An async one's is
    raised by the next call that waits, the next due save (15), which does not save; the call
    after it does (16)."""
    out = values(run_ranks(_saves_past_a_failure, 2, str(tmp_path), async_save))
    calls = {step: did for step, did in enumerate(out[0][:-1], start=1) if did != "-"}
    if async_save:
        assert calls == {5: "saved", 10: "saved", 15: "raised", 16: "saved"}
        assert out[0][-1] == "5,16"
    else:
        assert calls == {5: "saved", 10: "raised", 11: "saved", 15: "saved"}
        assert out[0][-1] == "5,11,15"
    assert out[0] == out[1]


def test_a_failed_save_raised_by_wait_does_not_count_for_the_schedule(tmp_path: Path) -> None:
    """README, "Schedules": a failed save does not count for the schedule. With
    ``every_n_steps=5`` and step 10 failing in the background, a ``wait()`` at step 11 raises
    its error, and step 11 is then due, counted from step 5 (still counted from 10, it would
    wait for step 15)."""
    with distckpt.CheckpointManager(tmp_path, every_n_steps=5, async_save=True, fsync=False) as mgr:
        faults.arm("after_shard_write", "raise", nth=2)  # the second save's: step 10
        for step in range(1, 11):
            mgr.save(step, {"w": torch.zeros(4)})
        with pytest.raises(distckpt.CheckpointError):
            mgr.wait()
        saved = mgr.save(11, {"w": torch.zeros(4)})
        mgr.wait()
        assert saved is not None and mgr.steps() == [5, 11]
