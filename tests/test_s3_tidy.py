"""On an ``s3://`` root, rank 0 deletes a removed step's objects (and at a start the leftovers
of dead writers) only once the outcome reached every rank (``tidy()``): a deletion however
slow fails neither a committed save, a ``delete``, a ``prune`` nor the start of a requeued
job. Inside the operation only the step's ``COMMIT`` goes (one request, after one for the
record a killed set-aside may have left), so the step is unpublished at once; what a crash
before the objects went leaves behind is a dead writer's save to the next start or ``gc``.

The store is slowed or broken by a real proxy in front of the real test server
(tests/s3proxy.py), picking the batched deletes of one step's objects by the names in their
body: what thousands of objects make slow. A slow delete is one held at the proxy until rank 1
has the operation's outcome (it writes a flag file then): rank 1 can only get there if rank 0
told the outcome before that delete, so no test depends on how long anything takes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import distckpt
from distckpt.layout import step_dir_name
from distckpt.objstore import ObjectStore
from distckpt.policy import RetentionPolicy
from distckpt.results import CheckpointLocation
from distckpt.storage import open_store, open_view
from tests.ranks import run_ranks, values
from tests.s3proxy import Rule, S3Proxy
from tests.s3server import S3Server
from tests.test_s3_store import _write_attempt
from tests.waiting import after_rank_0_removals

pytest.importorskip("botocore")

#: the collectives' timeout: an operation whose delete were held inside it would fail then
TIMEOUT = 20.0
JOB_TIMEOUT = 120.0


def _keys(url: str, options: dict[str, Any], step: int) -> list[str]:
    """The names of every object under ``step``'s prefix, relative to the root."""
    with ObjectStore(url, options) as store:
        return [info.key for info in store.list(f"{step_dir_name(step)}/")]


def _save_location(url: str, options: dict[str, Any], step: int) -> str:
    """The URL of the (only) save under ``step``'s prefix."""
    (attempt,) = {key.split("/")[1] for key in _keys(url, options, step) if key.count("/") > 1}
    return f"{url}/{step_dir_name(step)}/{attempt}"


def _hold_removal(proxy: S3Proxy, step: int, flag: Path) -> Rule:
    """Hold the batched deletes of ``step``'s objects until ``flag`` exists; the rule, to
    check that it acted."""
    rule = proxy.hold(
        "POST", "?delete", body_parts=(f"/{step_dir_name(step)}/".encode(),), times=100
    )
    rule.release_once_exists(flag)
    return rule


@contextlib.contextmanager
def _flag_when_done(rank: int, flag: Path) -> Iterator[None]:
    """On rank 1, write ``flag`` once the block is done, returned or raised (a rank 0 held
    in a delete is released then, rather than at the proxy's hold timeout)."""
    try:
        yield
    finally:
        if rank == 1:
            flag.touch()


@contextlib.contextmanager
def _manager_through_a_proxy_on_rank_0(
    rank: int, url: str, options: dict[str, Any], port: int
) -> Iterator[tuple[distckpt.CheckpointManager, S3Proxy | None]]:
    """A manager with ``keep_last=1`` and the short timeout, and on rank 0 the proxy (in
    front of the server on ``port``) its requests go through; the other ranks go straight to
    the server, with no proxy."""
    with contextlib.ExitStack() as stack:
        proxy = stack.enter_context(S3Proxy(port)) if rank == 0 else None
        endpoint = f"http://127.0.0.1:{port}" if proxy is None else proxy.endpoint
        options = {**options, "endpoint_url": endpoint}
        yield (
            stack.enter_context(
                distckpt.CheckpointManager(
                    url, storage_options=options, timeout=TIMEOUT, keep_last=1
                )
            ),
            proxy,
        )


def _state(step: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4,), float(step))}


def _save_steps(url: str, options: dict[str, Any], *steps: int) -> None:
    """Save ``steps`` in one job of one rank, keeping them all."""
    with distckpt.CheckpointManager(url, storage_options=options) as mgr:
        for step in steps:
            mgr.save(step, _state(step))


