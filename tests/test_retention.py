"""Ranking and retention: the best step, the retention rules (last, best, milestones, protected,
kept by time, unranked checkpoints), creation times read from manifests, and properties over
random histories: pure functions (the creation-time tests read back manifests they wrote to a
temporary directory)."""

from __future__ import annotations

import datetime
import math
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distckpt.errors import InvalidArgument
from distckpt.manifest import Manifest, read_manifest
from distckpt.policy import (
    CheckpointRecord,
    RetentionPolicy,
    SaveSchedule,
    best_step,
    kept_as_milestones,
    kept_by_time,
    metric_value,
    parse_created_utc,
    rank_by_metric,
    steps_to_keep,
    steps_to_remove,
)


def rec(step: int, epoch: int | None = None, **metrics: float) -> CheckpointRecord:
    return CheckpointRecord(step=step, epoch=epoch, metrics=metrics)


# --------------------------------------------------------------------------------------------
# Ranking


def test_rank_min_and_max() -> None:
    records = [rec(1, loss=0.5), rec(2, loss=0.2), rec(3, loss=0.9)]
    assert [r.step for r in rank_by_metric(records, "loss", "min")] == [2, 1, 3]
    assert [r.step for r in rank_by_metric(records, "loss", "max")] == [3, 1, 2]
    assert best_step(records, "loss", "min") == 2
    assert best_step(records, "loss", "max") == 3


def test_ties_go_to_the_earlier_step() -> None:
    records = [rec(30, acc=0.9), rec(10, acc=0.9), rec(20, acc=0.8)]
    assert [r.step for r in rank_by_metric(records, "acc", "max")] == [10, 30, 20]
    assert best_step(records, "acc", "max") == 10
    assert best_step(records, "acc", "min") == 20
    # A later checkpoint must strictly improve to become best.
    assert best_step([*records, rec(40, acc=0.9)], "acc", "max") == 10
    assert best_step([*records, rec(40, acc=0.91)], "acc", "max") == 40


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_are_never_best(mode: str, bad: float) -> None:
    records = [rec(1, loss=bad), rec(2, loss=1.0), rec(3, loss=bad)]
    assert [r.step for r in rank_by_metric(records, "loss", mode)] == [2]  # type: ignore[arg-type]
    assert best_step(records, "loss", mode) == 2  # type: ignore[arg-type]
    assert best_step([rec(1, loss=bad)], "loss", mode) is None  # type: ignore[arg-type]


def test_metric_value() -> None:
    assert metric_value(rec(1, loss=0.25), "loss") == 0.25
    assert metric_value(rec(1, loss=3), "loss") == 3.0
    assert metric_value(rec(1, acc=1.0), "loss") is None
    assert metric_value(rec(1, loss=math.nan), "loss") is None
    assert metric_value(rec(1, loss=-math.inf), "loss") is None


def test_unranked_records_are_never_best() -> None:
    records = [rec(1), rec(2, acc=0.5), rec(3, loss=0.1), rec(4, loss=0.3)]
    assert [r.step for r in rank_by_metric(records, "loss", "min")] == [3, 4]
    assert best_step(records, "loss", "min") == 3
    assert best_step(records, None, "min") is None
    assert best_step([rec(1), rec(2)], "loss", "min") is None
    assert best_step([], "loss", "min") is None


def test_rank_rejects_bad_mode() -> None:
    with pytest.raises(InvalidArgument):
        rank_by_metric([rec(1, loss=1.0)], "loss", "lowest")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Retention


def test_retention_validation() -> None:
    with pytest.raises(InvalidArgument, match="keep_last"):
        RetentionPolicy(keep_last=0)
    with pytest.raises(InvalidArgument, match="keep_last"):
        RetentionPolicy(keep_last=True)
    with pytest.raises(InvalidArgument, match="keep_best"):
        RetentionPolicy(keep_best=-1, monitor="loss")
    with pytest.raises(InvalidArgument, match="keep_every_n_steps"):
        RetentionPolicy(keep_every_n_steps=2.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="mode"):
        RetentionPolicy(monitor="loss", mode="lowest")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="keep_best needs monitor"):
        RetentionPolicy(keep_best=1)
    with pytest.raises(InvalidArgument, match="monitor"):
        RetentionPolicy(monitor="")
    # monitor alone is fine: it only names the best checkpoint.
    RetentionPolicy(monitor="loss", mode="max")


