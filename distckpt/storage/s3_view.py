"""An ``s3://`` root as readers see it (see :mod:`distckpt.storage.views`; the checkpoint of
one step is :mod:`distckpt.storage.s3_checkpoint`, the object layout and the reads both share
:mod:`distckpt.storage.s3_root`)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from distckpt.errors import CorruptCheckpoint
from distckpt.results import CheckpointLocation
from distckpt.storage.s3_checkpoint import S3Checkpoint
from distckpt.storage.s3_root import S3Root, prefix_holds_a_root
from distckpt.storage.views import RootView


class S3RootView(RootView):
    """An ``s3://`` root, read through its objects."""

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        s3: S3Root | None = None,
    ) -> None:
        self.s3 = s3 if s3 is not None else S3Root(url, storage_options)
        self.root: str = self.s3.root

    def exists(self) -> bool:
        """Whether, for a root under a prefix, the prefix holds an object: what a directory's
        existence is to a local root. A manager leaves its lease object in the root whether or
        not it committed, so a root a job opened is there; a prefix holding nothing (a typo) is
        not. A missing bucket raises the store's :class:`ObjectNotFound` (``NoSuchBucket``), as
        every other command's first request does: it is no missing root."""
        first = next(iter(self.s3.client.list("", page_size=1)), None)
        return first is not None or not self.s3.url.prefix

    def holds_a_root(self) -> bool:
        return prefix_holds_a_root(self.s3.client, "")

    def certainly_no_root(self) -> bool:
        return not self.holds_a_root()

    def committed_steps(self) -> list[int]:
        return self.s3.committed_steps()

    def committed_versions(self) -> dict[int, Hashable | None]:
        return dict(self.s3.commit_etags())  # what committed_steps costs

    def candidate_steps(self) -> list[int]:
        # the step prefixes only: neither a listing of every object nor a HEAD of a COMMIT
        return self.s3.listed_steps()

    def committed_steps_from(self, step: int) -> list[int]:
        return self.s3.committed_steps(step)  # a HEAD per newer step, not per kept step

    def checkpoint(self, step: int) -> S3Checkpoint:
        return S3Checkpoint(self.s3, step)

    def set_aside_checkpoints(self) -> list[CheckpointLocation]:
        """Where the objects of each set-aside save are (its prefix, as a URL); not a save
        whose step's ``COMMIT`` still names it: its set-aside was interrupted before its copy
        was whole (the step is still committed, and the next restore continues it)."""
        return [
            self.s3.set_aside_location(step, attempt)
            for step, attempt in self.s3.set_aside_attempts()
            if not self._still_committed(step, attempt)
        ]

    def _still_committed(self, step: int, attempt: str) -> bool:
        """Whether the step's ``COMMIT`` names the save ``attempt`` (a damaged ``COMMIT``
        names none)."""
        try:
            record = self.s3.read_commit(step)
        except CorruptCheckpoint:
            return False
        return record is not None and record.attempt == attempt

    def read_pointer(self, name: str) -> str | None:
        return self.s3.read_pointer(name)[0]

    def pointer_present(self, name: str) -> bool:
        return self.s3.read_pointer(name)[1] is not None
