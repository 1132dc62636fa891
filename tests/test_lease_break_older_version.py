"""Breaking a root's lease with an older version of distckpt on either side: it refuses a
live holder of this version, and a lingering lock leaves the requeued job the only lease
(see ``tests/test_lease_break.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import distckpt
import distckpt.cli
import distckpt.lease
import distckpt.lease_break
from distckpt.layout import RootLayout
from distckpt.lease import RootLease, this_host
from distckpt.lease_break import break_lease
from tests.lease_holders import (
    STARTUP,
    Holder,
    _record_as_another_machine,
    start_holder,
)
from tests.older_version import OLDER_COMMAND_LINE, older_version_process


def test_an_older_versions_break_refuses_a_live_holder_of_this_version_on_this_machine(
    root: Path, holders: list[Holder], older_distckpt: Path
) -> None:
    """This version's record keeps the keys an older version decodes (it ignores the boot id)
    and the plain hostname it compares: its ``lease --break`` finds the holder on its machine
    and alive, and refuses."""
    root.mkdir()
    first = start_holder(holders, root)
    assert first.line() == "held 1"
    refused = older_version_process(
        older_distckpt, OLDER_COMMAND_LINE, "lease", "--break", os.fspath(root)
    )
    assert refused.returncode == 2, refused.stderr
    assert f"pid {first.pid}" in refused.stderr and "stop it" in refused.stderr
    assert first.ask("check") == "current"


_LINGERING_LOCK = textwrap.dedent(
    """
    import fcntl, os, sys, time

    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(600)
    """
)


@pytest.mark.parametrize("waiting_version", ["this", "older"])
def test_a_break_past_a_lingering_lock_leaves_the_requeued_job_one_lease(
    root: Path,
    holders: list[Holder],
    monkeypatch: pytest.MonkeyPatch,
    older_distckpt: Path,
    waiting_version: str,
) -> None:
    """On NFS a dead machine's lock lingers until the server's lease ends, and the operator
    breaks the lease meanwhile, while the requeued job waits for the lock (``wait_for_root``,
    of this version or an older one). The lingering lock ends at the worst moment, just as the
    break writes the record: the break holds the lock of a new lock file by then, so the
    requeued job claims the root after the break, on the file every later job locks. It holds
    the only lease, generation 4; a third job is refused."""
    root.mkdir()
    dead = _record_as_another_machine(root, host=this_host() + "-node7")
    lock_file = RootLayout(root).lease_lock_path
    # No NFS server here whose lease of a dead client's lock could be let run out: a process
    # holding the flock of the lock file stands in for it until it is killed. The server's
    # lock is in no /proc/locks of a client (on the server, its lockd or nfsd kernel threads
    # hold it, which the break passes over), while this stand-in's is in this machine's: the
    # break is told no process here holds it.
    monkeypatch.setattr(distckpt.lease_break, "_locked_here", lambda path: False)
    lingering = subprocess.Popen(
        [sys.executable, "-c", _LINGERING_LOCK, os.fspath(lock_file)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert lingering.stdout is not None and lingering.stdout.readline().strip() == "locked"
        prefix: tuple[str, ...] = ()
        if waiting_version == "older":
            # its own directory first on the path, so that it imports its own package
            prefix = ("env", "-C", os.fspath(older_distckpt), f"PYTHONPATH={older_distckpt}")
        requeued = start_holder(holders, root, wait=STARTUP, prefix=prefix, announce=True)
        assert requeued.line() == "acquiring"
        claimed_during_the_write: list[str] = []
        real_write = distckpt.lease_break.atomic_write_bytes

        def the_lingering_lock_ends_as_the_break_writes(
            path: Path, data: bytes, **kw: bool
        ) -> None:
            lingering.kill()
            lingering.wait(timeout=STARTUP)
            # a job polling a free lock takes it within a few of filelock's 0.05 s polls
            claimed_during_the_write.append(requeued.line(timeout=2.0))
            real_write(path, data, **kw)

        # A wrapper around the break's write: no real part can end the lingering lock between
        # the break's re-reading of the record and its writing. The end itself is real.
        monkeypatch.setattr(
            distckpt.lease_break, "atomic_write_bytes", the_lingering_lock_ends_as_the_break_writes
        )
        try:
            broken = break_lease(root)
        except distckpt.LeaseTakenMeanwhile:
            # It took the new lock file in the instant between its making and the break's
            # lock (it polls every 0.05 s): the break then changes nothing, also one lease.
            assert claimed_during_the_write == []
        else:
            assert broken is not None and broken.token == dead.token and broken.broken_utc
            assert claimed_during_the_write == [""]  # it waited for the break's lock
    finally:
        if lingering.poll() is None:
            lingering.kill()
        lingering.wait(timeout=STARTUP)
    assert requeued.line() == f"held {dead.generation + 1}"
    assert requeued.ask("check") == "current"
    assert lock_file.exists()
    assert [path.name for path in root.glob(".lease.*.lingering")] == []
    with pytest.raises(distckpt.RootInUse):
        RootLease.acquire(root)
    assert requeued.ask("check") == "current"
