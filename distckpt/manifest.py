"""The manifest: the schema of ``manifest.json`` and the checks a checkpoint dir must pass.

The manifest is written last, inside the staging dir, before the dir is renamed into place; a
committed dir therefore always has one. It is plain JSON (never a pickle), with every file of the
checkpoint listed by its path relative to the dir, its size and its checksum, and a checksum of
its own content (:data:`MANIFEST_CHECKSUM_KEY`), so a checkpoint can be checked without loading
a tensor, by distckpt or by any other tool.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any

from distckpt._version import __version__
from distckpt.checksums import CHECKSUM_ALGORITHM, bytes_checksum, file_checksum
from distckpt.errors import (
    CorruptCheckpoint,
    InvalidArgument,
    ManifestChecksumMismatch,
    UnsupportedVersion,
)
from distckpt.layout import MANIFEST_NAME
from distckpt.problems import (
    Problem,
    checksum_mismatch,
    damage,
    missing,
    unjudged,
    unknown_checksum_algorithm,
    wrong_size,
)

#: Bumped when a change to the schema or to a format's files would mislead an older reader.
#: 2: the "torch" format's rank files hold raw tensor bytes (:mod:`distckpt.formats.raw_rank_file`)
#: instead of ``torch.save`` output; version-1 checkpoints still load.
#: Not bumped for :data:`MANIFEST_CHECKSUM_KEY`: an optional key misleads no reader (every
#: earlier version ignores a top-level key it does not know), while a bump would make every
#: earlier version refuse the checkpoint with UnsupportedVersion.
FORMAT_VERSION = 2
#: The top-level key under which a manifest records the CRC-32 of its own content (as 8 hex
#: digits, like a file's checksum): of :func:`canonical_content`, so a flipped bit anywhere in
#: the manifest (the epoch, a metric, a file's size or checksum) is found when it is read.
#: Written by every version since the one after 0.2.0; a manifest without it (an earlier
#: version's, or another tool's) is read unchecked, as before. It lives in the manifest rather
#: than in a file beside it: earlier versions ignore the unknown key (their ``from_json`` keeps
#: only the fields they know), whereas a sibling file would be an unlisted file to their
#: ``verify``, and one more file a crash could leave without the manifest. The algorithm is in
#: the key's name and the content is always what :func:`canonical_content` gives: a version
#: that changes either must use another key, so this one never misjudges its manifests.
MANIFEST_CHECKSUM_KEY = "manifest_crc32"
#: A manifest lists files by name: even a huge sharded checkpoint's is a few MiB. A larger file
#: is refused unread rather than loaded into memory.
MAX_MANIFEST_BYTES = 64 << 20

_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


@dataclass(frozen=True)
class FileRecord:
    """One file of a checkpoint: its size in bytes, its checksum and the rank that wrote it."""

    size: int
    checksum: str
    rank: int | None = None


@dataclass(frozen=True)
class Manifest:
    """Everything distckpt records about a committed checkpoint."""

    step: int
    world_size: int
    format: str
    files: Mapping[str, FileRecord]
    epoch: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    checksum_algorithm: str = CHECKSUM_ALGORITHM
    format_version: int = FORMAT_VERSION
    library_version: str = __version__
    torch_version: str = ""
    python_version: str = field(default_factory=platform.python_version)
    #: when rank 0 wrote it (ISO 8601, UTC); None when a manifest read from disk has none, so
    #: the time it was read is never mistaken for the time it was written
    created_utc: str | None = field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat()
    )
    #: the checksum of its content the manifest recorded (:data:`MANIFEST_CHECKSUM_KEY`) when it
    #: was read, None when it recorded none (or was not read from a file); ``to_json`` records
    #: the one of the content it writes, whatever this holds. Not compared: a manifest read back
    #: equals the one written.
    manifest_crc32: str | None = field(default=None, compare=False)

    @property
    def total_bytes(self) -> int:
        return sum(record.size for record in self.files.values())

    def to_json(self) -> bytes:
        """The bytes of ``manifest.json``: strict JSON, keys sorted, with the checksum of its
        own content recorded under :data:`MANIFEST_CHECKSUM_KEY`. ``metadata`` must be plain
        JSON (str keys, lists, finite numbers), as :func:`check_json_metadata` makes every
        save's."""
        # Field by field, not asdict(self): that would turn each file's record into a dict
        # (a copy of everything, of 100,000 records in a large manifest) only to be redone.
        data = {member.name: getattr(self, member.name) for member in fields(self)}
        data["metrics"] = encode_metrics(self.metrics)
        data["files"] = {name: dict(vars(record)) for name, record in sorted(self.files.items())}
        # Of ``data`` as it is, with no dump and parse back first (a tenth of a second for a
        # manifest of 100,000 files): it is what a reader parses back, since everything in it is
        # plain JSON already (metadata as check_json_metadata returns it, metrics as plain
        # floats or the strings of encode_metrics, names and checksums as str, sizes and ranks
        # as int), and a Python float dumps as the shortest text that parses back to it.
        data[MANIFEST_CHECKSUM_KEY] = content_checksum(data)
        # allow_nan=False: the file must be valid JSON for any reader, not only Python's.
        return (json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes, *, source: str) -> Manifest:
        """Parse a manifest; ``source`` names it in errors. Raises
        :class:`ManifestChecksumMismatch` when it records a checksum of its content that the
        content does not have, before anything else is judged."""
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptCheckpoint(f"{source} is not valid JSON: {exc}", damaged=True) from exc
        except RecursionError as exc:
            raise _nested_too_deeply(source) from exc
        if not isinstance(data, dict):
            raise CorruptCheckpoint(f"{source} is not a JSON object", damaged=True)
        # Before anything is taken from the content: a flipped bit may have made any of it
        # (the format version too: 2 and 3 differ by one bit) say something else.
        _check_content_checksum(data, source)
        version = data.get("format_version")
        if not isinstance(version, int):
            raise CorruptCheckpoint(f"{source} has no integer format_version", damaged=True)
        if version > FORMAT_VERSION:
            raise UnsupportedVersion(
                f"{source} has format version {version}, written by distckpt "
                f"{data.get('library_version', '?')}; this distckpt {__version__} reads up to "
                f"version {FORMAT_VERSION}: upgrade distckpt to read it"
            )
        # Keys this version does not know are ignored, at the top level and in each file's
        # record alike: a newer writer adds them without raising FORMAT_VERSION (it rises only
        # for changes that would mislead this reader), so they are never damage. A known key
        # missing (of those every version writes) or of a type no version writes is.
        files_data = data.get("files")
        if not isinstance(files_data, dict):
            raise _off_schema(source, "'files' is missing or not an object")
        files = {
            _checked_relative_name(name, source): _file_record(name, record, source)
            for name, record in files_data.items()
        }
        metrics_data = data.get("metrics")
        if not isinstance(metrics_data, dict):
            raise _off_schema(source, "'metrics' is missing or not an object")
        try:
            metrics = {key: _decode_float(value) for key, value in metrics_data.items()}
        except (TypeError, ValueError) as exc:
            # A value spelled in a way this version does not know may be a newer writer's:
            # refused, not judged damage.
            raise CorruptCheckpoint(
                f"{source} has a metric this version cannot read: {exc}"
            ) from exc
        for key in ("step", "world_size"):
            if not _is_integer(data.get(key)):
                raise _off_schema(source, f"{key!r} is missing or not an integer")
        if data["world_size"] < 1:
            raise _off_schema(source, f"'world_size' is {data['world_size']}, not a count of ranks")
        if not isinstance(data.get("format"), str):
            raise _off_schema(source, "'format' is missing or not a string")
        _check_optional_keys(data, source)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known.setdefault("created_utc", None)  # unknown, not "now"
        known.update(files=files, metrics=metrics)
        return cls(**known)


