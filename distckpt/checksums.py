"""Checksums of checkpoint files: the CRC-32 distckpt records for every file, computed while
the file is written (:class:`ChecksumWriter`, one thread or several at known offsets, their
CRCs joined by :func:`crc32_combine`) or recomputed from its bytes (:func:`file_checksum`).

Nothing here knows about ranks, formats or layouts; the durability primitives the writer's
files rely on are in :mod:`distckpt.fsutil`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from distckpt.fsutil import EarlyWriteback, with_file_name

try:  # the same CRC-32 as zlib's, about six times faster (SIMD); the save computes it inline
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - a platform without zlib-ng wheels
    from zlib import crc32

CHECKSUM_ALGORITHM = "crc32"
_READ_CHUNK = 8 << 20


#: The CRC-32 polynomial, reflected (zlib's).
_CRC32_POLYNOMIAL = 0xEDB88320


def _multiply_mod_crc_polynomial(a: int, b: int) -> int:
    """``a * b`` modulo the CRC-32 polynomial over GF(2), both in zlib's reflected bit order
    (the top bit is x^0); zlib's ``multmodp``."""
    product, bit = 0, 1 << 31
    while a:
        if a & bit:
            product ^= b
            a ^= bit
        bit >>= 1
        b = (b >> 1) ^ _CRC32_POLYNOMIAL if b & 1 else b >> 1
    return product


def _x_to_the_powers_of_two() -> list[int]:
    """x^(2^k) modulo the CRC-32 polynomial for k = 0..31 (x is 1 << 30 reflected)."""
    table = [1 << 30]
    for _ in range(31):
        table.append(_multiply_mod_crc_polynomial(table[-1], table[-1]))
    return table