def _saves_two_steps(
    rank: int, world_size: int, url: str, options: dict[str, Any], port: int, flags: Path
) -> tuple[list[int], bool]:
    """Save steps 1 and 2 with ``keep_last=1``, rank 0's delete of step 1's objects held until
    rank 1's save of step 2 returned; the steps saved then listed, and whether the delete was
    held (rank 0; True elsewhere)."""
    steps: list[int] = []
    rules: list[Rule] = []
    with _manager_through_a_proxy_on_rank_0(rank, url, options, port) as (mgr, proxy):
        for step in (1, 2):  # the second one's retention removes step 1
            if step == 2 and proxy is not None:
                rules = [_hold_removal(proxy, 1, flags / "saved")]
            with _flag_when_done(rank, flags / "saved") if step == 2 else contextlib.nullcontext():
                result = mgr.save(step, _state(step))
            assert result is not None
            steps.append(result.step)
        after_rank_0_removals(mgr)  # they run in the background, after rank 1's save returned
        dist.barrier()  # the training loop's own collective
        steps.extend(mgr.steps())
    return steps, all(rule.arrived.is_set() for rule in rules)


def test_a_slow_delete_of_a_retained_steps_objects_never_fails_the_committed_save(
    s3_server: S3Server, s3_url: str, tmp_path: Path
) -> None:
    options = s3_server.storage_options()
    out = run_ranks(
        _saves_two_steps, 2, s3_url, options, s3_server.port, tmp_path, timeout=JOB_TIMEOUT
    )
    assert values(out) == [([1, 2, 2], True)] * 2
    assert _keys(s3_url, options, 1) == []


def _saves_on_while_a_removal_is_held(
    rank: int, world_size: int, url: str, options: dict[str, Any], port: int, flags: Path
) -> tuple[list[int], bool]:
    """Save steps 1 and 2 (``keep_last=1``: step 1 is unpublished), with rank 0's delete of
    step 1's objects held until rank 1 has made its NEXT calls too (save 3, prune, delete 3):
    were rank 0 held inside any of them, rank 1 would time out there. The steps left, and
    whether the delete was held (rank 0; True elsewhere)."""
    rules: list[Rule] = []
    with _manager_through_a_proxy_on_rank_0(rank, url, options, port) as (mgr, proxy):
        mgr.save(1, _state(1))
        if proxy is not None:
            rules = [_hold_removal(proxy, 1, flags / "next calls")]
        with _flag_when_done(rank, flags / "next calls"):
            mgr.save(2, _state(2))
            mgr.save(3, _state(3))
            mgr.prune()
            mgr.delete(3)
        after_rank_0_removals(mgr)
        return mgr.steps(), all(rule.arrived.is_set() for rule in rules)


def test_a_slow_delete_on_an_s3_root_holds_up_none_of_the_calls_the_ranks_make_next(
    s3_server: S3Server, s3_url: str, tmp_path: Path
) -> None:
    """README: a deletion slower than ``timeout`` fails neither the operation nor the call the
    ranks make next, on an S3 root as on a POSIX one (rank 0 deletes in the background)."""
    options = s3_server.storage_options()
    out = run_ranks(
        _saves_on_while_a_removal_is_held,
        2,
        s3_url,
        options,
        s3_server.port,
        tmp_path,
        timeout=JOB_TIMEOUT,
    )
    assert values(out) == [([], True)] * 2  # step 3's save removed step 2, delete step 3
    assert [_keys(s3_url, options, step) for step in (1, 2, 3)] == [[], [], []]


