"""What a manager leaves behind it and what it needs before it: after close() and
destroy_process_group() nothing of the old process group is held (it can be initialised again on
the same port), a closed async manager holds no copy of the state, a writing manager refuses to
start before init_process_group() where the launcher says there are several ranks, and a second
manager on a root this process holds says so."""

from __future__ import annotations

import datetime
import gc
import multiprocessing
import os
import signal
import socket
import threading
import weakref
from multiprocessing.synchronize import Barrier as BarrierType
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import distckpt
from distckpt import coord_groups
from distckpt.lease import LeaseHolder
from tests.ports import ReservedPort
from tests.ranks import run_ranks, values
from tests.test_async_interrupts import _held_after_writing, _interrupted_in_the_wait

#: A rank's seconds for a collective, and for the store's rendezvous.
TIMEOUT = 10.0


def _listens(port: int) -> bool:
    """Whether a server accepts connections on 127.0.0.1:``port``."""
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _initialised_again(
    rank: int, world_size: int, root: str, port: int, both_in: BarrierType, destroyed: EventType
) -> tuple[bool, float, int, list[int]]:
    """One life of the process group (manager, save, close, a group retired, destroy), then a
    second on the same port: whether rank 0 still listened on it in between, the second life's
    all_reduce of ones, the step its manager saved and the steps it lists. Rank 1 starts the
    second life once rank 0 ``destroyed`` the first: a client that came sooner could join the
    old store's server."""
    # The harness's group meets in a file store; what must go with a destroyed group is the
    # TCPStore server that init_process_group starts on rank 0, so the ranks make their own.
    # Not before both are here: a rank still connecting the harness's group fails when its
    # peer destroys it under it.
    both_in.wait()
    dist.destroy_process_group()
    delta = datetime.timedelta(seconds=TIMEOUT)

    def initialise() -> None:
        address = f"tcp://127.0.0.1:{port}"
        dist.init_process_group(
            "gloo", init_method=address, rank=rank, world_size=world_size, timeout=delta
        )

    initialise()
    first = distckpt.CheckpointManager(root, timeout=TIMEOUT)
    first.save(1, {"w": torch.ones(2)})
    first.close()  # kept referenced: a closed manager must not hold the group either
    # A group retired as if a collective had failed on it: the retired list must not hold it
    # (and the old store with it) past the destroy either.
    coord_groups.retire_private_group(coord_groups.take_private_group((0, 1), TIMEOUT))
    dist.destroy_process_group()
    still_listening = rank == 0 and _listens(port)
    if rank == 0:
        destroyed.set()
    else:
        assert destroyed.wait(TIMEOUT)
    initialise()
    total = torch.ones(1)
    dist.all_reduce(total)
    second = distckpt.CheckpointManager(root, timeout=TIMEOUT)
    saved = second.save(2, {"w": torch.ones(2)})
    assert saved is not None
    second.close()
    dist.destroy_process_group()
    return still_listening, total.item(), saved.step, second.steps()


def test_a_process_group_initialised_again_on_the_same_port_works_after_close(
    tmp_path: Path,
) -> None:
    """README: after close() and destroy_process_group(), init_process_group() may run again on
    the same MASTER_PORT: neither distckpt's pooled groups nor its retired ones keep the old
    store's server."""
    forked = multiprocessing.get_context("fork")  # the ranks are forked
    both_in, destroyed = forked.Barrier(2, timeout=TIMEOUT), forked.Event()
    with ReservedPort() as reserved:
        root, port = str(tmp_path / "r"), reserved.port
        results = values(run_ranks(_initialised_again, 2, root, port, both_in, destroyed))
    for still_listening, total, step, steps in results:
        assert not still_listening
        assert (total, step, steps) == (2.0, 2, [1, 2])


def _snapshot_buffers(mgr: distckpt.CheckpointManager) -> list[weakref.ref[torch.Tensor]]:
    """Weak references to the buffers of ``mgr``'s async snapshot (its copy of the state)."""
    assert mgr._saver is not None and mgr._saver._snapshot is not None
    buffers = [weakref.ref(buffer) for buffer in mgr._saver._snapshot._buffers.values()]
    assert buffers
    return buffers


