"""The root's upkeep a :class:`~distckpt.CheckpointManager` runs on request: deleting a step,
applying the retention rules, collecting dead writers' leftovers, and having rank 0 remove what
they left in the background. Its methods are the manager's (it derives from
:class:`RootUpkeep`); kept apart from the manager's lifecycle, saves and restores."""

from __future__ import annotations

from distckpt import protocol
from distckpt.coord import Coordinator
from distckpt.decisions import SaveDecider
from distckpt.results import CheckpointLocation, SaveResult
from distckpt.storage import RootStore
from distckpt.tidying import BackgroundTidy


class RootUpkeep:
    """:meth:`delete`, :meth:`prune` and :meth:`gc` of a :class:`~distckpt.CheckpointManager`,
    over the parts the manager makes: its coordinator, store, save decider and background
    removals."""

    _coord: Coordinator
    _store: RootStore
    _decider: SaveDecider
    _tidying: BackgroundTidy

    def _check_open(self, call: str) -> None:
        """Refuse a closed manager, naming ``call`` (:meth:`CheckpointManager._check_open
        <distckpt.CheckpointManager._check_open>` overrides it)."""
        raise NotImplementedError

    def wait(self) -> SaveResult | None:
        """Finish the save in flight (:meth:`CheckpointManager.wait
        <distckpt.CheckpointManager.wait>` overrides it)."""
        raise NotImplementedError

    def delete(self, step: int) -> None:
        """Delete the checkpoint of ``step``; collective. Links that pointed at it are moved to
        what remains (or removed). Raises :class:`CheckpointNotFound` if it does not exist."""
        self._check_open("delete")
        protocol.check_step_number(step)
        self.wait()
        latest = self._coord.decide(lambda: self._store.delete(step), what=f"deleting step {step}")
        self._tidy()
        self._decider.count_delete(step, latest)

    def prune(self) -> list[int]:
        """Apply the retention rules now (as after every commit), under the lock; collective.
        Returns the steps removed. Links are repaired first, so their targets stay."""
        self._check_open("prune")
        self.wait()
        removed = self._coord.decide(self._store.prune, what="pruning")
        self._tidy()
        return removed

    def gc(self) -> list[CheckpointLocation]:
        """Remove leftovers of dead writers (staging dirs whose writer lock is free; on an
        ``s3://`` root, saves whose writer's claim expired) and the trash; collective. A live
        writer's staging is never touched. Returns what was removed (also done at start).
        Unlike the removals after a start, a commit, a delete or a prune, these run inside the
        call (within ``timeout``), after rank 0 waited for those still running in the
        background, so that no two remove the same trash at once."""
        self._check_open("gc")
        self.wait()
        return self._coord.decide(self._collect_leftovers, what="collecting leftovers")

    def _collect_leftovers(self) -> list[CheckpointLocation]:
        """Rank 0's part of :meth:`gc`: after the background removals, its own."""
        self._tidying.wait()
        return self._store.collect_leftovers()

    def _tidy(self) -> None:
        """Rank 0, after an outcome reached every rank: have what it left to remove (the trash,
        a removed step's objects, a start's leftovers) removed in the background
        (:meth:`~distckpt.storage.RootStore.tidy`): no later collective waits for it."""
        if self._coord.is_coordinator:
            self._tidying.request()