def test_the_starts_cleanup_never_reports_the_jobs_own_removed_save_as_a_dead_writers(
    s3_server: S3Server, s3_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The start's leftover scan runs in the background: held at its listing until the first
    save's retention has unpublished step 1 (its objects not yet deleted), it meets step 1's
    save with no COMMIT. It deletes it, but neither logs nor reports it as left by a writer
    that died: gc reports nothing."""
    direct = s3_server.storage_options()
    _save_steps(s3_url, direct, 1)
    with S3Proxy(s3_server.port) as proxy:
        listing = proxy.hold("GET", "prefix=ckpt%2F&max-keys=1000")  # the scan's whole listing
        options = s3_server.storage_options(endpoint_url=proxy.endpoint)
        with (
            caplog.at_level(logging.INFO, logger="distckpt"),
            distckpt.CheckpointManager(s3_url, storage_options=options, keep_last=1) as mgr,
        ):
            assert listing.arrived.wait(JOB_TIMEOUT)
            mgr.save(2, _state(2))  # retention unpublishes step 1; its objects go at tidy
            listing.release()
            after_rank_0_removals(mgr)
            assert mgr.gc() == []
    assert not [record for record in caplog.records if "died" in record.getMessage()]
    assert _keys(s3_url, direct, 1) == []


def _leave_a_killed_writers_save(url: str, options: dict[str, Any], step: int) -> str:
    """Leave what a job killed while it saved ``step`` leaves: its objects and its expired
    claim; its attempt."""
    attempt = "killed-writer"
    _write_attempt(url, options, step, attempt)
    with ObjectStore(url, options) as store:
        claim = {"attempt": attempt, "host": "elsewhere", "pid": 1, "expires_unix": 0.0}
        store.put_bytes(f".writers/{attempt}", json.dumps(claim).encode())
    return attempt


def _opens(rank: int, world_size: int, url: str, options: dict[str, Any], flag: Path) -> list[Any]:
    with _flag_when_done(rank, flag):
        mgr = distckpt.CheckpointManager(url, storage_options=options, timeout=TIMEOUT)
    with mgr:
        dist.barrier()  # the training loop's own collective (gc waits for rank 0's removals)
        return [mgr.latest_step(), [str(location) for location in mgr.gc()]]


def test_a_slow_delete_of_a_dead_writers_leftovers_never_fails_the_start_of_a_requeued_job(
    s3_server: S3Server, s3_url: str, tmp_path: Path
) -> None:
    direct = s3_server.storage_options()
    _save_steps(s3_url, direct, 1)
    attempt = _leave_a_killed_writers_save(s3_url, direct, 2)
    with S3Proxy(s3_server.port) as proxy:
        # the batched delete of the leftover's objects, until rank 1's start returned
        held = _hold_removal(proxy, 2, tmp_path / "opened")
        options = s3_server.storage_options(endpoint_url=proxy.endpoint)
        flag = tmp_path / "opened"
        out = values(run_ranks(_opens, 2, s3_url, options, flag, timeout=JOB_TIMEOUT))
    assert held.arrived.is_set()
    # the start's removal, reported once by the gc after it
    assert out == [[1, [f"{s3_url}/{step_dir_name(2)}/{attempt}"]]] * 2
    assert _keys(s3_url, direct, 2) == []
    with ObjectStore(s3_url, direct) as store:
        assert list(store.list(".writers/")) == []


def _prunes_and_deletes(
    rank: int, world_size: int, url: str, options: dict[str, Any], port: int, flags: Path
) -> tuple[list[int], list[int], bool]:
    """With ``keep_last=1``, prune steps 1 and 2 of 3, then delete step 3, rank 0's deletes of
    the objects of steps 1 and 3 held until rank 1's prune, and then its delete, returned;
    what prune returned, the steps left, and whether both deletes were held (rank 0; True
    elsewhere)."""
    rules: list[Rule] = []
    with _manager_through_a_proxy_on_rank_0(rank, url, options, port) as (mgr, proxy):
        if proxy is not None:
            rules = [
                _hold_removal(proxy, 1, flags / "pruned"),
                _hold_removal(proxy, 3, flags / "deleted"),
            ]
        with _flag_when_done(rank, flags / "pruned"):
            pruned = mgr.prune()
        dist.barrier()  # the training loop's own collective
        with _flag_when_done(rank, flags / "deleted"):
            mgr.delete(3)
        after_rank_0_removals(mgr)  # they run in the background, after rank 1's call returned
        dist.barrier()
        return pruned, mgr.steps(), all(rule.arrived.is_set() for rule in rules)


def test_delete_and_prune_return_before_the_objects_go_and_tidy_removes_them(
    s3_server: S3Server, s3_url: str, tmp_path: Path
) -> None:
    direct = s3_server.storage_options()
    _save_steps(s3_url, direct, 1, 2, 3)
    out = run_ranks(
        _prunes_and_deletes, 2, s3_url, direct, s3_server.port, tmp_path, timeout=JOB_TIMEOUT
    )
    assert values(out) == [([1, 2], [], True)] * 2
    assert [_keys(s3_url, direct, step) for step in (1, 2, 3)] == [[], [], []]


@pytest.mark.parametrize("cleanup", ["next save", "start", "gc"])
def test_a_failing_delete_in_tidy_is_logged_and_the_next_save_start_or_gc_removes_the_objects(
    s3_server: S3Server, s3_url: str, caplog: pytest.LogCaptureFixture, cleanup: str
) -> None:
    direct = s3_server.storage_options()
    with S3Proxy(s3_server.port) as proxy:
        refused = proxy.fail(
            "POST", "?delete", status=503, body_parts=(f"/{step_dir_name(1)}/".encode(),), times=100
        )
        # one attempt per request: the client's retries of a 503 would only add their backoff
        options = s3_server.storage_options(endpoint_url=proxy.endpoint, retries=1)
        with distckpt.CheckpointManager(s3_url, storage_options=options, keep_last=1) as mgr:
            mgr.save(1, _state(1))
            location = _save_location(s3_url, direct, 1)
            with caplog.at_level(logging.WARNING, logger="distckpt"):
                saved = mgr.save(2, _state(2))
                after_rank_0_removals(mgr)  # the refused delete runs in the background
            assert saved is not None and saved.step == 2
            assert refused.arrived.is_set()
            assert mgr.steps() == [2]  # unpublished at once: its COMMIT went
            assert f"{step_dir_name(1)}/COMMIT" not in _keys(s3_url, direct, 1)
            assert _keys(s3_url, direct, 1) != []  # its objects are left
            assert any(
                "could not delete the objects of" in record.getMessage()
                and location in record.getMessage()
                for record in caplog.records
            )
            refused.times = 0  # the store works again
            if cleanup == "next save":
                mgr.save(3, _state(3))
    if cleanup == "start":
        with distckpt.CheckpointManager(s3_url, storage_options=direct) as mgr:
            assert mgr.gc() == [location]  # removed by the start, reported once
    elif cleanup == "gc":
        assert open_store(s3_url, storage_options=direct).collect_leftovers() == [location]
    assert _keys(s3_url, direct, 1) == []


@pytest.mark.parametrize("cleanup", ["start", "gc"])
def test_a_step_unpublished_whose_objects_were_never_tidied_is_removed_by_the_next_start_or_gc(
    s3_server: S3Server, s3_url: str, cleanup: str
) -> None:
    options = s3_server.storage_options()
    _save_steps(s3_url, options, 1, 2)
    location = _save_location(s3_url, options, 1)
    # a prune killed before its tidy(): step 1 is unpublished, its objects still there
    store = open_store(s3_url, storage_options=options, retention=RetentionPolicy(keep_last=1))
    assert store.prune() == [1]
    assert open_view(s3_url, storage_options=options).committed_steps() == [2]
    assert _keys(s3_url, options, 1) != []
    if cleanup == "start":
        with distckpt.CheckpointManager(s3_url, storage_options=options) as mgr:
            assert mgr.gc() == [location]  # removed by the start, reported once
    else:
        assert open_store(s3_url, storage_options=options).collect_leftovers() == [location]
    assert _keys(s3_url, options, 1) == []


def test_objects_under_a_step_prefix_of_another_width_are_never_taken_for_leftovers(
    s3_server: S3Server, s3_url: str
) -> None:
    """``step-2/`` and ``step-02/`` are no prefixes a manager writes (step 2's is
    ``step-00000002/``): what is under them is someone else's, kept by gc and not reported."""
    options = s3_server.storage_options()
    _save_steps(s3_url, options, 2)
    foreign = ["step-2/foreign/data.bin", "step-02/foreign/data.bin", "step-2/COMMIT"]
    with ObjectStore(s3_url, options) as store:
        for key in foreign:
            store.put_bytes(key, b"not a checkpoint's")
        assert open_store(s3_url, storage_options=options).collect_leftovers() == []
        assert {info.key for info in store.list("step-")} >= set(foreign)


def _interrupt_the_main_thread_when(rule: Rule) -> threading.Thread:
    """A thread that presses Ctrl-C (SIGINT, to the main thread: its request is the one
    held) once a request ``rule`` picks arrived."""

    def interrupt() -> None:
        if rule.arrived.wait(JOB_TIMEOUT):
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    return thread


def test_a_ctrl_c_in_tidy_keeps_the_saves_not_yet_deleted_for_the_next_tidy(
    s3_server: S3Server, s3_url: str
) -> None:
    direct = s3_server.storage_options()
    _save_steps(s3_url, direct, 1, 2, 3)
    with S3Proxy(s3_server.port) as proxy:
        options = s3_server.storage_options(endpoint_url=proxy.endpoint)
        store = open_store(s3_url, storage_options=options, retention=RetentionPolicy(keep_last=1))
        assert store.prune() == [1, 2]  # both unpublished, their objects left to tidy
        held = proxy.hold("POST", "?delete", body_parts=(f"/{step_dir_name(1)}/".encode(),))
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            interrupter = _interrupt_the_main_thread_when(held)
            with pytest.raises(KeyboardInterrupt):
                store.tidy()  # interrupted in the delete of step 1's objects
        finally:
            signal.signal(signal.SIGINT, previous)
            held.release()
        interrupter.join()
        store.tidy()
    assert [_keys(s3_url, direct, step) for step in (1, 2)] == [[], []]


#: how long a gc is given to run while a tidy in another thread is held in its delete: a gc
#: that does not wait for the tidy is done by then, and reports the leftover the tidy reports
#: again; one that waits (as it must) is still waiting, and the test goes on
GC_HEAD_START = 2.0


def test_a_gc_while_tidy_runs_in_a_thread_waits_for_it_and_each_leftover_is_reported_once(
    s3_server: S3Server, s3_url: str
) -> None:
    direct = s3_server.storage_options()
    attempt = _leave_a_killed_writers_save(s3_url, direct, 2)
    with S3Proxy(s3_server.port) as proxy:
        options = s3_server.storage_options(endpoint_url=proxy.endpoint)
        store = open_store(s3_url, storage_options=options)
        store.open()
        try:
            # the tidy after the open, in a thread, held in its delete of the leftover
            held = proxy.hold("POST", "?delete", body_parts=(f"/{step_dir_name(2)}/".encode(),))
            tidy = threading.Thread(target=store.tidy, daemon=True)
            tidy.start()
            assert held.arrived.wait(JOB_TIMEOUT)
            reports: list[list[CheckpointLocation]] = []
            gc = threading.Thread(target=lambda: reports.append(store.collect_leftovers()))
            gc.start()
            gc.join(GC_HEAD_START)
            held.release()
            tidy.join(JOB_TIMEOUT)
            gc.join(JOB_TIMEOUT)
            reports.append(store.collect_leftovers())  # nothing is left to remove or report
        finally:
            store.close()
    assert reports == [[f"{s3_url}/{step_dir_name(2)}/{attempt}"], []]
    assert _keys(s3_url, direct, 2) == []
