"""The object layout of an ``s3://`` root, which its readers (:mod:`distckpt.storage.s3_view`,
:mod:`distckpt.storage.s3_checkpoint`) and its writer (:mod:`distckpt.storage.s3`) share, and
:class:`S3Root`, the names and reads they share, and what makes a prefix a root
(:func:`prefix_holds_a_root`: a view asks it of its root, a reader of a URL it is given).

Under ``s3://BUCKET/PREFIX/``::

    step-00000010/<attempt>/rank-00000.pt ...   every object of one save, under its own prefix
    step-00000010/<attempt>/manifest.json       (``attempt`` is the save's unique token)
    step-00000010/COMMIT                        {"step": 10, "attempt": "<attempt>"}: created
                                                with If-None-Match: *, the moment of publication
    last, best                                  pointer objects: one line, "step-00000010"
    damaged-step-00000010-<attempt>             a set-aside record: the save ``attempt`` of
                                                step 10, found damaged, whose COMMIT was
                                                then deleted; its objects stay (gc leaves them)
    .lease                                      the writing job's lease (distckpt.objlease)
    .writers/<attempt>                          a live writer's claim on its attempt

A step is committed exactly when its ``COMMIT`` object exists, and its checkpoint is the
attempt ``COMMIT`` names; objects of any other attempt are leftovers (or a live writer's), but
for an attempt a set-aside record names. Objects under ``damaged-step-N-<attempt>/`` that no
record names are a leftover too once ``COMMIT`` does not name that attempt (the part of a
copy a set-aside killed before its step was deleted or replaced left).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from distckpt.errors import (
    CorruptCheckpoint,
    ObjectExists,
    ObjectNotFound,
)
from distckpt.fsutil import POINTER_MAX_BYTES
from distckpt.layout import (
    LINK_NAMES,
    MANIFEST_NAME,
    SET_ASIDE_PREFIX,
    parse_set_aside_name,
    parse_step_dir_name,
    set_aside_name,
    step_dir_name,
)
from distckpt.manifest import Manifest
from distckpt.objinfo import ObjectInfo
from distckpt.objlease import LeaseRecord
from distckpt.objstore import ObjectStore
from distckpt.objurl import S3Url

COMMIT_NAME = "COMMIT"
LEASE_NAME = ".lease"
WRITERS_PREFIX = ".writers/"
#: Files downloaded at once by :meth:`S3Checkpoint.local_copy` (each a stream of its own).
DOWNLOAD_CONCURRENCY = 4
#: The objects of a step (its saves' files, their manifests, its ``COMMIT``) up to which the
#: committed steps are read from a listing of every object under the step prefixes, a page per
#: 1000 objects, rather than by a ``HEAD`` of each step's ``COMMIT``: at 32, a page covers 31
#: steps or more, and S3 prices a LIST as 12.5 HEADs (on moto a page of 1000 took as long as
#: about 100 HEADs sent four at a time). So a save of up to 30 files (one a rank, for 30 ranks)
#: sends no request per step kept. More objects a step are listed too while the steps a
#: process keeps fit one page of :data:`LISTING_PAGE` objects.
LISTED_OBJECTS_PER_STEP = 32
#: The objects a page of the listing of every object under the step prefixes asks for (S3's
#: most a page holds).
LISTING_PAGE = 1000
#: the attempt a damaged ``COMMIT`` names (unknown); no attempt token is empty
UNKNOWN_ATTEMPT = ""


@dataclass(frozen=True)
class CommitRecord:
    """What a step's ``COMMIT`` object says, and the ETag of the version read."""

    step: int
    attempt: str
    etag: str

    @staticmethod
    def encode(step: int, attempt: str) -> bytes:
        return json.dumps({"step": step, "attempt": attempt}, sort_keys=True).encode()


