"""What an ``s3://`` URL a user gives stands for (:func:`locate_url`): the object-store side of
:func:`distckpt.storage.locate`, by the rules :mod:`distckpt.layout` states for a directory
(what makes a prefix a root is :func:`distckpt.storage.s3_root.prefix_holds_a_root`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from distckpt.errors import CheckpointNotFound
from distckpt.layout import LINK_NAMES, MANIFEST_NAME, parse_set_aside_name, parse_step_dir_name
from distckpt.manifest import Manifest
from distckpt.objurl import S3Url
from distckpt.storage.s3_checkpoint import S3Checkpoint
from distckpt.storage.s3_root import S3Root, prefix_holds_a_root
from distckpt.storage.s3_view import S3RootView
from distckpt.storage.views import Located, nested_root_refusal


def locate_url(url: str, storage_options: Mapping[str, Any] | None) -> Located:
    """What an ``s3://`` URL stands for: ``.../last`` or ``.../best`` (a pointer of the root
    above it, unless that is no root's pointer, :meth:`RootView.owns_pointer`, and the URL's
    prefix holds objects: then a root of that name); ``.../step-1`` or ``.../step-00000001``
    (a name of any width: that step of the root above it when that root committed it; else a
    root when the prefix holds one, :func:`prefix_holds_a_root`, a sweep's ``.../step-1``);
    ``.../damaged-step-00000001-<attempt>``, a save a restore set aside, when a record names
    it (:class:`S3SetAsideCheckpoint`: read and verified where it lies, as a set-aside dir of
    a directory root is); or a root, unlisted: whether it is there is asked only when it has
    no committed step (:meth:`S3RootView.exists`), so a root with checkpoints costs no
    request here.
    Raises :class:`CheckpointNotFound` for a step-named URL that is neither, and
    :class:`InvalidArgument` for a root named like a step dir inside another root (whose
    ``gc`` would take it for leftovers of its own)."""
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
    if step is None:
        set_aside = parse_set_aside_name(last)
        if set_aside is not None:
            view = S3RootView(parent_url, storage_options)
            source = S3SetAsideCheckpoint(view.s3, *set_aside)
            if source.exists():
                return Located("step_dir", view, source=source)
        return Located("root", as_root)
    view = S3RootView(parent_url, storage_options)
    source = view.checkpoint(step)
    if source.exists():
        return Located("step_dir", view, source=source)
    if not prefix_holds_a_root(as_root.s3.client, ""):
        raise CheckpointNotFound(f"no committed checkpoint at {url}", path=url, step=step)
    if prefix_holds_a_root(view.s3.client, ""):
        raise nested_root_refusal(url, parent_url, last)
    return Located("root", as_root)


class S3SetAsideCheckpoint(S3Checkpoint):
    """A save a restore set aside as damaged, read where its copy lies
    (``damaged-step-N-<attempt>/``), as a set-aside directory of a directory root is read:
    it is no committed checkpoint, but ``verify`` names its damage, ``info`` shows its
    manifest and ``load_checkpoint`` reads what can still be read."""

    def __init__(self, root: S3Root, step: int, attempt: str) -> None:
        super().__init__(root, step)
        self.location = root.set_aside_location(step, attempt)
        self._attempt = attempt

    def exists(self) -> bool:
        """Whether a set-aside record names the save (a copy no record names is a
        leftover that the next cleanup removes)."""
        assert self._attempt is not None
        return self._root.is_set_aside(self.expected_step, self._attempt)

    def _prefix(self) -> str:
        assert self._attempt is not None
        return self._root.set_aside_prefix(self.expected_step, self._attempt)

    def read_manifest(self) -> Manifest:
        # not the root's cache of committed manifests: this copy may be damaged otherwise
        return self._fetch_manifest(self._object(MANIFEST_NAME))