def _all_gone(buffers: list[weakref.ref[torch.Tensor]]) -> bool:
    gc.collect()
    return all(ref() is None for ref in buffers)


def test_close_lets_go_of_the_async_saves_copy_of_the_state(tmp_path: Path) -> None:
    """README: close() lets go of an async manager's snapshot buffers, although the manager
    itself is still referenced."""
    mgr = distckpt.CheckpointManager(tmp_path / "r", async_save=True, fsync=False)
    mgr.save(1, {"w": torch.ones(8)})
    mgr.wait()
    buffers = _snapshot_buffers(mgr)
    mgr.close()
    assert _all_gone(buffers)
    assert mgr.steps() == [1]


def test_a_close_that_does_not_complete_lets_go_of_the_copy_of_the_state_too(
    tmp_path: Path,
) -> None:
    """README: a close interrupted in its wait (a Ctrl-C) does not complete, yet nothing saves
    after it: the snapshot buffers go all the same; the repeated close completes it."""
    mgr = distckpt.CheckpointManager(tmp_path / "r", async_save=True, fsync=False, timeout=TIMEOUT)
    with _held_after_writing(1) as release:
        mgr.save(1, {"w": torch.ones(8)})
        buffers = _snapshot_buffers(mgr)
        _interrupted_in_the_wait(mgr.close, lambda save: release.set())
    assert not mgr._released
    assert _all_gone(buffers)
    mgr.close()
    assert mgr._released and mgr.steps() == [1]


def test_a_close_outside_the_main_thread_with_save_on_signal_completes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """README: close() called outside the main thread, where Python cannot restore a signal
    handler, completes (lease, groups and snapshot let go of) with a warning, and the handler
    left installed hands the signal to the one it had replaced."""
    received: list[int] = []
    original = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    try:
        mgr = distckpt.CheckpointManager(
            tmp_path / "r", async_save=True, fsync=False, save_on_signal=(signal.SIGUSR1,)
        )
        mgr.save(1, {"w": torch.ones(8)})
        buffers = _snapshot_buffers(mgr)
        failures: list[BaseException] = []

        def close() -> None:
            try:
                mgr.close()
            except BaseException as exc:  # handed to the test's thread, which asserts on it
                failures.append(exc)

        closer = threading.Thread(target=close)
        closer.start()
        closer.join()
        assert failures == []
        assert mgr._released and _all_gone(buffers)
        assert "closing outside the main thread" in caplog.text
        signal.raise_signal(signal.SIGUSR1)
        assert received == [signal.SIGUSR1] and not mgr._signals.is_set()
        with distckpt.CheckpointManager(tmp_path / "r") as reopened:  # the lease was released
            assert reopened.steps() == [1]
    finally:
        signal.signal(signal.SIGUSR1, original)


def _made_before_init(
    rank: int, world_size: int, new_root: str, saved_root: str
) -> tuple[str, int | None, bool, int, float, bool]:
    """Under a launcher's environment for rank 1 of 2, with no process group: the refusal of a
    writing manager (message and rank), whether it created its root, and a read_only manager's
    world size and the value it restored; then, with WORLD_SIZE=1, whether a writing manager
    saved."""
    with pytest.raises(distckpt.CoordinationError) as refused:
        distckpt.CheckpointManager(new_root)
    reader = distckpt.CheckpointManager(saved_root, read_only=True)
    restored = reader.restore()
    assert restored is not None
    reader.close()
    created = Path(new_root).exists()
    os.environ["WORLD_SIZE"] = "1"  # as the refusal advises a process meant to run alone
    with distckpt.CheckpointManager(new_root) as alone:
        saved = alone.save(1, {"w": torch.ones(1)})
    return (
        str(refused.value),
        refused.value.rank,
        created,
        reader.world_size,
        restored.state["w"].sum().item(),
        saved is not None and saved.step == 1,
    )


