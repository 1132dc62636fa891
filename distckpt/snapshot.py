"""Snapshots for async saves: a copy of the state in CPU buffers that training cannot touch.

An async save returns as soon as the state is copied, and a background thread writes the copy.
The buffers are allocated at the first save and reused by later ones of the same shapes (pinned
when CUDA is present, so device-to-host copies run at full speed), so a steady-state snapshot
costs one memory copy and no allocation. DTensors are copied shard by shard and rebuilt with
the same mesh and placements.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

from distckpt.per_rank import PerRank
from distckpt.state import dtensor_type, same_kind_of_tuple


class SnapshotBuffers:
    """Reusable CPU buffers, keyed by where each tensor sits in the state tree."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}
        self._pin = torch.cuda.is_available()
        self._dtensor: Any = None

    def snapshot(self, state: Any) -> Any:
        """A copy of ``state`` (plain data and tensors) sharing no memory with it."""
        seen: set[tuple[Any, ...]] = set()
        self._dtensor = dtensor_type()
        copied = self._copy(state, (), seen)
        # Drop buffers of tensors that are gone, so a changed state does not pin old memory.
        for key in set(self._buffers) - seen:
            del self._buffers[key]
        return copied

    def _buffer_for(self, key: tuple[Any, ...], tensor: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(
                tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=self._pin
            )
            self._buffers[key] = buffer
        buffer.copy_(tensor.detach(), non_blocking=self._pin)
        return buffer

    def _copy(self, value: Any, key: tuple[Any, ...], seen: set[tuple[Any, ...]]) -> Any:
        if self._dtensor is not None and isinstance(value, self._dtensor):
            seen.add(key)
            local = self._buffer_for(key, value.to_local())
            return self._dtensor.from_local(
                local,
                value.device_mesh,
                value.placements,
                run_check=False,
                shape=value.shape,
                stride=value.stride(),
            )
        if isinstance(value, torch.Tensor):
            seen.add(key)
            return self._buffer_for(key, value)
        if isinstance(value, PerRank):
            return PerRank(self._copy(value.value, key, seen))
        if isinstance(value, Mapping):
            return {k: self._copy(v, (*key, k), seen) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            items = [self._copy(v, (*key, i), seen) for i, v in enumerate(value)]
            if isinstance(value, list):
                return items
            return same_kind_of_tuple(value, items)
        # Plain values (numbers, strings) are immutable or small: a deep copy stops later
        # mutation of, say, a list of ints in a sampler's state from reaching the snapshot.
        return copy.deepcopy(value)

    def synchronize(self) -> None:
        """Wait for non-blocking device-to-host copies (pinned buffers) to land."""
        if self._pin:
            torch.cuda.synchronize()
