"""The "dcp" format's reader against torch's ``FileSystemReader``: a restore opens each data file
once, not once per value, a refused per-rank item only the data file of the first rank holding
it, and the private hook the reader names a failing value through is still there."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import distckpt
from tests.ranks import run_ranks, values
from tests.syscall_trace import FileCall, TracedParts, trace_parts

#: conftest readies the job servers first: the traced runs are their children
NEEDS_JOB_SERVERS = True

#: a one-process "dcp" save of 200 values into ``root``, then its restore
MANY_VALUES_RESTORE = """
import torch
import distckpt
state = {f"t{index}": torch.full((4,), float(index)) for index in range(200)}
with distckpt.CheckpointManager("root", format="dcp", timeout=60) as manager:
    manager.save(1, state)
restored = {key: torch.zeros(4) for key in state}
with distckpt.CheckpointManager("root", format="dcp", timeout=60) as manager:
    manager.restore("last", state=restored)
assert all(torch.equal(restored[key], state[key]) for key in state)
"""


#: one process restoring a per-rank item of a list that every rank saved (whole, in its own
#: data file) into ``root``: refused, as the saving ranks were more
PER_RANK_ITEM_RESTORE = """
import torch
import distckpt
given = {"w": torch.zeros(3), "l": [distckpt.PerRank(-1), None]}
try:
    with distckpt.CheckpointManager("root", fsync=False, timeout=60) as manager:
        manager.restore("last", state=given)
except distckpt.WorldSizeMismatch:
    pass
else:
    raise AssertionError("a per-rank item restored by another number of ranks")
"""


def _save_per_rank_item(rank: int, world_size: int, root: str) -> None:
    with distckpt.CheckpointManager(root, format="dcp", fsync=False, timeout=30) as manager:
        manager.save(1, {"w": torch.arange(3.0), "l": [distckpt.PerRank(rank), None]})


@pytest.fixture(scope="module")
def traced_restores(tmp_path_factory: pytest.TempPathFactory) -> TracedParts:
    """The files opened by :data:`MANY_VALUES_RESTORE` (in ``many``) and, after 4 ranks saved
    into ``per-rank/root``, :data:`PER_RANK_ITEM_RESTORE` (in ``per-rank``), both in one traced
    run (:func:`~tests.syscall_trace.trace_parts`), paid once for both tests."""
    workdir = tmp_path_factory.mktemp("traced-restores")
    values(run_ranks(_save_per_rank_item, 4, str(workdir / "per-rank" / "root"), timeout=90))
    parts = {"many": MANY_VALUES_RESTORE, "per-rank": PER_RANK_ITEM_RESTORE}
    return trace_parts(parts, workdir, "openat")


def _data_file_reads(traced: TracedParts, part: str) -> list[FileCall]:
    """The opens for reading of data files in ``part``'s root."""
    return [
        call
        for call in traced.of(part)
        if call.path.endswith(".distcp") and "O_RDONLY" in " ".join(call.args)
    ]


def test_a_restore_opens_a_data_file_once_not_once_per_value(
    traced_restores: TracedParts,
) -> None:
    """Reading 200 values from one data file opens it a handful of times (the read itself,
    the checksum's), not once per value: each open costs, and a model has thousands."""
    read_opens = _data_file_reads(traced_restores, "many")
    assert read_opens  # the trace saw the restore's reads
    assert len(read_opens) <= 4, len(read_opens)


def test_a_refused_per_rank_item_opens_one_ranks_data_file(traced_restores: TracedParts) -> None:
    """Saved by 4 ranks, restored by one process asking for a per-rank item of a list: rank 0's
    saved list holding the item is enough to refuse the restore, so no other rank's data file
    is opened (every restoring rank reading every saved rank's lists costs M x N reads)."""
    read_opens = [Path(call.path).name for call in _data_file_reads(traced_restores, "per-rank")]
    assert read_opens == ["__0_0.distcp"], read_opens


def test_torchs_file_system_reader_still_calls_slice_file() -> None:
    """The reader names the item a failure belongs to by overriding torch's private
    ``FileSystemReader._slice_file``, which ``read_data`` calls once per item. A torch release
    that renames or stops calling it makes that override dead code (errors then name only the
    data files): update ``Reader._slice_file`` in ``distckpt/formats/dcp_storage.py`` to the
    new hook."""
    import inspect

    from torch.distributed.checkpoint.filesystem import FileSystemReader

    message = "torch's FileSystemReader no longer has _slice_file: update dcp_storage.Reader"
    assert hasattr(FileSystemReader, "_slice_file"), message
    assert "_slice_file" in inspect.getsource(FileSystemReader.read_data), message
