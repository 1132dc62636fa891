"""Checksums of checkpoint files: the CRC-32 distckpt records for every file, computed while
the file is written (:class:`ChecksumWriter`, one thread or several at known offsets, their
CRCs joined by :func:`crc32_combine`) or recomputed from its bytes (:func:`file_checksum`),
and spelled as an object store's ``x-amz-checksum-crc32`` header spells it
(:func:`crc32_base64`, :func:`crc32_hex_of_base64`).

Nothing here knows about ranks, formats or layouts; the durability primitives the writer's
files rely on are in :mod:`distckpt.fsutil`.
"""

from __future__ import annotations

import base64
import errno
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from distckpt.errors import InvalidArgument
from distckpt.fsutil import WRITEBACK_BYTES, EarlyWriteback, fsync_file, with_file_name
from distckpt.memory import (
    DIRECT_ALIGNMENT,
    DIRECT_MIN_BYTES,
    anonymous_memory,
    buffer_address,
    round_up,
)

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
#: A direct writer's page-aligned staging buffer: what it cannot write straight from the
#: caller's memory is copied here and written once the buffer is full (or at ``close``); and
#: memory it can write straight is handed over in stretches of this size too.
DIRECT_STAGING_BYTES = WRITEBACK_BYTES
#: The errors of a write that found no room (a file size limit, a full disk or quota), which a
#: direct writer's padded tail can meet where its true bytes fit.
_NO_ROOM_ERRNOS = (errno.EFBIG, errno.ENOSPC)
#: 0 where the platform has no direct I/O (macOS, Windows): such a writer is always buffered.
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def _create(path: Path, *, direct: bool) -> tuple[int, bool]:
    """A new file at ``path`` (``O_CREAT | O_EXCL``: a file of the same name is never reused
    or overwritten) open for writing, and whether it is open for direct I/O: asked for
    (``direct``) and accepted by the file system, which refuses the flag with EINVAL where it
    has no direct I/O (the file is then written through the page cache)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    if direct and _O_DIRECT:
        try:
            return os.open(path, flags | _O_DIRECT, 0o666), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        # Linux checks O_DIRECT only once it has created the file (O_EXCL refuses an existing
        # name before that), so the refused open left this writer's own file behind: removed,
        # and created again as if no direct I/O had been asked for (opening it again instead
        # could be refused: the umask may have left it without write permission).
        path.unlink(missing_ok=True)
    return os.open(path, flags, 0o666), False


def _stop_direct_io(fd: int) -> None:
    """Write the rest of the open file ``fd`` through the page cache (Linux lets ``fcntl``
    clear ``O_DIRECT`` on an open file: same descriptor, same position)."""
    import fcntl  # here: only platforms with O_DIRECT get here, and Windows has no fcntl

    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)


class ChecksumWriter:
    """A binary file opened for writing that computes its size and checksum as bytes go by,
    so a checkpoint file is never read back just to checksum it. Small writes are gathered up
    to :data:`COALESCE_BYTES`; a disk error may therefore surface on a later write or on
    ``flush``/``close`` (its fsync: a disk may fail to store bytes it took), named after the
    file either way.

    A writer that fsyncs on close also starts the disk on its bytes each time another
    :data:`~distckpt.fsutil.WRITEBACK_BYTES` have been written, a large write being handed over
    in stretches of that size (parallel writers: on each chunk once written, whatever its size;
    :class:`~distckpt.fsutil.EarlyWriteback`), where the platform can, so most of them are on
    their way to the disk by the time ``close`` fsyncs; a file smaller than that written by one
    writer is left to its fsync. The fsync alone decides durability.

    With ``direct=True`` the file is opened for direct I/O (``O_DIRECT``) where the file system
    takes it (:attr:`direct` says whether it did; elsewhere the writer is buffered, as without):
    bytes go from memory to the disk without a copy into the page cache, which costs the writing
    thread little CPU and leaves the cache to the training job. Every direct write is whole
    pages (:data:`~distckpt.memory.DIRECT_ALIGNMENT`) from page-aligned memory at a page-aligned
    offset: a write of at least :data:`~distckpt.memory.DIRECT_MIN_BYTES` whose memory starts on
    a page, at a file position on one, goes straight from that memory (whole pages of it, in
    stretches of :data:`DIRECT_STAGING_BYTES`); everything else is copied into a page-aligned
    staging buffer of that size, written as it fills. ``close`` writes the staged tail padded to
    a whole page, cuts the file back to its true size (``ftruncate``) and fsyncs. Size and
    checksum cover the file's true bytes, never the padding. No early writeback is asked for (no
    page of the file is in the cache). Should a direct write be refused mid-file (EINVAL: a
    device with stricter rules), the rest of the file is written buffered from the same position
    rather than failing. The padding needs room a buffered file does not: should the padded tail
    find none (EFBIG: a file size limit between the true and the padded size; ENOSPC: a disk or
    quota full by less than a page), the tail is written again unpadded and buffered from its
    start, the file's direct I/O stopped (:attr:`direct` turns False), and fails only if that
    fails too. Any other error (a full disk mid-file) fails the write, named after the file, as
    it does buffered. :meth:`flush` hands nothing over in direct mode (staged bytes wait for a
    whole buffer or ``close``), and :meth:`write_in_parallel` needs a buffered writer."""

    def __init__(self, path: Path, *, fsync: bool, direct: bool = False) -> None:
        self.path = path
        self._fsync = fsync
        fd, opened_direct = _create(path, direct=direct)
        self._file: BinaryIO = os.fdopen(fd, "wb", buffering=0)
        #: whether the file is being written with direct I/O (False once a refused direct write
        #: turned the rest of it buffered)
        self.direct = opened_direct
        #: bytes accepted so far (written, gathered or staged)
        self.size = 0
        self._crc = 0  # of the bytes handed to the kernel (direct mode: of those accepted)
        self._early = EarlyWriteback(fd) if fsync and not opened_direct else None
        self._pending = bytearray()
        # direct mode: the page-aligned staging buffer and how many bytes it holds
        self._staging = anonymous_memory(DIRECT_STAGING_BYTES) if opened_direct else None
        self._staged = 0
        #: the OSError a write raised, if any
        self.error: OSError | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        if self._staging is not None:
            self._write_staged(view)
            self.size += view.nbytes
            return view.nbytes
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

    def _write_staged(self, view: memoryview) -> None:
        """Direct mode's :meth:`write`: large page-aligned memory straight to the disk, the
        rest through the staging buffer (see the class doc)."""
        assert self._staging is not None
        # Once a write goes straight from memory, its later stretches do too while a whole page
        # is left, however short (else a large write's last under-1-MiB would be copied).
        straight = view.nbytes >= DIRECT_MIN_BYTES
        while view.nbytes:
            if (
                straight
                and view.nbytes >= DIRECT_ALIGNMENT
                and self._staged % DIRECT_ALIGNMENT == 0
                and buffer_address(view) % DIRECT_ALIGNMENT == 0
            ):
                # Whole pages staged before it are written first, so it lands on a page.
                self._write_staging(self._staged)
                taken = min(view.nbytes - view.nbytes % DIRECT_ALIGNMENT, DIRECT_STAGING_BYTES)
                self._write_direct(view[:taken])
            else:
                straight = False
                taken = min(DIRECT_STAGING_BYTES - self._staged, view.nbytes)
                self._staging[self._staged : self._staged + taken] = view[:taken]
                self._staged += taken
                if self._staged == DIRECT_STAGING_BYTES:
                    self._write_staging(self._staged)
            self._crc = crc32(view[:taken], self._crc)
            view = view[taken:]

    def _write_staging(self, nbytes: int) -> None:
        """Write the first ``nbytes`` of the staging buffer (whole pages, but for the padded
        tail written by :meth:`close`) and empty it."""
        assert self._staging is not None
        if nbytes:
            self._write_direct(self._staging[:nbytes])
        self._staged = 0

    def _write_direct(self, view: memoryview) -> None:
        """Write all of ``view`` at the file's position; a refused direct write (EINVAL) turns
        the file buffered and is written again (nothing of it was written)."""
        if self.error is not None:  # the file is lost already; its error was raised
            raise self.error
        written = 0
        try:
            while written < view.nbytes:
                try:
                    written += os.write(self._file.fileno(), view[written:])
                except OSError as exc:
                    if exc.errno != errno.EINVAL or not self.direct:
                        raise
                    _stop_direct_io(self._file.fileno())
                    self.direct = False
        except OSError as exc:
            self.error = with_file_name(exc, self.path)
            raise self.error from None

    def write_in_parallel(self, chunks: Sequence[Sequence[memoryview]], threads: int) -> None:
        """Append ``chunks`` (each a run of buffers, in file order) with ``threads`` threads,
        each writing whole chunks with ``pwritev`` at offsets known beforehand and computing
        their CRC-32; the file's checksum is then combined from the chunks' in file order, so
        size, checksum and bytes are what :meth:`write` of every buffer in turn gives. The
        first error (a full disk) is raised, named after the file, once every thread stopped.
        Buffered writers only: parallel writes at offsets are not staged into whole pages."""
        if self._staging is not None:
            raise InvalidArgument(f"{self.path}: write_in_parallel needs a buffered writer")
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
            if self._staging is not None and self.error is None:
                self._write_tail()
            # After a failed write the file is lost: no fsync, whose own failure would
            # replace the write's error, the one the caller is told about.
            if self._fsync and self.error is None:
                try:
                    fsync_file(self._file.fileno(), self.path)
                except OSError as exc:
                    self.error = exc
                    raise
        finally:
            self._file.close()
            if self._staging is not None:
                self._staging.release()
                self._staging = None

    def _write_tail(self) -> None:
        """Direct mode: write what is staged, padded with zeros to a whole page (a direct write
        is whole pages), then cut the file back to its true size. Where the padding finds no
        room (see the class doc), the tail is written again unpadded and buffered."""
        assert self._staging is not None
        staged = self._staged
        padded = round_up(staged, DIRECT_ALIGNMENT)
        # The buffer is reused within the file: what lies past the tail is older bytes.
        self._staging[staged:padded] = bytes(padded - staged)
        tail_offset = self.size - staged
        try:
            self._write_staging(padded)
        except OSError as exc:
            if padded == staged or exc.errno not in _NO_ROOM_ERRNOS:
                raise
            self._write_tail_buffered(tail_offset, staged)
        if padded != staged:
            try:
                os.ftruncate(self._file.fileno(), self.size)
            except OSError as exc:
                self.error = with_file_name(exc, self.path)
                raise self.error from None

    def _write_tail_buffered(self, offset: int, nbytes: int) -> None:
        """Write the first ``nbytes`` of the staging buffer at ``offset`` through the page
        cache, the rest of the file's direct I/O stopped: the padded tail's write, which this
        replaces, may have written part of it. Its error, if any, is named after the file."""
        assert self._staging is not None
        fd = self._file.fileno()
        self.error = None  # the padded write's: the tail is written again
        try:
            _stop_direct_io(fd)
            self.direct = False
            os.lseek(fd, offset, os.SEEK_SET)
            self._write_all(self._staging[:nbytes])
        except OSError as exc:
            self.error = with_file_name(exc, self.path)
            raise self.error from None
        self._staged = 0

    def __enter__(self) -> ChecksumWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def bytes_checksum(data: bytes) -> str:
    """The checksum :class:`ChecksumWriter` computes, of bytes already in memory."""
    return f"{crc32(data):08x}"


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


def crc32_base64(crc: int) -> str:
    """A CRC-32 in an object store's notation (``x-amz-checksum-crc32``: base64 of its 4
    big-endian bytes)."""
    return base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")


def crc32_hex_of_base64(store_value: str | None) -> str | None:
    """A store's ``x-amz-checksum-crc32`` as the 8 hex digits manifests hold; None for none,
    or for a composite value (``...-N``, a checksum of part checksums)."""
    if not store_value or "-" in store_value:
        return None
    try:
        raw = base64.b64decode(store_value, validate=True)
    except ValueError:
        return None
    return raw.hex() if len(raw) == 4 else None
