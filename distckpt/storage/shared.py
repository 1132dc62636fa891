"""What both stores share: the parts of :class:`~distckpt.storage.RootStore` that only read
the root through its :class:`~distckpt.storage.views.RootView`."""

from __future__ import annotations

import atexit
import weakref
from typing import NamedTuple

from distckpt import policy, resolve
from distckpt.errors import CheckpointExists, CorruptCheckpoint, InvalidStep, ReadOnlyRoot
from distckpt.layout import BEST, LAST, parse_step_dir_name
from distckpt.results import SaveResult
from distckpt.storage import RootStore
from distckpt.storage.views import CheckpointSource, RootView

#: Stores holding a lease, released at interpreter exit. Registered when the first store module
#: is imported, before any async save's own exit hook, so (hooks run last-registered first) a
#: save still in flight at exit is finished before its lease goes.
_open_stores: weakref.WeakSet[RootStore] = weakref.WeakSet()


@atexit.register
def _release_leases_at_exit() -> None:
    for store in list(_open_stores):
        store.close()


def release_at_exit(store: RootStore) -> None:
    """Have ``store``'s lease released at interpreter exit (until :func:`opened_no_more`)."""
    _open_stores.add(store)


def opened_no_more(store: RootStore) -> None:
    """``store`` was closed: nothing left to release at exit."""
    _open_stores.discard(store)


class DamagedStep(NamedTuple):
    """A committed checkpoint that fails its check with checksums, and why."""

    step: int
    source: CheckpointSource
    problem: str


def _damage(source: CheckpointSource) -> str | None:
    """What is wrong with a committed checkpoint, checksums included; None when it is intact.
    Only damage counts: a newer format version (:class:`~distckpt.UnsupportedVersion`) is
    raised, as such a checkpoint is whole and must never be replaced by this version."""
    try:
        resolve.check(source, checksums=True)
    except CorruptCheckpoint as exc:
        return str(exc)
    return None


class ViewedStore(RootStore):
    """A store that reads its root through ``view`` (a base class: the store sets these)."""

    view: RootView
    retention: policy.RetentionPolicy
    #: never write: changes raise :class:`~distckpt.ReadOnlyRoot`
    read_only: bool

    def _newest(self) -> tuple[int, int | None] | None:
        """The step and epoch of the newest committed checkpoint that passes its check."""
        newest = resolve.newest_valid(self.view)
        return (newest[1].step, newest[1].epoch) if newest is not None else None

    def _refuse_if_read_only(self, change: str) -> None:
        if self.read_only:
            raise ReadOnlyRoot(
                f"cannot {change}: the checkpoint root {self.root} was opened with "
                "read_only=True, which never writes to it",
                path=self.root,
            )

    #: Whether a committed step that fails its check is saved again rather than counted as
    #: saved (see :meth:`steps_in_the_way`); a store that sets it replaces the damaged
    #: checkpoints :meth:`steps_in_the_way` returns when it commits. Off, every committed
    #: step counts, damaged or not.
    replaces_damaged_steps: bool = False

    def check_step(self, step: int, *, overwrite: bool, explicit: bool) -> SaveResult | None:
        checked = self.steps_in_the_way(step, overwrite=overwrite, explicit=explicit)
        return checked if isinstance(checked, SaveResult) else None

    def steps_in_the_way(
        self, step: int, *, overwrite: bool, explicit: bool
    ) -> SaveResult | list[DamagedStep]:
        """:meth:`check_step`, and the damaged committed checkpoints a save of ``step`` replaces:
        its own, and every newer one.

        Why damaged steps do not count (with :attr:`replaces_damaged_steps`): a restart
        resumes from the newest intact checkpoint, skipping damaged ones, and the job then
        saves the steps after it again. Counting a damaged step as saved would drop the new
        state of its own step (returned as "already saved") and refuse every step below a
        damaged newer one ("steps only grow"), on every restart, until someone deleted it by
        hand. So the rule is about intact steps: steps only grow past the newest intact one,
        and a damaged checkpoint in the way is replaced when the save commits (moved to the
        trash, with a warning). Only this rare path reads checksums (an existing step saved
        again, or a step lower than the newest): a normal save checks nothing more."""
        committed = self.view.committed_steps()
        damaged: list[DamagedStep] = []
        if step in committed and not overwrite:
            source = self.view.checkpoint(step)
            problem = _damage(source) if self.replaces_damaged_steps else None
            if problem is not None:
                damaged.append(DamagedStep(step, source, problem))
            elif not explicit:
                source, manifest = resolve.resolve_step(self.view, step)
                return SaveResult(step, source.location, manifest.epoch, dict(manifest.metrics))
            else:
                raise CheckpointExists(
                    f"step {step} is already committed at {source.location}; pass "
                    "overwrite=True to replace it",
                    path=source.location,
                    step=step,
                )
        for newer in sorted((s for s in committed if s > step), reverse=True):
            source = self.view.checkpoint(newer)
            problem = _damage(source) if self.replaces_damaged_steps else None
            if problem is None:
                raise InvalidStep(
                    f"step {step} is lower than the newest committed step {newer} in "
                    f"{self.root}; steps only grow within a root: delete the newer "
                    "checkpoints (manager.delete(step)) or save into a new root",
                    step=step,
                )
            damaged.append(DamagedStep(newer, source, problem))
        return damaged

    def _steps_retention_removes(self, records: list[policy.CheckpointRecord]) -> list[int]:
        """The steps the retention rules do not keep among ``records``; never the targets of
        ``last`` / ``best`` as they are now."""
        if self.retention.keeps_everything:
            return []
        protected = {
            step
            for name in (LAST, BEST)
            if (target := self.view.read_pointer(name)) is not None
            and (step := parse_step_dir_name(target)) is not None
        }
        return policy.steps_to_remove(records, self.retention, protected=protected)
