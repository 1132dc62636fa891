"""The removals and renames a block of the test's own thread makes, seen through Python's audit
events (PEP 578): a spy, every call still happens. One hook is installed on first use and stays
for the rest of the process (an audit hook cannot be removed); outside a
:func:`recording_removals_and_renames` block, and for every other thread (a background thread
left by an earlier test), it records nothing."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

#: the audit events of ``os.remove``/``os.unlink``, ``os.rmdir`` and ``os.rename``/``os.replace``
_WATCHED = frozenset({"os.remove", "os.rmdir", "os.rename"})


@dataclass(frozen=True)
class FileEvent:
    """One removal (``paths`` is the path removed) or rename (``paths`` is source, target)."""

    event: str
    paths: tuple[str, ...]


#: what each recording thread has seen so far, by thread id
_recording: dict[int, list[FileEvent]] = {}
_hook_installed = False


def _record(event: str, args: tuple[Any, ...]) -> None:
    if event not in _WATCHED:
        return
    seen = _recording.get(threading.get_ident())
    if seen is not None:
        count = 2 if event == "os.rename" else 1
        seen.append(FileEvent(event, tuple(os.fsdecode(path) for path in args[:count])))


@contextlib.contextmanager
def recording_removals_and_renames() -> Iterator[list[FileEvent]]:
    """The list of the removals and renames this thread makes in the block, filled as they
    happen. Blocks do not nest: a second one in the same thread is a RuntimeError."""
    global _hook_installed
    if not _hook_installed:
        sys.addaudithook(_record)
        _hook_installed = True
    if threading.get_ident() in _recording:
        raise RuntimeError("this thread is recording its removals and renames already")
    seen: list[FileEvent] = []
    _recording[threading.get_ident()] = seen
    try:
        yield seen
    finally:
        del _recording[threading.get_ident()]
