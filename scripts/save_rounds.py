"""Rounds of timed saves for the measuring scripts: every manager is warmed by one untimed save,
then measured once a round in an order that rotates from round to round, so that none always
follows the same one (a save slows the next one down: writeback, a busy disk)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import distckpt

Key = TypeVar("Key")
Item = TypeVar("Item")
Measured = TypeVar("Measured")


def rotated(items: Sequence[Item], shift: int) -> list[Item]:
    """``items`` starting from the one at ``shift`` (modulo their count), wrapping around."""
    if not items:
        return []
    shift %= len(items)
    return [*items[shift:], *items[:shift]]


def measure_in_rounds(
    managers: Mapping[Key, distckpt.CheckpointManager],
    rounds: int,
    measure: Callable[[distckpt.CheckpointManager, int], Measured],
) -> dict[Key, list[Measured]]:
    """Per manager, ``measure(manager, step)`` of each round (steps 2, 3, ...), after one at
    step 1 that is not kept (it creates the root's layout and an async manager's snapshot
    buffers); every manager is closed at the end."""
    measured: dict[Key, list[Measured]] = {key: [] for key in managers}
    try:
        for manager in managers.values():
            measure(manager, 1)
        for r in range(rounds):
            for key in rotated(list(managers), r):
                measured[key].append(measure(managers[key], 2 + r))
    finally:
        for manager in managers.values():
            manager.close()
    return measured
