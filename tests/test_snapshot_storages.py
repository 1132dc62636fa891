"""Async saves' snapshots of tensors as they lie in their storages: shared where the state's
tensors share one (tied weights, views, DTensors sharing a local shard, slices far apart), and
kept with the strides and bits a sync save keeps where they are not contiguous; buffers reused
until the sharing changes, and none left half made by a failed allocation."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

import distckpt
from distckpt.snapshot import SnapshotBuffers
from tests.ranks import run_ranks, values
from tests.snapshot_states import _tensors

# --------------------------------------------------------------------------- tensors that
# share a storage: tied weights, views


def _tied_state(weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Tied weights and views of them, of other dtypes and strides, and a tensor alone."""
    return {
        "embedding": weights,
        "head": weights,  # tied to the embedding
        "slice": weights[10:20],
        "as_ints": weights.view(torch.int32)[5:9],
        "transposed": weights.view(64, -1).t(),
        "alone": torch.randn(8),
    }


def _sharing(state: dict[str, torch.Tensor]) -> dict[str, tuple[Any, ...]]:
    """How each tensor lies in its storage: which of the state's storages (numbered in order),
    its size in bytes, and the tensor's dtype, offset, shape and strides."""
    numbers: dict[int, int] = {}
    return {
        name: (
            numbers.setdefault(tensor.untyped_storage().data_ptr(), len(numbers)),
            tensor.untyped_storage().nbytes(),
            tensor.dtype,
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
        )
        for name, tensor in state.items()
    }


def test_an_async_save_keeps_the_sharing_of_storages_a_sync_save_keeps(tmp_path: Path) -> None:
    weights = torch.randn(1 << 18)  # 1 MiB: its buffer is page-aligned, as large ones are
    state = _tied_state(weights)
    expected = {name: tensor.clone() for name, tensor in state.items()}
    with distckpt.CheckpointManager(tmp_path / "sync", fsync=False) as mgr:
        mgr.save(1, state)
        from_sync = mgr.restore(1).state
    with distckpt.CheckpointManager(tmp_path / "async", fsync=False, async_save=True) as mgr:
        mgr.save(1, state)
        weights.add_(1.0)  # training goes on: the snapshot keeps what it copied
        mgr.wait()
        from_async = mgr.restore(1).state
    assert _sharing(from_async) == _sharing(from_sync)
    assert _sharing(from_async)["head"][:2] == (0, weights.nbytes)  # one storage, once
    assert len({entry[0] for entry in _sharing(from_async).values()}) == 2
    for name, tensor in expected.items():
        assert torch.equal(from_async[name], tensor), name
    (sync_file,) = (tmp_path / "sync" / "step-00000001").glob("rank-*")
    (async_file,) = (tmp_path / "async" / "step-00000001").glob("rank-*")
    assert async_file.stat().st_size == sync_file.stat().st_size


def test_shared_buffers_are_reused_until_the_sharing_changes() -> None:
    weights = torch.arange(64, dtype=torch.float32)
    buffers = SnapshotBuffers()
    state = {"a": weights[5:10], "b": weights[7:30], "c": weights.clone()}
    first = buffers.snapshot(state)
    # Only the bytes the views reach, from the lowest rounded down to 16: [16, 120).
    assert first["a"].untyped_storage().data_ptr() == first["b"].untyped_storage().data_ptr()
    assert first["a"].untyped_storage().nbytes() == 30 * 4 - 16
    assert (first["a"].storage_offset(), first["b"].storage_offset()) == (1, 3)
    addresses = [t.data_ptr() for t in _tensors(first)]
    weights.add_(1.0)
    second = buffers.snapshot(state)
    assert [t.data_ptr() for t in _tensors(second)] == addresses  # no new allocation
    for name, tensor in state.items():
        assert torch.equal(second[name], tensor), name
    # Tied otherwise (same places, shapes and dtypes): new buffers, each tensor right.
    retied = {"a": weights[5:10], "b": weights[7:30].clone(), "c": weights[:64]}
    third = buffers.snapshot(retied)
    assert [t.data_ptr() for t in _tensors(third)] != addresses
    assert third["a"].untyped_storage().data_ptr() == third["c"].untyped_storage().data_ptr()
    assert third["b"].untyped_storage().nbytes() == third["b"].nbytes
    for name, tensor in retied.items():
        assert torch.equal(third[name], tensor), name


