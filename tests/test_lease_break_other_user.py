"""Breaking a root's lease as a user who may not write, or create, its lease lock: the
holder is still told alive, or its liveness unknown, and never broken (see
``tests/test_lease_break.py``)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

import distckpt
import distckpt.cli
import distckpt.lease
import distckpt.lease_break
from distckpt.layout import RootLayout
from distckpt.lease import read_holder
from distckpt.lock import lock_is_held
from tests.cli_runner import run_cli
from tests.other_user import succeeds_as_nobody


def _held_under_umask(root: Path, umask: int) -> distckpt.CheckpointManager:
    """A manager holding ``root``, its files made under ``umask`` (a job of another user's)."""
    previous = os.umask(umask)
    try:
        return distckpt.CheckpointManager(root)
    finally:
        os.umask(previous)


def test_a_user_who_may_not_write_the_lease_lock_still_tells_a_live_holder(
    shared_dir: Path,
) -> None:
    """Another user, who may not open the root's ``.lease`` (0644, made under umask 022) for
    writing, as taking its lock needs: ``lease`` still shows the holder alive and ``--break``
    refuses it (it was taken for dead, and the break exited 0 having done nothing); a holder
    that died is shown dead."""
    root = shared_dir / "run"
    manager = _held_under_umask(root, 0o022)

    def refused_while_alive() -> None:
        assert read_holder(root).alive is True  # type: ignore[union-attr]
        refused = run_cli("lease", "--break", os.fspath(root))
        assert refused.returncode == 2 and "alive: stop it" in refused.stderr, refused

    try:
        assert succeeds_as_nobody(refused_while_alive), "a live holder was not told"
    finally:
        manager.close()
    dead = os.fork()
    if dead == 0:  # pragma: no cover - a holder that dies without releasing its lease
        try:
            distckpt.CheckpointManager(root)
        finally:
            os._exit(0)  # also when it raised: the child must never go on running pytest
    os.waitpid(dead, 0)

    def shown_dead() -> None:
        assert read_holder(root).alive is False  # type: ignore[union-attr]

    assert succeeds_as_nobody(shown_dead), "a dead holder was not told"


def test_a_lease_lock_that_is_a_fifo_another_user_may_not_write_is_not_opened(
    shared_dir: Path,
) -> None:
    """A FIFO in place of the root's ``.lease`` (0644, another user's): the read-only probe
    of a user who may not write it blocked in its open until some writer opened the FIFO,
    and ``distckpt lease``/``ls`` with it. Liveness is unknown, told at once."""
    root = shared_dir / "run"
    dead = os.fork()
    if dead == 0:  # pragma: no cover - a holder that dies without releasing its lease
        try:
            distckpt.CheckpointManager(root)
        finally:
            os._exit(0)
    os.waitpid(dead, 0)
    lease_lock = RootLayout.at(root).lease_lock_path
    lease_lock.unlink()
    os.mkfifo(lease_lock, 0o644)

    def unknown_at_once() -> None:
        # A watchdog, not a timing: a blocked probe would hang the test run for good.
        signal.alarm(60)
        assert read_holder(root).alive is None  # type: ignore[union-attr]
        signal.alarm(0)

    assert succeeds_as_nobody(unknown_at_once), "the probe opened the FIFO"


@pytest.mark.parametrize(
    ("record_mode", "shown_line", "refusal"),
    [
        (0o644, "alive or not: unknown here", "whether it lives cannot be told here"),
        (0o600, "lease: none", "cannot be read by this user"),
    ],
    ids=["record-readable", "record-unreadable"],
)
def test_break_refuses_a_holder_on_this_machine_whose_liveness_cannot_be_told(
    shared_dir: Path, record_mode: int, shown_line: str, refusal: str
) -> None:
    """A live holder whose job ran under umask 077: its ``.lease`` is 0600, so another user
    cannot probe it; its ``.lease.json`` is 0600 too unless made readable, so that user reads
    no holder at all. ``lease --break`` by that user took it for dead (or for none) and exited
    0 having done nothing; it refuses instead, saying why."""
    root = shared_dir / "run"
    manager = _held_under_umask(root, 0o077)
    root.chmod(0o755)
    RootLayout.at(root).lease_record_path.chmod(record_mode)

    def refused() -> None:
        shown = run_cli("lease", os.fspath(root))
        assert shown_line in shown.stdout, shown
        result = run_cli("lease", "--break", os.fspath(root))
        assert result.returncode == 2, result
        assert refusal in result.stderr, result

    try:
        assert succeeds_as_nobody(refused), "a holder not known dead was not refused"
        assert read_holder(root).broken_utc is None  # type: ignore[union-attr]
    finally:
        manager.close()


def test_a_lease_lock_another_user_may_not_write_is_unknown_where_there_is_no_fcntl(
    shared_dir: Path,
) -> None:
    """Where there is no ``fcntl`` module (Windows), the read-only probe of a lease lock this
    user may not write says liveness is unknown, as lock_is_held promises, rather than raise."""
    lease_lock = shared_dir / ".lease"
    lease_lock.touch(mode=0o644)

    def unknown_without_fcntl() -> None:
        # No platform without fcntl runs these tests: a None in sys.modules makes its import
        # fail as it does there. Only in this forked child, which exits after it.
        sys.modules["fcntl"] = None  # type: ignore[assignment]
        assert lock_is_held(lease_lock) is None

    assert succeeds_as_nobody(unknown_without_fcntl), "the probe raised without fcntl"


def test_a_lease_lock_file_that_is_gone_is_free_to_a_user_who_may_not_create_it(
    shared_dir: Path,
) -> None:
    """A lease lock file that does not exist is free, as the writable probe finds it by
    creating it; to a user who may not create it (the read-only probe) it was unknown, so a
    dead holder on this machine whose lock file is gone was refused as "cannot be probed", with
    no way around it on a read-only mount."""
    missing_lock = shared_dir / ".lease"

    def free() -> None:
        assert lock_is_held(missing_lock) is False

    assert succeeds_as_nobody(free), "a missing lock file was not told free"
    assert not missing_lock.exists()