def canonical_content(data: Mapping[str, Any]) -> bytes:
    """A manifest's parsed content without :data:`MANIFEST_CHECKSUM_KEY`, as the bytes its
    checksum is of: compact JSON with sorted keys and ASCII escapes (``json.dumps(content,
    sort_keys=True, separators=(",", ":"))``), each float of an integral value (``1.0``,
    ``1e+20``) but ``-0.0`` dumped as that int (``1``, ``100000000000000000000``). Whatever
    spelling the file used (its indent, a string escaped or not, ``1.50`` for ``1.5``, ``1`` for
    ``1.0`` as jq and JavaScript write it back), the same values give the same bytes, so any
    reader can reproduce them from the parsed JSON alone."""
    content = {
        key: _integral_floats_as_ints(value)
        for key, value in data.items()
        if key != MANIFEST_CHECKSUM_KEY
    }
    # allow_nan: no writer stores NaN or an infinity (metrics hold them as strings), but a
    # damaged number may parse as one (1e999): its bytes must then fail the checksum, not this.
    return json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


def _integral_floats_as_ints(value: Any) -> Any:
    """``value`` (parsed JSON) with every float of an integral value but ``-0.0`` made an int.
    JSON has one kind of number, and the common tools that rewrite a file without changing a
    value (``jq .``, JavaScript's ``JSON.stringify``) write ``1.0`` as ``1``, which Python then
    parses as an int: the canonical form must not tell the two apart. ``-0.0`` stays a float:
    as an int it would read as ``0``, and a sign changed would pass unseen."""
    if type(value) is float:
        if value.is_integer() and not (value == 0 and math.copysign(1.0, value) < 0):
            return int(value)
        return value
    if type(value) is dict:
        return {key: _integral_floats_as_ints(item) for key, item in value.items()}
    if type(value) is list:
        return [_integral_floats_as_ints(item) for item in value]
    return value


