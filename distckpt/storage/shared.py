"""What both stores share: the parts of :class:`~distckpt.storage.RootStore` that only read
the root through its :class:`~distckpt.storage.views.RootView`."""

from __future__ import annotations

import atexit
import logging
import weakref
from collections.abc import Collection

from distckpt import damaged, policy, resolve
from distckpt.errors import CheckpointExists, CorruptCheckpoint, InvalidStep, ReadOnlyRoot
from distckpt.layout import BEST, LAST, parse_step_dir_name
from distckpt.manifest import Manifest
from distckpt.results import CheckpointLocation, SaveResult
from distckpt.storage import OpenedRoot, RootStore
from distckpt.storage.views import RootView

logger = logging.getLogger("distckpt")

#: Stores holding a lease, released at interpreter exit by an ``atexit`` hook. An async save
#: still in flight at exit is finished by a hook that runs before every ``atexit`` hook
#: (:mod:`distckpt.background`), so before its lease goes.
_open_stores: weakref.WeakSet[RootStore] = weakref.WeakSet()


@atexit.register
def _release_leases_at_exit() -> None:
    for store in list(_open_stores):
        store.close()


def log_upkeep_failure(location: CheckpointLocation, links: str, exc: Exception) -> None:
    """After a commit, moving the ``links`` (``"links"``, ``"pointers"``) or applying retention
    failed: logged, never raised. A start repairs the links but never applies retention (a job
    opening a root with ``keep_last=1`` to restore an older step must not lose it there)."""
    logger.error(
        "committed %s, but updating %s or retention failed (%s are redone at the next commit "
        "or start, retention at the next commit or by distckpt prune): %s",
        location,
        links,
        links,
        exc,
    )


def release_at_exit(store: RootStore) -> None:
    """Have ``store``'s lease released at interpreter exit (until :func:`opened_no_more`)."""
    _open_stores.add(store)


def opened_no_more(store: RootStore) -> None:
    """``store`` was closed: nothing left to release at exit."""
    _open_stores.discard(store)


class ViewedStore(RootStore):
    """A store that reads its root through ``view`` (a base class: the store sets these)."""

    view: RootView
    retention: policy.RetentionPolicy
    #: never write: changes raise :class:`~distckpt.ReadOnlyRoot`
    read_only: bool

    def _opened(
        self, removed: tuple[CheckpointLocation, ...] = (), *, checked: list[Manifest] | None = None
    ) -> OpenedRoot:
        """What opening the root found: the newest committed checkpoint that passes its
        check, and ``removed``. ``checked``: the manifests of every committed checkpoint that
        passes its check, when the caller just checked them all (the root is not read again)."""
        if checked is None:
            newest = resolve.newest_valid(self.view)
            checked = [] if newest is None else [newest[1]]
        if not checked:
            return OpenedRoot(None, removed)
        manifest = max(checked, key=lambda manifest: manifest.step)
        created = policy.parse_created_utc(manifest.created_utc)
        return OpenedRoot((manifest.step, manifest.epoch), removed, newest_created=created)

    def _refuse_if_read_only(self, change: str) -> None:
        if self.read_only:
            raise ReadOnlyRoot(
                f"cannot {change}: the checkpoint root {self.root} was opened with "
                "read_only=True, which never writes to it",
                path=self.root,
            )

    def check_step(self, step: int, *, overwrite: bool, explicit: bool) -> SaveResult | None:
        # the rules below look at this step and newer ones only
        committed = self.view.committed_steps_from(step)
        if step in committed and not overwrite:
            source = self.view.checkpoint(step)
            if not explicit:
                return self._committed_result(step)
            raise CheckpointExists(
                f"step {step} is already committed at {source.location}; pass "
                "overwrite=True to replace it",
                path=source.location,
                step=step,
            )
        if committed and step < committed[-1]:
            raise InvalidStep(
                f"step {step} is lower than the newest committed step {committed[-1]} in "
                f"{self.root}; steps only grow within a root: delete the newer "
                "checkpoints (manager.delete(step)) or save into a new root"
                + damaged.verdicts_on_newer(self.view, step, committed),
                step=step,
            )
        return None

    def _committed_result(self, step: int) -> SaveResult:
        """What a forced or scheduled save of the committed ``step`` returns: that checkpoint.
        One that fails its check is refused here, before anything is written, naming the ways
        out: for a damaged one (a manifest, or ``COMMIT`` object), delete or overwrite; for one
        not judged damaged (a format of a newer version, or of a plugin not imported), a
        distckpt that reads it."""
        try:
            source, manifest = resolve.resolve_step(self.view, step)
        except CorruptCheckpoint as exc:
            location = self.view.checkpoint(step).location
            way_out = (
                f"delete it (manager.delete({step}), or distckpt delete) or save the step with "
                "overwrite=True to replace it"
                if exc.damaged
                else "it may be sound: upgrade distckpt, or import the plugin of its format, "
                "to read it"
            )
            raise CorruptCheckpoint(
                f"step {step} is already committed at {location}, but fails its check, so a "
                f"forced or scheduled save cannot return it: {exc}; {way_out}",
                damaged=exc.damaged,
                path=exc.path or location,
                step=step,
            ) from exc
        return SaveResult(step, source.location, manifest.epoch, dict(manifest.metrics))

    def _linked_steps(self) -> set[int]:
        """The steps ``last`` / ``best`` name now (a pointer naming no step dir counts for
        none)."""
        return {
            step
            for name in (LAST, BEST)
            if (target := self.view.read_pointer(name)) is not None
            and (step := parse_step_dir_name(target)) is not None
        }

    def _steps_retention_removes(
        self, records: list[policy.CheckpointRecord], linked_before: Collection[int] = ()
    ) -> list[int]:
        """The steps the retention rules do not keep among ``records``; never the targets of
        ``last`` / ``best`` as they are now, nor the ``linked_before`` steps (what they named
        before the links were moved: a prune whose ``monitor``/``mode`` differ from the job's
        moves ``best`` away from the job's best, which must survive it)."""
        if self.retention.keeps_everything:
            return []
        # Protecting more steps only ever keeps more: when the rules remove nothing even
        # without the pointers' targets protected, those need not be read (two requests on an
        # object store at every save).
        if not policy.steps_to_remove(records, self.retention, protected=linked_before):
            return []
        protected = self._linked_steps() | set(linked_before)
        return policy.steps_to_remove(records, self.retention, protected=protected)
