"""The strace reader of ``tests/syscall_trace.py`` on real traces, and on lines of one."""

from __future__ import annotations

from pathlib import Path

from tests.syscall_trace import FileCall, parsed_calls, run_traced


def test_a_short_call_padded_before_its_result_is_read(tmp_path: Path) -> None:
    """strace pads a short call with spaces up to the column of its ``=``: an fsync of ``/``
    is one such line, and must be read like any other."""
    code = """
import os
descriptor = os.open("/", os.O_RDONLY)
os.fsync(descriptor)
os.close(descriptor)
"""
    # imports nothing that a job server would have preloaded: a fresh interpreter is as quick
    run_traced(code, tmp_path, "fsync", preloaded=False)
    assert parsed_calls(tmp_path / "strace.log") == [FileCall("fsync", "/", [], 0)]
    assert "   = 0" in (tmp_path / "strace.log").read_text()  # padded indeed


def test_a_call_split_by_another_threads_line_is_read_whole(tmp_path: Path) -> None:
    """Lines of a real trace: a thread's open of a data file split around another thread's
    line counts as the one open it is."""
    data = "/r/step-00000001/__0_0.distcp"
    (tmp_path / "strace.log").write_text(
        f'20326 openat(AT_FDCWD</r>, "{data}", O_RDONLY|O_CLOEXEC <unfinished ...>\n'
        '20342 openat(AT_FDCWD</r>, "/r/.staging", O_RDONLY|O_DIRECTORY <unfinished ...>\n'
        f"20326 <... openat resumed>)             = 4<{data}>\n"
        "20342 <... openat resumed>)             = 5</r/.staging>\n"
    )
    assert parsed_calls(tmp_path / "strace.log") == [
        FileCall("openat", data, ["O_RDONLY|O_CLOEXEC"], 4),
        FileCall("openat", "/r/.staging", ["O_RDONLY|O_DIRECTORY"], 5),
    ]