def content_checksum(data: Mapping[str, Any]) -> str:
    """The checksum a manifest records of its parsed content ``data``
    (:data:`MANIFEST_CHECKSUM_KEY`)."""
    return bytes_checksum(canonical_content(data))


def _check_content_checksum(data: dict[str, Any], source: str) -> None:
    """Damage when ``data`` records a checksum of its content that the content does not have;
    nothing when it records none (an earlier version's manifest)."""
    if MANIFEST_CHECKSUM_KEY not in data:
        return
    recorded = data[MANIFEST_CHECKSUM_KEY]
    if not isinstance(recorded, str):
        raise _off_schema(source, f"{MANIFEST_CHECKSUM_KEY!r} is not a string")
    try:
        computed = content_checksum(data)
    except RecursionError as exc:  # nested as deep as json.loads went, from a deeper frame
        raise _nested_too_deeply(source) from exc
    if computed != recorded:
        raise ManifestChecksumMismatch(
            f"{source}: checksum mismatch of the manifest itself (its bytes changed after it "
            f"was written: it records {MANIFEST_CHECKSUM_KEY} {recorded}, its content has "
            f"{computed}); nothing it says can be trusted",
            recorded=recorded,
            computed=computed,
            path=source,
        )


def encode_metrics(metrics: Mapping[str, float]) -> dict[str, float | str]:
    """``metrics`` as a manifest stores them: strict JSON, which has no NaN or infinities, so
    those are the strings ``"nan"``, ``"inf"`` and ``"-inf"``."""
    return {key: encode_float(value) for key, value in metrics.items()}


def encode_float(value: float) -> float | str:
    """``value`` as strict JSON holds it: NaN and the infinities as the strings of
    :func:`encode_metrics`."""
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _decode_float(value: float | str) -> float:
    if isinstance(value, str):
        if value not in _NON_FINITE:
            raise ValueError(f"metric value {value!r} is not a number")
        return _NON_FINITE[value]
    return float(value)


def _checked_relative_name(name: str, source: str) -> str:
    """A file name from a manifest, refused if it could reach outside the checkpoint dir."""
    if "/" in name:
        pure = PurePosixPath(name)
        outside = pure.is_absolute() or ".." in pure.parts
    else:  # one component, as most names are: no path object to make for each file
        outside = name in ("", "..")
    if outside or "\0" in name:
        raise CorruptCheckpoint(
            f"{source} lists a file outside its directory: {name!r}", damaged=True
        )
    if "\\" in name:
        # Refused, as a separator elsewhere, but a legal POSIX name that a newer writer could
        # list: not judged damage.
        raise CorruptCheckpoint(f"{source} lists a file outside its directory: {name!r}")
    return name


