"""Direct I/O as the kernel is asked for it, read from ``strace`` of real saves in a fresh
interpreter: an async save's rank file is opened with ``O_DIRECT`` and a sync save's is not,
an async save to an object store spools buffered; and what a traced run that dies or hangs
leaves (:mod:`tests.syscall_trace`)."""

from __future__ import annotations

import subprocess
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from distckpt.memory import DIRECT_ALIGNMENT
from tests.filesystems import immutable, require_direct_io
from tests.s3server import S3Server
from tests.syscall_trace import (
    FileCall,
    async_saves_traced,
    opened_direct,
    run_traced,
    traced_file_calls,
)

#: conftest readies the job servers first: the traced runs are their children
NEEDS_JOB_SERVERS = True


def _rank_file_calls(calls: list[FileCall], root: str) -> list[FileCall]:
    """The calls that wrote the rank file of ``root``: its open for writing and what followed
    (the restore's and ``verify``'s opens for reading left out)."""
    return [
        call
        for call in calls
        if f"/{root}/" in call.path
        and call.path.endswith(".pt")
        and not (call.name == "openat" and "O_RDONLY" in call.args[0])
    ]


#: saves the local roots "async", "sync" and "buffered" (in the traced run's working directory)
#: with their options, restores each bit for bit and verifies it
LOCAL_SAVES = """
import torch
import distckpt
torch.manual_seed(0)
state = {
    "w": torch.randn(6 << 20),  # 24 MiB
    "odd": torch.randn(700),  # the file ends mid-page
    "tiny": torch.arange(3),
    "step": 7,
}
for root, options in (
    ("async", {"async_save": True}),
    ("sync", {}),
    ("buffered", {"async_save": True, "direct_io": False}),
):
    with distckpt.CheckpointManager(root, **options) as manager:
        manager.save(1, state)
        manager.wait()
        restored = manager.restore(1).state
    for key in ("w", "odd", "tiny"):
        assert restored[key].dtype == state[key].dtype, (root, key)
        saved = state[key].view(torch.uint8) if key != "tiny" else state[key]
        got = restored[key].view(torch.uint8) if key != "tiny" else restored[key]
        assert torch.equal(got, saved), (root, key)
    assert restored["step"] == 7
    assert distckpt.verify(root).ok, root
"""
#: the file the traced run opens after its local saves, before its save to an object store
OBJECT_STORE_PART = "object-store-part-starts"
#: where the traced run writes the traceback of its object-store part, if that part failed
OBJECT_STORE_FAILED = "object-store-failed.txt"


@dataclass(frozen=True)
class TracedSaves:
    """What one traced interpreter's saves did to files, split where it went on to the object
    store."""

    workdir: Path
    local: list[FileCall]
    #: None where there is no object store to save to (no moto server or no botocore)
    object_store: list[FileCall] | None


