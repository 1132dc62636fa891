"""Rank coordination: the one place distckpt calls torch.distributed collectives.

Every decision that ranks must share goes through a :class:`Coordinator`, so ranks cannot drift
apart. Its verbs take the *local* part as a function, run it, capture its failure instead of
raising it (a rank that raised alone would leave the others waiting in the collective), run the
collective, and then raise the same error on every rank:

* :meth:`Coordinator.all_gather` — every rank runs its function; every rank gets all values.
* :meth:`Coordinator.all_reduce` — every rank runs its function; one pure function of all
  values gives every rank the same result (or the same error). Below
  :data:`GATHER_FROM_RANKS` ranks every rank computes it after an all-gather; from there on
  rank 0 alone does, after a gather, and broadcasts it.
* :meth:`Coordinator.decide` — rank 0 runs the function; its value or error reaches every rank.
  :meth:`Coordinator.decide_within` repeats it while rank 0 waits for longer than a collective
  may take.
* :meth:`Coordinator.gather_decide` — every rank runs its function; the values (or errors)
  travel to rank 0 alone, which decides from them (or takes the error every rank must raise)
  and broadcasts the result or the error. Two collectives, a gather and a broadcast, for a
  decision only rank 0 needs the values for: a gather is one hop to rank 0 where an
  all-gather's ring takes ``world_size - 1``. Its halves, :meth:`Coordinator.gather` and
  :meth:`Coordinator.conclude`, let a caller mark the moment between them (a phase, a fault
  point); a gather must always be concluded, or the other ranks wait for the broadcast.

Errors cross ranks as their class name, message and structured fields
(:meth:`~distckpt.errors.CheckpointError.fields`) and are rebuilt on the other side
(:mod:`distckpt.coord_outcomes`: a rank's :class:`~distckpt.coord_outcomes.Outcome` and the
rules that raise the same error on every rank). Values cross as pickles in a fixed-size frame
(:mod:`distckpt.coord_frames`): one tensor collective per verb, a second only for a value that
does not fit (:data:`~distckpt.coord_frames.FRAME_BYTES`; in a gather, only the ranks whose
value did not fit send the rest, to rank 0 alone). Collectives run on the coordinator's own
gloo group (:mod:`distckpt.coord_groups`, which pools them), created with the manager's
timeout, so a dead or hung rank surfaces as :class:`CoordinationError`
(:class:`CoordinationTimeout` when gloo timed out) after that timeout instead of gloo's
30-minute default, and distckpt's collectives never interleave with the training loop's.
This module holds the verbs and their collectives; those three and
:mod:`distckpt.coord_health` (what a failed collective does to the group) hold the parts no
verb needs to be read with. Nothing here knows about files or formats.

A failed collective breaks the group for good (gloo closes its connections after a timeout),
so the coordinator marks it broken, retires it (:func:`~distckpt.coord_groups.retire_private_group`)
and makes a fresh one, with every other rank, before its next collective: one failure fails
that operation on every rank, and the next operation runs again. The ranks agree on when to
make it because they fail the same operation: the rank that timed out closes the connections
and every peer still in (or later entering) that operation's collectives fails at once. The
exception is a peer whose last collective of an operation had completed just as another rank
gave up on it (a broadcast whose bytes were sent): it learns of the failure at the first
collective of its next operation, which fails at once (or times out, at the moment the rank
that gave up timed out too, where a third rank stalled); it then reads the failure reports of
the others (:func:`~distckpt.coord_groups.report_failure`), and when they failed an earlier
operation it makes the fresh group too and runs the collective again on it, in step with them.
A peer that cannot tell (no report arrives) raises, and so does every rank waiting for it: a
rank left waiting for a fresh group fails after the timeout, never hangs. The operations are
counted per coordinator (:meth:`Coordinator.begin_operation`: the manager marks where each of
its calls begins), so every rank numbers them alike. An async save's background coordinator
(:meth:`Coordinator.spawn`) is the exception: it never makes a group in its thread, and after a
failure raises until the next save renews it in the caller's thread, on every rank alike.

A late rank's collective fails at once with gloo's "Connection closed by peer" where the rank
that waited for it timed out; it raises :class:`CoordinationTimeout` as well when that peer
reports the timeout in the same operation, so every rank raises the same class.

A group destroyed under the coordinator (``torch.distributed.destroy_process_group()`` while
an async save's collectives were still to come) raises :class:`ProcessGroupDestroyed`, saying
to wait for or close the manager first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
import torch.distributed as dist

from distckpt import events
from distckpt.coord_frames import FRAME_BYTES, frame_length, pack_frame, padded_rest, unpack_frame
from distckpt.coord_groups import (
    failed_anywhere,
    is_registered,
    retire_private_group,
    return_private_group,
    take_private_group,
)
from distckpt.coord_health import GroupHealth
from distckpt.coord_outcomes import Outcome, raise_failures
from distckpt.errors import (
    CheckpointError,
    CoordinationError,
)

logger = logging.getLogger("distckpt")
T = TypeVar("T")
R = TypeVar("R")

#: From this many ranks on, :meth:`Coordinator.all_reduce` gathers to rank 0 and broadcasts
#: the result instead of all-gathering. gloo's all-gather is a ring of ``world_size - 1``
#: steps, each a wake-up of every rank, where a gather is one step into rank 0 and a broadcast
#: one out of it: at 4 ranks on 2 cores the pair took 2.3-3.1 ms against the all-gather's
#: 4.3-4.9 ms (medians of 300 each, 4 runs). At 2 ranks the all-gather is one exchange and
#: the pair 0.1-0.2 ms slower (0.5-0.6 ms against 0.7), so two ranks keep the all-gather.
GATHER_FROM_RANKS = 3


def run_now(func: Callable[[], T]) -> Callable[[], T]:
    """Run ``func`` now and return a function that gives its value or raises its error later:
    for a verb's local part that must run before something else happens on this rank alone
    (a fault point, a phase boundary) and only then be reported to the other ranks."""
    try:
        value = func()
    except Exception as exc:  # raised again inside the verb, which reports it
        error = exc  # `exc` itself is unbound when the except block ends

        def replay() -> T:
            raise error

        return replay
    return lambda: value


@dataclass(frozen=True)
class Gathered(Generic[T]):
    """The first half of :meth:`Coordinator.gather_decide` on one rank, to be passed to
    :meth:`Coordinator.conclude`."""

    #: names the operation in errors
    what: str
    #: every rank's outcome, by rank, on rank 0; None on the other ranks, which learn the
    #: verdict from the broadcast
    outcomes: tuple[Outcome, ...] | None
    #: this rank's own failure, if its function raised: the cause of the error it will raise
    cause: Exception | None = None


def current_rank() -> int:
    """This process's global rank, or 0 without an initialised process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class Coordinator(GroupHealth):
    """Collectives among the ranks of one group, on a private gloo group.

    With no initialised process group it stands for a single process (rank 0 of 1) and every
    collective is a no-op, so the same code runs in plain scripts; so is every collective of a
    group of one rank, which has no one to tell.

    The private group is made with ``new_group(..., use_local_synchronization=True)``: only the
    ranks of ``group`` take part in creating it, so a manager can live on a subgroup.
    """

    def __init__(self, group: dist.ProcessGroup | None, timeout: float) -> None:
        self.timeout = timeout
        self._group: dist.ProcessGroup | None = None
        self._src = 0
        self._ranks: tuple[int, ...] = ()
        #: whether a broken group is replaced before the next collective (False for a
        #: background twin, whose owner renews it: see :meth:`spawn`)
        self.renews_itself = True
        if not (dist.is_available() and dist.is_initialized()):
            if group is not None:
                raise CoordinationError("group= was given but torch.distributed is not initialised")
            self.rank, self.world_size = 0, 1
            self._start_counting()
            return
        parent = group if group is not None else dist.group.WORLD
        self._ranks = tuple(dist.get_process_group_ranks(parent))
        if dist.get_rank() not in self._ranks:
            raise CoordinationError(
                f"this process (global rank {dist.get_rank()}) is not a member of the given group"
            )
        self._group = take_private_group(self._ranks, timeout)
        self.rank = dist.get_rank(self._group)
        self.world_size = dist.get_world_size(self._group)
        self._src = dist.get_global_rank(self._group, 0)
        self._start_counting()

    def _start_counting(self) -> None:
        """A healthy group and no operation yet: the next collective begins the first one."""
        #: whether a collective failed on the group (it is then replaced before the next one)
        self._broken = False
        #: the operation the last collective belonged to, counted alike on every rank
        self._operation = 0
        #: whether the next collective begins a new operation (:meth:`begin_operation`)
        self._operation_pending = True
        #: whether no collective of the current operation has completed on this rank yet
        self._first_of_operation = True

    def begin_operation(self) -> None:
        """Mark the start of an operation (a call of the manager): its first collective counts
        it. Only the counting collectives make it one, so a call that runs no collective on any
        rank counts on none."""
        self._operation_pending = True

    @property
    def _alone(self) -> bool:
        """Whether no other rank takes part (no process group, or a group of one rank): every
        collective then returns this rank's own value, without gloo (whose all-gather costs a
        lone rank about 0.5 ms: a hand-off to its worker thread and back)."""
        return self._group is None or self.world_size == 1

    @property
    def is_coordinator(self) -> bool:
        """Whether this is rank 0 of the group: the rank that commits."""
        return self.rank == 0

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The private gloo group (None without torch.distributed)."""
        return self._group

    def _run(self, verb: str, what: str, collective: Callable[[dist.ProcessGroup], None]) -> None:
        """Run ``collective`` on the private group: a fresh group first if the last one broke,
        and once more on a fresh group if this rank had completed the collective that another
        rank failed (see the module doc). Any failure raises :class:`CoordinationError`."""
        if self._operation_pending:
            self._operation_pending = False
            self._operation += 1
            self._first_of_operation = True
        if self._broken:
            if not self.renews_itself:
                raise self._still_broken(what)
            self._renew_group(what)
        first = self._first_of_operation
        try:
            self._attempt(verb, collective)
        except Exception as exc:
            peers = self._fail(exc)
            if not (first and peers.earlier and self.renews_itself):
                raise self._error(what, exc, peers) from exc
            # The peers failed an earlier operation that this rank completed: they begin this
            # one on a fresh group, so this rank joins them there.
            logger.warning(
                "%s: rank %d had completed a collective that another rank failed in an "
                "earlier operation; running this one again on a fresh group",
                what,
                self.rank,
            )
            self._renew_group(what)
            try:
                self._attempt(verb, collective)
            except Exception as again:
                raise self._error(what, again, self._fail(again)) from again
        self._first_of_operation = False

    def _attempt(self, verb: str, collective: Callable[[dist.ProcessGroup], None]) -> None:
        """Run ``collective`` once on the current group, unless it was destroyed."""
        group = self._group
        assert group is not None  # only a real group runs collectives
        if not is_registered(group):
            raise self._destroyed()
        with events.phase(f"collective.{verb}", rank=self.rank):
            collective(group)

    def _broadcast(self, value: T, *, what: str) -> T:
        """Rank 0's ``value`` on every rank (the others' argument is ignored)."""
        if self._alone:
            return value
        frame, rest = pack_frame(value if self.is_coordinator else None)
        self._run("broadcast", what, lambda g: dist.broadcast(frame, src=self._src, group=g))
        extra = frame_length(frame) - FRAME_BYTES
        if extra <= 0:
            return unpack_frame(frame, None)
        tail = padded_rest(rest if self.is_coordinator else b"", extra)
        self._run("broadcast", what, lambda g: dist.broadcast(tail, src=self._src, group=g))
        return unpack_frame(frame, tail)

    def _all_gather(self, value: T, *, what: str) -> list[T]:
        """Every rank's ``value``, indexed by rank, on every rank."""
        if self._alone:
            return [value]
        frame, rest = pack_frame(value)
        frames = [torch.empty_like(frame) for _ in range(self.world_size)]
        self._run("all_gather", what, lambda g: dist.all_gather(frames, frame, group=g))
        extra = max(frame_length(f) for f in frames) - FRAME_BYTES
        if extra <= 0:
            return [unpack_frame(f, None) for f in frames]
        tail = padded_rest(rest, extra)
        tails = [torch.empty_like(tail) for _ in range(self.world_size)]
        self._run("all_gather", what, lambda g: dist.all_gather(tails, tail, group=g))
        return [unpack_frame(f, t) for f, t in zip(frames, tails)]

    def _gather(self, value: T, *, what: str) -> list[T] | None:
        """Every rank's ``value``, indexed by rank, on rank 0; None on the other ranks."""
        if self._alone:
            return [value]
        coordinator_rank = self._src  # the global rank of rank 0
        frame, rest = pack_frame(value)
        frames = (
            [torch.empty_like(frame) for _ in range(self.world_size)]
            if self.is_coordinator
            else None
        )
        self._run(
            "gather", what, lambda g: dist.gather(frame, frames, dst=coordinator_rank, group=g)
        )
        # The rest of a value longer than a frame goes to rank 0 alone, point to point: rank 0
        # read every length in the frames and each sender knows its own, so no rank waits in a
        # second round it has no part in.
        if not self.is_coordinator:
            if rest:
                tail = torch.frombuffer(bytearray(rest), dtype=torch.uint8)
                self._run("gather", what, lambda g: dist.send(tail, dst=coordinator_rank, group=g))
            return None
        assert frames is not None  # rank 0 received them
        gathered: list[T] = []
        for rank, rank_frame in enumerate(frames):
            extra = frame_length(rank_frame) - FRAME_BYTES
            if extra <= 0:
                gathered.append(unpack_frame(rank_frame, None))
                continue
            if rank == self.rank:
                tail = padded_rest(rest, extra)
            else:
                tail = self._receive(extra, sender=rank, what=what)
            gathered.append(unpack_frame(rank_frame, tail))
        return gathered

    def _receive(self, size: int, *, sender: int, what: str) -> torch.Tensor:
        """``size`` bytes that rank ``sender`` of the group sends to this rank."""
        assert self._group is not None  # only a real group has other ranks
        received = torch.empty(size, dtype=torch.uint8)
        source = dist.get_global_rank(self._group, sender)
        self._run("gather", what, lambda g: dist.recv(received, src=source, group=g))
        return received

    def all_gather(self, local: Callable[[], T], *, what: str) -> list[T]:
        """Every rank runs ``local``; returns every rank's value, indexed by rank, on every
        rank — or, if any rank's ``local`` raised, raises on every rank alike (see
        :func:`~distckpt.coord_outcomes.raise_failures`). ``what`` names the operation in
        errors."""
        outcome, cause = Outcome.of(local, rank=self.rank)
        outcomes = self._all_gather(outcome, what=what)
        raise_failures(outcomes, what=what, cause=cause)
        return [o.value for o in outcomes]

    def all_reduce(
        self, local: Callable[[], T], combine: Callable[[list[T]], R], *, what: str
    ) -> R:
        """:meth:`all_gather`, then ``combine`` of the values by rank, the same on every rank:
        its result, or its error. ``combine`` must be a pure function of the values. Below
        :data:`GATHER_FROM_RANKS` ranks every rank computes it from the all-gathered values;
        from there on rank 0 alone does, from gathered ones, and broadcasts it
        (:meth:`gather_decide`), which is faster than the all-gather's ring. Either way a
        failing ``local`` raises on every rank alike (see
        :func:`~distckpt.coord_outcomes.raise_failures`)."""
        if self.world_size < GATHER_FROM_RANKS:
            return combine(self.all_gather(local, what=what))
        return self.conclude(self.gather(local, what=what), combine, what=what, pure=True)

    def agree_on(self, local: Callable[[], T], *, what: str) -> T:
        """Every rank runs ``local`` and keeps its own value; only the verdicts travel (a
        restored state stays on its rank). If any rank's ``local`` raised, raises on every rank
        alike, as :meth:`all_gather` does. An :meth:`all_reduce` of the verdicts (a gather to
        rank 0 and a broadcast from :data:`GATHER_FROM_RANKS` ranks on)."""
        kept: list[T] = []

        def keep_here() -> None:
            kept.append(local())

        self.all_reduce(keep_here, lambda _verdicts: None, what=what)
        return kept[0]

    def decide(self, decide: Callable[[], T], *, what: str) -> T:
        """Rank 0 runs ``decide``; its result, or its error, reaches every rank."""
        if self.is_coordinator:
            outcome, cause = Outcome.of(decide, rank=self.rank)
        else:
            outcome, cause = Outcome(), None
        return self._tell(outcome, what=what).unwrap(what=what, cause=cause)

    def _tell(self, outcome: Outcome, *, what: str) -> Outcome:
        """Rank 0's ``outcome`` of a decision on every rank (the others' is ignored)."""
        try:
            return self._broadcast(outcome, what=what)
        except CoordinationError as exc:
            if self.is_coordinator and outcome.error is None:
                # The deed is done (a commit is on disk); only telling the others failed.
                raise type(exc)(
                    f"{what}: done on rank 0 ({outcome.value!r}), but the other ranks could not "
                    f"be told: {exc}",
                    rank=self.rank,
                ) from exc
            raise

    def gather_decide(
        self, local: Callable[[], T], decide: Callable[[list[T]], R], *, what: str
    ) -> R:
        """Every rank runs ``local``; rank 0 gets the values, indexed by rank, and runs
        ``decide`` on them; its result reaches every rank. If any rank's ``local`` raised, rank
        0 does not decide and every rank raises the error :meth:`all_gather` would have
        raised (see :func:`~distckpt.coord_outcomes.raise_failures`); if ``decide`` raised,
        every rank raises its error. A gather and a broadcast: :meth:`gather`, then
        :meth:`conclude`."""
        return self.conclude(self.gather(local, what=what), decide, what=what)

    def gather(self, local: Callable[[], T], *, what: str) -> Gathered[T]:
        """The first half of :meth:`gather_decide`: every rank runs ``local`` and its outcome
        travels to rank 0. Nothing is raised for a failing ``local`` yet (only
        :meth:`conclude` tells every rank alike); the result must be passed to
        :meth:`conclude`, or the other ranks wait for rank 0's broadcast until they time out."""
        outcome, cause = Outcome.of(local, rank=self.rank)
        outcomes = self._gather(outcome, what=what)
        return Gathered(what, None if outcomes is None else tuple(outcomes), cause)

    def conclude(
        self,
        gathered: Gathered[T],
        decide: Callable[[list[T]], R],
        *,
        what: str,
        pure: bool = False,
    ) -> R:
        """The second half of :meth:`gather_decide`: rank 0 decides from the gathered values,
        or takes the gathered failure, and every rank returns or raises what it broadcasts.
        ``what`` names the decision in errors (the gather's failures keep the gather's name).
        An error of ``decide`` names rank 0 as its ``rank`` unless it names one, or unless
        ``decide`` is ``pure``: a function of the values alone, whose error is no rank's own
        (as if every rank had computed it)."""
        cause = gathered.cause
        if gathered.outcomes is None:  # not rank 0: its answer is in the broadcast
            outcome = Outcome()
        else:
            try:
                raise_failures(gathered.outcomes, what=gathered.what)
            except CheckpointError as exc:  # the error all_gather would raise on every rank
                outcome = Outcome.failure(exc)
            else:
                values = [o.value for o in gathered.outcomes]
                deciding_rank = None if pure else self.rank
                outcome, decided = Outcome.of(lambda: decide(values), rank=deciding_rank)
                cause = cause or decided
        return self._tell(outcome, what=what).unwrap(what=what, cause=cause)

    def decide_within(
        self,
        attempt: Callable[[float], T],
        *,
        wait: float,
        retry_on: type[Exception],
        what: str,
    ) -> T:
        """:meth:`decide` for a decision rank 0 may have to wait for longer than one collective
        may last (another job's lock): rank 0 calls ``attempt(seconds)``, which may block for
        ``seconds``, with at most half the timeout at a time, and every rank learns after each
        try whether to go on waiting. ``retry_on`` is the error meaning "not yet"; once
        ``wait`` seconds (rank 0's clock) have passed it is raised on every rank."""
        deadline = time.monotonic() + wait
        longest = self.timeout / 2

        def one_try() -> tuple[bool, T | None]:
            remaining = deadline - time.monotonic()
            try:
                return True, attempt(min(max(remaining, 0.0), longest))
            except retry_on:
                if deadline - time.monotonic() > 0:
                    return False, None
                raise

        while True:
            done, value = self.decide(one_try, what=what)
            if done:
                return value  # type: ignore[return-value]

    def spawn(self) -> Coordinator:
        """Another coordinator over the same ranks on a group of its own (for a background
        thread whose collectives must never interleave with this one's). Collective.

        The twin never makes a group in its thread: the ranks name each group by the attempt
        they share in the store (:data:`~distckpt.coord_groups.ATTEMPT_KEY`), and torch names a
        group it names itself from the groups registered before it, so a group made in a
        background thread while the caller's thread (another manager, or the training loop's
        own ``new_group``) makes one could be named differently on each rank, or alike twice.
        After a failure its next collective raises (:meth:`_still_broken`) unless the owner, in
        the caller's thread, called :meth:`renew` on every rank first."""
        twin = object.__new__(Coordinator)
        twin.__dict__.update(self.__dict__)
        twin._start_counting()
        twin.renews_itself = False
        if self._group is not None:
            twin._group = take_private_group(self._ranks, self.timeout)
        return twin

    def close(self) -> None:
        """Give the private group back to the pool, or retire it if a collective failed on it
        here or on a peer (which reported it). Safe to call twice."""
        group, self._group = self._group, None
        if group is None or not is_registered(group):
            return  # destroyed already: nothing to give back
        if self._broken or failed_anywhere(group):
            retire_private_group(group)
        else:
            return_private_group(self._ranks, group)
