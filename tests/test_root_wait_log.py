"""What a start that waits for a held root logs (``wait_for_root``): one line as it finds the
root held, naming the holder and the longest wait, nothing per poll, and one line once it got
the root; nothing at all when the root is free. On a root directory and an ``s3://`` root,
the holder a second manager of this process (its lease excludes the waiting one as another
job's would, and the line names it as this process, as a refusal does). ``wait_for_root`` is
waited in tries of half the manager's timeout (``Coordinator.decide_within``): one line for
them all."""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import distckpt
from distckpt.lease import _lock_path
from distckpt.starting import RootWait

STARTUP = 60.0  # seconds a start may take on a loaded machine
HELD = "is held by"
GOT = "after waiting"


def _root_and_options(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> tuple[str, dict[str, Any]]:
    if where == "s3":
        server = request.getfixturevalue("s3_server")
        return request.getfixturevalue("s3_url"), {"storage_options": server.storage_options()}
    return str(tmp_path / "ckpt"), {}


def _messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "distckpt" and text in r.getMessage()
    ]


@pytest.mark.parametrize("where", ["posix", "s3"])
def test_a_start_that_waits_for_a_held_root_says_so_once_and_when_it_got_it(
    where: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger="distckpt")
    # The job id SLURM would give the holder's job (read when it takes the lease): this test
    # runs under no scheduler, and only the environment says a job id.
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    root, options = _root_and_options(where, tmp_path, request)
    holder = distckpt.CheckpointManager(root, wait_for_root=5, **options)
    # a free root, even to a start that may wait: no word of waiting
    assert _messages(caplog, HELD) == [] and _messages(caplog, GOT) == []
    tries = threading.Semaphore(0)
    open_one_try = RootWait.open

    def open_and_count(wait: RootWait, seconds: float) -> Any:
        tries.release()
        return open_one_try(wait, seconds)

    # Wraps the real opening, only to count the start's tries: nothing else tells a test
    # when the next try has begun, short of sleeping for it.
    monkeypatch.setattr(RootWait, "open", open_and_count)
    opened: list[Any] = []

    def wait_for_the_root() -> None:
        try:
            # Timeout 1: the start waits in tries of 0.5 s, several of them below.
            manager = distckpt.CheckpointManager(root, wait_for_root=300, timeout=1, **options)
            opened.append(manager)
        except BaseException as exc:  # reported by the assertions below
            opened.append(exc)

    waiting = threading.Thread(target=wait_for_the_root)
    try:
        waiting.start()
        deadline = time.monotonic() + STARTUP
        while not _messages(caplog, HELD) and waiting.is_alive():
            assert time.monotonic() < deadline, "no line said that the root is held"
            time.sleep(0.02)
        assert len(_messages(caplog, HELD)) == 1, (_messages(caplog, HELD), opened)
        (said,) = _messages(caplog, HELD)
        # the holder's describe() (job id, host, pid), as this process: it holds the root
        prefix = f"checkpoint root {root} is held by this process (job 4242 on host "
        assert said.startswith(prefix), said
        assert f", pid {os.getpid()}" in said, said
        assert "waiting up to 300 s for it to end" in said, said
        assert opened == [] and waiting.is_alive(), opened  # waiting, neither refused nor in
        if where == "posix":  # the tries are the same on an s3:// root, and slower to make
            # Three tries begun: two of them waited in full, each of which would have said
            # it again (the store's waits poll, too).
            for _ in range(3):
                assert tries.acquire(timeout=STARTUP), "the start made no further try"
            assert len(_messages(caplog, HELD)) == 1, _messages(caplog, HELD)
    finally:
        holder.close()
        waiting.join(STARTUP)
        for manager in opened:  # closed also when an assertion failed: it holds the root
            if isinstance(manager, distckpt.CheckpointManager):
                manager.close()
    assert not waiting.is_alive()
    (manager,) = opened
    assert isinstance(manager, distckpt.CheckpointManager), manager
    (got,) = _messages(caplog, GOT)
    assert got.startswith(f"got checkpoint root {root} after waiting "), got
    assert len(_messages(caplog, HELD)) == 1


def test_a_lock_held_for_a_probes_instant_after_a_finished_job_is_no_holder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The lease lock held briefly (a probe's instant, shorter than the lock's grace) right
    after a job released the root: a start that may wait takes the root without saying it is
    held, nor naming the finished job."""
    root = tmp_path / "ckpt"
    distckpt.CheckpointManager(root).close()  # a finished job: its record says released
    caplog.set_level(logging.INFO, logger="distckpt")
    # The probe's lock is an flock of its own open file, as another process's would be (the
    # library locks with flock: one open file excludes another, in one process too).
    probe = os.open(_lock_path(root), os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(probe, fcntl.LOCK_EX)
    letting_go = threading.Timer(0.25, os.close, (probe,))
    letting_go.start()
    try:
        with distckpt.CheckpointManager(root, wait_for_root=0.2):
            pass
    finally:
        letting_go.join()
    assert _messages(caplog, HELD) == [] and _messages(caplog, GOT) == []
