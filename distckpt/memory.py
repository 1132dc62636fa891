"""Memory the library manages itself: page-aligned anonymous memory, the addresses direct I/O
asks about, and fresh memory faulted in at once before a read fills it.

:func:`anonymous_memory` gives page-aligned private memory (async snapshots' buffers, a direct
writer's staging buffer); :data:`DIRECT_ALIGNMENT` is what direct I/O asks of every write's
memory, offset and length, and :func:`buffer_address` says where a buffer's memory starts.

:func:`prefault`: a full restore reads each large tensor into a storage just allocated; the
allocator maps such a block fresh from the kernel, so the read stops at every 4 KiB page of it
for the kernel to supply a zeroed one. Linux's ``madvise(MADV_POPULATE_WRITE)`` (5.14 and later)
supplies them all in one call instead: 8 storages of 8 MiB read from the page cache took 24-25
ms with it against 33 ms without (medians of 20, 2 cores). Memory the allocator hands out again
(pages already in place) gains nothing and would still pay for the walk over its pages (7 ms
against 5 ms for the same 64 MiB), so a block whose last page is already resident (``mincore``)
is left alone. Only an advice: where the call is missing or refused (another system, an older
kernel, a sandbox), nothing is done and the read faults the pages in as it always did.
"""

from __future__ import annotations

import ctypes
import errno
import mmap

from distckpt.fsutil import libc_function

#: linux/mman.h
_MADV_POPULATE_WRITE = 23
_PAGE = mmap.PAGESIZE


def round_up(value: int, multiple: int) -> int:
    """``value`` rounded up to a multiple of ``multiple``."""
    return -(-value // multiple) * multiple


_MADVISE = libc_function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])
_MINCORE = libc_function("mincore", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p])
#: cleared once the kernel refuses the advice: it would refuse it for every block
_enabled = _MADVISE is not None and _MINCORE is not None
#: the errors that say the advice will never be taken here (not: memory short for now)
_REFUSED = {errno.EINVAL, errno.EPERM, errno.ENOSYS}


def prefault(address: int, nbytes: int) -> bool:
    """Fault in, for writing, the whole pages of the memory from ``address`` on for ``nbytes``
    bytes, when they look fresh (the last one is not resident yet); returns whether it did.
    The memory must belong to the caller (a storage about to be overwritten whole)."""
    global _enabled
    start = round_up(address, _PAGE)
    end = (address + nbytes) // _PAGE * _PAGE
    if not _enabled or end <= start:
        return False
    assert _MADVISE is not None and _MINCORE is not None  # _enabled says so
    resident = ctypes.create_string_buffer(1)
    if _MINCORE(end - _PAGE, _PAGE, resident) != 0 or resident.raw[0] & 1:
        return False
    if _MADVISE(start, end - start, _MADV_POPULATE_WRITE) != 0:
        if ctypes.get_errno() in _REFUSED:
            _enabled = False  # no such advice here (EINVAL before Linux 5.14), or not allowed
        return False  # else (ENOMEM, EAGAIN: memory short for now) the read faults them in
    return True


def anonymous_memory(nbytes: int) -> memoryview:
    """``nbytes`` of fresh page-aligned memory from a private anonymous mapping.

    It does not ask for transparent huge pages (``MADV_HUGEPAGE``): measured on a VM, the first
    copy into huge pages, which the first async save pays, took about twice as long (the kernel
    finds and clears 2 MiB at a time, often from memory the host must back first), and later
    copies were no faster than into plain pages. (Where the system's setting gives huge pages
    to every mapping, ``enabled=always``, the kernel may still use them.)"""
    private = getattr(mmap, "MAP_PRIVATE", None)
    if private is None:  # Windows: its anonymous mappings are private already
        block = mmap.mmap(-1, nbytes)
    else:
        # Private: Python's default anonymous mapping is MAP_SHARED, i.e. shared memory (shmem,
        # counted apart from the process's own memory and shared with any child it forks).
        block = mmap.mmap(-1, nbytes, flags=private | mmap.MAP_ANONYMOUS)
    return memoryview(block)


#: What direct I/O (``O_DIRECT``) asks of every write: the memory's address, the file offset
#: and the length are multiples of this many bytes (4 KiB: a page on most systems, and a
#: multiple of the logical block size of the disks and file systems Linux serves direct I/O on).
DIRECT_ALIGNMENT = 4096
#: The smallest run of memory a direct writer writes straight from where it is; a smaller one
#: is copied through its staging buffer, so only storages and snapshot buffers of at least this
#: many bytes are placed on a multiple of :data:`DIRECT_ALIGNMENT` (smaller ones would waste
#: up to 4 KiB each on padding, in the file and in the snapshot, and gain nothing).
DIRECT_MIN_BYTES = 1 << 20


class _PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer`` (the buffer protocol's view of an object's memory)."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_GET_BUFFER = ctypes.pythonapi.PyObject_GetBuffer
_GET_BUFFER.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_GET_BUFFER.restype = ctypes.c_int
_RELEASE_BUFFER = ctypes.pythonapi.PyBuffer_Release
_RELEASE_BUFFER.argtypes = [ctypes.POINTER(_PyBuffer)]
_RELEASE_BUFFER.restype = None
_CONTIGUOUS_BUFFER = 0  # PyBUF_SIMPLE: one run of bytes, read-only or not


def buffer_address(view: memoryview) -> int:
    """The address of the first byte of the contiguous ``view`` (read-only or writable, which
    ``ctypes.c_char.from_buffer`` alone would refuse)."""
    buffer = _PyBuffer()
    _GET_BUFFER(view, ctypes.byref(buffer), _CONTIGUOUS_BUFFER)  # raises if it cannot
    try:
        return buffer.buf or 0
    finally:
        _RELEASE_BUFFER(ctypes.byref(buffer))