@dataclass(frozen=True)
class StepListing:
    """The committed steps as :meth:`S3Root.step_listing` read them."""

    #: each committed step's ``COMMIT`` ETag
    commits: dict[int, str]
    #: each step's objects, by key under the step's prefix, as one listing of every object
    #: under the step prefixes saw them (its pages are no snapshot: an object's absence, or
    #: another size, may be a change since); None where the steps were not read that way
    objects: dict[int, dict[str, ObjectInfo]] | None

    def commit_of(self, step: int) -> CommitRecord | None:
        """The record of the step's ``COMMIT`` version the listing saw, where its ETag is the
        MD5 digest of the record naming one of the step's saves the listing shows (a prefix
        holding a manifest), as S3 gives an object written in one ``PUT`` without KMS
        encryption: the bytes written are then known. None otherwise (another store's ETag,
        a damaged ``COMMIT``, one another version wrote otherwise): it must be read."""
        etag = self.commits.get(step)
        if etag is None or self.objects is None:
            return None
        for key in self.objects.get(step, {}):
            attempt = save_whose_manifest(key)
            if attempt is not None and etag.strip('"') == _digest(step, attempt):
                return CommitRecord(step, attempt, etag)
        return None

    def save_sizes(self, step: int, attempt: str) -> dict[str, int] | None:
        """The sizes of the save ``attempt``'s objects, by name under its prefix, as the
        listing saw them; None when the steps were not listed so."""
        if self.objects is None:
            return None
        prefix = f"{attempt}/"
        listed = self.objects.get(step, {}).items()
        return {key[len(prefix) :]: info.size for key, info in listed if key.startswith(prefix)}


def save_whose_manifest(key_in_step: str) -> str | None:
    """The save (its attempt) whose top-level ``manifest.json`` the object named
    ``key_in_step`` (its name under a step's prefix) is, or None: what tells a save's prefix,
    as no root has one at its top."""
    attempt, slash, name = key_in_step.partition("/")
    return attempt if slash and name == MANIFEST_NAME else None


def _digest(step: int, attempt: str) -> str:
    """The MD5 digest (hex) of the ``COMMIT`` record naming the save ``attempt`` of ``step``."""
    return hashlib.md5(CommitRecord.encode(step, attempt), usedforsecurity=False).hexdigest()


def step_of_commit(key: str) -> int | None:
    """The step whose ``COMMIT`` object ``key`` (relative to the root) is, or None when it is
    no step's ``COMMIT``: a listing's entry of that key, with its ETag, tells as much as a
    ``HEAD`` of it on a strongly consistent store. Only the name :meth:`S3Root.commit_name`
    gives is one: ``step-2/COMMIT`` (another width, which no manager writes) is not step 2's,
    nor may its ETag stand for that of ``step-00000002/COMMIT``, which a ``HEAD`` reads."""
    step = parse_step_dir_name(key.partition("/")[0])
    return step if step is not None and key == S3Root.commit_name(step) else None


