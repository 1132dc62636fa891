"""Who holds an ``s3://`` root, judged against a real S3-protocol server (moto,
tests/s3server.py) across PID namespaces, users, boots and versions: a live holder in another
PID namespace of its host, or of another user on this machine, is not taken over, a claim of an
exited pid counts only in its own PID namespace and boot, and an older version's lease on this
host is judged by its pid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

import distckpt
from distckpt import CoordinationTimeout, RootInUse
from distckpt.lease import local_process_gone, this_host, this_process_host
from distckpt.objlease import ObjectLease
from distckpt.objstore import ObjectStore
from distckpt.storage import open_store
from tests.lease_holders import in_a_pid_namespace_of_its_own
from tests.other_user import succeeds_as_nobody
from tests.s3server import S3Server
from tests.test_s3_store import _state

pytest.importorskip("botocore")


def _exited_pid() -> int:
    """The pid of a process of this machine that has exited (unless reused at once)."""
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(child.stdout)


def test_a_live_holder_is_not_taken_over_from_another_pid_namespace_of_its_host(
    s3_server: S3Server, s3_url: str
) -> None:
    # A container with the host's network (so its hostname) but its own PID namespace: the
    # holder's pid names no process there, yet the holder runs.
    options = s3_server.storage_options()

    def open_the_root() -> str:
        try:
            with distckpt.CheckpointManager(s3_url, storage_options=options):
                return "opened"
        except distckpt.RootInUse:
            return "RootInUse"

    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        manager.save(1, _state(1))
        assert in_a_pid_namespace_of_its_own(open_the_root) == "RootInUse"
        assert manager.save(2, _state(2)) is not None  # still the holder


def _write_claim(url: str, options: dict[str, Any], attempt: str, claim: dict[str, Any]) -> None:
    with ObjectStore(url, options) as store:
        store.put_bytes(f"step-00000001/{attempt}/rank-00000.pt", b"staged")
        store.put_bytes(f".writers/{attempt}", json.dumps(claim).encode())


def test_a_claim_of_an_exited_pid_counts_only_in_this_pid_namespace_and_boot(
    s3_server: S3Server, s3_url: str
) -> None:
    here = this_process_host()
    assert here.startswith(f"{this_host()}/pidns:")  # /proc says where on this machine
    boot = here.rpartition("/boot:")[2]
    options = s3_server.storage_options()
    hosts = {
        "other-ns": f"{this_host()}/pidns:1/boot:{boot}",
        "other-boot": here.replace(f"/boot:{boot}", "/boot:00000000"),
        "this-ns": here,
        "older-writer": this_host(),  # a plain hostname: judged by the pid alone, as before
    }
    dead = _exited_pid()
    for attempt, host in hosts.items():
        _write_claim(s3_url, options, attempt, {"host": host, "pid": dead, "expires_unix": 4e9})
    store = open_store(s3_url, storage_options=options)
    alive = {
        leftover.path.rpartition("/")[2]: leftover.writer_alive for leftover in store.leftovers()
    }
    assert alive == {"other-ns": True, "other-boot": True, "this-ns": False, "older-writer": False}


@pytest.mark.parametrize("older_holder_alive", [True, False])
def test_an_older_versions_lease_on_this_host_is_judged_by_its_pid(
    s3_server: S3Server, s3_url: str, older_holder_alive: bool
) -> None:
    options = s3_server.storage_options()
    pid = os.getppid() if older_holder_alive else _exited_pid()
    older_record = {"owner": "older", "host": this_host(), "pid": pid, "duration": 600.0}
    with ObjectStore(s3_url, options) as store:
        store.put_bytes(".lease", json.dumps(older_record).encode())
    if older_holder_alive:
        with pytest.raises(RootInUse):
            distckpt.CheckpointManager(s3_url, storage_options=options)
    else:  # its holder is gone: taken over at once, not after 600 s
        with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
            assert manager.save(1, _state(1)) is not None


def _put_lease_of_another_machine(url: str, options: dict[str, Any], duration: float) -> None:
    """A lease object whose holder ran on another machine (its pid means nothing here) and
    declared ``duration``: never renewed, as after that holder died."""
    record = {
        "owner": "remote/job:41/start:2026-01-01T00:00:00+00:00/gen:3",
        "host": "another-machine",
        "pid": 4242,
        "duration": duration,
        "renewal": 7,
        "released": False,
    }
    with ObjectStore(url, options) as store:
        store.put_bytes(".lease", json.dumps(record).encode())


#: the manager's timeout in the tests below: a start waits for the root in tries of half of it,
#: each shorter than the lease of :data:`REMOTE_LEASE_SECONDS`
TRY_TIMEOUT = 1.0
REMOTE_LEASE_SECONDS = 2 * TRY_TIMEOUT


def test_a_start_waiting_in_tries_shorter_than_a_dead_remote_lease_takes_it_over(
    s3_server: S3Server, s3_url: str
) -> None:
    """object-stores.md: a job killed on another machine blocks the root for its lease's time,
    and wait_for_root= longer than that waits it out, whatever the manager's timeout (the
    start's tries, each half of it, time the holder as one wait)."""
    options = s3_server.storage_options()
    _put_lease_of_another_machine(s3_url, options, REMOTE_LEASE_SECONDS)
    with distckpt.CheckpointManager(
        s3_url,
        storage_options=options,
        timeout=TRY_TIMEOUT,
        wait_for_root=4 * REMOTE_LEASE_SECONDS,  # ample, and what a test failing here waits
    ) as manager:
        assert manager.save(1, _state(1)) is not None
    with ObjectStore(s3_url, options) as store:
        assert json.loads(store.get_bytes(".lease"))["owner"].endswith("/gen:4")


def test_a_start_refused_after_waiting_in_tries_says_how_long_it_waited(
    s3_server: S3Server, s3_url: str
) -> None:
    options = s3_server.storage_options()
    _put_lease_of_another_machine(s3_url, options, 600.0)
    wait = 2 * TRY_TIMEOUT  # two tries or more
    with pytest.raises(RootInUse) as refused:
        distckpt.CheckpointManager(
            s3_url, storage_options=options, timeout=TRY_TIMEOUT, wait_for_root=wait
        )
    assert refused.value.waited >= wait  # all the tries, not the last one's part
    assert f"(waited {refused.value.waited:g} s)" in str(refused.value)
    assert "job 41 on host another-machine, pid 4242" in str(refused.value)


def test_a_live_holder_of_another_user_on_this_machine_is_not_taken_over(
    s3_server: S3Server, s3_url: str
) -> None:
    """Only a holder *gone* from this machine is taken over at once: a live process of another
    user, which an unprivileged contender may not signal, is alive, and its lease waits out
    its duration."""
    options = s3_server.storage_options()
    with (
        ObjectStore(s3_url, options) as store,
        ObjectLease(store, ".lock", duration=600) as held,
    ):
        held.acquire(timeout=0)

        def contend() -> None:
            with (
                ObjectStore(s3_url, options) as theirs,
                ObjectLease(theirs, ".lock", duration=30) as contender,
                pytest.raises(CoordinationTimeout),
            ):
                contender.acquire(
                    timeout=0, holder_gone=lambda found: local_process_gone(found.host, found.pid)
                )

        assert succeeds_as_nobody(contend)
        held.check()
