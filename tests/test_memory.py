"""Fresh memory faulted in at once before a full restore reads into it (distckpt.memory), on
real anonymous memory of this process."""

from __future__ import annotations

import ctypes
import mmap
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import distckpt
from distckpt.memory import prefault

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="madvise(MADV_POPULATE_WRITE) is Linux's"
)

PAGES = 256


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@contextmanager
def _fresh_block(nbytes: int) -> Iterator[tuple[mmap.mmap, int]]:
    """A private anonymous mapping no page of which has been touched, and its address."""
    block = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    anchor = ctypes.c_char.from_buffer(block)
    try:
        yield block, ctypes.addressof(anchor)
    finally:
        del anchor  # the mapping cannot close while a ctypes object holds it
        block.close()


def test_fresh_memory_is_faulted_in_at_once_and_memory_in_place_is_left_alone() -> None:
    nbytes = PAGES * mmap.PAGESIZE
    with _fresh_block(nbytes) as (block, address):
        if not prefault(address, nbytes):
            pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux 5.14+)")
        ones = b"\x01" * nbytes  # made first: its own fresh pages are not the block's
        before = _minor_faults()
        block.write(ones)  # the pages are in place: writing them faults none
        assert _minor_faults() - before < PAGES // 4
        assert not prefault(address, nbytes)  # resident now: no second walk over its pages
        assert block[:4] == b"\x01" * 4


def test_only_the_whole_pages_inside_the_range_are_touched() -> None:
    with _fresh_block(4 * mmap.PAGESIZE) as (_block, address):
        # Less than one whole page between two page boundaries: nothing to do.
        assert not prefault(address + 1, mmap.PAGESIZE)
        assert not prefault(address, 0)


def test_a_full_restore_into_fresh_memory_reads_every_byte(tmp_path: Path) -> None:
    # Storages of 1 MiB and more are read alone, into memory prefaulted first where fresh.
    state = {"big": torch.randn(1 << 20), "small": torch.arange(5), "other": torch.rand(3 << 19)}
    with distckpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, state)
        loaded = mgr.restore(1)
    assert loaded is not None
    for key, value in state.items():
        assert torch.equal(loaded.state[key], value)
