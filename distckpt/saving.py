"""One save a manager decided to make, from its proposal to its commit, and the schedule's count
of it.

:class:`Saver` proposes (:func:`distckpt.proposal.propose`), then commits the plan in the
calling thread or hands it to the async save's background thread
(:class:`~distckpt.background.BackgroundSaves`), and tells the
:class:`~distckpt.decisions.SaveDecider` what the schedule counts from now. A hand-off to that
thread that fails before the thread took the plan (its group cannot be renewed, the thread
cannot start or takes no more work, a Ctrl-C lands in it) discards the staging area at once, as
a failed commit does.
The manager decides whether to save and owns every piece this uses (the groups, the store, the
buffers, the thread).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from distckpt import proposal, protocol
from distckpt.background import BackgroundSaves
from distckpt.coord import Coordinator
from distckpt.decisions import SaveDecider, SaveDecision
from distckpt.errors import CheckpointError
from distckpt.formats import CheckpointFormat
from distckpt.launcher import LauncherWatch
from distckpt.loader_warnings import SharedGeneratorLoaderWarning
from distckpt.results import SaveResult
from distckpt.snapshot import SnapshotBuffers
from distckpt.storage import RootStore
from distckpt.tidying import BackgroundTidy
from distckpt.weights_only import RefusedValuesWarning


class Saver:
    """The saves of one manager: ``token`` names their staging areas (with a count of the
    saves, unique to each), ``background`` is the async saves' thread (None: sync saves), and
    ``tidying`` runs rank 0's removals after each commit."""

    def __init__(
        self,
        *,
        coord: Coordinator,
        store: RootStore,
        fmt: CheckpointFormat,
        decider: SaveDecider,
        token: str,
        space_margin: float,
        launcher: LauncherWatch,
        snapshot: SnapshotBuffers | None,
        background: BackgroundSaves | None,
        tidying: BackgroundTidy,
    ) -> None:
        self._coord = coord
        self._store = store
        self._format = fmt
        self._decider = decider
        self._token = token
        self._space_margin = space_margin
        self._launcher = launcher
        self._snapshot = snapshot
        self._background = background
        self._tidying = tidying
        self._count = 0
        #: warns once per manager about values a default restore would refuse
        self._refused_values = RefusedValuesWarning()
        #: warns once per manager about a loader a resume would shuffle differently
        self._shared_generator_loaders = SharedGeneratorLoaderWarning()

    def save(self, request: proposal.SaveRequest, state: Any, decision: SaveDecision) -> SaveResult:
        """Save ``state`` as ``decision`` says (collective); any previous save is done. An
        async save returns a result with ``done=False`` at once, unless it is a preemption
        save, which must be durable first."""
        self._count += 1
        self._shared_generator_loaders.check(state)
        plan = proposal.propose(
            request,
            state,
            coord=self._coord,
            store=self._store,
            fmt=self._format,
            snapshot=self._snapshot,
            token=f"{self._token}-{self._count}",
            space_margin=self._space_margin,
            launcher=self._launcher,
            twin_broken=self._background is not None and self._background.coord.broken,
        )
        self._decider.resuming = False  # a save was tried: a later restore is no resume
        if isinstance(plan, SaveResult):  # committed already: the schedule counts from it
            self._decider.count_save(plan.step, plan.epoch)
            result = plan  # durable: a preemption save is done
        else:
            commit = functools.partial(
                protocol.write_and_commit,
                plan,
                store=self._store,
                fmt=self._format,
                launcher=self._launcher,
                tidying=self._tidying,
                refused_values=self._refused_values,
            )
            if self._background is None:
                result = commit(coord=self._coord)
                self._decider.count_save(plan.step, plan.epoch)
            else:
                self._hand_off(plan, commit, self._background)
                result = SaveResult(
                    plan.step, plan.destination, plan.epoch, plan.metrics, done=False
                )
                if decision.preempt:
                    result = self.wait() or result  # a preemption save must be durable first
        if decision.preempt:
            self._decider.preemption_saved(request.step, report=self._coord.is_coordinator)
        return result

    def _hand_off(
        self,
        plan: protocol.SavePlan,
        commit: Callable[..., SaveResult],
        background: BackgroundSaves,
    ) -> None:
        """Give ``plan`` to ``background``'s thread, which runs ``commit`` with its own
        coordinator, renewing that coordinator's group first when the plan says so. The plan
        has one owner at a time: this thread until the background thread starts the commit,
        that thread from then on (:meth:`BackgroundSaves.submit`). When the renewal fails (a
        rank could not make the group), or the submission fails or the hand-off is
        interrupted (a Ctrl-C, at any point) before that thread took the plan, the staging area
        is discarded here and the schedule's count put back (the save is not made), and the
        error raised; the submission's ``RuntimeError`` (the thread
        could not be started, or takes no work at interpreter exit) as a
        :class:`~distckpt.errors.CheckpointError` naming the step and the rank. A submission
        interrupted after the thread took the plan leaves it to the thread, in flight."""
        # Who owns the plan once made: background.cancel() decides (see BackgroundSaves.submit).
        # Made inside the try, so that an interrupt landing at any point of the hand-off, its
        # making included, ends the plan here when the background thread never got it.
        outcome: Future[SaveResult] | None = None
        counted = False

        def abandon() -> None:
            """End the plan while this thread still owns it (no commit will run for it)."""
            if counted:
                self._decider.in_flight_failed()
            protocol.release_staging(plan, store=self._store)

        try:
            outcome = Future()
            if plan.renew_twin:  # here, never in the background thread (see spawn)
                background.coord.renew(f"renewing the background save's group for step {plan.step}")
            self._decider.count_in_flight(plan.step, plan.epoch)  # wait() undoes a failure
            counted = True
            background.submit(lambda coord: commit(coord=coord), outcome)
        except BaseException as exc:
            # cancel() succeeds while the background thread has not started the commit (also
            # when submit cancelled it already, or had made it the one in flight): the plan is
            # still this thread's to end. When it fails, the thread runs the plan: in flight,
            # also when the interrupt landed after the submission, before submit made it so.
            if outcome is None or background.cancel(outcome):
                abandon()
            else:
                background.keep_in_flight(outcome)
            # "can't start new thread", "cannot schedule new futures": the thread did not take
            # the plan. A CheckpointError (the renewal's) names the step already.
            if (
                isinstance(exc, RuntimeError)
                and not isinstance(exc, CheckpointError)
                and outcome is not None
                and outcome.cancelled()
            ):
                raise CheckpointError(
                    f"the background thread could not take the async save of step {plan.step}: "
                    f"{exc}",
                    rank=self._coord.rank,
                    step=plan.step,
                ) from exc
            raise

    def wait(self) -> SaveResult | None:
        """The async save in flight's result once durable, or its error (then the schedule
        counts from what came before it); None when no save is in flight. An interrupted wait
        (a Ctrl-C) leaves the save in flight and counted: a later wait has its outcome."""
        if self._background is None:
            return None
        # Only the save's own failure uncounts it: a Ctrl-C in the wait leaves it in flight.
        return self._background.wait(on_failure=self._decider.in_flight_failed)

    def drop_snapshot(self) -> None:
        """Let go of the async save's snapshot buffers (a copy of the state), once the manager
        closed: no save comes after."""
        self._snapshot = None

    @property
    def in_flight(self) -> bool:
        """Whether an async save is still running on this rank."""
        return self._background is not None and self._background.in_flight
