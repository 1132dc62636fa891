"""A helper shared by the snapshot tests: the tensors of a nested state (dicts, lists and tuples),
in order."""

from __future__ import annotations

from typing import Any

import torch


def _tensors(state: Any) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _tensors(v)]
    return []