def test_keeps_everything() -> None:
    records = [rec(step, loss=1.0 / step) for step in (1, 2, 3, 4)]
    assert RetentionPolicy().keeps_everything
    assert RetentionPolicy(monitor="loss").keeps_everything
    assert not RetentionPolicy(keep_last=1).keeps_everything
    assert not RetentionPolicy(keep_every_n_steps=10).keeps_everything
    assert steps_to_keep(records, RetentionPolicy()) == {1, 2, 3, 4}
    assert steps_to_remove(records, RetentionPolicy(monitor="loss")) == []


def test_keep_last() -> None:
    records = [rec(step) for step in (30, 10, 50, 20, 40)]
    policy = RetentionPolicy(keep_last=2)
    assert steps_to_keep(records, policy) == {40, 50}
    assert steps_to_remove(records, policy) == [10, 20, 30]


def test_keep_last_two_and_best_one_keeps_an_old_best() -> None:
    records = [rec(1, loss=0.9), rec(2, loss=0.1), rec(3, loss=0.5), rec(4, loss=0.6), rec(5)]
    policy = RetentionPolicy(keep_last=2, keep_best=1, monitor="loss")
    assert steps_to_keep(records, policy) == {2, 4, 5}
    assert steps_to_remove(records, policy) == [1, 3]


def test_keep_best_alone_keeps_best_and_newest() -> None:
    records = [rec(1, loss=0.9), rec(2, loss=0.1), rec(3, loss=0.5), rec(4, loss=0.6)]
    policy = RetentionPolicy(keep_best=1, monitor="loss")
    assert steps_to_keep(records, policy) == {2, 4}
    assert steps_to_remove(records, policy) == [1, 3]


def test_keep_best_several_max_mode() -> None:
    records = [rec(1, acc=0.5), rec(2, acc=0.9), rec(3, acc=0.7), rec(4, acc=0.8), rec(5, acc=0.1)]
    policy = RetentionPolicy(keep_best=2, monitor="acc", mode="max")
    assert steps_to_keep(records, policy) == {2, 4, 5}


def test_unranked_records_kept_only_by_other_rules() -> None:
    records = [rec(1, loss=0.5), rec(2), rec(3, loss=math.nan), rec(4, loss=0.7), rec(5)]
    policy = RetentionPolicy(keep_best=3, monitor="loss")
    # Only two records are ranked; keep_best=3 does not pull in unranked ones.
    assert steps_to_keep(records, policy) == {1, 4, 5}
    # keep_last keeps unranked records like any other.
    policy = RetentionPolicy(keep_last=3, keep_best=1, monitor="loss")
    assert steps_to_keep(records, policy) == {1, 3, 4, 5}


def test_best_step_always_kept_when_monitored() -> None:
    records = [rec(1, loss=0.1), rec(2, loss=0.5), rec(3, loss=0.4)]
    policy = RetentionPolicy(keep_last=1, monitor="loss")
    assert steps_to_keep(records, policy) == {1, 3}


def test_milestones() -> None:
    records = [rec(step) for step in range(100, 1100, 100)]
    policy = RetentionPolicy(keep_last=1, keep_every_n_steps=500)
    assert steps_to_keep(records, policy) == {500, 1000}
    policy = RetentionPolicy(keep_every_n_steps=300)
    assert steps_to_keep(records, policy) == {300, 600, 900, 1000}
    assert steps_to_remove(records, policy) == [100, 200, 400, 500, 700, 800]


