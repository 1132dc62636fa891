"""The Coordinator's verbs on real gloo ranks: values and errors reach every rank alike, and
errors keep their structured fields across ranks. A rank that dies, is stopped or comes late
(a timeout everywhere else) is tested in ``tests/test_coord_failures.py``; the pool of private
groups, the wait for peers' failure reports and the rank a survivor's error names in
``tests/test_coord_groups.py``."""

from __future__ import annotations

import pickle

import pytest
import torch

import distckpt
from distckpt.coord import GATHER_FROM_RANKS, Coordinator
from distckpt.coord_frames import FRAME_BYTES
from distckpt.coord_outcomes import Outcome
from distckpt.errors import CheckpointExists, InvalidStep, RankFailure
from tests.ranks import run_ranks, values

TIMEOUT = 3.0


def _gathered(rank: int, world_size: int) -> tuple[list[int], int]:
    coord = Coordinator(None, TIMEOUT)
    try:
        squares = coord.all_gather(lambda: rank * rank, what="squaring")
        total = coord.all_reduce(lambda: rank + 1, sum, what="summing")
        return squares, total
    finally:
        coord.close()


def test_all_gather_and_all_reduce_give_every_rank_the_same_values() -> None:
    assert values(run_ranks(_gathered, 3)) == [([0, 1, 4], 6)] * 3


def _reduced(rank: int, world_size: int) -> tuple[int, list[str], tuple[str, int | None]]:
    """An all_reduce's result, the collectives it took, and the error of a failing combine."""
    coord = Coordinator(None, TIMEOUT)
    collectives: list[str] = []
    stop = distckpt.events.add_listener(lambda event: collectives.append(event.phase))

    def too_many(counts: list[int]) -> int:
        raise InvalidStep(f"{sum(counts)} is too many")

    try:
        total = coord.all_reduce(lambda: rank + 1, sum, what="summing")
        taken = list(collectives)
        with pytest.raises(InvalidStep) as failed:
            coord.all_reduce(lambda: rank + 1, too_many, what="checking")
        return total, taken, (str(failed.value), failed.value.rank)
    finally:
        stop()
        coord.close()


@pytest.mark.parametrize(
    ("world_size", "collectives"),
    [
        (2, ["collective.all_gather"]),  # one exchange: cheaper than a gather and a broadcast
        (GATHER_FROM_RANKS, ["collective.gather", "collective.broadcast"]),
    ],
)
def test_all_reduce_gives_every_rank_the_same_result_or_error(
    world_size: int, collectives: list[str]
) -> None:
    total = world_size * (world_size + 1) // 2
    # the combine's error is the same everywhere and, a function of the values, names no rank
    expected = (total, collectives, (f"{total} is too many", None))
    assert values(run_ranks(_reduced, world_size)) == [expected] * world_size


def _filling_a_frame() -> int:
    """The length of a bytes value whose report (the :class:`Outcome` a verb sends) fills a
    first-round frame exactly: the boundary at which no second round may be awaited."""
    for size in range(FRAME_BYTES):
        report = pickle.dumps(Outcome(value=b"v" * size), protocol=pickle.HIGHEST_PROTOCOL)
        if len(report) == FRAME_BYTES:
            return size
    raise AssertionError(f"no bytes value's report is {FRAME_BYTES} bytes long")


#: The length of a value whose report fills its frame to the last byte.
FILLING = _filling_a_frame()

