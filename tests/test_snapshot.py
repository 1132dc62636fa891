"""Async saves' snapshots: one flat block of memory, yet separate storages to every format,
shared where the state's tensors share one; tensors no raw buffer can hold are cloned."""

from __future__ import annotations

import gc
import re
import sys
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt.memory import DIRECT_ALIGNMENT, DIRECT_MIN_BYTES, anonymous_memory
from distckpt.snapshot import (
    BUFFER_ALIGNMENT,
    SUB_BYTE_DTYPES,
    Slot,
    SnapshotBuffers,
    flat_buffers,
)
from tests.ranks import run_ranks, values


def _mixed_state() -> dict[str, Any]:
    """Tensors of every awkward kind: dtypes, a 0-d one, an empty one, a transposed view and
    a slice of a larger storage."""
    big = torch.arange(100, dtype=torch.float32)
    return {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(7).to(torch.bfloat16),
        "bool": torch.tensor([True, False, True]),
        "int8": torch.arange(-5, 5, dtype=torch.int8),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.empty(0, 4),
        "transposed": torch.randn(4, 6).t(),
        "slice": big[10:20],
        "plain": [1, "two", 3.0],
        "nested": (torch.ones(2, dtype=torch.int64), {"deep": torch.zeros(3, 3)}),
    }


def _tensors(state: Any) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _tensors(v)]
    return []


def _map_tensors(state: Any, fn: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, dict):
        return {k: _map_tensors(v, fn) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_map_tensors(v, fn) for v in state)
    return state


def test_snapshot_copies_into_one_block_with_a_storage_per_tensor() -> None:
    state = _mixed_state()
    buffers = SnapshotBuffers()
    snap = buffers.snapshot(state)
    for original, copied in zip(_tensors(state), _tensors(snap)):
        assert torch.equal(original, copied) and original.dtype == copied.dtype
        assert copied.stride() == original.stride()  # the transposed one stays transposed
        # Its own storage of exactly its bytes: a format writes nothing more.
        assert copied.untyped_storage().nbytes() == copied.nbytes
    filled = [t for t in _tensors(snap) if t.numel()]
    addresses = sorted(t.data_ptr() for t in filled)
    assert all(address % BUFFER_ALIGNMENT == 0 for address in addresses)
    # One block: the buffers follow one another, each padded to the alignment at most.
    span = addresses[-1] - addresses[0]
    assert span < sum(t.nbytes + BUFFER_ALIGNMENT for t in filled)
    assert snap["plain"] == state["plain"] and snap["plain"] is not state["plain"]


def test_snapshot_reuses_its_buffers_and_is_isolated_from_later_changes() -> None:
    state = _mixed_state()
    buffers = SnapshotBuffers()
    first = buffers.snapshot(state)
    addresses = [t.data_ptr() for t in _tensors(first)]
    state["f32"].add_(1.0)
    second = buffers.snapshot(state)
    assert [t.data_ptr() for t in _tensors(second)] == addresses  # no new allocation
    assert torch.equal(second["f32"], state["f32"])
    state["f32"].add_(1.0)  # training goes on: the snapshot keeps what it copied
    assert torch.equal(second["f32"] + 1.0, state["f32"])


def test_buffers_of_a_changed_state_are_let_go() -> None:
    buffers = SnapshotBuffers()
    state = {"kept": torch.ones(1000), "removed": torch.ones(1000)}
    old = [weakref.ref(t) for t in _tensors(buffers.snapshot(state))]
    del state["removed"]
    snap = buffers.snapshot(state)
    gc.collect()
    assert all(ref() is None for ref in old)  # the old block goes back, not just one buffer
    assert list(snap) == ["kept"] and torch.equal(snap["kept"], torch.ones(1000))


def _mapping_of(address: int) -> tuple[str, dict[str, str]]:
    """The ``/proc/self/smaps`` entry holding ``address``: its header line and its fields."""
    header, fields = "", {}
    found: tuple[str, dict[str, str]] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            if found is not None:
                break
            header, fields = line, {}
            low, high = (int(x, 16) for x in line.split()[0].split("-"))
            if low <= address < high:
                found = (header, fields)
        else:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    assert found is not None, "the address is in none of this process's mappings"
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_the_block_is_private_memory_that_asks_for_no_huge_pages() -> None:
    """Private, not shmem; and no ``MADV_HUGEPAGE`` (smaps flag ``hg``), whose first faults
    made the first async save about twice as slow where it was measured."""
    block = anonymous_memory(4 << 20)
    header, fields = _mapping_of(torch.frombuffer(block, dtype=torch.uint8).data_ptr())
    assert header.split()[1].endswith("p")
    assert "hg" not in fields["VmFlags"].split()


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_an_async_save_writes_what_a_sync_save_writes(tmp_path: Path, fmt: str) -> None:
    state = _mixed_state()
    # The snapshot holds each tensor with its strides in its own storage, as a clone does (a
    # sync save writes a view with the storage it views, as torch.save does).
    clones = _map_tensors(state, torch.clone)
    with distckpt.CheckpointManager(tmp_path / "sync", format=fmt, fsync=False) as mgr:
        mgr.save(1, clones)
    with distckpt.CheckpointManager(
        tmp_path / "async", format=fmt, fsync=False, async_save=True
    ) as mgr:
        mgr.save(1, state)
        mgr.save(2, state)  # from reused buffers
        mgr.wait()
        # DCP loads in place, into a state of the same structure.
        template = _map_tensors(state, torch.zeros_like) if fmt == "dcp" else None
        restored = mgr.restore(2, state=template).state
    sync_files = sorted((tmp_path / "sync" / "step-00000001").iterdir())
    async_files = sorted((tmp_path / "async" / "step-00000002").iterdir())
    if fmt == "torch":
        # Only each tensor's own bytes: the rank file is the sync save's, byte for byte.
        rank_files = [(p.name, p.read_bytes()) for p in sync_files if p.suffix != ".json"]
        assert rank_files == [(p.name, p.read_bytes()) for p in async_files if p.suffix != ".json"]
    for original, loaded in zip(_tensors(state), _tensors(restored)):
        assert torch.equal(original, loaded) and original.dtype == loaded.dtype
        if fmt == "torch":  # independent tensors, not views of one block
            assert loaded.untyped_storage().nbytes() == loaded.nbytes
    storages = {t.untyped_storage().data_ptr() for t in _tensors(restored) if t.numel()}
    assert len(storages) == len([t for t in _tensors(restored) if t.numel()])
    assert restored["plain"] == state["plain"]


