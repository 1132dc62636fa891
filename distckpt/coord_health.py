"""The health of a :class:`~distckpt.coord.Coordinator`'s private group: what a failed
collective does to it (the group marked broken, the failure reported to the other ranks and
theirs read), the error every rank raises for it, and the group's replacement.

A module of its own because it is the failure path of every verb, which none of the verbs
needs to be read with; :class:`GroupHealth` is a base of the coordinator, whose module doc
says when a group breaks and when the ranks replace it.
"""

from __future__ import annotations

import torch.distributed as dist

from distckpt import errors
from distckpt.arguments import as_seconds
from distckpt.coord_groups import (
    PeerFailures,
    is_registered,
    peer_failures,
    report_failure,
    retire_private_group,
    take_private_group,
)
from distckpt.errors import (
    CoordinationError,
    CoordinationTimeout,
    ProcessGroupDestroyed,
    describe_error,
)

#: gloo's own words for a collective that ran out of time. torch raises them as a plain
#: RuntimeError (no DistBackendError, no TimeoutError), so gloo's message is what tells a timeout
#: from a peer that died; after a timeout gloo closes the pair, and the next collective on the
#: group fails with the second message.
GLOO_TIMEOUT_MESSAGES = ("Timed out waiting", "Application timeout caused pair closure")


#: How long a rank whose first collective of an operation (after the first operation) failed
#: (a peer closed the connection, or, with 3 ranks or more, it timed out just as a peer timed
#: out in the operation before) waits for the peers' failure reports
#: (:func:`~distckpt.coord_groups.peer_failures`): a live peer writes its report right after
#: its collective failed; a dead or stopped one never does, and then the error is raised this
#: much later. Capped by the coordinator's timeout. Every other failed collective reads the
#: reports once, without waiting.
PEER_REPORT_WAIT = 2.0


def is_timeout(exc: BaseException) -> bool:
    """Whether a failed collective ran out of time (rather than losing a peer)."""
    if isinstance(exc, TimeoutError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in GLOO_TIMEOUT_MESSAGES)


#: The shortest timeout taken. gloo counts whole milliseconds (under 1 ms is 0 ms, which fails
#: every collective at once), and connecting the group's ranks must fit in it too: at 2 ranks
#: on one machine 1 ms failed every time (once aborting a rank inside gloo), 10 ms worked; a
#: tenth of a second leaves room for a loaded machine. A floor, not advice: a job's timeout is
#: seconds to minutes.
SHORTEST_TIMEOUT = 0.1
#: The longest: seconds that gloo's timeout (and ``datetime.timedelta``) still hold.
LONGEST_TIMEOUT = 10**7


def check_timeout(timeout: object) -> float:
    """``timeout`` as seconds (:func:`~distckpt.arguments.as_seconds`, as every seconds option
    is read: a NumPy number too), refused unless gloo can take it: from
    :data:`SHORTEST_TIMEOUT` (0.1 s) to below :data:`LONGEST_TIMEOUT`."""
    seconds = as_seconds(timeout)
    if seconds is None or not SHORTEST_TIMEOUT <= seconds < LONGEST_TIMEOUT:
        raise errors.InvalidArgument(
            f"timeout must be a number of seconds from {SHORTEST_TIMEOUT:g} (a shorter one leaves "
            f"the ranks no time to connect) to below {LONGEST_TIMEOUT:g}, not {timeout!r}"
        )
    return seconds