@pytest.fixture(scope="module")
def traced_saves(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> TracedSaves:
    """:data:`LOCAL_SAVES`, then an async save of 24 MiB to a root on the S3 server, traced in
    one run (:func:`~tests.syscall_trace.run_traced`), paid once for the tests that read these
    saves' calls. The S3 part's failure (its traceback in
    :data:`OBJECT_STORE_FAILED`) is the object-store test's alone."""
    workdir = tmp_path_factory.mktemp("traced-saves")
    require_direct_io(workdir)
    code = LOCAL_SAVES
    try:
        server: S3Server | None = request.getfixturevalue("s3_server")
        import botocore  # noqa: F401  the S3 store's client
    except (pytest.skip.Exception, Exception):
        # A server that did not start fails the object-store test on its own (it asks for the
        # server too); the local saves are traced without it.
        server = None
    if server is not None:
        url = f"s3://{server.create_bucket()}/ckpt"
        options = server.storage_options()
        object_store_part = f"""
state = {{"w": torch.randn(6 << 20)}}  # 24 MiB: direct, were it a local root
with distckpt.CheckpointManager({url!r}, storage_options={options!r},
                                async_save=True) as manager:
    manager.save(1, state)
    manager.wait()
    assert torch.equal(manager.restore(1).state["w"], state["w"])
"""
        # A failure here is the object-store test's to report: the local part's calls are
        # still read.
        code += f"""
open({OBJECT_STORE_PART!r}, "w").close()
try:
{textwrap.indent(object_store_part, "    ")}
except BaseException:
    import traceback
    with open({OBJECT_STORE_FAILED!r}, "w") as failed:
        failed.write(traceback.format_exc())
"""
    calls = traced_file_calls(code, workdir, "openat,ftruncate,fsync,sync_file_range")
    split = next(
        (i for i, call in enumerate(calls) if call.path.endswith(f"/{OBJECT_STORE_PART}")),
        len(calls),
    )
    if server is not None:
        assert split < len(calls), "the traced run never reached its object-store part"
    return TracedSaves(workdir, calls[:split], calls[split:] if server is not None else None)


def test_an_async_save_writes_its_rank_file_direct_and_a_sync_save_buffered(
    traced_saves: TracedSaves,
) -> None:
    """Real saves under strace: the async save's rank file is opened with O_DIRECT, asks for no
    early writeback, and ends with an ftruncate to its true size and then its fsync; the sync
    save's is opened without O_DIRECT, and with ``direct_io=False`` no file is. Every restore
    is bit for bit the saved state, and ``verify`` passes."""
    calls = traced_saves.local
    direct = _rank_file_calls(calls, "async")
    opened = [call for call in direct if call.name == "openat"]
    assert len(opened) == 1 and opened_direct(opened[0]), direct
    assert "O_EXCL" in opened[0].args[0]
    written = [call for call in direct if call.name != "openat"]
    assert not [call for call in written if call.name == "sync_file_range"], written
    assert [call.name for call in written] == ["ftruncate", "fsync"], written
    size = int(written[0].args[0])
    saved = traced_saves.workdir / "async" / "step-00000001" / "rank-00000.pt"
    assert size == saved.stat().st_size and size % DIRECT_ALIGNMENT != 0
    for root in ("sync", "buffered"):
        opened = [call for call in _rank_file_calls(calls, root) if call.name == "openat"]
        assert opened and not [call for call in opened if opened_direct(call)], opened
    under_buffered = [call for call in calls if "/buffered/" in call.path]
    assert under_buffered and not [call for call in under_buffered if opened_direct(call)]


def test_an_async_save_to_an_object_store_spools_its_rank_file_buffered(
    s3_server: S3Server, traced_saves: TracedSaves
) -> None:
    """Through the real wiring (the manager, the protocol, the S3 store): the spool file an
    async save streams into its object is written without O_DIRECT."""
    pytest.importorskip("botocore")
    failed = traced_saves.workdir / OBJECT_STORE_FAILED
    assert not failed.exists(), failed.read_text()
    calls = traced_saves.object_store
    assert calls is not None, "the traced run had no object store, though the server runs"
    written = [
        call
        for call in calls
        if call.name == "openat"
        and call.path.endswith("rank-00000.pt")
        and "O_WRONLY" in call.args[0]
    ]
    assert written, calls
    assert not [call for call in written if opened_direct(call)], written


def test_a_shared_traced_run_that_dies_names_the_directory_it_died_in(tmp_path: Path) -> None:
    """When the one interpreter the filesystem matrix traces dies on one filesystem, that
    filesystem's result says it died there, the ones after it say they were not reached, and
    the ones before it keep their results. The death is real: an immutable directory, where
    neither the save nor its ``failed.txt`` can be written (its ``started.txt`` is made
    beforehand, and a file's contents may still change in an immutable directory)."""
    before, dying, after = tmp_path / "before", tmp_path / "dying", tmp_path / "after"
    dying.mkdir()
    (dying / "started.txt").write_text("")
    with immutable(dying):
        found = async_saves_traced([before, dying, after], tmp_path)
    assert found[before].written_direct(commits=True)
    died = "the shared traced run died (exit status 1)"
    assert found[dying].lost == f"{died} while saving on {dying}"
    assert found[after].lost == f"not reached: {died} before {after}"
    with pytest.raises(AssertionError, match="not reached"):
        found[after].written_direct(commits=True)


def test_a_traced_run_that_hangs_is_killed_with_everything_it_traces(tmp_path: Path) -> None:
    """A traced interpreter that outlives its timeout is killed along with strace: left
    running, it would keep the files it has open, and a FUSE mount under them, busy."""
    # The pid file appears whole (a rename), or not at all.
    hanging = (
        "import os, time; open('pid.new', 'w').write(str(os.getpid())); "
        "os.rename('pid.new', 'pid.txt'); time.sleep(600)"
    )
    # A timeout that fired before the interpreter got to write its pid (a loaded machine starts
    # it slowly) leaves nothing to look at: the run is tried again with twice the timeout.
    timeout = 1.0
    while True:
        workdir = tmp_path / f"timeout-{timeout:g}s"
        workdir.mkdir()
        with pytest.raises(subprocess.TimeoutExpired):
            run_traced(hanging, workdir, "openat", timeout=timeout)
        if (workdir / "pid.txt").exists():
            break
        # 1 + 2 + ... + 32 = 63 s in all, well within the test's timeout (pyproject.toml).
        assert timeout < 32, "the traced interpreter never wrote its pid in 63 s"
        timeout *= 2
    pid = int((workdir / "pid.txt").read_text())
    for _ in range(300):  # SIGKILL is sent when the timeout fires; this only waits out the exit
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return
        if "State:\tZ" in status:
            return
        time.sleep(0.1)
    pytest.fail(f"the traced interpreter {pid} still runs after its run timed out")
