"""The interface every on-disk format implements.

A format turns one rank's state into files inside a staging dir, and reads them back. It knows
nothing about committing, links or retention: the manager runs the same protocol around every
format. ``write`` and ``read`` are called on every rank at the same time, so a format whose
library runs its own collectives (DCP) may do so on ``ctx.group``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist

from distckpt.coord import Coordinator
from distckpt.manifest import FileRecord, Manifest


@dataclass(frozen=True)
class ShardContext:
    """Where this rank stands when it writes or reads its part of a checkpoint."""

    rank: int
    world_size: int
    fsync: bool
    #: the ranks' coordinator (collectives on distckpt's private gloo group), or None when a
    #: plain process reads a checkpoint
    coordinator: Coordinator | None = None

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The private gloo group, for a format whose library runs its own collectives."""
        return self.coordinator.group if self.coordinator is not None else None


@dataclass(frozen=True)
class ReadOptions:
    """How to read a checkpoint back."""

    map_location: Any = "cpu"
    #: unpickle arbitrary objects; only for checkpoints from a trusted source
    allow_pickle: bool = False
    #: memory-map tensor data instead of reading it all (where the format supports it)
    mmap: bool = False


class CheckpointFormat(Protocol):
    """How one rank's state becomes files, and back."""

    #: the name stored in the manifest and passed as ``CheckpointManager(format=...)``
    name: str
    #: whether a checkpoint can only be restored by the world size that saved it
    fixed_world_size: bool

    def required_files(self, manifest: Manifest) -> list[str]:
        """Files a complete checkpoint of this format must list in its manifest."""
        ...

    def owns_file(self, name: str) -> bool:
        """Whether ``name`` is, or could be, one of this format's own files in a checkpoint
        dir (extra files must not take such a name)."""
        ...

    def check_template(self, directory: Path, template: Any) -> None:
        """Refuse a ``state=`` template this format cannot read into (run on every rank, and
        agreed on, before :meth:`read`)."""
        ...

    def estimate_bytes(self, state: Any) -> int:
        """Roughly how many bytes ``write`` will put on disk for this rank's ``state``."""
        ...

    def write(self, state: Any, directory: Path, ctx: ShardContext) -> Mapping[str, FileRecord]:
        """Write this rank's ``state`` (already reduced to plain data and tensors) into
        ``directory``; return the files this rank wrote, by name relative to ``directory``."""
        ...

    def read(
        self,
        directory: Path,
        manifest: Manifest,
        ctx: ShardContext,
        template: Any,
        options: ReadOptions,
    ) -> Any:
        """This rank's state from a committed checkpoint dir. ``template`` is the user's
        ``state=`` reduced to plain data (None if not given); formats that load in place
        (DCP) fill its tensors, others may ignore it."""
        ...