class S3Root:
    """One ``s3://`` root: its names, and the reads its view and its store share. The client
    is made on first use in each process (a botocore client must not cross a ``fork()``)."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None) -> None:
        self.url = S3Url.parse(url)
        self.root = str(self.url)
        self.storage_options = dict(storage_options or {})
        self._client: ObjectStore | None = None
        self._client_pid = 0
        self._client_lock = threading.Lock()
        #: manifests read, by (step, attempt): a save's manifest never changes once committed.
        #: Those of a step are dropped, with its commit record, once this process removes it
        #: (:meth:`forget_commit`) or a listing of every step no longer finds it (another
        #: process's retention: :meth:`listed_steps`), so a reader's do not pile up either
        self.manifests: dict[tuple[int, str], Manifest] = {}
        self.commits: dict[int, CommitRecord] = {}  # each step's last read, with its ETag

    def __getstate__(self) -> dict[str, Any]:
        # Sent to other ranks (a resolved checkpoint travels in a broadcast): each makes its
        # own client.
        return {"url": self.root, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"])  # type: ignore[misc]

    @property
    def client(self) -> ObjectStore:
        with self._client_lock:
            if self._client is None or self._client_pid != os.getpid():
                self._client = ObjectStore(self.root, self.storage_options)
                self._client_pid = os.getpid()
            return self._client

    def close(self) -> None:
        with self._client_lock:
            if self._client is not None and self._client_pid == os.getpid():
                self._client.close()
            self._client = None

    # -- names (relative to the root's prefix)

    @staticmethod
    def commit_name(step: int) -> str:
        return f"{step_dir_name(step)}/{COMMIT_NAME}"

    @staticmethod
    def attempt_prefix(step: int, attempt: str) -> str:
        return f"{step_dir_name(step)}/{attempt}/"

    @staticmethod
    def claim_name(attempt: str) -> str:
        return f"{WRITERS_PREFIX}{attempt}"

    @staticmethod
    def set_aside_record_name(step: int, attempt: str) -> str:
        return set_aside_name(step, attempt)

    def write_set_aside_record(self, step: int, attempt: str) -> None:
        """Write the record naming the save ``attempt`` of ``step`` set aside, unless there
        (one that died wrote it): cleanup copies the save it names before deleting it."""
        with suppress(ObjectExists):
            name = set_aside_name(step, attempt)
            self.client.put_bytes(name, CommitRecord.encode(step, attempt), if_absent=True)

    @staticmethod
    def set_aside_prefix(step: int, attempt: str) -> str:
        """Where a save set aside is moved to, beside its record: no ``step-N/`` prefix, which
        any version's cleanup may take for a dead writer's once ``COMMIT`` no longer names it."""
        return f"{set_aside_name(step, attempt)}/"

    def set_aside_location(self, step: int, attempt: str) -> str:
        """A save set aside, as a URL: its objects' prefix."""
        return f"{self.root}/{set_aside_name(step, attempt)}"

    def location(self, step: int) -> str:
        """The checkpoint of ``step`` as users name it: ``s3://BUCKET/PREFIX/step-N``."""
        return f"{self.root}/{step_dir_name(step)}"

    def attempt_location(self, step: int, attempt: str) -> str:
        """A save's prefix as a URL: what every rank is told to write into."""
        return f"{self.root}/{self.attempt_prefix(step, attempt).rstrip('/')}"

    def parse_attempt_location(self, location: str) -> tuple[int, str]:
        """The step and attempt of a URL :meth:`attempt_location` made."""
        step_name, _, attempt = location[len(self.root) + 1 :].partition("/")
        step = parse_step_dir_name(step_name)
        if not location.startswith(self.root + "/") or step is None or not attempt:
            raise ValueError(f"{location} is not a save's prefix in {self.root}")
        return step, attempt

    # -- reads

    def committed_steps(self, from_step: int = 0) -> list[int]:
        return sorted(self.commit_etags(from_step))

    def listed_steps(self, from_step: int = 0) -> list[int]:
        """The steps from ``from_step`` on that have objects, committed or not, ascending: one
        ``/``-delimited listing, no request per step. A listing of every step (``from_step``
        0) also forgets what this process keeps of the steps it no longer finds
        (:meth:`forget_commit`)."""
        kept = self._kept_steps()
        parsed = (parse_step_dir_name(name.rstrip("/")) for name in self.client.list_dirs("step-"))
        listed = {step for step in parsed if step is not None}
        if from_step == 0:
            self._forget_unlisted(kept, listed)
        return sorted(step for step in listed if step >= from_step)

    def commit_etags(self, from_step: int = 0) -> dict[int, str]:
        """Each committed step from ``from_step`` on, with its ``COMMIT``'s ETag
        (:meth:`step_listing`'s ``commits``)."""
        return self.step_listing(from_step).commits

    def step_listing(self, from_step: int = 0) -> StepListing:
        """Each committed step from ``from_step`` on, with its ``COMMIT``'s ETag. Of every
        step (``from_step`` 0), where that pays (:meth:`_listing_pays`: saves of few files,
        or few enough steps of them to fit a page) and its pages show no more objects a step
        than that (:meth:`_listed_commits`): one listing of every object under the step
        prefixes (a page per :data:`LISTING_PAGE` objects), which shows each ``COMMIT`` and
        its ETag, and each step's objects, no request per step; like :meth:`listed_steps`, it
        forgets the steps no longer found. Else, and from a later step (the step rules',
        usually past every step): the step prefixes listed, and a ``HEAD`` of ``COMMIT`` for
        each from ``from_step`` on (no objects shown)."""
        if from_step == 0 and self._listing_pays():
            listing = self._listed_commits()
            if listing is not None:
                return listing
        steps = self.listed_steps(from_step)
        with ThreadPoolExecutor(DOWNLOAD_CONCURRENCY) as pool:
            etags = pool.map(self.current_commit_etag, steps)
            commits = {step: etag for step, etag in zip(steps, etags) if etag is not None}
        return StepListing(commits, None)

    def _listing_pays(self) -> bool:
        """Whether the saves whose manifests this process keeps (their files, manifest and
        ``COMMIT``) have at most :data:`LISTED_OBJECTS_PER_STEP` objects each on average, or
        so few steps of them fit one page: their average times the steps this process keeps
        at most :data:`LISTING_PAGE`. In a process that keeps none, the listing's pages tell
        (:meth:`_listed_commits`)."""
        manifests = list(self.manifests.values())  # a copy: another thread may change it
        objects = sum(len(manifest.files) + 2 for manifest in manifests)
        if objects <= LISTED_OBJECTS_PER_STEP * len(manifests):
            return True
        return objects * len(self._kept_steps()) <= LISTING_PAGE * len(manifests)

    def _listed_commits(self) -> StepListing | None:
        """Each committed step with its ``COMMIT``'s ETag, and each step's objects, from one
        listing of every object under the step prefixes; None when, at the end of a page
        before the last, the objects listed so far are more than
        :data:`LISTED_OBJECTS_PER_STEP` times the steps listed so far: the rest would cost
        more pages than a ``HEAD`` per step costs."""
        kept = self._kept_steps()
        listed: set[int] = set()
        objects_of: dict[int, dict[str, ObjectInfo]] = {}
        commits: dict[int, str] = {}
        objects = 0
        for page in self.client.list_pages("step-", page_size=LISTING_PAGE):
            for info in page.objects:
                head, slash, rest = info.key.partition("/")
                step = parse_step_dir_name(head)
                if step is not None and slash:
                    listed.add(step)
                if step is not None and head == step_dir_name(step):  # not step-2/: no step's
                    objects_of.setdefault(step, {})[rest] = info
                if (committed := step_of_commit(info.key)) is not None:
                    commits[committed] = info.etag
            objects += len(page.objects)
            if not page.last and objects > LISTED_OBJECTS_PER_STEP * len(listed):
                return None  # before the next page is asked for
        self._forget_unlisted(kept, listed)
        return StepListing(commits, objects_of)

    def _kept_steps(self) -> set[int]:
        """The steps this process keeps a commit record or a manifest of. Taken before a
        listing (copies taken at once: another thread may change them), so that a step this
        process commits while the listing runs, missing from it, is not forgotten for that."""
        return set(list(self.commits)) | {step for step, _ in list(self.manifests)}

    def _forget_unlisted(self, kept: set[int], listed: set[int]) -> None:
        """Forget the ``kept`` steps (:meth:`_kept_steps`) that a listing of every step did not
        find: another process removed them."""
        for step in kept - listed:
            self.forget_commit(step)

    def current_commit_etag(self, step: int, store: ObjectStore | None = None) -> str | None:
        """The ETag of the step's ``COMMIT`` object (from ``store``, or :attr:`client`), None
        when it has none."""
        try:
            return (store or self.client).head(self.commit_name(step)).etag
        except ObjectNotFound:
            return None

    def read_commit_or_unknown(
        self, step: int, store: ObjectStore | None = None
    ) -> CommitRecord | None:
        """:meth:`read_commit`, but a damaged ``COMMIT`` is a record naming
        :data:`UNKNOWN_ATTEMPT`, with the ETag of the bytes read (not asked for again: a
        ``COMMIT`` written meanwhile would lend its ETag to the damaged one's record)."""
        fetched = self.fetch_commit(step, store)
        if fetched is None:
            return None
        try:
            return self.parse_commit(step, *fetched)
        except CorruptCheckpoint:
            return CommitRecord(step, UNKNOWN_ATTEMPT, fetched[1])

    def read_commit(self, step: int, store: ObjectStore | None = None) -> CommitRecord | None:
        """The step's commit record, or None when the step is not committed: its
        :meth:`fetch_commit`, parsed (:meth:`parse_commit`)."""
        fetched = self.fetch_commit(step, store)
        return None if fetched is None else self.parse_commit(step, *fetched)

    def fetch_commit(self, step: int, store: ObjectStore | None = None) -> tuple[bytes, str] | None:
        """The bytes of the step's ``COMMIT`` object and the ETag of their version, or None
        (its record forgotten) when the step is not committed. Read with ``store``, or
        :attr:`client`."""
        try:
            return (store or self.client).get_versioned(self.commit_name(step))
        except ObjectNotFound:
            self.forget_commit(step)
            return None

    def parse_commit(self, step: int, data: bytes, etag: str) -> CommitRecord:
        """The record the version ``etag`` of the step's ``COMMIT``, ``data``, holds, kept for
        :meth:`known_commit`. A commit object that is not one (written by something else) is
        :class:`CorruptCheckpoint`, damaged: every version writes the same two keys, whole."""
        try:
            fields = json.loads(data)
            record = CommitRecord(int(fields["step"]), str(fields["attempt"]), etag)
            self.remember_commit(step, record)
            return record
        except (ValueError, TypeError, KeyError) as exc:
            raise CorruptCheckpoint(
                f"{self.root}/{self.commit_name(step)} is not a commit record: {exc}",
                damaged=True,
                path=f"{self.root}/{self.commit_name(step)}",
                step=step,
            ) from exc

    def known_commit(self, step: int, etag: str | None) -> CommitRecord | None:
        """The record of the version ``etag`` of the step's ``COMMIT`` (as a listing or a
        ``HEAD`` just saw it) when this process read or wrote that very version, else None:
        no request."""
        known = self.commits.get(step)
        return known if known is not None and known.etag == etag else None

    def remember_commit(self, step: int, record: CommitRecord) -> None:
        """Keep ``record``, the step's ``COMMIT`` read or written, for :meth:`known_commit`
        (filed under ``step``, where it was found, whatever step it names); a manifest kept of
        another save of the step goes (that save was replaced: ``overwrite``)."""
        self.commits[step] = record
        self._forget_manifests(step, keep=record.attempt)

    def forget_commit(self, step: int) -> None:
        """Drop what this process keeps of the step, its ``COMMIT``'s record (for
        :meth:`known_commit`) and the manifests of its saves: the step was removed (a record
        and a manifest per step ever saved or read would pile up in a long job)."""
        self.commits.pop(step, None)
        self._forget_manifests(step)

    def _forget_manifests(self, step: int, *, keep: str | None = None) -> None:
        """Drop the manifests kept of the step's saves, but of the save ``keep``."""
        for key in [key for key in list(self.manifests) if key[0] == step and key[1] != keep]:
            self.manifests.pop(key, None)

    def set_aside_attempts(self) -> list[tuple[int, str]]:
        """The saves set aside as damaged (step, attempt), from their records' names."""
        return [
            parsed
            # its records only, not the objects of the copies beside them
            for info in self.client.list(SET_ASIDE_PREFIX, top_level=True)
            if (parsed := parse_set_aside_name(info.key)) is not None
        ]

    def is_set_aside(self, step: int, attempt: str) -> bool:
        """Whether a set-aside record names the save ``attempt`` of ``step``."""
        try:
            self.client.head(self.set_aside_record_name(step, attempt))
        except ObjectNotFound:
            return False
        return True

    def read_pointer(self, name: str) -> tuple[str | None, str | None]:
        """The target a pointer object names (None if absent or not a pointer) and its ETag
        (None if absent)."""
        return read_pointer_object(self.client, name)


def read_pointer_object(store: ObjectStore, key: str) -> tuple[str | None, str | None]:
    """The target the pointer object ``key`` of ``store`` names (None if absent or not a
    pointer) and its ETag (None if absent)."""
    try:
        data, etag = store.get_versioned(key)
    except ObjectNotFound:
        return None, None
    if len(data) > POINTER_MAX_BYTES:
        return None, etag
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        return None, etag
    target = lines[0].strip() if len(lines) == 1 else ""
    return target or None, etag


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
