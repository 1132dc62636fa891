"""The benchmark's object-store case (scripts/bench/objstore.py) run end to end at its smallest:
it starts its own moto server, measures, prints its PASS/FAIL lines and writes its JSON, so it
cannot silently rot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_bench import run_bench


@pytest.mark.timeout(130)
def test_object_store_case_at_its_smallest(tmp_path: Path) -> None:
    pytest.importorskip("moto.server", reason="the object-store case needs moto[server]")
    out = tmp_path / "bench.json"
    args = ["--world-sizes", "0", "--coord-ranks", "0", "--small-ranks", "0"]
    args += ["--s3-ranks", "2", "--s3-mib", "1", "--rounds", "2", "--start-method", "fork"]
    args += ["--dir", str(tmp_path / "work"), "--json", str(out)]
    proc = run_bench(args, tmp_path / "bench.log")
    assert "== object store (moto on 127.0.0.1): 2 ranks x 1 MiB" in proc.stdout, proc.stderr
    report = json.loads(out.read_text())
    summary = report["object_store"]
    assert summary is not None, proc.stderr
    for metric in (
        "raw_upload",
        "distckpt_sync_torch",
        "distckpt_async_torch.blocking",
        "distckpt_async_torch.total",
    ):
        assert len(summary["times"][metric]) == 2 and summary["medians"][metric] > 0, metric
    assert summary["save_ratio"] > 0 and summary["blocking_ratio"] > 0
    targets = {t["target"]: t for t in report["targets"]}
    for label in (
        "object store: sync save <= 1.15x a plain parallel upload",
        "object store: async blocking <= 8% of the sync save",
    ):
        assert targets[label]["passed"] is not None, targets[label]  # measured: PASS or FAIL
        verdict = "PASS" if targets[label]["passed"] else "FAIL"
        assert f"{verdict}  {label}" in proc.stdout
