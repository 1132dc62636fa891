"""The checkpoint of one step of an ``s3://`` root (:class:`S3Checkpoint`), as its readers
and the writer's checks see it: the save its ``COMMIT`` names, checked against its manifest
and downloaded for a read."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from distckpt.checksums import crc32
from distckpt.errors import CheckpointNotFound, CorruptCheckpoint, ObjectNotFound
from distckpt.layout import MANIFEST_NAME
from distckpt.manifest import CHECKSUM_ALGORITHM, MAX_MANIFEST_BYTES, Manifest, oversized_manifest
from distckpt.problems import (
    Problem,
    checksum_mismatch,
    damage,
    missing,
    unknown_checksum_algorithm,
    wrong_size,
)
from distckpt.storage.s3_root import COMMIT_NAME, DOWNLOAD_CONCURRENCY, S3Root
from distckpt.storage.s3_spool import make_temp_dir
from distckpt.storage.views import CheckpointSource

_READ_CHUNK = 8 << 20


class S3Checkpoint(CheckpointSource):
    """The checkpoint of one step of an ``s3://`` root: the attempt its ``COMMIT`` names."""

    def __init__(
        self,
        root: S3Root,
        step: int,
        attempt: str | None = None,
        listed_sizes: Mapping[str, int] | None = None,
    ) -> None:
        """``attempt``: the save the step's ``COMMIT`` names, when known (it is not read).
        ``listed_sizes``: with it, the sizes of that save's objects by name under its prefix,
        as a listing of every object under the step prefixes saw them
        (:meth:`~distckpt.storage.s3_root.StepListing.save_sizes`): the check reads them
        rather than list the save, and the manifest's size rather than ask for it (``HEAD``).
        Such a listing of several pages is no snapshot (a save completed or replaced while it
        ran): where it shows a file missing or of another size, the save is listed again
        before any problem is reported."""
        self._root = root
        self.location: str = root.location(step)
        self.expected_step: int = step
        self._attempt: str | None = attempt
        self._listed_sizes = dict(listed_sizes) if listed_sizes is not None else None
        self._commit_etag: str | None = None  # of the ``COMMIT`` read, when read

    def unsafe(self) -> str | None:
        return None  # objects cannot be links

    def exists(self) -> bool:
        """Whether the step is still committed, and (once read) still as the save read: a
        save replaced by ``overwrite`` has vanished for a reader that was reading it."""
        try:
            record = self._root.read_commit(self.expected_step)
        except CorruptCheckpoint:
            return True  # there, but damaged: reported as such, not as vanished
        return record is not None and self._attempt in (None, record.attempt)

    def _prefix(self) -> str:
        """The committed attempt's prefix (read from ``COMMIT`` once per instance, unless
        given)."""
        if self._attempt is None:
            fetched = self._root.fetch_commit(self.expected_step)
            if fetched is None:
                raise CheckpointNotFound(
                    f"{self.location} is not committed (no {COMMIT_NAME} object)",
                    path=self.location,
                    step=self.expected_step,
                )
            # The version before its parse: a COMMIT that is no commit record fails the read,
            # and a search reads it again only once another version replaced it.
            data, self._commit_etag = fetched
            record = self._root.parse_commit(self.expected_step, data, self._commit_etag)
            self._attempt = record.attempt
        return self._root.attempt_prefix(self.expected_step, self._attempt)

    def committed_version(self) -> str | None:
        """The ETag of the ``COMMIT`` its read followed, or found to be no commit record (a
        save's objects never change once committed; an overwrite writes another ``COMMIT``)."""
        return self._commit_etag

    def _object(self, name: str) -> str:
        return self._prefix() + name

    def read_manifest(self) -> Manifest:
        name = self._object(MANIFEST_NAME)
        assert self._attempt is not None  # read by _object
        key = (self.expected_step, self._attempt)
        if key not in self._root.manifests:
            self._root.manifests[key] = self._fetch_manifest(name)
        return self._root.manifests[key]

    def _fetch_manifest(self, name: str) -> Manifest:
        source = f"{self._root.root}/{name}"
        listed = (self._listed_sizes or {}).get(MANIFEST_NAME)
        try:
            size = listed if listed is not None else self._root.client.head(name).size
            if size > MAX_MANIFEST_BYTES:
                raise oversized_manifest(source)
            raw = self._root.client.get_bytes(name)
        except ObjectNotFound as exc:
            raise CorruptCheckpoint(
                f"{self.location} has no {MANIFEST_NAME}", damaged=True
            ) from exc
        return Manifest.from_json(raw, source=source)

    def _sizes(self, manifest: Manifest | None = None) -> dict[str, int]:
        """The sizes of the save's objects by name: those listed before (``listed_sizes``),
        where they hold ``manifest``'s every file at its size, else from a listing of the
        save now."""
        listed = self._listed_sizes
        if listed is not None and manifest is not None and _holds(listed, manifest):
            return listed
        prefix = self._prefix()
        return {info.key[len(prefix) :]: info.size for info in self._root.client.list(prefix)}

    def file_problems(
        self,
        manifest: Manifest,
        *,
        checksums: bool,
        progress: Callable[[int], None] | None = None,
    ) -> list[Problem]:
        problems: list[Problem] = []
        if manifest.step != self.expected_step:
            problems.append(
                damage(
                    f"{self.describe(MANIFEST_NAME)}: names step {manifest.step}, "
                    f"but the checkpoint is for step {self.expected_step}"
                )
            )
        if manifest.checksum_algorithm != CHECKSUM_ALGORITHM and checksums:
            problems.append(unknown_checksum_algorithm(self.describe(MANIFEST_NAME), manifest))
            checksums = False
        sizes = self._sizes(manifest)
        if MANIFEST_NAME not in sizes:
            # ``manifest`` may come from memory (this process wrote or read it before): the
            # listing is what tells whether the object is still there.
            problems.append(missing(self.describe(MANIFEST_NAME)))
        for name, record in sorted(manifest.files.items()):
            size = sizes.get(name)
            if size is None:
                problems.append(missing(self.describe(name)))
            elif size != record.size:
                problems.append(wrong_size(self.describe(name), size, record.size))
            elif checksums:
                try:
                    matches = self._checksum_matches(name, record.checksum, progress)
                except ObjectNotFound:
                    # deleted since the listing (before its HEAD or its GET): as missing as
                    # when the listing did not find it
                    problems.append(missing(self.describe(name)))
                    continue
                if not matches:
                    problems.append(checksum_mismatch(self.describe(name)))
        return problems

    def _checksum_matches(
        self, name: str, expected: str, progress: Callable[[int], None] | None
    ) -> bool:
        """Whether the object's CRC-32 is ``expected``. The store's own CRC-32 (kept where the
        object was sent with one) answers a mismatch without a download; a match is confirmed
        by reading every byte, since what the store keeps is what it was sent."""
        stored = self._root.client.head(self._object(name)).crc32
        if stored is not None and stored != expected:
            return False
        crc = 0
        with self._root.client.open_read(self._object(name)) as stream:
            while chunk := stream.read(_READ_CHUNK):
                crc = crc32(chunk, crc)
                if progress is not None:
                    progress(len(chunk))
        return f"{crc:08x}" == expected

    def unlisted_files(self, manifest: Manifest) -> list[str]:
        return [
            f"{self.describe(name)}: unexpected object, not in the manifest"
            for name in sorted(self._sizes())
            if name != MANIFEST_NAME and name not in manifest.files
        ]

    def describe(self, name: str) -> str:
        if self._attempt is None:
            return f"{self.location}/{name}"
        return f"{self._root.root}/{self._object(name)}"

    def local_copy(self, names: Collection[str]) -> AbstractContextManager[Path]:
        return self._downloaded(names)

    @contextmanager
    def _downloaded(self, names: Collection[str]) -> Iterator[Path]:
        manifest = self.read_manifest()
        directory = make_temp_dir("read", self.name)
        try:
            wanted = sorted(set(names) | {MANIFEST_NAME})
            with ThreadPoolExecutor(DOWNLOAD_CONCURRENCY) as pool:
                for future in [
                    pool.submit(self._download, name, directory, manifest) for name in wanted
                ]:
                    future.result()
            yield directory
        finally:
            # A format may have memory-mapped a file: unlinking it keeps the mapping valid.
            shutil.rmtree(directory, ignore_errors=True)

    def _download(self, name: str, directory: Path, manifest: Manifest) -> None:
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with (
                self._root.client.open_read(self._object(name)) as stream,
                open(target, "wb") as out,
            ):
                shutil.copyfileobj(stream, out, _READ_CHUNK)
        except ObjectNotFound as exc:
            raise CorruptCheckpoint(f"{self.describe(name)}: missing") from exc
        record = manifest.files.get(name)
        size = target.stat().st_size
        if record is not None and size != record.size:
            raise CorruptCheckpoint(
                f"{self.describe(name)}: {size} bytes, the manifest says {record.size} (truncated?)"
            )


def _holds(sizes: Mapping[str, int], manifest: Manifest) -> bool:
    """Whether ``sizes`` (an object's size by name) hold the manifest and each of its files at
    the size it lists."""
    files = manifest.files.items()
    return MANIFEST_NAME in sizes and all(sizes.get(name) == r.size for name, r in files)
