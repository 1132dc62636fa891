"""On-disk formats behind one interface (:class:`~distckpt.formats.base.CheckpointFormat`).

This registry is the one place that maps a format's name (as passed to
``CheckpointManager(format=...)`` and stored in manifests) to its implementation; everything
else asks the format object, never compares names.
"""

from __future__ import annotations

from distckpt.errors import InvalidArgument
from distckpt.formats.base import CheckpointFormat, PreparedRead, ReadOptions, ShardContext
from distckpt.formats.torch_files import (
    TorchFilesFormat,
    check_direct_io,
    check_writer_threads,
)

__all__ = [
    "CheckpointFormat",
    "PreparedRead",
    "ReadOptions",
    "ShardContext",
    "format_named",
    "FORMAT_NAMES",
]

FORMAT_NAMES = ("torch", "dcp")


def format_named(name: str, *, writer_threads: int = 1, direct_io: bool = True) -> CheckpointFormat:
    """The format stored under ``name`` in manifests; ``writer_threads`` threads write each
    rank file of the "torch" format (DCP's writer has no such setting: it refuses more than 1,
    rather than ignore it), with direct I/O where ``direct_io`` allows and the rank file's
    memory suits it (:func:`~distckpt.formats.raw_rank_file.writes_direct`; DCP's files are
    always buffered)."""
    writer_threads = check_writer_threads(writer_threads)
    direct_io = check_direct_io(direct_io)
    if name == "torch":
        return TorchFilesFormat(writer_threads, direct_io)
    if writer_threads != 1 and name in FORMAT_NAMES:
        raise InvalidArgument(
            f"writer_threads={writer_threads} applies to the 'torch' format, not {name!r}"
        )
    if name == "dcp":
        from distckpt.formats.dcp import DcpFormat  # imported lazily: pulls in DCP

        return DcpFormat()
    raise InvalidArgument(f"unknown checkpoint format {name!r}; choose one of {FORMAT_NAMES}")
