"""What an ``s3://`` URL a user gives stands for (:func:`locate_url`), and what makes a prefix
a root (:func:`prefix_holds_a_root`): the object-store side of :func:`distckpt.storage.locate`,
by the rules :mod:`distckpt.layout` states for a directory."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from distckpt.errors import CheckpointNotFound
from distckpt.layout import LINK_NAMES, parse_step_dir_name, step_dir_name
from distckpt.objstore import ObjectStore
from distckpt.objurl import S3Url
from distckpt.storage.s3_view import LEASE_NAME, S3RootView
from distckpt.storage.views import Located


def prefix_holds_a_root(store: ObjectStore, prefix: str) -> bool:
    """Whether the objects under ``prefix`` (relative to ``store``'s own prefix: ``""``, or
    ending in ``/``) are a checkpoint root's, by what only a root has, as
    :func:`distckpt.layout.holds_a_root` tells a directory: its lease object (a manager
    leaves it, whether or not it committed), a ``last``/``best`` pointer, or a step's
    prefix."""
    owned = {info.key[len(prefix) :] for info in store.list(prefix, top_level=True)}
    if owned & {*LINK_NAMES, LEASE_NAME}:
        return True
    return any(
        parse_step_dir_name(name[len(prefix) :].rstrip("/")) is not None
        for name in store.list_dirs(prefix)
    )


def locate_url(url: str, storage_options: Mapping[str, Any] | None) -> Located:
    """What an ``s3://`` URL stands for: ``.../last`` or ``.../best`` (a pointer of the root
    above it, unless that is no root's pointer, :meth:`RootView.owns_pointer`, and the URL's
    prefix holds objects: then a root of that name); ``.../step-00000010`` (a checkpoint when
    the root above it committed that step under that name, the only one a step has in a
    bucket; else a root when the prefix holds one, :func:`prefix_holds_a_root`: a sweep's
    ``.../step-1``); or a root, when its prefix holds an object (a job's lease, at least).
    Raises :class:`CheckpointNotFound` for anything else: a prefix holding nothing (a typo),
    a step not committed or spelled with another width."""
    parsed = S3Url.parse(url)
    parent, _, last = parsed.prefix.rpartition("/")
    parent_url = str(S3Url(parsed.bucket, parent))
    as_root = S3RootView(url, storage_options)
    if last in LINK_NAMES:
        parent_view = S3RootView(parent_url, storage_options)
        if not parent_view.owns_pointer(last) and as_root.exists():
            return Located("root", as_root)
        return Located("link", parent_view, pointer=last)
    step = parse_step_dir_name(last)
    if step is not None:
        if last == step_dir_name(step):
            view = S3RootView(parent_url, storage_options)
            source = view.checkpoint(step)
            if source.exists():
                return Located("step_dir", view, source=source)
        if prefix_holds_a_root(as_root.s3.client, ""):
            return Located("root", as_root)
        raise CheckpointNotFound(f"no committed checkpoint at {url}", path=url, step=step)
    if not as_root.exists():
        raise CheckpointNotFound(f"no checkpoint or checkpoint root at {url}", path=url)
    return Located("root", as_root)
