"""Mounts and loop devices that a killed test session left behind (its cleanup is only a
``finally``, which a SIGKILL skips), swept at the start of the next session.

Only what lies under pytest's numbered directories (``pytest-<N>`` or a ``garbage-*`` one
pytest is removing, in ``<temp>/pytest-of-<user>``) of a session known to be over is touched:
pytest writes its session's pid into ``.lock`` in the directory, so a lock whose pid is no
running process belongs to a session that was killed (one that ends normally has run its own
unmounts). A directory without a lock, or with an empty one, is left alone: pytest removes the
lock at exit, but writes none at all under ``tmp_path_retention_policy=none`` (or a retention
count of 0), so such a directory may be a live session's. The current session's and any other
running session's (another engineer's, an xdist controller's) hold a live pid and are left
alone.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path

from _pytest.tmpdir import get_user

from tests.filesystems import _run

_DELETED = " (deleted)"


def pytest_temp_root() -> Path:
    """Where pytest puts this user's numbered session directories (without ``--basetemp``),
    spelled as pytest spells it."""
    base = os.environ.get("PYTEST_DEBUG_TEMPROOT") or tempfile.gettempdir()
    return Path(base).resolve() / f"pytest-of-{get_user() or 'unknown'}"


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it runs
        return True
    return True


def ended_session_dirs(temp_root: Path) -> list[Path]:
    """The numbered directories under ``temp_root`` of sessions that are over."""
    ended: list[Path] = []
    for entry in temp_root.glob("*"):
        if entry.is_symlink() or not entry.is_dir():
            continue
        if not re.fullmatch(r"pytest-\d+|garbage-.*", entry.name):
            continue
        try:
            owner = int((entry / ".lock").read_text().strip())
        except (OSError, ValueError):
            # No lock (removed at a normal exit, or never written: see the module doc), one
            # being written (empty) or unreadable: not known to be over.
            continue
        if owner <= 0 or not _pid_runs(owner):
            ended.append(entry)
    return ended


def _mount_points() -> list[Path]:
    """Every mount point of this mount namespace (``/proc/self/mountinfo``'s fifth field,
    whose spaces and the like are octal escapes)."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        escaped = line.split(" ")[4]
        points.append(Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), escaped)))
    return points


def _loop_backing_files() -> dict[str, Path]:
    """Each attached loop device (``/dev/loop3``) and the file behind it."""
    backing: dict[str, Path] = {}
    for device in Path("/sys/block").glob("loop*"):
        try:
            name = (device / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue  # not attached
        backing[f"/dev/{device.name}"] = Path(name.removesuffix(_DELETED))
    return backing


def sweep_leftover_mounts(temp_root: Path) -> list[str]:
    """Lazily unmount every mount under an ended session's directory of ``temp_root``
    (deepest first) and detach the loop devices whose files lie there; returns what could not
    be undone. Root only: anyone else could not have mounted them, and nothing is done."""
    if os.geteuid() != 0 or not temp_root.is_dir():
        return []
    ended = ended_session_dirs(temp_root)
    if not ended:
        return []
    problems: list[str] = []
    stale = [point for point in _mount_points() if any(point.is_relative_to(d) for d in ended)]
    for point in sorted(set(stale), key=lambda p: len(p.parts), reverse=True):
        try:
            _run("umount", "-l", point)  # lazily: a dead FUSE daemon's mount cannot be busy-waited
        except RuntimeError as exc:
            problems.append(str(exc))
    for device, file in _loop_backing_files().items():
        if any(file.is_relative_to(d) for d in ended):
            try:
                _run("losetup", "-d", device)
            except RuntimeError as exc:
                problems.append(str(exc))
    return problems


def sweep_and_warn() -> None:
    """:func:`sweep_leftover_mounts` of pytest's own temp root, warning of what stays."""
    problems = sweep_leftover_mounts(pytest_temp_root())
    if problems:
        warnings.warn("left over by an earlier session: " + "; ".join(problems), stacklevel=2)