def test_milestones_are_the_first_checkpoint_at_or_after_each_multiple() -> None:
    assert kept_as_milestones([0, 999, 1002, 1500, 2001, 2004, 3000], 1000) == {0, 1002, 2001, 3000}
    assert kept_as_milestones([500, 999], 1000) == set()  # no multiple reached but 0
    assert kept_as_milestones([1500, 1800], 1000) == {1500}  # the first one left after 1000
    assert kept_as_milestones([], 1000) == set()
    with pytest.raises(InvalidArgument):
        kept_as_milestones([1], 0)


def test_milestones_survive_saves_that_land_beside_the_multiples() -> None:
    """Saves every 3 steps with every_n_steps=500 (the crossing rule: 501, 1002, 1500, ...),
    pruned after each commit with keep_last=2: one milestone per 1000 steps stays."""
    schedule = SaveSchedule(every_n_steps=500)
    policy = RetentionPolicy(keep_last=2, keep_every_n_steps=1000)
    last, on_disk = None, []
    for step in range(3, 6001, 3):
        if schedule.due_by_counters(step, None, last_step=last, last_epoch=None):
            last = step
            on_disk.append(step)
            doomed = set(steps_to_remove([rec(s) for s in on_disk], policy))
            on_disk = [s for s in on_disk if s not in doomed]
    assert on_disk == [1002, 2001, 3000, 4002, 5001, 5502, 6000]


def test_protected_steps_kept() -> None:
    records = [rec(step) for step in (1, 2, 3, 4, 5)]
    policy = RetentionPolicy(keep_last=1)
    # 99 has no record, so it is not reported as kept.
    assert steps_to_keep(records, policy, protected={2, 99}) == {2, 5}
    assert steps_to_remove(records, policy, protected=[2, 99]) == [1, 3, 4]


def test_retention_edge_cases() -> None:
    policy = RetentionPolicy(keep_last=1, keep_best=1, monitor="loss")
    assert steps_to_keep([], policy) == set()
    assert steps_to_remove([], policy) == []
    assert steps_to_keep([rec(7)], policy) == {7}
    # Records may come from a generator.
    assert steps_to_remove((rec(step) for step in (3, 1, 2)), policy) == [1, 2]


# --------------------------------------------------------------------------------------------
# Creation times and keep_every_n_seconds


def dated(step: int, created: float | None, **metrics: float) -> CheckpointRecord:
    return CheckpointRecord(step=step, metrics=metrics, created=created)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T12:00:00+00:00", 1714564800.0),
        ("2024-05-01T12:00:00.250000+00:00", 1714564800.25),
        ("2024-05-01T12:00:00Z", 1714564800.0),
        ("2024-05-01T12:00:00", 1714564800.0),  # no offset: UTC
        ("2024-05-01T14:00:00+02:00", 1714564800.0),
        ("yesterday", None),
        ("", None),
        (None, None),
        (1714564800, None),
    ],
)
def test_parse_created_utc(text: object, expected: float | None) -> None:
    assert parse_created_utc(text) == expected


def test_record_from_a_real_manifest(tmp_path: Path) -> None:
    written = Manifest(
        step=7,
        world_size=2,
        format="torch",
        files={},
        epoch=1,
        metrics={"loss": math.nan},
        created_utc="2024-05-01T12:00:00+00:00",
    )
    (tmp_path / "manifest.json").write_bytes(written.to_json())
    record = CheckpointRecord.from_manifest(read_manifest(tmp_path))
    assert (record.step, record.epoch, record.created) == (7, 1, 1714564800.0)
    assert math.isnan(record.metrics["loss"])
    # A manifest made now carries the time it was made.
    fresh = Manifest(step=1, world_size=1, format="torch", files={})
    before = time.time()
    assert before - 5 <= CheckpointRecord.from_manifest(fresh).created <= before + 5  # type: ignore[operator]


