"""Async saves' snapshots: one flat block of memory, yet separate storages to every format, its
buffers reused and let go, an async save writing what a sync save writes; tensors no raw
buffer can hold (quantized, sparse, sub-byte) are cloned. How tensors that share a storage or
are not contiguous are snapshotted is in test_snapshot_storages.py."""

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
from tests.snapshot_states import _tensors


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
    # Mutable values that are no container the snapshot walks into: copied all the same.
    state["seen"], state["ids"] = {"a"}, bytearray(b"ab")
    buffers = SnapshotBuffers()
    first = buffers.snapshot(state)
    addresses = [t.data_ptr() for t in _tensors(first)]
    state["f32"].add_(1.0)
    second = buffers.snapshot(state)
    assert [t.data_ptr() for t in _tensors(second)] == addresses  # no new allocation
    assert torch.equal(second["f32"], state["f32"])
    state["f32"].add_(1.0)  # training goes on: the snapshot keeps what it copied
    state["seen"].add("b")
    state["ids"][0] = ord("z")
    assert torch.equal(second["f32"] + 1.0, state["f32"])
    assert (second["seen"], second["ids"]) == ({"a"}, bytearray(b"ab"))


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
    sizes = [3, DIRECT_ALIGNMENT // 4, 5, large, 1, large + 2, 3 * DIRECT_ALIGNMENT // 4, large + 1]
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