def _is_integer(value: object) -> bool:
    """An integer as JSON gives one (``true`` parses as a Python ``bool``, an ``int``)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_epoch(value: object) -> bool:
    """None (no epoch) or a non-negative integer, as an epoch is saved."""
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)


def check_epoch_number(epoch: object) -> None:
    """An epoch must be None or a non-negative int (bools are refused, too): a manifest holding
    anything else is judged damaged when read, so it is refused before it is saved."""
    if not _is_epoch(epoch):
        raise InvalidArgument(f"epoch must be None or a non-negative int, got {epoch!r}")


#: Keys a manifest may lack (read as their defaults; ``created_utc`` as unknown) whose type, when
#: present, every version writes the same: a string (``created_utc`` also None, as a manifest
#: read with none holds it).
_STRING_KEYS = ("checksum_algorithm", "library_version", "torch_version", "python_version")


def _check_optional_keys(data: dict[str, Any], source: str) -> None:
    """Damage when a known key that may be missing is present with a type no version writes.
    Only keys whose type this version is sure of are checked: an unknown key stays ignored."""
    if not _is_epoch(data.get("epoch")):
        raise _off_schema(source, f"'epoch' is {data['epoch']!r}, not null or a count of epochs")
    if not isinstance(data.get("metadata", {}), dict):
        raise _off_schema(source, "'metadata' is not an object")
    for key in _STRING_KEYS:
        if key in data and not isinstance(data[key], str):
            raise _off_schema(source, f"{key!r} is not a string")
    if not isinstance(data.get("created_utc"), (str, type(None))):
        raise _off_schema(source, "'created_utc' is neither a string nor null")


def _nested_too_deeply(source: str) -> CorruptCheckpoint:
    """JSON nested deeper than Python's recursion limit: no manifest is, so it is damage."""
    return CorruptCheckpoint(f"{source} is not a manifest: nested too deeply", damaged=True)


def _off_schema(source: str, what: str) -> CorruptCheckpoint:
    """A manifest missing a key every version writes, or holding one of a type none writes:
    damage this version is sure of."""
    return CorruptCheckpoint(f"{source} does not follow the manifest schema: {what}", damaged=True)


def _file_record(name: str, record: object, source: str) -> FileRecord:
    """One file's record from a manifest: its known keys only (a newer writer may add others,
    ignored as at the top level); damage when one it needs is missing or of the wrong type."""
    if not isinstance(record, dict):
        raise _off_schema(source, f"the record of {name!r} is not an object")
    size, checksum, rank = record.get("size"), record.get("checksum"), record.get("rank")
    if not _is_integer(size) or size < 0:
        raise _off_schema(source, f"the size of {name!r} is missing or not a count of bytes")
    if not isinstance(checksum, str):
        raise _off_schema(source, f"the checksum of {name!r} is missing or not a string")
    if rank is not None and not _is_integer(rank):
        raise _off_schema(source, f"the rank of {name!r} is not an integer")
    return FileRecord(size=size, checksum=checksum, rank=rank)


def check_json_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """User metadata as it will be stored; refused early if it is not plain JSON."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidArgument(f"metadata must be a dict, not {type(metadata).__name__}")
    try:
        return json.loads(json.dumps(dict(metadata), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(
            f"metadata must be plain JSON (str keys, finite numbers): {exc}"
        ) from exc


def oversized_manifest(source: object) -> CorruptCheckpoint:
    """A manifest larger than :data:`MAX_MANIFEST_BYTES`, refused unread. Not judged damage:
    the limit is this version's, and a newer one may list more files."""
    return CorruptCheckpoint(
        f"{source} is larger than {MAX_MANIFEST_BYTES >> 20} MiB: this version does not read it"
    )


def _not_regular(where: object, mode: int) -> str:
    return f"{where}: is {file_kind(mode)}; checkpoint files must be regular files"


