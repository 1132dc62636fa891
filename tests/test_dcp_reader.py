"""The "dcp" format's reader against torch's ``FileSystemReader``: a restore opens each data file
once, not once per value, and the private hook the reader names a failing value through is
still there."""

from __future__ import annotations

from pathlib import Path

#: a one-process "dcp" save of 200 values, then its restore
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


def test_a_restore_opens_a_data_file_once_not_once_per_value(tmp_path: Path) -> None:
    """Reading 200 values from one data file opens it a handful of times (the read itself,
    the checksum's), not once per value: each open costs, and a model has thousands."""
    from tests.syscall_trace import traced_file_calls

    calls = traced_file_calls(MANY_VALUES_RESTORE, tmp_path, "openat")
    data_opens = [call for call in calls if call.path.endswith(".distcp")]
    read_opens = [call for call in data_opens if "O_RDONLY" in " ".join(call.args)]
    assert read_opens, data_opens  # the trace saw the restore's reads
    assert len(read_opens) <= 4, len(read_opens)


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