class GroupHealth:
    """The failure handling of a coordinator's group (a base of
    :class:`~distckpt.coord.Coordinator`, which sets these attributes)."""

    timeout: float
    rank: int
    world_size: int
    _group: dist.ProcessGroup | None
    _ranks: tuple[int, ...]
    #: whether a collective failed on the group (it is then replaced before the next one)
    _broken: bool
    #: the operation the last collective belonged to, counted alike on every rank
    _operation: int
    #: whether no collective of the current operation has completed on this rank yet
    _first_of_operation: bool

    def _fail(self, exc: Exception) -> PeerFailures:
        """Mark the group broken after ``exc``, report it to the other ranks and return what
        they reported. At the first collective of an operation after the first one, wait up to
        :data:`PEER_REPORT_WAIT` for the reports (a peer that closed the connection, or one
        that timed out in the operation before, reports a moment later), except where this
        rank timed out with a single peer: that peer is the one that did not come, and never
        reports. Anywhere else the reports are read once."""
        if isinstance(exc, ProcessGroupDestroyed):
            raise exc
        group = self._group
        assert group is not None
        if not is_registered(group):
            raise self._destroyed() from exc
        self._broken = True
        timed_out = is_timeout(exc)
        report_failure(group, operation=self._operation, timed_out=timed_out)
        # Only the first collective of an operation after the first one can have failed for a
        # peer's failure of the operation before (see the module doc), whose report may still
        # be on its way; anywhere else the reports are read once, so that a survivor of a dead
        # peer (which never reports) raises at once. Timed out here too: a rank that completed
        # the operation before while another rank was left waiting in it (a broadcast it
        # received, where a third rank stalled) enters this one at once, and times out in it at
        # the moment that rank times out there and only then reports. Raising without its
        # report would leave this rank an operation behind the others for good. That takes a
        # third rank: with one peer, a timeout here means that very peer did not come, and
        # waiting for its report would only raise the error later on every such call.
        may_follow_a_failure = (
            self._first_of_operation
            and self._operation > 1
            and (not timed_out or self.world_size > 2)
        )
        return peer_failures(
            group,
            operation=self._operation,
            timed_out_here=timed_out,
            wait=min(PEER_REPORT_WAIT, self.timeout) if may_follow_a_failure else 0.0,
        )

    def _error(self, what: str, exc: Exception, peers: PeerFailures) -> CoordinationError:
        """The error of a failed collective: :class:`CoordinationTimeout` when it timed out
        here, or when a peer reports having timed out in this operation (which closed the
        connection this rank then found closed)."""
        if is_timeout(exc):
            hint = (
                f"another rank died, hung or stopped calling distckpt in step with this one "
                f"(timeout {self.timeout:g} s)"
            )
        elif peers.timed_out:
            hint = (
                f"another rank gave up waiting for this one after the timeout "
                f"({self.timeout:g} s) and closed the connection: this rank came late"
            )
        else:
            hint = (
                f"another rank died, failed a collective before or stopped calling distckpt "
                f"in step with this one (timeout {self.timeout:g} s)"
            )
        error_type = (
            CoordinationTimeout if is_timeout(exc) or peers.timed_out else CoordinationError
        )
        return error_type(
            f"{what}: the collective among {self.world_size} ranks failed on rank "
            f"{self.rank}; {hint}: {describe_error(exc)}",
            rank=self.rank,
        )

    def _destroyed(self) -> ProcessGroupDestroyed:
        """The error of a collective whose group ``destroy_process_group()`` destroyed."""
        return ProcessGroupDestroyed(
            "the process group was destroyed (torch.distributed.destroy_process_group()) "
            "while distckpt still had collectives to run, such as an async save's commit: call "
            "mgr.wait() or mgr.close() on every manager before destroy_process_group()",
            rank=self.rank,
        )

    def _still_broken(self, what: str) -> CoordinationError:
        """The error of a background twin's collective on a group broken earlier: the twin
        never makes a group itself (see :meth:`spawn`); its owner renews it first."""
        return CoordinationError(
            f"{what}: a collective of the background save before failed, and its gloo group "
            "is renewed only by the next save's call, in step with the other ranks",
            rank=self.rank,
        )

    @property
    def broken(self) -> bool:
        """Whether a collective failed on the group here (it is replaced before the next)."""
        return self._broken

    def renew(self, what: str = "renewing the background save's group") -> None:
        """Replace the group with a fresh one now, made with every other rank, which must
        call this at the same point (collective); for a background twin, whose own thread
        never makes groups (see :meth:`spawn`). ``what`` names the renewal in its error.

        A rank that fails to make the group raises at once; the others cannot connect to it
        and raise once the timeout has run out. Each rank keeps the group it had: the ranks
        whose group broke keep it broken, and say so in the next save's proposal, so the next
        save tries the renewal again on every rank, under a name of its own (the rank that
        failed moved the attempt the ranks share past the failed one:
        :data:`~distckpt.coord_groups.ATTEMPT_KEY`)."""
        if self._group is not None:
            self._renew_group(what)

    def _renew_group(self, what: str) -> None:
        """Replace the broken group with a fresh one, made with every other rank (each renews
        before the same operation's collectives; see the module doc), and retire it."""
        broken = self._group
        assert broken is not None
        if not is_registered(broken):
            raise self._destroyed()
        try:
            fresh = take_private_group(self._ranks, self.timeout)
        except CoordinationError as exc:  # the group it had is kept (see renew)
            raise type(exc)(
                f"{what}: a collective failed earlier, and replacing distckpt's gloo group "
                f"with the other ranks failed too (a rank died or is no longer in step): {exc}",
                rank=self.rank,
            ) from exc
        retire_private_group(broken)
        self._group, self._broken = fresh, False