def test_a_writing_manager_made_before_init_process_group_under_a_launcher_is_refused(
    tmp_path: Path,
) -> None:
    """README: where WORLD_SIZE > 1, a manager made before init_process_group() raises
    CoordinationError saying to call it first (or to set WORLD_SIZE=1 in a process meant to run
    alone, which then saves), before touching the root; a read_only one runs as rank 0 of 1."""
    saved_root = tmp_path / "saved"
    with distckpt.CheckpointManager(saved_root) as writer:
        writer.save(1, {"w": torch.ones(3)})
    launcher = {"RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "job42"}
    results = run_ranks(_made_before_init, 0, str(tmp_path / "new"), str(saved_root), env=launcher)
    message, rank, created, reader_world_size, restored, saved_alone = values(results)[0]
    assert "call torch.distributed.init_process_group() before creating the" in message
    assert "WORLD_SIZE=2" in message
    assert "a process meant to run alone can set WORLD_SIZE=1" in message
    assert rank == 1
    assert not created
    assert (reader_world_size, restored) == (1, 3.0)
    assert saved_alone


def _saved_by_two_ranks(rank: int, world_size: int, torch_root: str, dcp_root: str) -> None:
    """Step 1 in each format: "torch" with each rank's own value, "dcp" with one value."""
    with distckpt.CheckpointManager(torch_root, timeout=TIMEOUT) as mgr:
        mgr.save(1, {"w": torch.full((2,), float(rank))})
    with distckpt.CheckpointManager(dcp_root, format="dcp", timeout=TIMEOUT) as mgr:
        mgr.save(1, {"w": torch.full((2,), 7.0)})


def _read_alone(
    rank: int, world_size: int, torch_root: str, dcp_root: str
) -> tuple[int, int, list[float], list[float]]:
    """Under a launcher's environment for rank 1 of 2, with no process group: the saved and
    restoring world sizes a read_only manager's restore of the "torch" checkpoint is refused
    with, the value it restores of the "dcp" one, and rank 1's part as load_checkpoint reads
    it."""
    with (
        distckpt.CheckpointManager(torch_root, read_only=True) as reader,
        pytest.raises(distckpt.WorldSizeMismatch) as refused,
    ):
        reader.restore()
    with distckpt.CheckpointManager(dcp_root, read_only=True) as reader:
        restored = reader.restore(state={"w": torch.zeros(2)})
    assert restored is not None
    part = distckpt.load_checkpoint(torch_root, rank=1)
    return (
        refused.value.saved_world_size,
        refused.value.world_size,
        restored.state["w"].tolist(),
        part.state["w"].tolist(),
    )


def test_a_read_only_manager_under_a_launcher_runs_as_one_process_of_one_rank(
    tmp_path: Path,
) -> None:
    """README: a read_only manager made where WORLD_SIZE > 1 without a process group runs as
    one process of one rank: it restores a "dcp" checkpoint two ranks saved, refuses a "torch"
    one with WorldSizeMismatch; load_checkpoint(path, rank=...) reads a rank's part."""
    torch_root, dcp_root = str(tmp_path / "torch"), str(tmp_path / "dcp")
    values(run_ranks(_saved_by_two_ranks, 2, torch_root, dcp_root))
    launcher = {"RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "job42"}
    results = run_ranks(_read_alone, 0, torch_root, dcp_root, env=launcher)
    assert values(results)[0] == (2, 1, [7.0, 7.0], [1.0, 1.0])


@pytest.mark.parametrize("where", ["directory", "s3"])
def test_a_second_manager_on_a_root_this_process_holds_says_the_first_is_not_closed(
    tmp_path: Path, request: pytest.FixtureRequest, where: str
) -> None:
    """README: a second manager on a root whose first manager in the same process is not
    closed raises RootInUse saying that this process holds the root, an s3:// root too."""
    root, options = str(tmp_path / "r"), None
    if where == "s3":
        root = request.getfixturevalue("s3_url")
        options = request.getfixturevalue("s3_server").storage_options()
    with (
        distckpt.CheckpointManager(root, storage_options=options),
        pytest.raises(distckpt.RootInUse) as refused,
    ):
        distckpt.CheckpointManager(root, storage_options=options)
    message, holder = str(refused.value), refused.value.holder
    assert isinstance(holder, LeaseHolder) and holder.pid == os.getpid()
    assert f"root {root} is in use by this process ({holder.describe()}): " in message
    assert "another CheckpointManager on it was not closed" in message
    # closed, the first let go of it
    with distckpt.CheckpointManager(root, storage_options=options) as reopened:
        assert reopened.steps() == []
