"""Uploading a rank's shard while its format writes it: the spool dir of one save and rank,
watched, and each file streamed into the store as it grows.

A format writes its files into a local dir (formats are path-based). Uploading them only
after the format is done would add the local write's time to every save; instead each file
that appears in the spool is followed like ``tail -f`` and streamed into its object while the
format goes on writing. When the format is done, the rest of each file is sent and the object
published, and what was sent is checked against the format's record (size and CRC-32): a file
the format rewrote in place, or one it renamed, is uploaded again whole, and one it removed is
discarded (its upload aborted). Nothing is visible to readers before the step's ``COMMIT``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from distckpt.lease import process_gone, this_process_host
from distckpt.manifest import FileRecord
from distckpt.objstore import ObjectStore
from distckpt.objstreams import ObjectWriter

logger = logging.getLogger("distckpt")

#: How often the spool dir is scanned for new files, and a file for new bytes (seconds).
POLL_SECONDS = 0.02
_CHUNK = 8 << 20
#: The temp dirs of this machine's saves (spools) and reads (downloads), each named
#: ``<prefix><pid>@<place>-...`` after the process that made it (:func:`make_temp_dir`).
TEMP_DIR_PREFIXES = ("distckpt-spool-", "distckpt-read-")
#: How old (by its last change) a temp dir whose pid cannot be judged from here must be before
#: it is removed: one made in another place (another PID namespace sharing this temp dir, a
#: previous boot with the temp dir on disk), or named the way older versions named them
#: (``<prefix><pid>-...``, without a place). No save or read keeps its dir unchanged this long.
UNJUDGED_TEMP_DIR_AGE = 24 * 3600.0


def temp_dir_place() -> str:
    """Where this process's pid means this process, as a token fit for a file name: a short
    hash of :func:`~distckpt.lease.this_process_host` (hostname, PID namespace and boot)."""
    return hashlib.sha256(this_process_host().encode()).hexdigest()[:12]


def make_temp_dir(kind: str, name: str) -> Path:
    """A new temp dir for a save's spool (``kind`` ``"spool"``) or a read's download
    (``"read"``), named after this process and where its pid means it
    (:func:`temp_dir_place`), so :func:`remove_dead_temp_dirs` can tell once its process is
    gone (a killed process leaves it behind)."""
    prefix = f"distckpt-{kind}-{os.getpid()}@{temp_dir_place()}-{name}-"
    return Path(tempfile.mkdtemp(prefix=prefix))


def remove_dead_temp_dirs() -> None:
    """Remove the temp dirs of this machine's saves and reads whose process no longer runs.

    A dir made where its pid means the same process as here (its place is
    :func:`temp_dir_place`) is removed once that process is gone. One made in another place (a
    job in another PID namespace that shares this temp dir, a previous boot) is removed only
    once it is :data:`UNJUDGED_TEMP_DIR_AGE` old: a live job there keeps its dir changing. One
    named the way older versions named them (no place) is removed once that old and no process
    of its pid runs here (in this namespace its pid may still be its live writer)."""
    try:
        entries = list(os.scandir(tempfile.gettempdir()))
    except OSError:
        return
    place = temp_dir_place()
    for entry in entries:
        prefix = next((p for p in TEMP_DIR_PREFIXES if entry.name.startswith(p)), None)
        if prefix is None or not entry.is_dir(follow_symlinks=False):
            continue
        pid, at, its_place = entry.name[len(prefix) :].partition("-")[0].partition("@")
        if not pid.isdigit():
            continue
        if at and its_place == place:
            if process_gone(int(pid)):
                logger.info("removing %s, left by a process that died", entry.path)
                shutil.rmtree(entry.path, ignore_errors=True)
        elif _unchanged_for(entry, UNJUDGED_TEMP_DIR_AGE) and (at or process_gone(int(pid))):
            logger.info(
                "removing %s, left by a process %s, unchanged for %g s or more",
                entry.path,
                "of another PID namespace or boot" if at else "of an older version",
                UNJUDGED_TEMP_DIR_AGE,
            )
            shutil.rmtree(entry.path, ignore_errors=True)


def _unchanged_for(entry: os.DirEntry[str], seconds: float) -> bool:
    """Whether ``entry`` was last changed at least ``seconds`` ago (False if it is gone)."""
    try:
        return time.time() - entry.stat(follow_symlinks=False).st_mtime >= seconds
    except OSError:
        return False


class _Follower:
    """One file followed into one object, in a thread of its own."""

    def __init__(self, store: ObjectStore, path: Path, name: str) -> None:
        self.path = path
        self.error: BaseException | None = None
        self.size = -1  # what was published, once done
        self.checksum = ""
        self._writer: ObjectWriter = store.open_write(name)
        self._complete = threading.Event()  # the format is done: read to the end and publish
        self._cancel = threading.Event()  # the file is not part of the shard: abort
        self._thread = threading.Thread(target=self._follow, name="distckpt-spool", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        try:
            file = open(self.path, "rb")  # noqa: SIM115 - closed by the with below
        except FileNotFoundError:  # renamed or removed at once: uploaded whole at the end
            self._writer.abort()
            return
        try:
            with file:
                final_read = False  # an empty read made after the format was done: the end
                while not self._cancel.is_set():
                    chunk = file.read(_CHUNK)
                    if chunk:
                        self._writer.write(chunk)
                    elif final_read:
                        self._writer.close()  # publishes the object
                        self.size, self.checksum = self._writer.size, self._writer.checksum
                        return
                    elif self._complete.is_set():
                        final_read = True  # bytes may have landed since the empty read
                    else:
                        self._cancel.wait(POLL_SECONDS)
            self._writer.abort()
        except BaseException as exc:
            self.error = exc
            self._writer.abort()

    def finish(self, *, keep: bool) -> None:
        """The format is done: publish the object (``keep``) or abort it; wait for either."""
        (self._complete if keep else self._cancel).set()
        self._thread.join()


class SpoolUploads:
    """Follows every file created in ``directory`` into the object ``prefix + name``."""

    def __init__(self, store: ObjectStore, directory: Path, prefix: str) -> None:
        self._store = store
        self._directory = directory
        self._prefix = prefix
        self._followers: dict[str, _Follower] = {}
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="distckpt-spool", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            try:
                entries = list(os.scandir(self._directory))
            except FileNotFoundError:
                return
            for entry in entries:
                if entry.name not in self._followers and entry.is_file(follow_symlinks=False):
                    self._followers[entry.name] = _Follower(
                        self._store, Path(entry.path), self._prefix + entry.name
                    )

    def finish(self, records: Mapping[str, FileRecord]) -> set[str]:
        """The format wrote ``records``: publish what was followed and matches its record;
        the names uploaded so. Raises a follower's store error."""
        self._stop.set()
        self._watcher.join()
        done = set()
        errors = []
        for name, follower in self._followers.items():
            follower.finish(keep=name in records)
            if follower.error is not None:
                errors.append(follower.error)
            elif name in records and (follower.size, follower.checksum) == (
                records[name].size,
                records[name].checksum,
            ):
                done.add(name)
        if errors:
            raise errors[0]
        return done

    def abort(self) -> None:
        """The format failed: abort every upload (idempotent)."""
        self._stop.set()
        if self._watcher is not threading.current_thread():
            self._watcher.join()
        for follower in self._followers.values():
            follower.finish(keep=False)