#: Each rank's value in the mixed all_gather and gather: only rank 3's needs a second round;
#: rank 1's fills its frame to the last byte.
SIZES = (0, FILLING, FRAME_BYTES // 2, 3 * FRAME_BYTES + 7)


def _full(rank: int) -> bytes:
    """Rank 1's value, the largest, fills its frame to the last byte."""
    return bytes([rank]) * (FILLING if rank == 1 else 10)


def _values_of_every_size(
    rank: int, world_size: int
) -> tuple[list[bytes], list[bytes], list[bytes], int]:
    """Values around the frame size: one collective when all fit, a second round otherwise."""
    coord = Coordinator(None, TIMEOUT)
    collectives: list[str] = []
    stop = distckpt.events.add_listener(lambda event: collectives.append(event.phase))
    try:
        small = coord.all_gather(lambda: bytes([rank]) * 10, what="small")
        mixed = coord.all_gather(lambda: bytes([rank]) * SIZES[rank], what="mixed")
        full = coord.all_gather(lambda: _full(rank), what="full")
        for size in (0, FILLING, FRAME_BYTES // 2, 3 * FRAME_BYTES + 7):
            shared = coord.decide(lambda s=size: b"x" * s, what="broadcast")
            assert shared == b"x" * size
        return small, mixed, full, len(collectives)
    finally:
        stop()
        coord.close()


def test_object_collectives_carry_small_values_in_one_round_and_large_ones_in_two() -> None:
    small = [bytes([r]) * 10 for r in range(4)]
    mixed = [bytes([r]) * SIZES[r] for r in range(4)]
    full = [_full(r) for r in range(4)]
    # the all_gathers: 1 + 2 + 1 rounds; the broadcasts: 1 + 1 + 1 + 2 rounds
    assert values(run_ranks(_values_of_every_size, 4)) == [(small, mixed, full, 4 + 5)] * 4


def _structured_failure(rank: int, world_size: int) -> tuple[str, dict[str, object]]:
    coord = Coordinator(None, TIMEOUT)

    def local() -> None:
        if rank == 1:
            raise CheckpointExists("step 7 exists", path="/ckpt/step-7", step=7)

    try:
        coord.all_gather(local, what="checking the step")
    except CheckpointExists as exc:
        return type(exc).__name__, {"rank": exc.rank, "path": exc.path, "step": exc.step}
    finally:
        coord.close()
    raise AssertionError("no rank raised")


def test_an_error_keeps_its_type_and_fields_on_every_rank() -> None:
    fields = {"rank": 1, "path": "/ckpt/step-7", "step": 7}
    assert values(run_ranks(_structured_failure, 2)) == [("CheckpointExists", fields)] * 2


def _mixed_failures(
    rank: int, world_size: int
) -> tuple[dict[int, str], dict[int, str], tuple[str, dict[int, str]]]:
    coord = Coordinator(None, TIMEOUT)

    def local() -> None:
        raise (OSError("disk gone") if rank == 0 else CheckpointExists("step exists"))

    def rank_zero_fails() -> None:
        raise RankFailure("reading", {3: "OSError: gone"})

    def rank_one_fails() -> None:
        if rank == 1:
            raise RankFailure("reading", {3: "OSError: gone"})

    try:
        with pytest.raises(RankFailure) as gathered:
            coord.all_gather(local, what="writing")
        with pytest.raises(RankFailure) as decided:
            coord.decide(rank_zero_fails, what="deciding")
        with pytest.raises(RankFailure) as nested:
            coord.all_gather(rank_one_fails, what="writing")
        return (
            gathered.value.failures,
            decided.value.failures,
            (nested.value.what, nested.value.failures),
        )
    finally:
        coord.close()


def test_rank_failure_carries_its_failures_to_every_rank() -> None:
    gathered = {0: "OSError: disk gone", 1: "CheckpointExists: step exists"}
    # rank 0's RankFailure is rebuilt on rank 1 with its mapping, not just its text; one that
    # a single rank's own part raised is that rank's failure of this call, not a copy of it
    nested = ("writing", {1: "RankFailure: reading failed on rank 3: rank 3: OSError: gone"})
    assert values(run_ranks(_mixed_failures, 2)) == [(gathered, {3: "OSError: gone"}, nested)] * 2


def _gathered_to_rank_0(rank: int, world_size: int) -> tuple[int, list[list[bytes]], int]:
    """gather_decide with values of every size: only rank 0 sees them; every rank gets the
    decision. Counts this rank's collectives (rank 3's value needs a second, point-to-point
    round, which only it and rank 0 take part in)."""
    coord = Coordinator(None, TIMEOUT)
    seen: list[list[bytes]] = []
    collectives: list[str] = []
    stop = distckpt.events.add_listener(lambda event: collectives.append(event.phase))

    def decide(gathered: list[bytes]) -> int:
        seen.append(gathered)
        return sum(len(value) for value in gathered)

    try:
        total = coord.gather_decide(lambda: bytes([rank]) * SIZES[rank], decide, what="sizing")
        return total, seen, len(collectives)
    finally:
        stop()
        coord.close()


def test_gather_decide_gives_rank_0_every_value_and_every_rank_its_decision() -> None:
    gathered = [bytes([r]) * SIZES[r] for r in range(4)]
    results = values(run_ranks(_gathered_to_rank_0, 4))
    # gather + broadcast everywhere; rank 0 also receives rank 3's rest, which rank 3 sends
    assert results == [
        (sum(SIZES), [gathered], 3),
        (sum(SIZES), [], 2),
        (sum(SIZES), [], 2),
        (sum(SIZES), [], 3),
    ]


def _gathered_failure(rank: int, world_size: int, failing: tuple[int, ...]) -> object:
    """gather_decide where the ranks in ``failing`` raise locally: what each rank raised, and
    whether rank 0 decided anyway (it must not)."""
    coord = Coordinator(None, TIMEOUT)
    decided: list[bool] = []

    def local() -> int:
        if rank in failing:
            if len(failing) == 1:
                raise CheckpointExists("step 7 exists", path="/ckpt/step-7", step=7)
            raise OSError(f"disk {rank} gone")
        return rank

    def decide(gathered: list[int]) -> int:
        decided.append(True)
        return sum(gathered)

    try:
        coord.gather_decide(local, decide, what="checking the step")
    except CheckpointExists as exc:
        fields = {"rank": exc.rank, "path": exc.path, "step": exc.step}
        return type(exc).__name__, str(exc), fields, decided
    except RankFailure as exc:
        return type(exc).__name__, str(exc), exc.failures, decided
    finally:
        coord.close()
    raise AssertionError("no rank raised")


def test_gather_decide_raises_a_ranks_local_error_on_every_rank_alike() -> None:
    results = values(run_ranks(_gathered_failure, 3, (2,)))
    fields = {"rank": 2, "path": "/ckpt/step-7", "step": 7}
    assert results == [("CheckpointExists", "step 7 exists (on rank 2)", fields, [])] * 3


def test_gather_decide_names_every_failing_rank_on_every_rank() -> None:
    results = values(run_ranks(_gathered_failure, 3, (1, 2)))
    failures = {1: "OSError: disk 1 gone", 2: "OSError: disk 2 gone"}
    [(error_type, message, seen_failures, decided)] = set(
        (t, m, tuple(f.items()), tuple(d)) for t, m, f, d in results
    )
    assert (error_type, dict(seen_failures), decided) == ("RankFailure", failures, ())
    assert message.startswith("checking the step failed on ranks 1, 2")


def _one_type_other_messages(rank: int, world_size: int) -> tuple[str, str]:
    """Every rank fails with the same distckpt error, each with a message of its own."""
    coord = Coordinator(None, TIMEOUT)

    def local() -> None:
        raise CheckpointExists(f"step {rank} exists", step=rank)

    try:
        coord.all_gather(local, what="checking the steps")
    except CheckpointExists as exc:
        return type(exc).__name__, str(exc)
    finally:
        coord.close()
    raise AssertionError("no rank raised")


def test_an_error_of_one_type_with_other_messages_names_each_rank_with_its_own() -> None:
    # README (agree_on): a distckpt error of one type on every failing rank comes through as
    # itself, naming them: which message came from which rank
    message = (
        "checking the steps failed on ranks 0, 1: rank 0: step 0 exists; rank 1: step 1 exists"
    )
    assert values(run_ranks(_one_type_other_messages, 2)) == [("CheckpointExists", message)] * 2


def _decision_fails(rank: int, world_size: int) -> tuple[str, dict[str, object]]:
    coord = Coordinator(None, TIMEOUT)

    def decide(gathered: list[int]) -> int:
        raise CheckpointExists(f"step {sum(gathered)} exists", step=sum(gathered))

    try:
        coord.gather_decide(lambda: rank, decide, what="committing")
    except CheckpointExists as exc:
        return str(exc), {"rank": exc.rank, "step": exc.step}
    finally:
        coord.close()
    raise AssertionError("no rank raised")


def test_gather_decide_raises_rank_0s_decision_error_on_every_rank() -> None:
    # the decision ran on rank 0: its error names rank 0
    assert values(run_ranks(_decision_fails, 3)) == [("step 3 exists", {"rank": 0, "step": 3})] * 3


def _agreed(rank: int, world_size: int) -> tuple[str, str, str | None, int | None]:
    """agree_on: every rank keeps its own value; then one rank fails, and every rank raises."""
    coord = Coordinator(None, TIMEOUT)

    def fails_on_rank_1() -> str:
        if rank == 1:
            raise CheckpointExists("step 7 exists", step=7)
        return "fine"

    try:
        kept = coord.agree_on(lambda: f"state of rank {rank}", what="restoring")
        with pytest.raises(CheckpointExists) as failed:
            coord.agree_on(fails_on_rank_1, what="restoring")
        return kept, str(failed.value), failed.value.path, failed.value.rank
    finally:
        coord.close()


@pytest.mark.parametrize("world_size", [2, GATHER_FROM_RANKS])
def test_agree_on_keeps_each_ranks_value_and_raises_a_failure_on_every_rank(
    world_size: int,
) -> None:
    results = values(run_ranks(_agreed, world_size))
    expected = [
        (f"state of rank {rank}", "step 7 exists (on rank 1)", None, 1)
        for rank in range(world_size)
    ]
    assert results == expected


@pytest.mark.parametrize(
    "message",
    [
        "[gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 3000ms for send operation",
        "Application timeout caused pair closure",
    ],
)
def test_gloo_timeouts_are_timeouts(message: str) -> None:
    from distckpt.coord_health import is_timeout

    assert is_timeout(RuntimeError(message))
    assert not is_timeout(RuntimeError("Connection closed by peer [127.0.0.1]:1234"))


class _RecordingStore(torch.distributed.Store):
    """A real in-process store (torch's HashStore) that also records the order of its
    counters' increments: no interleaving of two processes shows that order reliably."""

    def __init__(self) -> None:
        super().__init__()
        self.store = torch.distributed.HashStore()
        self.added: list[str] = []

    def add(self, key: str, value: int) -> int:
        self.added.append(key)
        return self.store.add(key, value)


def test_a_failure_report_writes_its_timeout_before_its_failure() -> None:
    """A peer reading the reports must never see a failure without its timeout: it would
    raise CoordinationError where the rank that timed out raises CoordinationTimeout."""
    from distckpt.coord_groups import FAILED_IN_KEY, TIMED_OUT_IN_KEY, write_report

    store = _RecordingStore()
    write_report(store, 3, timed_out=True)
    failed, timed_out = FAILED_IN_KEY.format(operation=3), TIMED_OUT_IN_KEY.format(operation=3)
    assert store.added.index(timed_out) < store.added.index(failed)
    assert store.added[-1] == failed
    assert int(store.store.add(failed, 0)) == int(store.store.add(timed_out, 0)) == 1