_X_TO_THE_POWERS_OF_TWO = _x_to_the_powers_of_two()


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC-32 of ``A + B`` from ``crc1 = crc32(A)``, ``crc2 = crc32(B)`` and ``len(B)``,
    without the bytes: zlib's ``crc32_combine`` (Python's zlib does not expose it). ``crc1`` is
    multiplied by x^(8 * length2) modulo the polynomial, built from the powers x^(2^k); a few
    thousand integer operations, so it suits one call per chunk of a file, not per byte."""
    power, exponent, k = 1 << 31, length2, 3  # x^0; 8 * length2 bits is 2^3 * length2
    while exponent:
        if exponent & 1:
            power = _multiply_mod_crc_polynomial(_X_TO_THE_POWERS_OF_TWO[k & 31], power)
        exponent >>= 1
        k += 1
    return _multiply_mod_crc_polynomial(power, crc1) ^ crc2


#: Writes smaller than this are gathered and handed to the kernel together: torch.save's zip
#: writer passes each record's header, name and padding separately, so a state of many small
#: tensors cost several syscalls (and checksum calls) per tensor.
COALESCE_BYTES = 1 << 20
#: At most this many buffers per ``pwritev`` (Linux's IOV_MAX is 1024).
_MAX_WRITE_BUFFERS = 512


class ChecksumWriter:
    """A binary file opened for writing that computes its size and checksum as bytes go by,
    so a checkpoint file is never read back just to checksum it. Small writes are gathered up
    to :data:`COALESCE_BYTES`; a disk error may therefore surface on a later write or on
    ``flush``/``close``, named after the file either way.

    A writer that fsyncs on close also starts the disk on its bytes each time another
    :data:`~distckpt.fsutil.WRITEBACK_BYTES` have been written, a large write being handed over
    in stretches of that size (parallel writers: on each chunk once written, whatever its size;
    :class:`~distckpt.fsutil.EarlyWriteback`), where the platform can, so most of them are on
    their way to the disk by the time ``close`` fsyncs; a file smaller than that written by one
    writer is left to its fsync. The fsync alone decides durability."""

    def __init__(self, path: Path, *, fsync: bool) -> None:
        self.path = path
        self._fsync = fsync
        # O_EXCL: a file of the same name must never be silently reused or overwritten.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self._file: BinaryIO = os.fdopen(fd, "wb", buffering=0)
        #: bytes accepted so far (written or gathered)
        self.size = 0
        self._crc = 0  # of the bytes handed to the kernel
        self._early = EarlyWriteback(fd) if fsync else None
        self._pending = bytearray()
        #: the OSError a write raised, if any
        self.error: OSError | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        if len(self._pending) + view.nbytes > COALESCE_BYTES:
            self.flush()
        if view.nbytes >= COALESCE_BYTES:
            self._put(view)
        else:
            self._pending += view
        self.size += view.nbytes
        return view.nbytes

    def _put(self, view: memoryview) -> None:
        try:
            if self._early is None:
                self._write_all(view)
            else:
                self._early.write(view, self._write_all)
        except OSError as exc:
            # Kept, because a caller such as torch.save's zip writer may replace it with an
            # error of its own that no longer says "No space left on device".
            self.error = with_file_name(exc, self.path)
            raise self.error from None
        self._crc = crc32(view, self._crc)

    def _write_all(self, view: memoryview) -> None:
        written = 0
        while written < view.nbytes:
            written += self._file.write(view[written:])

    def write_in_parallel(self, chunks: Sequence[Sequence[memoryview]], threads: int) -> None:
        """Append ``chunks`` (each a run of buffers, in file order) with ``threads`` threads,
        each writing whole chunks with ``pwritev`` at offsets known beforehand and computing
        their CRC-32; the file's checksum is then combined from the chunks' in file order, so
        size, checksum and bytes are what :meth:`write` of every buffer in turn gives. The
        first error (a full disk) is raised, named after the file, once every thread stopped."""
        self.flush()
        if self.error is not None:
            raise self.error
        offsets, end = [], self.size
        for chunk in chunks:
            offsets.append(end)
            end += sum(buffer.nbytes for buffer in chunk)
        fd = self._file.fileno()

        def write_chunk(chunk: Sequence[memoryview], offset: int) -> int:
            if self.error is not None:  # another chunk failed: the file is lost anyway
                return 0
            crc, start = 0, offset
            remaining = [buffer for buffer in chunk if buffer.nbytes]
            for buffer in remaining:
                crc = crc32(buffer, crc)
            while remaining:
                written = os.pwritev(fd, remaining[:_MAX_WRITE_BUFFERS], offset)
                offset += written
                while remaining and written >= remaining[0].nbytes:
                    written -= remaining.pop(0).nbytes
                if written:
                    remaining[0] = remaining[0][written:]
            if self._early is not None:
                self._early.start(start, offset - start)
            return crc

        def guarded(chunk: Sequence[memoryview], offset: int) -> int:
            try:
                return write_chunk(chunk, offset)
            except OSError as exc:
                self.error = self.error or with_file_name(exc, self.path)
                raise

        try:
            with ThreadPoolExecutor(threads, thread_name_prefix="distckpt-writer") as pool:
                crcs = list(pool.map(guarded, chunks, offsets))
        except OSError as exc:
            # Raised as write() raises it: kept, and named after the file (see _put).
            raise (self.error or exc) from None
        for crc, chunk in zip(crcs, chunks):
            self._crc = crc32_combine(self._crc, crc, sum(buffer.nbytes for buffer in chunk))
        self.size = end
        if self._early is not None:
            self._early.skip_to(end)
        # Later writes (and the file's position for them) continue after the chunks.
        os.lseek(fd, end, os.SEEK_SET)

    def flush(self) -> None:
        """Hand the gathered bytes to the kernel (none after a failed write: the file is lost,
        and its error was raised already)."""
        if self._pending and self.error is None:
            with memoryview(self._pending) as pending:
                self._put(pending)
            self._pending.clear()

    @property
    def checksum(self) -> str:
        return f"{crc32(self._pending, self._crc):08x}"

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            self.flush()
            if self._fsync:
                os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def __enter__(self) -> ChecksumWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def file_checksum(
    path: str | os.PathLike[str], progress: Callable[[int], None] | None = None
) -> str:
    """The checksum :class:`ChecksumWriter` computes, recomputed from the file's bytes;
    ``progress`` is called with the size of each chunk read."""
    crc = 0
    with open(path, "rb") as file:
        while chunk := file.read(_READ_CHUNK):
            crc = crc32(chunk, crc)
            if progress is not None:
                progress(len(chunk))
    return f"{crc:08x}"