def test_unrelated_empty_tensors_keep_storages_of_their_own_after_an_async_save(
    tmp_path: Path,
) -> None:
    """An empty tensor reaches no byte of any storage (its data_ptr is 0, as every other empty
    one's), so it shares none: two unrelated ones come back with a storage each."""
    state = {"zeros": torch.zeros(0), "ones": torch.ones(0), "weights": torch.arange(4.0)}
    with distckpt.CheckpointManager(tmp_path, fsync=False, async_save=True) as mgr:
        mgr.save(1, state)
        mgr.wait()
        restored = mgr.restore(1).state
    # Their data_ptrs are 0 alike; growing one storage tells whether the other is the same.
    restored["zeros"].untyped_storage().resize_(8)
    assert restored["ones"].untyped_storage().nbytes() == 0


def _tied_dtensors(rank: int, world_size: int) -> dict[str, bool]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world_size,))
    local = torch.arange(16.0) + rank
    tied = DTensor.from_local(local, mesh, [Shard(0)])
    state = {
        "embedding": tied,
        "head": tied,
        "slice": DTensor.from_local(local[4:8], mesh, [Shard(0)]),
    }
    snap = SnapshotBuffers().snapshot(state)
    local.add_(100.0)  # training goes on: the snapshot keeps what it copied
    locals_ = {name: value.to_local() for name, value in snap.items()}
    storages = {t.untyped_storage().data_ptr() for t in locals_.values()}
    return {
        "dtensors": all(isinstance(value, DTensor) for value in snap.values()),
        "placed": snap["head"].placements == tied.placements and snap["head"].shape == tied.shape,
        "one storage": len(storages) == 1,  # the shards share it, as the state's do
        "head": torch.equal(locals_["head"], torch.arange(16.0) + rank),
        "slice": torch.equal(locals_["slice"], torch.arange(4.0, 8.0) + rank),
    }


def test_a_lazily_conjugated_view_keeps_its_bit_and_its_storage() -> None:
    """As a sync save does: the bytes as they are, under a view with the bit set, sharing the
    storage of the tensor it views."""
    complex_ = torch.randn(6, dtype=torch.complex64)
    state = {"values": complex_, "conjugated": complex_.conj(), "negated": complex_.conj().imag}
    assert state["conjugated"].is_conj() and state["negated"].is_neg()
    snap = SnapshotBuffers().snapshot(state)
    for name, tensor in state.items():
        assert torch.equal(snap[name], tensor), name
        assert (snap[name].is_conj(), snap[name].is_neg()) == (tensor.is_conj(), tensor.is_neg())
    assert len({t.untyped_storage().data_ptr() for t in snap.values()}) == 1
    complex_.add_(1.0)  # training goes on: the snapshot keeps what it copied
    assert not torch.equal(snap["conjugated"], complex_.conj())
    # A negated view of one element is contiguous: it keeps its bit all the same.
    one = torch.randn(1, dtype=torch.complex64).conj().imag
    assert one.is_contiguous() and one.is_neg()
    (negated,) = SnapshotBuffers().snapshot([one])
    assert negated.is_neg() and torch.equal(negated, one)


def test_dtensors_sharing_a_local_shard_share_its_buffer() -> None:
    for checks in values(run_ranks(_tied_dtensors, 2)):
        assert all(checks.values()), checks


