"""Tensors other than plain strided ones in a saved state: subclasses of ``torch.Tensor`` (a
plain subclass made with ``as_subclass``, a wrapper subclass holding inner tensors) and nested
tensors. The "torch" format saves them as ``torch.save`` does, an async save writing what a
sync one writes; the "dcp" format refuses them at the save."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing._internal.two_tensor import TwoTensor

import distckpt
from distckpt.errors import UnsafeCheckpoint, UnsupportedTensors
from distckpt.formats.torch_files import TorchFilesFormat

#: (async_save, writer_threads) of each way a "torch" save is made
SAVE_MODES = [(False, 1), (True, 1), (True, 2)]
MODE_IDS = ["sync", "async", "async-2-writers"]


class Marked(torch.Tensor):
    """A plain subclass (no inner tensors): ``as_subclass`` gives a tensor of this type."""


def subclass_state() -> dict[str, Any]:
    return {
        "marked": torch.arange(4.0).as_subclass(Marked),
        "two": TwoTensor(torch.arange(3.0), torch.arange(3.0) * 10),
        "plain": torch.ones(2),
    }


def assert_same(saved: torch.Tensor, got: torch.Tensor) -> None:
    """Same type, and bit for bit the same values (each inner tensor of a wrapper subclass)."""
    assert type(got) is type(saved)
    if isinstance(saved, TwoTensor):
        assert torch.equal(got.a, saved.a) and torch.equal(got.b, saved.b)
    else:
        plain_saved, plain_got = saved.as_subclass(torch.Tensor), got.as_subclass(torch.Tensor)
        assert plain_got.dtype == plain_saved.dtype
        assert torch.equal(plain_got.view(torch.uint8), plain_saved.view(torch.uint8))


def save_then_change(root: Path, state: dict[str, Any], *, async_save: bool, threads: int) -> None:
    """Save ``state`` as step 1, then change every tensor in place before the write is waited
    for: an async save must have written its snapshot, not the changed values."""
    with distckpt.CheckpointManager(
        root, async_save=async_save, writer_threads=threads, fsync=False
    ) as manager:
        manager.save(1, state)
        with torch.no_grad():
            for tensor in state.values():
                if isinstance(tensor, TwoTensor):
                    tensor.a.add_(100)
                    tensor.b.add_(100)
                else:
                    tensor.add_(100)
        manager.wait()


@pytest.mark.parametrize(("async_save", "threads"), SAVE_MODES, ids=MODE_IDS)
def test_subclasses_round_trip_with_their_type_and_values(
    root: Path, async_save: bool, threads: int
) -> None:
    state = subclass_state()
    expected = {key: tensor.clone() for key, tensor in state.items()}
    save_then_change(root, state, async_save=async_save, threads=threads)
    for mmap in (False, True):
        got = distckpt.load_checkpoint(root, allow_pickle=True, mmap=mmap).state
        for key, tensor in expected.items():
            assert_same(tensor, got[key])
    assert distckpt.verify(root).ok


@pytest.mark.parametrize(("async_save", "threads"), SAVE_MODES, ids=MODE_IDS)
def test_subclasses_load_as_weights_once_their_classes_are_allowed(
    root: Path, async_save: bool, threads: int
) -> None:
    """What the README tells a user: a default restore refuses the classes, and loads them once
    they are on torch's weights-only allow-list."""
    state = subclass_state()
    expected = {key: tensor.clone() for key, tensor in state.items()}
    save_then_change(root, state, async_save=async_save, threads=threads)
    with pytest.raises(UnsafeCheckpoint):
        distckpt.load_checkpoint(root)
    with torch.serialization.safe_globals([TwoTensor, Marked]):
        got = distckpt.load_checkpoint(root).state
    for key, tensor in expected.items():
        assert_same(tensor, got[key])


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_dcp_refuses_subclasses_at_the_save(root: Path, async_save: bool) -> None:
    with distckpt.CheckpointManager(root, format="dcp", async_save=async_save) as manager:
        with pytest.raises(UnsupportedTensors) as refused:
            manager.save(1, {"model": subclass_state()})
        manager.wait()
        assert manager.steps() == []
    assert refused.value.keys == ("model.marked", "model.two")
    assert refused.value.kinds == (
        f"{__name__}.Marked",
        "torch.testing._internal.two_tensor.TwoTensor",
    )


def nested(layout: torch.layout) -> torch.Tensor:
    with warnings.catch_warnings():
        # torch warns that the strided layout of nested tensors is a prototype.
        warnings.simplefilter("ignore", UserWarning)
        return torch.nested.nested_tensor(
            [torch.arange(3.0), torch.arange(5.0) + 100], layout=layout
        )


NESTED_LAYOUTS = [torch.strided, torch.jagged]


