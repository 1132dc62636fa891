"""Places for a test's roots of either kind, a local directory or an ``s3://`` prefix (the
``place`` fixture of ``conftest.py`` gives one of each): saving in a root there, writing a
file there, and moving a root between them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import distckpt
from distckpt.objstore import ObjectStore


@dataclass(frozen=True)
class Place:
    """Where a test's roots go (a directory, or an ``s3://`` prefix) and its store's options."""

    base: str
    options: dict[str, Any] | None


def move_root(place: Place, source: str, target: str) -> None:
    """Move the root at ``source`` to ``target``: a rename, or in a bucket a copy of each
    object under the new prefix and the delete of the old ones."""
    if place.options is None:
        Path(source).rename(target)
        return
    bucket = source.split("/")[2]
    with ObjectStore(f"s3://{bucket}", place.options) as store:
        old_prefix, new_prefix = (url.split("/", 3)[3] + "/" for url in (source, target))
        objects = list(store.list(old_prefix))
        for info in objects:
            store.copy(info.key, new_prefix + info.key[len(old_prefix) :], info.size)
        store.delete(info.key for info in objects)


def save_step(place: Place, root: str, step: int) -> distckpt.SaveResult:
    """Save ``step`` (a small tensor of its value) in a root of ``place``, opened and closed."""
    with distckpt.CheckpointManager(root, storage_options=place.options) as manager:
        result = manager.save(step, {"w": torch.full((3,), float(step))})
    assert result is not None
    return result


def put_file(place: Place, name: str, data: bytes) -> None:
    """Write ``data`` as the file, or object, ``name`` (``/``-separated) under the place."""
    if place.options is None:
        path = Path(place.base, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return
    bucket, _, prefix = place.base.removeprefix("s3://").partition("/")
    with ObjectStore(f"s3://{bucket}", place.options) as store:
        store.put_bytes(f"{prefix}/{name}", data)
