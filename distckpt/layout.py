"""Names on disk: where each part of a checkpoint root lives, and how names are parsed.

A root looks like this (documented in the README, so people and tools can rely on it)::

    root/step-00001000/         a committed checkpoint
        manifest.json           written last: the schema in :mod:`distckpt.manifest`
        rank-00000.pt ...       the "torch" format: one file per rank
    root/last, root/best        relative links to a step dir (symlink or pointer file)
    root/.staging/              checkpoints being written, one dir per save, each with a
                                ``<name>.lock`` beside it held by its live writer
    root/.trash/                checkpoints being deleted
    root/.lock                  the commit lock
    root/.lease                 the writer lease's lock, held by a writing job's rank 0
    root/.lease.json            the lease record: the holder (host, pid, job id, generation)
    root/damaged-step-00001000-<token>/
                                a committed checkpoint a restore found damaged, set aside
                                (no longer committed) rather than deleted: for people to look
                                at or remove; nothing distckpt does counts or removes it

What makes a directory a root (:func:`holds_a_root`, the one rule the command line and
``export`` share) is what only a root has, never a name alone: its lease record
(``.lease.json``, or a lease lock ``lease --break`` moved aside; every version opening a root
makes them, and closing it leaves them), a committed checkpoint (a step dir holding
``manifest.json``), or a ``last``/``best`` link (symlink or pointer file) naming one of its
committed step dirs. ``.lease``, ``.lock``, ``.staging`` and ``.trash`` are names other tools
use too, and a directory of any other kind may hold ``last/``, ``step-00000010/`` or
``damaged-x`` of its own (exports, a user's ``runs/last -> exp1``, a sweep's
``sweep/last -> step-2`` naming a trial dir): none of them makes a root. A path named like a
step dir is a checkpoint of the root above it when it is one, else a root when it holds one
by this rule (a sweep's ``runs/step-1``): :func:`distckpt.storage.posix_view.locate_path`
and, for a bucket's prefix, :func:`distckpt.storage.s3_locate.locate_url` (by
:func:`~distckpt.storage.s3_root.prefix_holds_a_root`) decide it alike.

This module computes names; it reads the disk only to list what is there and to tell a root.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from distckpt.fsutil import read_link

STEP_PREFIX = "step-"
STEP_DIGITS = 8
MANIFEST_NAME = "manifest.json"
STAGING_DIR_NAME = ".staging"
TRASH_DIR_NAME = ".trash"
LOCK_NAME = ".lock"
LEASE_LOCK_NAME = ".lease"
LEASE_RECORD_NAME = ".lease.json"
#: Ends the name a lease lock file is moved to when a dead machine's lock lingers on it
#: (``.lease.<32 hex digits>.lingering``): a ``lease --break`` takes a new one meanwhile.
LINGERING_LEASE_LOCK_SUFFIX = ".lingering"
LAST = "last"
BEST = "best"
LINK_NAMES = (LAST, BEST)
RANK_FILE_DIGITS = 5

#: Prefixed to a step dir's name when the checkpoint is set aside as damaged.
SET_ASIDE_PREFIX = "damaged-"

_STEP_DIR_RE = re.compile(r"^step-(\d+)$")
_SET_ASIDE_RE = re.compile(rf"^{SET_ASIDE_PREFIX}step-(\d+)-([0-9A-Za-z_.-]+)$")
_RANK_FILE_RE = re.compile(r"^rank-(\d+)\.pt$")


#: The names a root gives entries of its own, besides its step dirs, set-aside checkpoints and
#: lingering lease locks (:func:`is_root_entry_name`).
ROOT_ENTRY_NAMES = (STAGING_DIR_NAME, TRASH_DIR_NAME, LOCK_NAME, LEASE_LOCK_NAME, LEASE_RECORD_NAME)


def is_root_entry_name(name: str) -> bool:
    """Whether ``name`` is one a checkpoint root gives an entry of its own (the layout above):
    a step dir, a link, its staging or trash dir, its lock or lease files, a set-aside
    checkpoint. Whatever else is in a root is no part of it."""
    return (
        name in ROOT_ENTRY_NAMES
        or name in LINK_NAMES
        or parse_step_dir_name(name) is not None
        or parse_set_aside_name(name) is not None
        or is_lingering_lease_lock(name)
    )


def on_disk_spelling(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute, each existing part spelled as its directory lists it.

    On a filesystem that ignores case (exFAT, FAT) ``runs/RUN`` opens the directory listed as
    ``run``, yet locks taken by name there are per spelling (exfat-fuse gives each its own
    inode): two jobs opening one root in two spellings would both hold it. Spelled as listed,
    they lock the same names. A part is respelled only when it exists, its exact name is not
    listed and exactly one listed name equals it ignoring case; a part that does not exist
    (yet), or a directory that cannot be listed, keeps the spelling given. Symlinks on the way
    are kept, not resolved (:meth:`RootLayout.at` spells their targets too)."""
    absolute = Path(os.path.abspath(os.fspath(path)))
    spelled = Path(absolute.anchor)
    for name in absolute.parts[1:]:
        if not os.path.lexists(spelled / name):
            return spelled.joinpath(name, *absolute.parts[len(spelled.parts) + 1 :])
        spelled = spelled / _listed_spelling(spelled, name)
    return spelled


