"""What looks at a root's locks and temporary files without holding what its writer holds
(``distckpt ls`` probing writer locks without the root lock, ``distckpt gc`` holding the root
lock but not the lease) never makes a live job fail."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

import distckpt
from distckpt import lock
from distckpt.layout import RootLayout
from distckpt.lock import PROBE_GRACE, WriterLock


def _probe_the_new_writer_lock_first(
    monkeypatch: pytest.MonkeyPatch, hold_seconds: float
) -> list[threading.Timer]:
    """Have a probe (a lock of the kind ``distckpt ls`` takes) hold each new writer lock for
    ``hold_seconds`` just before the save locks it. ls probes for an instant and lands between
    a save creating its lock file and locking it only by chance: nothing real times that, so
    the probe is placed there by wrapping the save's acquire, and its hold stretched."""
    real_acquire = WriterLock.acquire
    releases: list[threading.Timer] = []

    def probed_first(writer: WriterLock) -> None:
        probe = lock._flock(writer.path, 0)
        probe.acquire()
        releases.append(threading.Timer(hold_seconds, probe.release))
        releases[-1].start()
        real_acquire(writer)

    monkeypatch.setattr(WriterLock, "acquire", probed_first)
    return releases


def test_a_probe_of_a_new_writer_lock_does_not_fail_the_save(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save takes its new writer lock within a grace of :data:`PROBE_GRACE`: a probe
    holding it meanwhile (``distckpt ls``) lets go by then."""
    with distckpt.CheckpointManager(root, timeout=20) as mgr:
        releases = _probe_the_new_writer_lock_first(monkeypatch, PROBE_GRACE / 5)
        assert mgr.save(1, {"w": torch.zeros(2)}).done
    assert releases and not any(release.is_alive() for release in releases)
    assert distckpt.CheckpointManager(root, read_only=True).steps() == [1]
    assert list(RootLayout.at(root).staging_root.iterdir()) == []


def test_a_save_that_cannot_take_its_writer_lock_leaves_no_lock_file(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held past the grace, the lock fails the save, and its lock file (this save's alone)
    goes with it; the next save takes a lock of its own."""
    with distckpt.CheckpointManager(root, timeout=20) as mgr:
        releases = _probe_the_new_writer_lock_first(monkeypatch, PROBE_GRACE * 4)
        with pytest.raises(distckpt.CheckpointError, match="is locked by another writer"):
            mgr.save(1, {"w": torch.zeros(2)})
        releases[-1].join()
        assert list(RootLayout.at(root).staging_root.iterdir()) == []
        monkeypatch.undo()
        assert mgr.save(1, {"w": torch.zeros(2)}).done