def test_kept_by_time_anchors_on_the_oldest() -> None:
    # Checkpoints every 10 s; one kept per 25 s from the oldest: 0, 30, 60, 90.
    records = [dated(step, step * 10.0) for step in range(10)]
    assert kept_by_time(records, 25) == {0, 3, 6, 9}
    # Exactly the interval apart counts.
    assert kept_by_time(records, 30) == {0, 3, 6, 9}
    assert kept_by_time(records, 1000) == {0}
    assert kept_by_time([], 10) == set()


def test_kept_by_time_skips_unknown_and_backward_times() -> None:
    records = [dated(1, None), dated(2, 100.0), dated(3, 50.0), dated(4, 160.0), dated(5, 150.0)]
    # 1 has no time, so 2 is the anchor; 3 went back in time; 4 is 60 s after 2, so kept;
    # 5 is created before 4, the last kept by time.
    assert kept_by_time(records, 60) == {2, 4}
    with pytest.raises(InvalidArgument, match="seconds"):
        kept_by_time(records, 0)


def test_keep_every_n_seconds_with_keep_last() -> None:
    records = [dated(step, step * 10.0) for step in range(1, 11)]
    policy = RetentionPolicy(keep_last=2, keep_every_n_seconds=40)
    assert not policy.keeps_everything
    assert steps_to_keep(records, policy) == {1, 5, 9, 10}
    assert steps_to_remove(records, policy) == [2, 3, 4, 6, 7, 8]
    # Alone it still keeps the newest.
    assert steps_to_keep(records, RetentionPolicy(keep_every_n_seconds=40)) == {1, 5, 9, 10}


def test_time_history_is_rebuilt_from_manifests_after_a_restart(tmp_path: Path) -> None:
    """A run saving every 10 s with keep_last=1 and one kept per 30 s, retention after each
    commit; then a restart reads the survivors' manifests from disk and must agree."""
    policy = RetentionPolicy(keep_last=1, keep_every_n_seconds=30)
    start = datetime.datetime(2024, 5, 1, tzinfo=datetime.timezone.utc)
    on_disk: dict[int, Path] = {}
    for step in range(1, 13):
        created = start + datetime.timedelta(seconds=10 * step + 0.125)
        directory = tmp_path / f"step-{step}"
        directory.mkdir()
        manifest = Manifest(
            step=step, world_size=1, format="torch", files={}, created_utc=created.isoformat()
        )
        (directory / "manifest.json").write_bytes(manifest.to_json())
        on_disk[step] = directory
        records = [CheckpointRecord.from_manifest(read_manifest(d)) for d in on_disk.values()]
        for doomed in steps_to_remove(records, policy):
            del on_disk[doomed]  # the manager renames it into the trash
    assert sorted(on_disk) == [1, 4, 7, 10, 12]
    # The restart: records rebuilt from the manifests remove nothing, and the next commit
    # goes on from the same history.
    records = [CheckpointRecord.from_manifest(read_manifest(d)) for d in on_disk.values()]
    assert steps_to_remove(records, policy) == []
    later = dated(13, (start + datetime.timedelta(seconds=130.125)).timestamp())
    assert steps_to_remove([*records, later], policy) == [12]


# --------------------------------------------------------------------------------------------
# keep_unranked


def test_keep_unranked_keeps_checkpoints_without_the_metric() -> None:
    records = [
        rec(1, loss=0.5),
        rec(2),
        rec(3, loss=0.9),
        rec(4, acc=0.1),
        rec(5, loss=math.nan),
        rec(6, loss=0.7),
    ]
    default = RetentionPolicy(keep_best=1, monitor="loss")
    assert steps_to_remove(records, default) == [2, 3, 4, 5]
    keeping = RetentionPolicy(keep_best=1, monitor="loss", keep_unranked=True)
    # Missing, or NaN (never ranked either), is unranked: kept. Ranked losers still go.
    assert steps_to_remove(records, keeping) == [3]


def test_keep_unranked_validation() -> None:
    with pytest.raises(InvalidArgument, match="keep_unranked needs monitor"):
        RetentionPolicy(keep_last=1, keep_unranked=True)
    with pytest.raises(InvalidArgument, match="keep_unranked must be True or False"):
        RetentionPolicy(monitor="loss", keep_unranked=1)  # type: ignore[arg-type]
    # Without a count rule nothing is removed anyway.
    assert RetentionPolicy(monitor="loss", keep_unranked=True).keeps_everything


