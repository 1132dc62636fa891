"""What an ``s3://`` URL a user gives stands for (:func:`locate_url`), and what makes a prefix
a root (:func:`prefix_holds_a_root`): the object-store side of :func:`distckpt.storage.locate`,
by the rules :mod:`distckpt.layout` states for a directory."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from distckpt.errors import CheckpointNotFound, ObjectNotFound
from distckpt.layout import LINK_NAMES, MANIFEST_NAME, parse_set_aside_name, parse_step_dir_name
from distckpt.manifest import Manifest
from distckpt.objlease import LeaseRecord
from distckpt.objstore import ObjectStore
from distckpt.objurl import S3Url
from distckpt.storage.s3_checkpoint import S3Checkpoint
from distckpt.storage.s3_root import COMMIT_NAME, LEASE_NAME, S3Root, read_pointer_object
from distckpt.storage.s3_view import S3RootView
from distckpt.storage.views import Located, nested_root_refusal

#: how many of a prefix's step-named sub-prefixes :func:`prefix_holds_a_root` asks about
#: (one ``HEAD`` each): a root's are committed but for the one a save is writing and a few a
#: crash left, so a root is told within a few; a folder of exports is refused within as many
COMMITS_CHECKED = 8


def prefix_holds_a_root(store: ObjectStore, prefix: str) -> bool:
    """Whether the objects under ``prefix`` (relative to ``store``'s own prefix: ``""``, or
    ending in ``/``) are a checkpoint root's, by what only a root has, as
    :func:`distckpt.layout.holds_a_root` tells a directory: its lease object holding a lease
    record (a manager leaves it, whether or not it committed; another tool's ``.lease`` is
    none), a ``last``/``best`` pointer naming a committed step, or a committed step (its
    ``COMMIT`` object; of the first :data:`COMMITS_CHECKED` step-named sub-prefixes). A folder
    of exports holding ``step-00000010/model.pt`` or ``last/model.pt``, or a sweep's
    ``last`` naming its trial ``step-1`` (no ``COMMIT`` there), is none."""
    owned = {info.key[len(prefix) :] for info in store.list(prefix, top_level=True)}
    if LEASE_NAME in owned and LeaseRecord.read(store, f"{prefix}{LEASE_NAME}") is not None:
        return True
    for name in sorted(owned & set(LINK_NAMES)):
        target = read_pointer_object(store, f"{prefix}{name}")[0]
        if (
            target is not None
            and parse_step_dir_name(target) is not None
            and _is_committed(store, f"{prefix}{target}/")
        ):
            return True
    step_prefixes = (
        name
        for name in store.list_dirs(prefix)
        if parse_step_dir_name(name[len(prefix) :].rstrip("/")) is not None
    )
    return any(
        _is_committed(store, name) for name in itertools.islice(step_prefixes, COMMITS_CHECKED)
    )


def _is_committed(store: ObjectStore, step_prefix: str) -> bool:
    """Whether the step whose objects are under ``step_prefix`` (ending in ``/``) is
    committed: its ``COMMIT`` object is there."""
    try:
        store.head(f"{step_prefix}{COMMIT_NAME}")
    except ObjectNotFound:
        return False
    return True


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
