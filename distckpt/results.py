"""What distckpt's calls return: plain, frozen records."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from distckpt.manifest import Manifest

#: Where a checkpoint (or a root) is: a :class:`~pathlib.Path` for a local root, the ``s3://``
#: URL (a ``str``) for an object-store root, e.g. ``"s3://bucket/prefix/step-00000010"``.
CheckpointLocation = Union[Path, str]


def location_name(location: CheckpointLocation) -> str:
    """The last component of a location (``step-00000010``), whatever its backend."""
    return (
        Path(location).name if isinstance(location, Path) else location.rstrip("/").rsplit("/")[-1]
    )


@dataclass(frozen=True)
class SaveResult:
    """A save, the same on every rank: the step and the committed checkpoint's location (a
    directory, or the ``s3://`` URL of an object-store checkpoint).

    ``done`` is True once the checkpoint is durable under ``path`` (always, for a synchronous
    save)."""

    step: int
    path: CheckpointLocation
    epoch: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    done: bool = True


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint as its manifest describes it; no tensor is read."""

    step: int
    path: CheckpointLocation
    epoch: int | None
    metrics: Mapping[str, float]
    metadata: Mapping[str, Any]
    size_bytes: int
    created_utc: str | None
    format: str
    world_size: int

    @classmethod
    def from_manifest(cls, path: CheckpointLocation, manifest: Manifest) -> CheckpointInfo:
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
    #: the checkpoint's location (a directory, or an ``s3://`` URL)
    path: CheckpointLocation
    manifest: Manifest
    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()
