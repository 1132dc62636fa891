"""What an object store says about its objects: one object (:class:`ObjectInfo`), a page of
a listing (:class:`ObjectPage`). Read by :class:`~distckpt.objstore.ObjectStore`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ObjectInfo:
    """What the store says about one object. ``crc32`` is the store's own full-object CRC-32 in
    distckpt's notation (8 hex digits, as in manifests), when the store keeps one (not in
    listings; not for multipart objects with per-part checksums)."""

    key: str
    size: int
    etag: str
    crc32: str | None = None


@dataclass(frozen=True)
class ObjectPage:
    """One page of a listing: its objects, and whether it is the listing's last."""

    objects: list[ObjectInfo]
    last: bool
