"""The benchmark package (scripts/bench): its phase table from distckpt's phase events, and
its smallest configuration run end to end, so it cannot silently rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distckpt import events

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "scripts" / "bench"
sys.path.insert(0, str(BENCH.parent))  # the package imports itself as ``bench``

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


def run_bench(args: list[str]) -> subprocess.CompletedProcess[str]:
    """``python scripts/bench *args`` with this tree's distckpt; it must exit 0."""
    proc = subprocess.run(
        [sys.executable, str(BENCH), *args],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.timeout(130)
def test_smallest_configuration_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")  # the "bench" extra, for --plot
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["--world-sizes", "1", "--mib", "1", "--rounds", "1", "--repeats", "1"]
    args += ["--coord-ranks", "2", "--coord-saves", "1", "--start-method", "fork"]
    args += ["--small-ranks", "2", "--small-tensors", "50", "--s3-ranks", "0"]
    args += ["--dir", str(tmp_path / "work"), "--json", str(out), "--plot", str(plot)]
    proc = run_bench(args)
    assert "== Targets" in proc.stdout
    report = json.loads(out.read_text())
    (config,) = report["configs"]
    assert config["skipped"] == {}, config["skipped"]
    for metric in ("raw_torch_save", "distckpt_sync_torch", "restore_mmap", "train_idle"):
        assert config["medians"][metric] > 0, metric
    # Each training measurement ran saves back to back until enough steps overlapped them,
    # with the background thread niced and not.
    during = config["info"]["train_steps_during_save"]
    assert {"train_during_distckpt_async", "train_during_distckpt_async_nice0"} <= set(during)
    for name, steps in during.items():
        assert min(steps) >= TRAIN_MIN_STEPS, name
        assert min(config["info"]["train_saves"][name]) >= 1, name
        assert config["medians"][name] > 0, name
    (coord,) = report["coordination"]
    assert coord["ranks"] == 2 and coord["median_s"] > 0
    assert report["small_tensors"]["save_ratio"] > 0
    assert report["small_tensors"]["restore_ratio"] > 0
    targets = {t["target"]: t for t in report["targets"]}
    assert "sync save <= 1.15x the disk floor" in targets
    assert targets["coordination per save <= 15 ms at 4 ranks"]["passed"] is None  # 2 ranks only
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert not list((tmp_path / "work").iterdir())  # its checkpoints were removed
