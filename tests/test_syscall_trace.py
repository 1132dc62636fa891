"""The strace reader of ``tests/syscall_trace.py`` on real traces."""

from __future__ import annotations

from pathlib import Path

from tests.syscall_trace import FileCall, traced_file_calls


def test_a_short_call_padded_before_its_result_is_read(tmp_path: Path) -> None:
    """strace pads a short call with spaces up to the column of its ``=``: an fsync of ``/``
    is one such line, and must be read like any other."""
    code = """
import os
descriptor = os.open("/", os.O_RDONLY)
os.fsync(descriptor)
os.close(descriptor)
"""
    assert traced_file_calls(code, tmp_path, "fsync") == [FileCall("fsync", "/", [], 0)]
    assert "   = 0" in (tmp_path / "strace.log").read_text()  # padded indeed
