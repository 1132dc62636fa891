"""The read side of the storage seam: a root and its checkpoints as readers see them.

:mod:`distckpt.resolve`, :mod:`distckpt.reader`, :mod:`distckpt.verify` and the exporter work
over these two interfaces only, so they never ask which backend holds a root:

* a :class:`RootView` lists the committed steps of one root and reads its ``last``/``best``
  pointers (POSIX: symlinks or pointer files; an object store: pointer objects);
* a :class:`CheckpointSource` is one checkpoint: its manifest, what is wrong with its files
  against that manifest, and :meth:`CheckpointSource.local_copy`, a local directory holding
  the files a read needs (POSIX: the checkpoint dir itself; an object store: a temporary
  download), which the formats read unchanged.

The implementations are :mod:`distckpt.storage.posix_view` and :mod:`distckpt.storage.s3_view`;
:func:`distckpt.storage.open_view` picks one.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Collection, Hashable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Literal

from distckpt.errors import CheckpointError, InvalidArgument
from distckpt.layout import RootLayout, parse_step_dir_name
from distckpt.manifest import Manifest
from distckpt.problems import Problem
from distckpt.results import CheckpointLocation, location_name

#: What a location given by a user stands for: a ``last``/``best`` pointer of a root, one
#: checkpoint, or a root (its newest checkpoint).
PathKind = Literal["link", "step_dir", "root"]


class CheckpointSource(abc.ABC):
    """One checkpoint of a root (committed, as far as its root's listing said)."""

    #: where it is: its dir, or its ``s3://`` URL
    location: CheckpointLocation
    #: the step its name stands for (None for a dir whose name is not a step dir's)
    expected_step: int | None

    @property
    def name(self) -> str:
        """Its last component, ``step-00000010`` (a POSIX dir may have any name)."""
        return location_name(self.location)

    def describe(self, name: str) -> str:
        """How messages name the file ``name`` of this checkpoint."""
        return f"{self.location}/{name}"

    @abc.abstractmethod
    def unsafe(self) -> str | None:
        """Why this checkpoint must not be read at all (POSIX: its dir is a symlink), or None."""

    @abc.abstractmethod
    def exists(self) -> bool:
        """Whether it is still there (committed): False once deleted, e.g. by another
        process's retention while it was being read."""

    @abc.abstractmethod
    def read_manifest(self) -> Manifest:
        """Its manifest: :class:`~distckpt.CorruptCheckpoint` when missing or unreadable,
        :class:`~distckpt.UnsupportedVersion` when newer than this library."""

    @abc.abstractmethod
    def committed_version(self) -> Hashable | None:
        """What identifies the version of this checkpoint that :meth:`read_manifest` read,
        taken no later than that read (None before it, or when unknown): one committed under
        its step since (``overwrite=True``) has another, as
        :meth:`RootView.committed_versions` tells, so that a search reads a checkpoint it
        found failing again only once it was replaced."""

    @abc.abstractmethod
    def file_problems(
        self,
        manifest: Manifest,
        *,
        checksums: bool,
        progress: Callable[[int], None] | None = None,
    ) -> list[Problem]:
        """Everything wrong with its files against ``manifest``, one message per problem: a
        step other than :attr:`expected_step`, a missing or wrong-sized file, and with
        ``checksums`` a wrong checksum (every byte is read; ``progress`` gets the counts).
        Each says whether it is damage this version is sure of (:class:`Problem`); a read
        that fails for another reason than a missing file raises."""

    @abc.abstractmethod
    def unlisted_files(self, manifest: Manifest) -> list[str]:
        """One message per file it holds that ``manifest`` does not list."""

    @abc.abstractmethod
    def local_copy(self, names: Collection[str]) -> AbstractContextManager[Path]:
        """A local directory holding at least the files ``names`` (each checked against the
        manifest's size), for as long as the ``with`` block lasts: what a format reads."""


@contextmanager
def errors_name_the_location(source: CheckpointSource, directory: Path) -> Iterator[None]:
    """Re-raise a :class:`~distckpt.CheckpointError` of a format reading ``directory`` (the
    local copy of ``source``) with the copy's path in its message and ``path`` replaced by
    ``source``'s location: for an object store the copy is a temporary download, gone once
    the read ends and meaningless to whoever reads the error. A no-op where the copy is the
    checkpoint itself (a local root)."""
    try:
        yield
    except CheckpointError as exc:
        local, location = str(directory), str(source.location)
        if local == location:
            raise

        def renamed(text: str) -> str:
            # The whole path first, then the bare dir name some messages use on its own.
            return text.replace(local, location).replace(directory.name, location)

        fields = exc.fields()
        if exc.path is not None:
            fields["path"] = renamed(exc.path)
        raise type(exc).rebuild(renamed(str(exc)), fields) from exc


class RootView(abc.ABC):
    """One checkpoint root as readers see it; reads only, never changes it."""

    #: where the root is: a directory, or an ``s3://`` URL
    root: CheckpointLocation
    #: a local root's paths (None for an object-store root)
    layout: RootLayout | None = None

    @abc.abstractmethod
    def exists(self) -> bool:
        """Whether the root is there (a directory; a bucket this client may list, and for a
        root under a prefix, an object under it)."""

    @abc.abstractmethod
    def holds_a_root(self) -> bool:
        """Whether it holds what only a checkpoint root has (its lease record, a committed
        checkpoint, a ``last``/``best`` link naming a committed step dir): not a directory or
        prefix of roots, nor of exports, nor a set-aside checkpoint
        (:func:`distckpt.layout.holds_a_root`)."""

    @abc.abstractmethod
    def certainly_no_root(self) -> bool:
        """Whether this location, holding no checkpoint, is certainly no empty root: a
        directory that is not there; a prefix that holds no root (:meth:`holds_a_root`). A
        directory that is there may be a root whose first lease a crash lost (its files are
        created one by one), so it is not ruled out; an object store writes the lease object
        whole or not at all."""

    @abc.abstractmethod
    def committed_steps(self) -> list[int]:
        """The steps committed in the root, ascending (their checkpoints are unchecked)."""

    @abc.abstractmethod
    def committed_versions(self) -> dict[int, Hashable | None]:
        """Each committed step, with what identifies the version committed now
        (:meth:`CheckpointSource.committed_version`; None: unknown)."""

    def candidate_steps(self) -> list[int]:
        """The committed steps, ascending, and perhaps steps that are not committed (a save in
        progress, a dead save's leftovers): what a search that checks each step it uses lists,
        where telling the committed steps costs more than listing the steps (an object store:
        a listing of every object, or a request per step), so that it asks only about the steps
        it reaches. By default :meth:`committed_steps`."""
        return self.committed_steps()

    def committed_steps_from(self, step: int) -> list[int]:
        """The committed steps from ``step`` on (``step`` itself and every newer one),
        ascending: what the step rules of a save of ``step`` need. A root where telling a step
        committed costs a request each asks only about these."""
        return [committed for committed in self.committed_steps() if committed >= step]

    @abc.abstractmethod
    def checkpoint(self, step: int) -> CheckpointSource:
        """The checkpoint of ``step`` (whether it is committed or not)."""

    def holds_checkpoint(self, location: CheckpointLocation, step: int) -> bool:
        """Whether ``location`` is this root's checkpoint of ``step``, not another root's that
        a path or URL named (a pretrained model, a teacher)."""
        return location == self.checkpoint(step).location

    def every_checkpoint(self) -> list[CheckpointSource]:
        """Everything that looks like a checkpoint, damaged or unsafe ones included, for
        ``verify`` to report on: by default the committed steps' checkpoints."""
        return [self.checkpoint(step) for step in self.committed_steps()]

    @abc.abstractmethod
    def set_aside_checkpoints(self) -> list[CheckpointLocation]:
        """The checkpoints set aside as damaged (:meth:`~distckpt.storage.RootStore.set_aside`),
        by name: no longer committed, kept for people to inspect or delete."""

    @abc.abstractmethod
    def read_pointer(self, name: str) -> str | None:
        """The target name the pointer ``name`` (``last``/``best``) holds, or None when it is
        absent or not a pointer."""

    @abc.abstractmethod
    def pointer_present(self, name: str) -> bool:
        """Whether anything is at the pointer's name at all (a pointer that cannot be read
        included)."""

    def pointer_location(self, name: str) -> str:
        """How messages name the pointer ``name``."""
        return f"{self.root}/{name}"

    def owns_pointer(self, name: str) -> bool:
        """Whether the location ``name`` (``last``/``best``) here is this root's pointer rather
        than a root of its own reached through it (a user's ``ln -s exp42 runs/best``, an
        ``s3://BUCKET/ckpt/best`` root): the pointer names a checkpoint (its target's last
        component is a step dir's name, however spelled: a symlink may hold an absolute path),
        or this holds checkpoints (a pointer of a root never stands for another root, wherever
        it was made to point)."""
        if parse_step_dir_name(Path(self.read_pointer(name) or "").name) is not None:
            return True
        return bool(self.committed_steps())


class Located:
    """What a location given by a user stands for (see :data:`PathKind`): its root's view,
    and for a ``"link"`` the pointer's name, for a ``"step_dir"`` the checkpoint."""

    def __init__(
        self,
        kind: PathKind,
        view: RootView,
        *,
        pointer: str | None = None,
        source: CheckpointSource | None = None,
    ) -> None:
        self.kind = kind
        self.view = view
        self.pointer = pointer
        self.source = source


def nested_root_refusal(inner: str | os.PathLike[str], outer: str, name: str) -> InvalidArgument:
    """The refusal of a root at ``inner``, inside the checkpoint root ``outer`` under the
    outer root's own ``name`` (what every reader and a manager say alike)."""
    return InvalidArgument(
        f"{os.fspath(inner)} is inside the checkpoint root {outer}, under its own name "
        f"{name!r}: no checkpoint root may be there, as that root would take it for a "
        "checkpoint, a dead save's leftovers or a link of its own; move it out",
        path=os.fspath(inner),
    )
