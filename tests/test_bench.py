"""The benchmark package (scripts/bench): its phase table from distckpt's phase events, and
its smallest configuration run end to end, so it cannot silently rot; the same for
scripts/snapshot_alternatives.py."""

from __future__ import annotations

import json
import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from distckpt import events
from tests import job_servers
from tests.processes import kill_session, session_members

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "scripts" / "bench"
sys.path.insert(0, str(BENCH.parent))  # the package imports itself as ``bench``

from bench import jobs  # noqa: E402
from bench.contenders import MIB  # noqa: E402
from bench.phases import PHASE_ORDER, recording, summarize_phases  # noqa: E402
from bench.render import render_phases  # noqa: E402
from bench.training import TRAIN_MIN_STEPS  # noqa: E402


def test_phase_table_from_events_emitted_by_hand() -> None:
    by_rank = []
    for rank in (0, 1):
        saves = []
        with recording() as recorder:
            for step in (1, 2, 3):
                with events.phase("save.write", rank=rank, step=step):
                    pass
                for _ in range(2):  # a phase that runs twice per save is summed
                    with events.phase("collective.all_gather", rank=rank, step=step):
                        pass
                if rank == 0:
                    with events.phase("commit.lock", rank=rank, step=step):
                        pass
                    with events.phase("zz.unlisted", rank=rank, step=step):
                        pass
                saves.append(recorder.take())
        by_rank.append(saves)
    # Outside the block the listener is gone again.
    with events.phase("save.write", rank=0):
        pass
    assert all(len(save) for saves in by_rank for save in saves)
    assert by_rank[0][0]["collective.all_gather"][1] == 2
    assert set(by_rank[1][0]) == {"save.write", "collective.all_gather"}

    summary = summarize_phases(by_rank)
    assert summary["commit.lock"]["rank"] == 0  # only rank 0 ran it
    assert summary["collective.all_gather"]["runs"] == 2
    assert summary["save.write"]["median_s"] >= 0

    lines = render_phases(summary)
    names = [line.split()[0] for line in lines[1:]]
    assert names == [*PHASE_ORDER, "zz.unlisted"]  # the documented order, then the others
    row = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert row["save.propose"] == ["-", "-", "-"]  # never arrived
    assert row["collective.all_gather"][-1] == "2"
    assert lines[1 + PHASE_ORDER.index("commit.lock")].startswith("    commit.lock")