def _listed_spelling(directory: Path, name: str) -> str:
    """How ``directory`` lists the existing entry opened as ``name``. It is listed only when
    ``name`` could be spelled otherwise there: a large parent (a home of 100k entries) costs
    a listing on each open, where case is told apart it costs one lookup."""
    if not _may_be_listed_otherwise(directory, name):
        return name
    try:
        listed = os.listdir(directory)
    except OSError:  # no permission to list it: the name as given still opens it
        return name
    if name in listed:
        return name
    matches = [entry for entry in listed if entry.casefold() == name.casefold()]
    return matches[0] if len(matches) == 1 else name


def _may_be_listed_otherwise(directory: Path, name: str) -> bool:
    """Whether the existing entry ``name`` of ``directory`` may be listed in another case: its
    name in swapped case opens something too (a filesystem that ignores case, or two entries
    of those names). A name of no cased letters has no other spelling; one whose swapped case
    is not the same name ignoring case (``ß``) is listed to tell."""
    other = name.swapcase()
    if other == name:
        return False
    if other.casefold() != name.casefold():
        return True
    return os.path.lexists(directory / other)


def holds_a_root(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` is a checkpoint root by what only a root has (the rule in the
    module docstring): its lease record, a committed checkpoint, or a ``last``/``best`` link
    naming one of its committed step dirs. A directory of roots, one holding another tool's
    ``.lock`` or ``.lease``, or one of exported files in ``last/`` or ``step-00000010/`` dirs is
    not one."""
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return False
    for entry in entries:
        # Not the lease lock (.lease) alone: another tool may keep a lock file of that name,
        # and a root's first open writes its record right after taking the lock.
        if entry.name == LEASE_RECORD_NAME or is_lingering_lease_lock(entry.name):
            return True
        if _is_committed_step_dir(entry):
            return True
        if entry.name in LINK_NAMES and _names_a_step_dir(Path(entry.path)):
            return True
    return False


def _is_committed_step_dir(entry: os.DirEntry[str]) -> bool:
    """Whether ``entry`` is a step dir holding its manifest (a committed checkpoint)."""
    return (
        parse_step_dir_name(entry.name) is not None
        and entry.is_dir(follow_symlinks=False)
        and os.path.isfile(os.path.join(entry.path, MANIFEST_NAME))
    )


#: the name of a lease lock file ``lease --break`` moved aside
#: (:meth:`RootLayout.lingering_lease_lock_path`, its token a uuid4's 32 hex digits)
_LINGERING_LEASE_LOCK = re.compile(
    rf"{re.escape(LEASE_LOCK_NAME)}\.[0-9a-f]{{32}}{re.escape(LINGERING_LEASE_LOCK_SUFFIX)}"
)


def is_lingering_lease_lock(name: str) -> bool:
    """Whether ``name`` is a lease lock file ``lease --break`` moved aside."""
    return _LINGERING_LEASE_LOCK.fullmatch(name) is not None


def _names_a_step_dir(link: Path) -> bool:
    """Whether the link ``link`` (symlink or pointer file) names a committed step dir beside
    it (one holding its manifest), as a root's ``last``/``best`` do: not a directory of
    another name (``runs/last -> exp1``), nor a sweep's trial dir (``sweep/last -> step-2``),
    nor anything elsewhere."""
    target = read_link(link)
    if target is None or parse_step_dir_name(target) is None:
        return False
    return (link.parent / target / MANIFEST_NAME).is_file()


def step_dir_name(step: int) -> str:
    """``step-00001000``: zero-padded to at least eight digits, so names sort like steps."""
    return f"{STEP_PREFIX}{step:0{STEP_DIGITS}d}"


def parse_step_dir_name(name: str) -> int | None:
    """The step a committed dir name stands for, or None if ``name`` is not one (any width)."""
    match = _STEP_DIR_RE.match(name)
    return int(match.group(1)) if match else None


def set_aside_name(step: int, token: str) -> str:
    """``damaged-step-00001000-<token>``: where a damaged checkpoint of ``step`` is set aside.
    No step dir's name (the step listing, ``last``/``best``, retention and the step rules never
    see it) and no leftover's (cleanup never removes it); ``token`` keeps each one apart."""
    return f"{SET_ASIDE_PREFIX}{step_dir_name(step)}-{token}"


def parse_set_aside_name(name: str) -> tuple[int, str] | None:
    """The step and token of a set-aside checkpoint's name, or None if ``name`` is not one."""
    match = _SET_ASIDE_RE.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


def rank_file_name(rank: int) -> str:
    """``rank-00003.pt``: the file one rank writes in the "torch" format."""
    return f"rank-{rank:0{RANK_FILE_DIGITS}d}.pt"


def parse_rank_file_name(name: str) -> int | None:
    """The rank a "torch"-format file name belongs to, or None."""
    match = _RANK_FILE_RE.match(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class RootLayout:
    """Every path inside one checkpoint root. ``root`` is kept absolute so that paths stay
    valid when the process changes its working directory."""

    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike[str]) -> RootLayout:
        """The layout of ``root``, spelled as the disk spells it (:func:`on_disk_spelling`).
        A root reached through a symlink whose target is spelled in another case is the
        target's root as the disk lists it; one whose links lead to names spelled as listed
        keeps the spelling given (the name its messages show)."""
        spelled = on_disk_spelling(root)
        resolved = Path(os.path.realpath(spelled))
        respelled = on_disk_spelling(resolved)
        return cls(spelled if resolved == respelled else respelled)

    @property
    def staging_root(self) -> Path:
        return self.root / STAGING_DIR_NAME

    @property
    def trash_root(self) -> Path:
        return self.root / TRASH_DIR_NAME

    @property
    def lock_path(self) -> Path:
        return self.root / LOCK_NAME

    @property
    def lease_lock_path(self) -> Path:
        return self.root / LEASE_LOCK_NAME

    @property
    def lease_record_path(self) -> Path:
        return self.root / LEASE_RECORD_NAME

    def lingering_lease_lock_path(self, token: str) -> Path:
        """Where ``lease --break`` moves a lease lock file a dead machine's lock lingers on."""
        return self.root / f"{LEASE_LOCK_NAME}.{token}{LINGERING_LEASE_LOCK_SUFFIX}"

    def step_dir(self, step: int) -> Path:
        return self.root / step_dir_name(step)

    def set_aside_dir(self, step: int, token: str) -> Path:
        return self.root / set_aside_name(step, token)

    def set_aside_dirs(self) -> list[Path]:
        """The checkpoints set aside as damaged, by name."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        return sorted(
            Path(entry.path)
            for entry in entries
            if parse_set_aside_name(entry.name) is not None and entry.is_dir(follow_symlinks=False)
        )

    def link_path(self, name: str) -> Path:
        return self.root / name

    def staging_dir(self, step: int, token: str) -> Path:
        """A save's private dir: unique per save, so two writers never share one."""
        return self.staging_root / f"{step_dir_name(step)}.{token}"

    @staticmethod
    def writer_lock_path(staging_dir: Path) -> Path:
        """The lock a live writer holds beside its staging dir (outside it, so it never ends up
        in the committed checkpoint)."""
        return staging_dir.with_name(staging_dir.name + ".lock")

    def committed_steps(self) -> list[int]:
        """Steps that have a committed dir (a real dir, not a link), ascending, each once.

        Any width parses, so two dirs may stand for one step (``step-5`` copied in beside
        ``step-00000005``): the step is listed once, as what is read, replaced and deleted
        is one dir (:meth:`step_dir` when it is a dir, else the first name in sorted
        order); the other one is that step again once that dir is deleted."""
        steps: set[int] = set()
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        for entry in entries:
            step = parse_step_dir_name(entry.name)
            if step is not None and entry.is_dir(follow_symlinks=False):
                steps.add(step)
        return sorted(steps)