# --------------------------------------------------------------------------------------------
# Properties over random histories


# Made once, not at every draw: building a strategy costs more than drawing from it.
_CLOCK_ADVANCES = st.floats(min_value=-20, max_value=100, allow_nan=False)
_TIME_KNOWN = st.sampled_from([True, True, True, False])  # 1 in 4 unknown
_LOSSES = st.sampled_from([None, math.nan, 0.1, 0.2, 0.3, 0.5, 0.8])


@st.composite
def histories(draw: st.DrawFn) -> list[CheckpointRecord]:
    """Records of a run: growing steps, creation times that mostly grow (sometimes stepping
    back or unknown), a loss that may be missing or NaN."""
    count = draw(st.integers(min_value=0, max_value=25))
    steps = sorted(draw(st.sets(st.integers(0, 500), min_size=count, max_size=count)))
    records = []
    clock = 0.0
    for step in steps:
        clock += draw(_CLOCK_ADVANCES)
        created = clock if draw(_TIME_KNOWN) else None
        loss = draw(_LOSSES)
        metrics = {} if loss is None else {"loss": loss}
        records.append(CheckpointRecord(step=step, metrics=metrics, created=created))
    return records


policies = st.builds(
    RetentionPolicy,
    keep_last=st.none() | st.integers(1, 4),
    keep_best=st.none() | st.integers(1, 3),
    monitor=st.just("loss"),
    mode=st.sampled_from(["min", "max"]),
    keep_every_n_steps=st.none() | st.integers(1, 100),
    keep_every_n_seconds=st.none() | st.floats(1, 300),
    keep_unranked=st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(histories(), policies)
def test_retention_keeps_the_newest_and_the_best_and_removes_nothing_of_its_survivors(
    records: list[CheckpointRecord], policy: RetentionPolicy
) -> None:
    """Retention never drops the newest step or the best one; and what a restart sees is what
    retention kept: applied to its survivors, it must decide the same. Both properties are
    checked on each drawn history (drawing it is most of this test's time)."""
    kept = steps_to_keep(records, policy)
    if records:
        assert max(r.step for r in records) in kept
    best = best_step(records, policy.monitor, policy.mode)
    assert best is None or best in kept
    survivors = [r for r in records if r.step in kept]
    assert steps_to_remove(survivors, policy) == []


@settings(max_examples=300, deadline=None)
@given(histories(), st.floats(1, 300))
def test_time_history_is_the_same_whether_pruned_as_it_grows_or_at_once(
    records: list[CheckpointRecord], seconds: float
) -> None:
    """Pruning after each commit (keep_last=1 plus the time rule) keeps exactly the time
    history computed from every record the run ever made, plus the newest."""
    policy = RetentionPolicy(keep_last=1, keep_every_n_seconds=seconds)
    on_disk: list[CheckpointRecord] = []
    for record in records:
        on_disk.append(record)
        doomed = set(steps_to_remove(on_disk, policy))
        on_disk = [r for r in on_disk if r.step not in doomed]
    expected = kept_by_time(records, seconds) | ({records[-1].step} if records else set())
    assert {r.step for r in on_disk} == expected


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 400), unique=True).map(sorted), st.integers(1, 50))
def test_milestones_are_the_same_whether_pruned_as_they_grow_or_at_once(
    steps: list[int], every_n_steps: int
) -> None:
    policy = RetentionPolicy(keep_last=1, keep_every_n_steps=every_n_steps)
    on_disk: list[int] = []
    for step in steps:
        on_disk.append(step)
        doomed = set(steps_to_remove([rec(s) for s in on_disk], policy))
        on_disk = [s for s in on_disk if s not in doomed]
    expected = kept_as_milestones(steps, every_n_steps) | set(steps[-1:])
    assert set(on_disk) == expected