def _snapshots_around_a_failed_allocation(rank: int, world_size: int) -> dict[str, Any]:
    import resource

    torch.manual_seed(0)
    small = {"a": torch.randn(1000), "tied": [torch.randn(2000)] * 2}
    big = {"a": torch.randn(64 << 20)}  # 256 MiB: its buffers will not fit under the limit
    buffers = SnapshotBuffers()
    buffers.snapshot(small)  # buffers for the small layout exist
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as status:
        mapped = int(re.search(r"VmSize:\s+(\d+)", status.read()).group(1)) << 10
    # A real shortage: the kernel refuses the block's mmap (ENOMEM), as on a host out of memory.
    resource.setrlimit(resource.RLIMIT_AS, (mapped + (64 << 20), hard))
    try:
        buffers.snapshot(big)
        failed = "no error"
    except (OSError, MemoryError, RuntimeError) as exc:
        failed = type(exc).__name__
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
    again = buffers.snapshot(small)  # the small layout again: its old buffers are gone
    return {
        "failed": failed,
        "equal": torch.equal(again["a"], small["a"])
        and all(torch.equal(t, small["tied"][0]) for t in again["tied"]),
        "still_shared": again["tied"][0].untyped_storage().data_ptr()
        == again["tied"][1].untyped_storage().data_ptr(),
    }


def test_a_failed_allocation_leaves_no_half_made_buffers_for_the_next_snapshot() -> None:
    (out,) = values(run_ranks(_snapshots_around_a_failed_allocation, 0))
    assert out["failed"] != "no error"
    assert out == {"failed": out["failed"], "equal": True, "still_shared": True}


def test_slices_far_apart_in_one_storage_keep_a_buffer_each(tmp_path: Path) -> None:
    big = torch.randn(16 << 20)  # 64 MiB
    state = {"head": big[:10], "tail": big[-10:]}
    buffers = SnapshotBuffers()
    snapshot = buffers.snapshot(state)
    # Only their own bytes are copied and held, not the 64 MiB between them.
    assert [t.untyped_storage().nbytes() for t in snapshot.values()] == [40, 40]
    assert torch.equal(snapshot["head"], big[:10]) and torch.equal(snapshot["tail"], big[-10:])
    with distckpt.CheckpointManager(tmp_path / "root", async_save=True, fsync=False) as mgr:
        mgr.save(1, state)
        mgr.wait()
        restored = mgr.restore(1).state
    assert torch.equal(restored["head"], big[:10]) and torch.equal(restored["tail"], big[-10:])
    assert sum(f.stat().st_size for f in (tmp_path / "root").rglob("rank-*")) < 1 << 20


def test_slices_reaching_twice_their_bytes_share_a_buffer_and_beyond_that_do_not() -> None:
    """README: tensors sharing a storage keep a buffer each only when the bytes between the
    lowest and highest they reach are more than twice their own; at exactly twice they share
    one."""
    weights = torch.arange(64, dtype=torch.float32)
    twice = {"head": weights[:16], "tail": weights[48:]}  # reach 256 bytes of their own 128
    beyond = {"head": weights[:16], "tail": weights[49:]}  # reach 256 bytes of their own 124
    for state, shared in ((twice, True), (beyond, False)):
        snapshot = SnapshotBuffers().snapshot(state)
        storages = {tensor.untyped_storage().data_ptr() for tensor in snapshot.values()}
        assert len(storages) == (1 if shared else 2)
        for name, tensor in state.items():
            assert torch.equal(snapshot[name], tensor), name


# --------------------------------------------------------------------------- tensors that are
# not contiguous: kept as a sync save keeps them


def _arranged_state() -> dict[str, torch.Tensor]:
    """A tensor of each arrangement a sync save keeps: memory formats, strides of 0, a
    transposed one, lazily conjugated and negated views, a slice with gaps."""
    torch.manual_seed(0)
    return {
        "channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        "channels_last_3d": torch.randn(2, 3, 2, 4, 5).to(memory_format=torch.channels_last_3d),
        "expanded": torch.randn(1, 4).expand(3, 4),
        "transposed": torch.randn(6, 8).t(),
        "conjugated": torch.randn(3, dtype=torch.complex64).conj(),
        "negated": torch.randn(3, dtype=torch.complex64).conj().imag,
        "every_other": torch.randn(6, 8)[2:4, 1::2],
    }


