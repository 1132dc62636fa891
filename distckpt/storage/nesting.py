"""Where a path or a key sits inside a checkpoint root under one of that root's own names
(``root/step-00000010/...``, ``root/last``, ``root/.staging/...``): the one walk the exporter
(an ``out_file``) and the stores (a manager's root, :func:`refuse_a_nested_root`) share.

A root inside another root under such a name is the outer root's to list, repoint, clean up or
delete: the outer root would take it for a damaged checkpoint, a dead save's leftovers or a
link of its own. Under any other name (``run/sub``) the outer root never looks at it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distckpt.errors import CorruptCheckpoint, InvalidArgument, UnsupportedVersion
from distckpt.layout import MANIFEST_NAME, holds_a_root, is_root_entry_name, parse_step_dir_name
from distckpt.manifest import read_manifest
from distckpt.objstore import ObjectStore
from distckpt.objurl import S3Url, is_s3_url
from distckpt.storage.s3_root import COMMIT_NAME, LEASE_NAME, WRITERS_PREFIX, prefix_holds_a_root
from distckpt.storage.views import nested_root_refusal


def is_layout_name(name: str) -> bool:
    """Whether ``name`` (one part of a path, or one ``/``-separated part of a key) is one a
    checkpoint root gives its own entries: on disk (:mod:`distckpt.layout`) or in a bucket
    (:mod:`distckpt.storage.s3_root`)."""
    return is_root_entry_name(name) or name in (LEASE_NAME, WRITERS_PREFIX.rstrip("/"))


def local_root_around(path: str | os.PathLike[str]) -> tuple[Path, str] | None:
    """The root ``path`` sits inside under one of its own names, and that name; None when it
    sits in none. Checked as given and with its links resolved (``root/last`` is a link to a
    step dir; so may any dir on the way be). Names are compared ignoring case, on every
    filesystem: where case is ignored (exFAT), ``root/LAST`` is the root's ``last``."""
    given = Path(os.path.abspath(os.fspath(path)))
    for way in (given, Path(os.path.realpath(given))):
        for depth in range(1, len(way.parts)):
            name = way.parts[depth]
            directory = Path(*way.parts[:depth])
            if is_root_entry_name(name.casefold()) and holds_a_root(directory):
                return directory, name
    return None


def bucket_root_around(store: ObjectStore, key: str) -> tuple[str, str] | None:
    """The root (its ``s3://`` URL) that ``key``, relative to a bucket-wide ``store``, sits
    inside under one of its own names, and that name; None when it sits in none. A prefix
    holds a root as :func:`~distckpt.storage.s3_root.prefix_holds_a_root` tells."""
    parts = key.split("/")
    for depth, part in enumerate(parts):
        if not is_layout_name(part):
            continue
        prefix = "".join(f"{name}/" for name in parts[:depth])
        if prefix_holds_a_root(store, prefix):
            return str(S3Url(store.bucket, prefix.rstrip("/"))), part
    return None


def refuse_a_nested_root(
    root: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> None:
    """Refuse (:class:`InvalidArgument`, naming both roots) to open ``root`` as a checkpoint
    root where it sits inside another root under one of that root's own names
    (:func:`nested_root_refusal`): ``ROOT/last`` (or a path through it), a step dir (a
    ``SaveResult.path``), ``ROOT/step-00000009`` holding a root of its own, or a path not
    there yet under one (``ROOT/step-00000009/new``). A local directory holding a checkpoint's
    manifest (a copy of one, in no root) is refused too: it is a checkpoint, not a root; one
    holding another tool's ``manifest.json`` (not read as a checkpoint's) is not.
    Reads only; a manager's store runs it before it creates or writes anything."""
    if is_s3_url(root):
        url = S3Url.parse(os.fspath(root))
        if not any(is_layout_name(part) for part in url.prefix.split("/")):
            return  # no client made, no request: the common case of every job's start
        with ObjectStore(str(S3Url(url.bucket, "")), storage_options) as store:
            found = bucket_root_around(store, url.prefix)
        if found is not None:
            raise nested_root_refusal(str(url), *found)
        return
    local = local_root_around(root)
    if local is not None:
        raise nested_root_refusal(root, str(local[0]), local[1])
    # The root itself only: a directory further up holding a file of that name is as likely
    # a project's own (a web app's manifest.json) as a checkpoint's; and only a distckpt
    # manifest (one of a newer version too) makes it a checkpoint.
    if Path(root, MANIFEST_NAME).is_file() and _holds_a_checkpoints_manifest(Path(root)):
        raise InvalidArgument(
            f"{os.fspath(root)} is a checkpoint (it holds {MANIFEST_NAME}), not a checkpoint "
            "root: give the root it belongs to, or a new directory outside it",
            path=os.fspath(root),
        )


def _holds_a_checkpoints_manifest(directory: Path) -> bool:
    """Whether ``directory``'s ``manifest.json`` is a distckpt checkpoint's (read as one), not
    another tool's file of that name."""
    try:
        read_manifest(directory)
    except UnsupportedVersion:
        return True
    except CorruptCheckpoint:
        # One cut short or damaged (an interrupted copy) is still a checkpoint's if its start
        # names a field of distckpt's: keys are sorted, so "checksum_algorithm" comes first.
        with open(directory / MANIFEST_NAME, "rb") as file:
            start = file.read(4096)
        return any(mark in start for mark in _MANIFEST_MARKS)
    return True


#: field names near the start of a distckpt manifest, whatever its version
_MANIFEST_MARKS = (b'"checksum_algorithm"', b'"format_version"')


def root_shown_by(rest: str) -> tuple[str, bool] | None:
    """Where the key ``rest``, relative to a step's prefix, may show a checkpoint root of its
    own: ``""`` for the step's prefix itself, else the one name under it a save's prefix would
    have; None where it shows none. With it, whether it shows one only if the object holds a
    lease record: a committed step's ``COMMIT`` under it is what no save holds, a ``.lease``
    may be a save's own file (an extra file of that name, which older versions allowed)."""
    parts = rest.split("/")
    if len(parts) >= 2 and parts[-1] == COMMIT_NAME and parse_step_dir_name(parts[-2]) is not None:
        parts, needs_a_record = parts[:-2], False
    elif parts[-1] == LEASE_NAME:
        parts, needs_a_record = parts[:-1], True
    else:
        return None
    return ("/".join(parts), needs_a_record) if len(parts) <= 1 else None