def run_bench(args: list[str], log: Path) -> subprocess.CompletedProcess[str]:
    """``python scripts/bench/__main__.py *args`` with this tree's distckpt, in a job server that
    has imported torch already (``tests.job_servers.run_preloaded``: the seconds of a fresh
    interpreter's imports are not what these runs check); it must exit 0. Its stdout and its
    stderr, apart, are also in ``log`` and in ``log`` with the suffix ``.err``."""
    done = job_servers.run_preloaded(
        [str(BENCH / "__main__.py"), *args], log, stderr_log=log.with_suffix(".err")
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.timeout(130)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc")
def test_peak_and_resident_size_are_read_together_and_the_peak_outlives_the_memory() -> None:
    before = jobs.read_memory()
    assert before.source == "VmHWM"
    assert before.peak >= before.resident > 0
    # 64 MiB touched, then unmapped (far above glibc's mmap threshold): gone from the
    # resident size, kept by the peak. The measured first saves rely on exactly this.
    block = mmap.mmap(-1, 64 * MIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for offset in range(0, 64 * MIB, mmap.PAGESIZE):
        block[offset] = 1
    touched = jobs.read_memory()
    block.close()
    after = jobs.read_memory()
    assert touched.resident - before.resident >= 60 * MIB
    # The kernel records the peak of memory being unmapped from its per-CPU counters, which
    # may lag the exact sum by a batch (at least 32 pages) per CPU and counter (208 KiB seen
    # on 2 CPUs): twice that much is allowed.
    assert after.peak >= touched.resident - (os.cpu_count() or 1) * 3 * 64 * mmap.PAGESIZE
    assert after.resident < touched.resident - 60 * MIB


def test_without_proc_the_peak_and_resident_size_are_ru_maxrss(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Patched: no machine without /proc runs this suite; hiding it is what such a one shows.
    def no_proc(path: str, *args: Any, **kwargs: Any) -> Any:
        raise FileNotFoundError(2, "No such file or directory", path)

    monkeypatch.setattr(jobs, "open", no_proc, raising=False)
    reading = jobs.read_memory()
    assert reading.source == "ru_maxrss"
    assert reading.peak == reading.resident >= jobs.ru_maxrss() > 0


def test_smallest_configuration_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")  # the "bench" extra, for --plot
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["--world-sizes", "1", "--mib", "1", "--rounds", "1", "--repeats", "1"]
    args += ["--coord-ranks", "2", "--coord-saves", "1", "--start-method", "fork"]
    args += ["--small-ranks", "2", "--small-tensors", "50", "--s3-ranks", "0"]
    args += ["--dir", str(tmp_path / "work"), "--json", str(out), "--plot", str(plot)]
    proc = run_bench(args, tmp_path / "bench.log")
    assert "== Targets" in proc.stdout
    report = json.loads(out.read_text())
    (config,) = report["configs"]
    assert config["skipped"] == {}, config["skipped"]
    for metric in ("raw_torch_save", "distckpt_sync_torch", "restore_mmap", "train_idle"):
        assert config["medians"][metric] > 0, metric
    # DCP's async_save ran in its process mode (the ranks may have children), its thread mode
    # beside it.
    assert config["info"]["dcp_async_mode"] == "process"
    assert "dcp_async_mode_refused" not in config["info"]
    for metric in ("dcp_async_save.total", "dcp_async_save_thread.total"):
        assert config["medians"][metric] > 0, metric
    # Each training measurement ran saves back to back until enough steps overlapped them,
    # with the background thread niced and not, and with DCP in both modes.
    during = config["info"]["train_steps_during_save"]
    assert set(during) == {
        "train_during_distckpt_async",
        "train_during_distckpt_async_nice0",
        "train_during_dcp_async",
        "train_during_dcp_async_thread",
    }
    for name, steps in during.items():
        assert min(steps) >= TRAIN_MIN_STEPS, name
        assert min(config["info"]["train_saves"][name]) >= 1, name
        assert config["medians"][name] > 0, name
    (coord,) = report["coordination"]
    assert coord["ranks"] == 2 and coord["median_s"] > 0
    assert report["small_tensors"]["save_ratio"] > 0
    assert report["small_tensors"]["restore_ratio"] > 0
    # Each first save's extra memory: its peak (VmHWM after) minus the resident size before,
    # both from the same reading of /proc/self/status.
    for key in ("rss", "rss_async"):
        (entry,) = config["info"][key]
        assert entry["source"] == "VmHWM", key
        assert entry["extra"] == max(0, entry["peak_after"] - entry["rss_before"]), key
        assert entry["peak_set_earlier"] == (entry["peak_before"] >= entry["peak_after"]), key
        assert entry["ru_maxrss_after"] > 0, key
    targets = {t["target"]: t for t in report["targets"]}
    assert "sync save <= 1.15x the disk floor" in targets
    assert targets["coordination per save <= 15 ms at 4 ranks"]["passed"] is None  # 2 ranks only
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert not list((tmp_path / "work").iterdir())  # its checkpoints were removed


def dcp_checkpoint_processes(session: int) -> list[int]:
    """The processes of ``session`` that DCP's process-based async_save started (spawned)."""
    found = []
    for pid in session_members(session):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if b"spawn_main" in cmdline:
            found.append(pid)
    return found


@pytest.mark.timeout(130)
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_a_stopped_run_leaves_no_rank_and_no_dcp_checkpoint_process(
    tmp_path: Path, stop: signal.Signals
) -> None:
    """Run as ``python scripts/bench/__main__.py ARGS...`` by a job server that imported torch
    already: the bench leads a session of its own and has a fresh interpreter's signal
    handlers; DCP's checkpoint processes are spawned fresh interpreters all the same."""
    # Many rounds: the run is stopped long before it ends, once DCP's processes run.
    args = ["--world-sizes", "2", "--mib", "1", "--rounds", "500", "--repeats", "1"]
    args += ["--contenders", "dcp_async_save", "--coord-ranks", "0", "--small-ranks", "0"]
    args += ["--s3-ranks", "0", "--start-method", "fork", "--dir", str(tmp_path / "work")]
    bench = job_servers.start_preloaded([str(BENCH / "__main__.py"), *args], tmp_path / "bench.log")
    try:
        deadline = time.monotonic() + 90
        while len(dcp_checkpoint_processes(bench.pid)) < 2:
            assert bench.poll() is None, "the bench ended before DCP's processes started"
            assert time.monotonic() < deadline, "DCP's checkpoint processes never started"
            time.sleep(0.2)
        # To the bench alone, as `timeout`, `kill` or Ctrl-C would: the ranks lead process
        # groups of their own, outside the terminal's foreground group.
        bench.send_signal(stop)
        bench.wait(timeout=30)
        deadline = time.monotonic() + 30
        while left := session_members(bench.pid):
            assert time.monotonic() < deadline, f"left running after {stop.name}: {left}"
            time.sleep(0.1)
    finally:
        kill_session(bench.pid)  # never leave them to the next test
        if bench.server.alive:
            bench.join()


def test_snapshot_alternatives_script_runs_end_to_end(tmp_path: Path) -> None:
    """scripts/snapshot_alternatives.py at its smallest, so it cannot silently rot; run as
    ``python SCRIPT ARGS...`` by a job server that imported torch already (what rots is the
    script, not a fresh interpreter's imports)."""
    script = REPO / "scripts" / "snapshot_alternatives.py"
    proc = job_servers.run_preloaded(
        [str(script), "--mib", "1", "--rounds", "2"],
        tmp_path / "snapshot.log",
        stderr_log=tmp_path / "snapshot.err",
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(" | ")[0] for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert rows == ["| snapshot", "| copy", "| fork"], proc.stdout