def read_manifest(checkpoint_dir: Path) -> Manifest:
    """The manifest of a checkpoint dir. Raises :class:`CorruptCheckpoint` when it is missing or
    unreadable (``damaged`` unless the read failed for another reason than a missing file: an
    I/O error may pass; no regular file, a FIFO, is never read), :class:`UnsupportedVersion`
    when it is newer than this library."""
    raw = read_manifest_bytes(checkpoint_dir)
    return Manifest.from_json(raw, source=os.fspath(checkpoint_dir / MANIFEST_NAME))


def read_manifest_bytes(checkpoint_dir: Path) -> bytes:
    """The bytes of a checkpoint dir's ``manifest.json``, unparsed; refused as
    :func:`read_manifest` refuses a manifest it cannot read."""
    path = checkpoint_dir / MANIFEST_NAME
    try:
        # Opened without blocking and judged by what was opened: a FIFO put in its place, even
        # between a check and the read, is refused (no O_NONBLOCK: no FIFOs either).
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise CorruptCheckpoint(_not_regular(path, status.st_mode))
            if status.st_size > MAX_MANIFEST_BYTES:
                raise oversized_manifest(path)
        except BaseException:
            os.close(fd)
            raise
        # A regular file only: its file object owns the fd from here on, closing it.
        with open(fd, "rb") as file:
            raw = file.read()
    except FileNotFoundError as exc:
        raise CorruptCheckpoint(f"{checkpoint_dir} has no {MANIFEST_NAME}", damaged=True) from exc
    except OSError as exc:
        raise CorruptCheckpoint(f"cannot read {path}: {exc}") from exc
    return raw


def find_problems(
    checkpoint_dir: Path,
    manifest: Manifest,
    *,
    expected_step: int | None = None,
    checksums: bool = False,
    progress: Callable[[int], None] | None = None,
    describe: Callable[[str], object] | None = None,
) -> list[Problem]:
    """Everything wrong with a checkpoint dir against its manifest, one problem per message,
    each naming the file (by its path, or as ``describe(name)`` names it): a missing or
    wrong-sized file, one that is no regular file (a symlink, a directory, a FIFO: named,
    never opened), a wrong checksum (only with ``checksums=True``: it reads every byte), a
    step that disagrees with the dir's name. An empty list means the dir passes. A failed
    read (but of a file missing, at its ``lstat`` or its checksum's open) is raised as its
    ``OSError``: it judges nothing."""
    problems: list[Problem] = []
    named = describe or checkpoint_dir.joinpath
    if expected_step is not None and manifest.step != expected_step:
        problems.append(
            damage(
                f"{named(MANIFEST_NAME)}: names step {manifest.step}, "
                f"but the dir is for step {expected_step}"
            )
        )
    if manifest.checksum_algorithm != CHECKSUM_ALGORITHM and checksums:
        problems.append(unknown_checksum_algorithm(named(MANIFEST_NAME), manifest))
        checksums = False
    for name, record in sorted(manifest.files.items()):
        path, where = checkpoint_dir / name, named(name)
        try:
            status = os.lstat(path)  # one system call for both questions, for every file
        except FileNotFoundError:
            problems.append(missing(where))
            continue
        if not stat.S_ISREG(status.st_mode):
            # Never opened: a FIFO would block the read forever, a device read who knows what.
            problems.append(unjudged(_not_regular(where, status.st_mode)))
            continue
        size = status.st_size
        if size != record.size:
            problems.append(wrong_size(where, size, record.size))
            continue
        if not checksums:
            continue
        try:
            checksum = file_checksum(path, progress)
        except FileNotFoundError:
            # Gone since the lstat (its dir deleted by a live job's retention): missing, as
            # at the lstat, so verify's handling of a vanished checkpoint sees it as one.
            problems.append(missing(where))
            continue
        if checksum != record.checksum:
            problems.append(checksum_mismatch(where))
    return problems


#: a file that is no regular file, by its ``S_IFMT``, in words
_FILE_KINDS = {
    stat.S_IFLNK: "a symlink",
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def file_kind(mode: int) -> str:
    """What a file of ``mode`` (its ``st_mode``) is, in words: ``a FIFO``, ``a directory``,
    ``a regular file``."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")