def _arrangement(tensor: torch.Tensor) -> tuple[Any, ...]:
    return tensor.shape, tensor.stride(), tensor.dtype, tensor.is_conj(), tensor.is_neg()


def test_an_async_save_keeps_strides_and_bits_as_a_sync_save_does(tmp_path: Path) -> None:
    expected = {name: tensor.clone() for name, tensor in _arranged_state().items()}
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    for mode in ("sync", "async"):
        state = _arranged_state()  # the same values (seeded) for each mode
        root = tmp_path / mode
        with distckpt.CheckpointManager(root, fsync=False, async_save=mode == "async") as mgr:
            mgr.save(1, state)
            for tensor in state.values():  # training goes on after save returned
                _train_on_storage(tensor)
            mgr.save(2, state)  # from reused buffers
            mgr.wait()
        loaded[mode] = distckpt.load_checkpoint(root / "step-00000001").state
        second = distckpt.load_checkpoint(root).state
        for name, tensor in state.items():
            assert torch.equal(second[name], tensor), (mode, name)
            assert _arrangement(second[name]) == _arrangement(tensor), (mode, name)
    for name, tensor in expected.items():
        for mode in ("sync", "async"):
            assert torch.equal(loaded[mode][name], tensor), (mode, name)
            # Against the state's tensor: a clone of an expanded one has strides of its own.
            assert _arrangement(loaded[mode][name]) == _arrangement(state[name]), (mode, name)


def _train_on_storage(tensor: torch.Tensor) -> None:
    """Change every byte of ``tensor``'s storage in place, as training would (an expanded view
    itself cannot be written to)."""
    whole = torch.empty(0, dtype=tensor.dtype).set_(tensor.untyped_storage())
    whole.add_(1.0)


def test_arranged_tensors_round_trip_through_an_async_dcp_save(tmp_path: Path) -> None:
    """DCP loads into the given state's tensors, so the strides are theirs: the values come
    back through an async snapshot of every arrangement."""
    state = _arranged_state()
    with distckpt.CheckpointManager(tmp_path, format="dcp", fsync=False, async_save=True) as mgr:
        mgr.save(1, state)
        mgr.wait()
        template = {
            name: torch.zeros_like(t.resolve_conj().resolve_neg()) for name, t in state.items()
        }
        mgr.restore(1, state=template)
    for name, tensor in state.items():
        assert torch.equal(template[name], tensor), name


def test_arranged_buffers_are_reused_and_hold_only_the_bytes_reached() -> None:
    state = _arranged_state()
    buffers = SnapshotBuffers()
    first = buffers.snapshot(state)
    # An expanded view holds its one row, not its three.
    assert first["expanded"].untyped_storage().nbytes() == 4 * 4
    addresses = [t.data_ptr() for t in first.values()]
    second = buffers.snapshot(state)
    assert [t.data_ptr() for t in second.values()] == addresses  # no new allocation
    # The same places, shapes and dtypes, other strides: new buffers with the new strides.
    state["transposed"] = state["transposed"].contiguous()
    third = buffers.snapshot(state)
    assert third["transposed"].is_contiguous() and torch.equal(
        third["transposed"], state["transposed"]
    )


def test_a_narrow_slice_of_a_large_tensor_is_copied_compactly_in_its_memory_format() -> None:
    """One channel of a large ``channels_last`` tensor reaches nearly all of its bytes: its
    buffer holds its own elements only, still channels-last."""
    large = torch.randn(4, 64, 8, 8).to(memory_format=torch.channels_last)
    state = {"channel": large[:, :2], "row": torch.randn(64, 1024)[:, :3]}
    snap = SnapshotBuffers().snapshot(state)
    for name, tensor in state.items():
        assert torch.equal(snap[name], tensor), name
        assert snap[name].untyped_storage().nbytes() == tensor.nbytes, name
    assert snap["channel"].is_contiguous(memory_format=torch.channels_last)
    assert snap["row"].is_contiguous()
