"""Helpers shared by the tests of raw rank files: the state the format-version-1 fixture holds,
torch.save/torch.load round trips, and comparisons of what was loaded with what torch.load
gives (types, keys and order, values bit for bit)."""

from __future__ import annotations

import io
from typing import Any

import torch


def _bytes_of(tensor: torch.Tensor) -> bytes:
    # A fresh tensor: contiguous() keeps the stride of a one-element view, view() refuses it.
    flat = torch.empty(tensor.numel(), dtype=tensor.dtype).copy_(tensor.detach().reshape(-1))
    return bytes(flat.view(torch.uint8).numpy())


def assert_same_as(loaded: Any, expected: Any, path: str = "state") -> None:
    """``loaded`` is what ``torch.load`` gave for the same state: same types, keys and order,
    values; tensors with the same dtype, shape, stride, storage offset and bytes."""
    assert type(loaded) is type(expected), path
    if isinstance(expected, torch.Tensor):
        assert loaded.dtype == expected.dtype, path
        assert loaded.shape == expected.shape, path
        assert loaded.stride() == expected.stride(), path
        assert loaded.storage_offset() == expected.storage_offset(), path
        assert loaded.untyped_storage().nbytes() == expected.untyped_storage().nbytes(), path
        assert _bytes_of(loaded) == _bytes_of(expected), path
    elif isinstance(expected, dict):
        assert list(loaded) == list(expected), path
        for key in expected:
            assert_same_as(loaded[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(loaded) == len(expected), path
        for index, (a, b) in enumerate(zip(loaded, expected)):
            assert_same_as(a, b, f"{path}[{index}]")
    else:
        assert loaded == expected, path


def _torch_round_trip(state: Any, **options: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True, **options)


def fixture_state() -> dict[str, Any]:
    """The state the format-version-1 fixture holds (written by distckpt 0.1.0's torch.save
    rank files, from this recipe)."""
    torch.manual_seed(0)
    base = torch.arange(12, dtype=torch.float32)
    return {
        "weights": {
            "w": torch.randn(3, 4),
            "b16": torch.randn(5).to(torch.bfloat16),
            "mask": torch.tensor([True, False, True]),
            "c": torch.randn(2, dtype=torch.complex64),
        },
        "base": base,
        "view": base[2:8].view(2, 3).t(),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(7, dtype=torch.int64),
        "items": [1, "two", (3.0, None)],
        "step": 3,
    }
