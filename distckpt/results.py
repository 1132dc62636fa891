"""What distckpt's calls return: plain, frozen records."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distckpt.manifest import Manifest


@dataclass(frozen=True)
class SaveResult:
    """A save, the same on every rank: the step and the committed directory.

    ``done`` is True once the checkpoint is durable under ``path`` (always, for a synchronous
    save)."""

    step: int
    path: Path
    epoch: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    done: bool = True


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint as its manifest describes it; no tensor is read."""

    step: int
    path: Path
    epoch: int | None
    metrics: Mapping[str, float]
    metadata: Mapping[str, Any]
    size_bytes: int
    created_utc: str | None
    format: str
    world_size: int

    @classmethod
    def from_manifest(cls, path: Path, manifest: Manifest) -> CheckpointInfo:
        return cls(
            step=manifest.step,
            path=path,
            epoch=manifest.epoch,
            metrics=dict(manifest.metrics),
            metadata=dict(manifest.metadata),
            size_bytes=manifest.total_bytes,
            created_utc=manifest.created_utc,
            format=manifest.format,
            world_size=manifest.world_size,
        )


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint.

    ``state`` is this rank's state as saved (stateful objects appear as their state dicts; the
    objects passed as ``state=`` have been loaded in place). ``missing_keys`` /
    ``unexpected_keys`` list what did not line up with ``state=`` under ``strict=False``."""

    state: Any
    step: int
    epoch: int | None
    metrics: Mapping[str, float]
    metadata: Mapping[str, Any]
    path: Path
    manifest: Manifest
    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()
