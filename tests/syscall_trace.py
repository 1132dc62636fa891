"""A snippet of Python run by a fresh interpreter under ``strace``, and the calls it made on
files: what the kernel was asked, read from a real process."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from tests.crashsim.trace import StraceUnavailable, ensure_strace
from tests.filesystems import skip_or_fail

_CALL = re.compile(r"^(?:\[pid +\d+\] |\d+ +)?(\w+)\((.*)\) = (-?\d+)(?:<([^>]*)>)?")
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