@pytest.mark.parametrize("layout", NESTED_LAYOUTS, ids=["strided", "jagged"])
@pytest.mark.parametrize(("async_save", "threads"), SAVE_MODES, ids=MODE_IDS)
def test_nested_tensors_round_trip_loaded_as_weights(
    root: Path, layout: torch.layout, async_save: bool, threads: int
) -> None:
    """As ``torch.save`` and ``torch.load(weights_only=True)`` do: no opt-in needed."""
    saved = nested(layout)
    state = {"nested": saved, "plain": torch.ones(2)}
    expected = [part.clone() for part in saved.unbind()]
    with distckpt.CheckpointManager(
        root, async_save=async_save, writer_threads=threads, fsync=False
    ) as manager:
        manager.save(1, state)
        with torch.no_grad():
            for part in saved.unbind():  # views of its memory: the snapshot must not see this
                part.add_(1000)
        manager.wait()
    for mmap in (False, True):
        got = distckpt.load_checkpoint(root, mmap=mmap).state["nested"]
        assert type(got) is type(saved) and got.is_nested and got.layout == layout
        parts = got.unbind()
        assert len(parts) == len(expected)
        assert all(torch.equal(part, want) for part, want in zip(parts, expected))
    assert distckpt.verify(root).ok


@pytest.mark.parametrize("layout", NESTED_LAYOUTS, ids=["strided", "jagged"])
def test_dcp_refuses_nested_tensors_at_the_save(root: Path, layout: torch.layout) -> None:
    with distckpt.CheckpointManager(root, format="dcp") as manager:
        with pytest.raises(UnsupportedTensors) as refused:
            manager.save(1, {"batch": nested(layout)})
        assert manager.steps() == []
    assert refused.value.keys == ("batch",)
    kind = "torch.Tensor (nested)" if layout == torch.strided else "NestedTensor"
    assert refused.value.kinds[0].endswith(kind)


def test_dcp_refuses_sparse_bits_and_sub_byte_tensors_at_the_save(root: Path) -> None:
    """What DCP fails on deep inside its save, naming no key: a sparse tensor's storage, the
    size of a ``bits*`` or sub-byte dtype."""
    refused_kinds = {
        "coo": torch.eye(2).to_sparse(),
        "csr": torch.eye(2).to_sparse_csr(),
        "bits": torch.zeros(2, dtype=torch.int16).view(torch.bits16),
        "nibbles": torch.zeros(2, dtype=torch.uint8).view(torch.uint4),
        "bit": torch.zeros(2, dtype=torch.uint8).view(torch.int1),
    }
    with distckpt.CheckpointManager(root, format="dcp", fsync=False) as manager:
        with pytest.raises(UnsupportedTensors) as refused:
            manager.save(1, {"model": {"w": torch.ones(2), **refused_kinds}})
        assert manager.steps() == []
    assert refused.value.keys == tuple(f"model.{key}" for key in refused_kinds)
    assert refused.value.kinds == (
        "torch.Tensor (torch.sparse_coo)",
        "torch.Tensor (torch.sparse_csr)",
        "torch.Tensor (torch.bits16)",
        "torch.Tensor (torch.uint4)",
        "torch.Tensor (torch.int1)",
    )


def test_dcp_still_saves_and_restores_the_unusual_dtypes_it_can(root: Path) -> None:
    """The refusal above takes nothing DCP saves: a packed float4, a float8 of exponents."""
    saved = {
        "f4": torch.arange(4, dtype=torch.uint8).view(torch.float4_e2m1fn_x2),
        "e8": torch.arange(4, dtype=torch.uint8).view(torch.float8_e8m0fnu),
    }
    with distckpt.CheckpointManager(root, format="dcp", fsync=False) as manager:
        manager.save(1, {"model": saved})
        state = {"model": {key: torch.zeros_like(tensor) for key, tensor in saved.items()}}
        manager.restore("last", state=state)
    for key, tensor in saved.items():
        got = state["model"][key]
        assert got.dtype == tensor.dtype
        assert torch.equal(got.view(torch.uint8), tensor.view(torch.uint8))


def rank_file_bytes(step_dir: Path) -> int:
    return sum(path.stat().st_size for path in step_dir.glob("rank*"))


def test_the_space_estimate_counts_a_wrapper_subclass_s_whole_storages(root: Path) -> None:
    # torch.save writes each inner tensor's whole storage, however few elements it shows.
    first, second = torch.zeros(2**20), torch.zeros(2**20)  # 4 MiB each
    state = {"two": TwoTensor(first[:10], second[:10])}
    estimate = TorchFilesFormat().estimate_bytes(state)
    with distckpt.CheckpointManager(root, fsync=False) as manager:
        manager.save(1, state)
    written = rank_file_bytes(root / "step-00000001")
    assert written > 8 * 2**20
    assert written <= estimate < written + 2**20


def test_the_space_estimate_counts_a_storage_shared_with_a_wrapper_subclass_once() -> None:
    storage = torch.zeros(2**20)  # 4 MiB
    alone = TorchFilesFormat().estimate_bytes({"plain": storage})
    # TwoTensor wants its inner tensors at one offset: one over the same slice twice
    shared = {"plain": storage, "two": TwoTensor(storage[:10], storage[:10])}
    assert TorchFilesFormat().estimate_bytes(shared) < alone + 2**20
