"""A snippet of Python run by a fresh interpreter under ``strace``, and the calls it made on
files: what the kernel was asked, read from a real process. :func:`async_save_written_direct`
asks it whether an async save on a given file system writes its rank file with direct I/O (the
filesystem matrix, and ``scripts/direct_io_filesystems.py`` beside its timings)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from tests.crashsim.trace import StraceUnavailable, ensure_strace
from tests.filesystems import skip_or_fail

_CALL = re.compile(r"^(?:\[pid +\d+\] |\d+ +)?(\w+)\((.*)\)\s+=\s+(-?\d+)(?:<([^>]*)>)?")
_DESCRIPTOR = re.compile(r"^(?:-?\d+|AT_FDCWD)<([^>]*)>$")


@dataclass(frozen=True)
class FileCall:
    """One call on a file. ``path`` is the file it acted on: its descriptor's, or for an
    ``openat`` the file it opened; ``args`` are the arguments after the descriptor (after the
    directory and the name for ``openat``)."""

    name: str
    path: str
    args: list[str]
    result: int


def traced_file_calls(code: str, workdir: Path, calls: str) -> list[FileCall]:
    """The ``calls`` (strace's comma-separated names) on files that ``code``, run with
    ``workdir`` as its working directory, made, in order; only successful ``openat`` calls."""
    try:
        strace = ensure_strace()
    except StraceUnavailable as exc:
        skip_or_fail(f"the system calls are read from strace: {exc}")
    log = workdir / "strace.log"
    script = workdir / "workload.py"
    script.write_text(textwrap.dedent(code))
    subprocess.run(
        [strace, "-f", "-y", "-qq", "-e", f"trace={calls}", "-o", log, sys.executable, script],
        check=True,
        timeout=180,
        cwd=workdir,
    )
    found_calls = []
    for line in log.read_text().splitlines():
        found = _CALL.match(line)
        if found is None:
            continue
        name, raw_args, result, opened = found.groups()
        args = [part.strip() for part in raw_args.split(",")]
        if name == "openat":
            if opened is None:
                continue  # a failed open: nothing was opened
            found_calls.append(FileCall(name, opened, args[2:], int(result)))
            continue
        descriptor = _DESCRIPTOR.match(args[0])
        if descriptor is not None:
            found_calls.append(FileCall(name, descriptor.group(1), args[1:], int(result)))
    return found_calls


#: an async "torch" save of one process, then its restore (bit for bit) and ``verify``
DIRECT_IO_SAVE = """
import torch
import distckpt
torch.manual_seed(0)
state = {"w": torch.randn(3 << 20), "odd": torch.randn(700), "step": 1}  # 12 MiB, a part page
try:
    with distckpt.CheckpointManager("root", async_save=True, timeout=60) as manager:
        manager.save(1, state)
        manager.wait()
        restored = manager.restore(1).state
except distckpt.CommitLost:
    raise SystemExit(0)  # fusefat empties the directory it renames: nothing commits there
for key in ("w", "odd"):
    assert torch.equal(restored[key].view(torch.int32), state[key].view(torch.int32)), key
assert distckpt.verify("root").ok
"""


def async_save_written_direct(workdir: Path, *, commits: bool) -> bool:
    """Run :data:`DIRECT_IO_SAVE` in ``workdir`` under strace; whether its rank file was
    written with direct I/O (then asking no early writeback, and cutting the padded tail back
    with ftruncate before the fsync)."""
    workdir.mkdir()
    calls = traced_file_calls(DIRECT_IO_SAVE, workdir, "openat,ftruncate,fsync,sync_file_range")
    rank_file = [
        call
        for call in calls
        if call.path.endswith("/rank-00000.pt")
        and not (call.name == "openat" and "O_RDONLY" in call.args[0])
    ]
    opened = [call for call in rank_file if call.name == "openat"]
    assert len(opened) == 1, rank_file
    assert (workdir / "root" / "step-00000001").is_dir() is commits
    if "O_DIRECT" not in opened[0].args[0].split("|"):
        return False
    assert [call.name for call in rank_file[1:]] == ["ftruncate", "fsync"], rank_file
    return True
