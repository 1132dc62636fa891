"""Who holds an ``s3://`` root, judged against a real S3-protocol server (moto,
tests/s3server.py) across PID namespaces, boots and versions: a live holder in another PID
namespace of its host is not taken over, a claim of an exited pid counts only in its own PID
namespace and boot, and an older version's lease on this host is judged by its pid."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any

import pytest

import distckpt
from distckpt import RootInUse
from distckpt.lease import this_host, this_process_host
from distckpt.objstore import ObjectStore
from distckpt.storage import open_store
from tests.s3server import S3Server
from tests.test_s3_store import JOB_TIMEOUT, _state

pytest.importorskip("botocore")


def _exited_pid() -> int:
    """The pid of a process of this machine that has exited (unless reused at once)."""
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(child.stdout)


_OPEN_FROM_ANOTHER_PID_NAMESPACE = """
import sys, distckpt
try:
    with distckpt.CheckpointManager(sys.argv[1], storage_options=eval(sys.argv[2])):
        print("opened")
except distckpt.RootInUse:
    print("RootInUse")
"""


def test_a_live_holder_is_not_taken_over_from_another_pid_namespace_of_its_host(
    s3_server: S3Server, s3_url: str
) -> None:
    # A container with the host's network (so its hostname) but its own PID namespace: the
    # holder's pid names no process there, yet the holder runs.
    unshare = ["unshare", "--pid", "--fork"]
    can_unshare = (
        shutil.which("unshare") is not None and not subprocess.run([*unshare, "true"]).returncode
    )
    if not can_unshare and os.environ.get("CI") != "true":
        pytest.skip("this machine cannot make a PID namespace (unshare --pid)")
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        manager.save(1, _state(1))
        other = subprocess.run(
            [
                *unshare,
                sys.executable,
                "-c",
                _OPEN_FROM_ANOTHER_PID_NAMESPACE,
                s3_url,
                repr(options),
            ],
            capture_output=True,
            text=True,
            timeout=JOB_TIMEOUT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        assert other.stdout.strip() == "RootInUse", other.stderr[-2000:]
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


def test_a_job_refused_after_waiting_in_pieces_says_the_whole_wait(
    s3_server: S3Server, s3_url: str
) -> None:
    """As on a root directory (tests/test_lease_refusal.py): a wait longer than half the
    timeout is made of several tries, and the refusal gives the time waited in all, in its
    ``waited`` and its message, not the last try's piece."""
    options = s3_server.storage_options()
    # an older version's lease (it never renews) held by a live process of this host
    record = {"owner": "older", "host": this_host(), "pid": os.getppid(), "duration": 600.0}
    with ObjectStore(s3_url, options) as store:
        store.put_bytes(".lease", json.dumps(record).encode())
    with pytest.raises(RootInUse) as refused:
        # timeout 1: tries of 0.5 s at most, two of them
        distckpt.CheckpointManager(s3_url, storage_options=options, wait_for_root=1.0, timeout=1.0)
    assert refused.value.waited >= 1.0  # the deadline is what ends the wait: never before it
    assert f" (waited {refused.value.waited:g} s); wait for it" in str(refused.value)
    assert f"pid {os.getppid()}" in str(refused.value)
