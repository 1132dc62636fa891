"""What a :class:`~distckpt.CheckpointManager` tells about its root without a collective: the
committed steps, the newest and the best, and each checkpoint's facts, read fresh from the
root through the manager's view. Its methods are the manager's (it derives from
:class:`RootQueries`); kept apart from the manager's lifecycle, saves and restores."""

from __future__ import annotations

from distckpt import resolve
from distckpt.policy import RetentionPolicy
from distckpt.results import CheckpointInfo
from distckpt.storage.views import RootView


class RootQueries:
    """:meth:`steps`, :meth:`latest_step`, :meth:`best_step` and :meth:`checkpoints` of a
    :class:`~distckpt.CheckpointManager`, over its root's view and its retention rules."""

    _view: RootView
    retention: RetentionPolicy

    def steps(self) -> list[int]:
        """Committed steps, ascending, read fresh from the root, damaged too (not collective)."""
        return self._view.committed_steps()

    def latest_step(self) -> int | None:
        """The newest committed step passing its manifest check, which ``restore("last")`` loads."""
        newest = resolve.newest_valid(self._view)
        return newest[1].step if newest else None

    def best_step(self) -> int | None:
        """The best committed step by ``monitor`` (None without one); not collective."""
        best = resolve.best_valid(self._view, self.retention.monitor, self.retention.mode)
        return best[1].step if best else None

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints passing their manifest check, oldest first, from manifests."""
        return resolve.list_checkpoints(self._view)
