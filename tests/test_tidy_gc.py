"""``gc()`` runs its removals after rank 0's background ones, never beside them
(:meth:`distckpt.upkeep.RootUpkeep.gc`): no two remove the same trash at once, and what the
start removed is reported once, by the gc that comes after it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import distckpt
from distckpt.layout import TRASH_DIR_NAME
from distckpt.storage import posix
from tests.core_ranks import TIMEOUT
from tests.fault_checks import entries

#: How long the start's removal stays in progress once entered, unless a second removal joins
#: it sooner (only with the bug this test looks for): the gc called meanwhile must wait for it.
HELD_SECONDS = 0.5


def test_gc_called_while_the_starts_removal_runs_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    left = tmp_path / TRASH_DIR_NAME / "step-00000000"
    left.mkdir(parents=True)
    remove = posix.PosixRootStore._remove_quietly
    state = threading.Lock()
    running: list[Path] = []
    side_by_side: list[list[Path]] = []
    first_entered, second_entered = threading.Event(), threading.Event()

    def held(self: posix.PosixRootStore, leftover: Path) -> bool:
        with state:
            running.append(leftover)
            if len(running) > 1:
                side_by_side.append(list(running))
                second_entered.set()
        first_entered.set()
        second_entered.wait(HELD_SECONDS)
        try:
            return remove(self, leftover)
        finally:
            with state:
                running.remove(leftover)

    # Replaced, the real removal still running inside: nothing real holds a removal in progress
    # at a known point, which the test needs to call gc() right then.
    monkeypatch.setattr(posix.PosixRootStore, "_remove_quietly", held)
    with distckpt.CheckpointManager(tmp_path, fsync=False, timeout=TIMEOUT) as mgr:
        assert first_entered.wait(TIMEOUT), "the start's removal never began"
        assert mgr.gc() == [left]
        assert side_by_side == []
        assert entries(tmp_path / TRASH_DIR_NAME) == []  # all removed by the time gc returns
        assert mgr.gc() == []
    assert not left.exists()