def test_a_buffer_of_a_mebibyte_or_more_starts_on_a_page() -> None:
    """So the "torch" rank file can write it with direct I/O straight from the snapshot; a
    smaller one (a page-sized one too) keeps the 64-byte alignment, and a state of whole pages
    gets a block of exactly its bytes (no page more)."""
    large = DIRECT_MIN_BYTES // 4
    sizes = [3, DIRECT_ALIGNMENT // 4, 5, large + 2, 1, 3 * DIRECT_ALIGNMENT // 4, large + 1]
    slots: list[Slot] = [((f"t{i}",), torch.Size([n]), torch.float32) for i, n in enumerate(sizes)]
    buffers = flat_buffers(slots)
    for (key, _, _), n in zip(slots, sizes):
        address = buffers[key].data_ptr()
        assert address % (DIRECT_ALIGNMENT if 4 * n >= DIRECT_MIN_BYTES else BUFFER_ALIGNMENT) == 0
    assert buffers[("t1",)].data_ptr() % DIRECT_ALIGNMENT != 0  # a page, packed at 64 bytes
    pages = [((f"p{i}",), torch.Size([large * (i + 1)]), torch.float32) for i in range(4)]
    whole = flat_buffers(pages)
    addresses = sorted(buffer.data_ptr() for buffer in whole.values())
    assert addresses[-1] + whole[("p3",)].nbytes - addresses[0] == sum(
        buffer.nbytes for buffer in whole.values()
    )


# --------------------------------------------------------------------------- tensors without
# a flat buffer: quantized, sparse and sub-byte ones


def _bytes_or_values(tensor: torch.Tensor) -> torch.Tensor:
    """What to compare of ``tensor``: torch compares no values of a sub-byte dtype, so their
    bytes; a sparse tensor dense; a quantized one as it is."""
    if tensor.layout != torch.strided:
        return tensor.to_dense()
    return tensor.view(torch.uint8) if tensor.dtype in SUB_BYTE_DTYPES else tensor


def _per_channel() -> torch.Tensor:
    scales, zero_points = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0, 1, 2])
    return torch.quantize_per_channel(torch.randn(3, 4), scales, zero_points, 0, torch.quint8)


def _unusual_kinds() -> dict[str, torch.Tensor]:
    return {
        "quantized": torch.quantize_per_tensor(torch.randn(4), 0.1, 3, torch.qint8),
        "per_channel": _per_channel(),
        "coo": torch.sparse_coo_tensor([[0, 2, 5]], [1.0, 2.0, 3.0], (8,)),
        "csr": torch.eye(3).to_sparse_csr(),
        "uint4": torch.arange(16, dtype=torch.uint8).view(torch.uint4),
        "int3": torch.arange(8, dtype=torch.uint8).view(torch.int3)[::2],  # a strided view too
        "uint1": torch.ones(5, dtype=torch.uint8).view(torch.uint1),
    }


def _train_on(state: dict[str, torch.Tensor]) -> None:
    """Change every tensor of ``state`` in place, as training would after save returned."""
    state["quantized"].copy_(torch.quantize_per_tensor(torch.randn(4), 0.1, 3, torch.qint8))
    state["per_channel"].copy_(_per_channel())
    state["coo"].add_(state["coo"])
    state["csr"].values().add_(1.0)
    for name in ("uint4", "int3", "uint1"):
        state[name].view(torch.uint8).add_(1)


def test_quantized_sparse_and_sub_byte_tensors_round_trip_through_an_async_save(
    tmp_path: Path,
) -> None:
    state = _unusual_kinds()
    expected = {name: _bytes_or_values(t).clone() for name, t in state.items()}
    with distckpt.CheckpointManager(tmp_path, fsync=False, async_save=True) as mgr:
        mgr.save(1, state)
        _train_on(state)  # the saved copy is the state as it was when save returned
        mgr.save(2, state)  # a second save, where buffers exist, copies the state anew
        second = {name: _bytes_or_values(t).clone() for name, t in state.items()}
        _train_on(state)
        mgr.wait()
        restored = [mgr.restore(step).state for step in (1, 2)]
    for saved, loaded in zip((expected, second), restored):
        for name, tensor in saved.items():
            assert loaded[name].dtype == state[name].dtype, name
            assert loaded[name].layout == state[name].layout, name
            assert torch.equal(_bytes_or_values(loaded[name]), tensor), name


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
