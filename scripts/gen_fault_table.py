"""Render the fault-injection outcomes of ``tests/test_faults.py`` as the table in
``docs/faults.md``.

    python scripts/gen_fault_table.py                 # run the scenarios, print the table
    python scripts/gen_fault_table.py --write         # ... and put it in docs/faults.md
    python scripts/gen_fault_table.py --report FILE   # render FILE instead of running them

Running the scenarios means running ``pytest tests/test_faults.py -k test_fault_point`` with
``DISTCKPT_FAULT_REPORT`` set: each scenario appends its outcome to that file as one JSON line.
The table sits between ``<!-- faults:start -->`` and ``<!-- faults:end -->``; a test checks
that it lists every fault point in every mode.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "faults.md"
START = "<!-- faults:start -->"
END = "<!-- faults:end -->"
REPORT_ENV = "DISTCKPT_FAULT_REPORT"
#: a row of the table: its point and its mode, each in backticks (digits allowed in both names)
_ROW = re.compile(r"^\|\s*`(?P<point>[a-z0-9_]+)`\s*\|\s*`(?P<mode>[a-z0-9-]+)`")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import doc_tables  # noqa: E402  (beside this script)


def _step(name: str | None) -> str:
    if name is None:
        return "none"
    match = re.fullmatch(r"step-0*(\d+)", name)
    return match.group(1) if match else name


def _steps(steps: Iterable[int]) -> str:
    return ", ".join(map(str, steps)) or "none"


def _leftovers(found: dict[str, list[str]]) -> str:
    locks = sum(name.endswith(".lock") for name in found["staging"])
    dirs = len(found["staging"]) - locks
    parts = []
    if dirs:
        parts.append(f"{dirs} staging dir{'s' if dirs > 1 else ''}")
    if locks:
        parts.append(f"{locks} writer lock file{'s' if locks > 1 else ''}")
    if found["trash"]:
        parts.append(f"{len(found['trash'])} in trash")
    return " + ".join(parts) or "nothing"


def _ranks(outcomes: dict[str, str]) -> str:
    if all(text == "killed" for text in outcomes.values()):
        return "all killed"
    return "; ".join(f"{rank}: {text}" for rank, text in sorted(outcomes.items()))


def _after_crash(record: dict[str, Any]) -> str:
    steps = record["steps_after_crash"]
    newest = steps[-1] if steps else None
    last = _step(record["last_after_crash"])
    stale = " (stale)" if newest is not None and last != str(newest) else ""
    broken = f"; BROKEN: {record['broken_after_crash']}" if record["broken_after_crash"] else ""
    return (
        f"steps {_steps(steps)}; `last`→{last}{stale}, `best`→{_step(record['best_after_crash'])}"
        f"; left: {_leftovers(record['leftovers_after_crash'])}{broken}"
    )


def _restart(record: dict[str, Any]) -> str:
    restored = sorted(set(record["restored"]))
    text = f"step {_steps(restored)}"
    checks = []
    if not all(record["state_ok"]):
        checks.append("WRONG STATE")
    if record["leftovers_after_restart"] != {"staging": [], "trash": []}:
        checks.append(f"left {_leftovers(record['leftovers_after_restart'])}")
    if record["link_problems_after_restart"]:
        checks.append("links: " + "; ".join(record["link_problems_after_restart"]))
    if record["next"] != [4] * len(record["next"]) or not record["final_ok"]:
        checks.append(f"then saved {record['next']}, verify ok: {record['final_ok']}")
    return text + (" — " + "; ".join(checks) if checks else ", exact state; clean; links right")


def render_table(
    records: Sequence[dict[str, Any]], points: Sequence[str], modes: Sequence[str]
) -> str:
    """The Markdown table, one row per point and mode (the last record of each wins)."""
    latest = {(r["point"], r["mode"]): r for r in records}
    rows = [
        "| Point | Mode (rank) | What each rank saw | Step 3 committed | On disk after the crash "
        "| Restart resumes from |",
        "|---|---|---|---|---|---|",
    ]
    slowest = 0.0
    for point in points:
        for mode in modes:
            record = latest.get((point, mode))
            if record is None:
                cells = [f"`{point}`", f"`{mode}`", "NOT RUN", "", "", ""]
            else:
                slowest = max([slowest, *record["seconds"].values()])
                at = "at rank" if mode == "kill-job" else "rank"
                cells = [
                    f"`{point}`",
                    f"`{mode}` ({at} {record['fault_rank']})",
                    _ranks(record["outcomes"]),
                    "yes" if record["committed3"] else "no",
                    _after_crash(record),
                    _restart(record),
                ]
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    within = "under 1 s" if slowest < 1 else f"within {math.ceil(slowest)} s"
    return (
        "\n".join(rows)
        + f"\n\nGenerated by `scripts/gen_fault_table.py` from {len(latest)} scenarios; every "
        f"rank that failed did so {within} of its save starting.\n"
    )


def read_report(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_scenarios(report: Path, workers: int) -> int:
    """Run the fault scenarios with ``report`` as their report file; returns pytest's status."""
    env = dict(os.environ, **{REPORT_ENV: os.fspath(report)})
    command = [sys.executable, "-m", "pytest", "tests/test_faults.py", "-k", "test_fault_point"]
    command += ["-q", "-p", "no:cacheprovider"]
    if workers > 1:
        command += ["-n", str(workers)]
    return subprocess.run(command, cwd=REPO, env=env).returncode


def extract_table(doc: str) -> str:
    return doc_tables.extract_table(doc, START, END)


def rows_in_doc(path: Path = DOC) -> set[tuple[str, str]]:
    """The (point, mode) pairs the committed doc's table has a row for."""
    rows = set()
    for line in extract_table(path.read_text(encoding="utf-8")).splitlines():
        if not line.startswith("| `"):
            continue  # the header, its rule, the sentence under the table
        match = _ROW.match(line)
        if match is None:
            # a row this cannot read would count as missing, and regenerating would not help
            raise SystemExit(f"cannot read the row {line!r} of {path.name}: fix _ROW in {__file__}")
        if "NOT RUN" not in line:
            rows.add((match["point"], match["mode"]))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update docs/faults.md")
    parser.add_argument("--report", type=Path, help="a report to render instead of running")
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (default 2)")
    args = parser.parse_args(argv)

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from distckpt.faults import POINTS
    from tests.test_faults import MODES

    status = 0
    if args.report is not None:
        records = read_report(args.report)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "faults.jsonl"
            status = run_scenarios(report, args.workers)
            records = read_report(report) if report.exists() else []
        if status != 0:
            print("some fault scenarios failed: the table shows what happened", file=sys.stderr)
    table = render_table(records, POINTS, MODES)
    if not args.write:
        sys.stdout.write(table)
        return status
    doc_tables.write_table(DOC, table, START, END, what=f"{len(records)} scenarios")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
