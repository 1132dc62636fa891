"""Run the filesystem matrix (``tests/test_filesystems.py``, with the cases of real mounts in
``tests/test_filesystems_space.py`` and ``tests/test_filesystems_fuse.py``) and write its
results as the Markdown table in ``docs/filesystems.md``.

    python scripts/gen_filesystem_table.py           # run the tests, print the table
    python scripts/gen_filesystem_table.py --write   # and replace it in docs/filesystems.md
    python scripts/gen_filesystem_table.py --write --workers 1   # one pytest worker

Needs root (mounts). The table sits between ``<!-- matrix:start -->`` and ``<!-- matrix:end -->``;
each cell is the outcome of one test: passed, "known failure" (an ``xfail`` naming the fix the
library still needs), failed or skipped (with the reason in the test log). Every test of the
three files is in the table, as a column or a row: tests/test_docs_truth.py checks it.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "filesystems.md"
START = "<!-- matrix:start -->"
END = "<!-- matrix:end -->"
TESTS = (
    "tests/test_filesystems.py",
    "tests/test_filesystems_space.py",
    "tests/test_filesystems_fuse.py",
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import doc_tables  # noqa: E402  (beside this script)

# a test's name and its parameter, if any: ``test_x_at_least_1_mib`` or ``test_y[sync-2-writers]``
_PARAM = re.compile(r"^(?P<test>test_\w+)(?:\[(?P<param>.+)\])?$")


def split_case_name(name: str) -> tuple[str, str]:
    """A junit test case's name as (test, parameter or ""); a name of another shape stops the
    script, so that no case drops out of the table unseen."""
    match = _PARAM.match(name)
    if match is None:
        raise SystemExit(f"cannot read the test case name {name!r}: fix _PARAM in {__file__}")
    return match["test"], match["param"] or ""


def run_matrix(workers: int = 2) -> dict[tuple[str, str], str]:
    """Each (test, parameter)'s outcome, from a run of the matrix by ``workers`` pytest-xdist
    workers."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-n",
                str(workers),
                *TESTS,
                f"--junitxml={report}",
                "-o",
                "junit_family=xunit1",  # xunit1 keeps record_property's properties
            ],
            cwd=REPO,
            check=False,
        )
        tree = ET.parse(report)
    outcomes: dict[tuple[str, str], str] = {}
    for case in tree.iter("testcase"):
        name = case.get("name", "")
        if not case.get("classname"):
            # pytest reports a file it could not collect as a case of no class, named after it
            raise SystemExit(f"pytest could not collect {name}: see its output above")
        test, param = split_case_name(name)
        outcome = "passed"
        for child in case:
            if child.tag == "skipped":
                kind = child.get("type", "")
                outcome = "known failure" if "xfail" in kind else "skipped"
                if outcome == "skipped" and child.get("message"):
                    outcome += f" ({child.get('message', '').removeprefix('Skipped: ')})"
            elif child.tag in ("failure", "error"):
                outcome = "FAILED"
            elif child.tag == "properties":
                # a test that passed by proving a refusal says what it proved (record_property)
                shown = [prop.get("value") for prop in child if prop.get("name") == "shows"]
                if shown and outcome == "passed":
                    outcome = f"passed: {shown[0]}"
        outcomes[(test, param)] = outcome
    return outcomes


_COLUMNS = {
    "test_save_retention_best_restore": "2-rank save (torch sync, dcp async), retention, best, "
    "fresh-process restore, verify, ls",
    "test_sigkill_mid_save_and_resume": "SIGKILL mid-save, resume",
    "test_early_writeback": "a 16 MiB file with early writeback and fsync: bytes, checksum",
    "test_async_save_with_direct_io": "direct I/O: an async torch save's rank file (strace), "
    "restore, verify",
}


def render_table(outcomes: dict[tuple[str, str], str]) -> str:
    """One row per filesystem of the matrix, one column per case; then the single cases."""
    names = sorted({p for (t, p) in outcomes if t in _COLUMNS}, key=_order)
    header = "| filesystem | " + " | ".join(_COLUMNS.values()) + " |"
    rows = [header, "|---" * (len(_COLUMNS) + 1) + "|"]
    for name in names:
        cells = [outcomes.get((test, name), "not run") for test in _COLUMNS]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    rows += ["", "| case | result |", "|---|---|"]
    for (test, param), outcome in sorted(outcomes.items()):
        if test not in _COLUMNS:
            rows.append(f"| `{test}{f'[{param}]' if param else ''}` | {outcome} |")
    return "\n".join(rows) + "\n"


#: a row of the single cases: the case's name, with its parameter if it has one, in backticks
_CASE_ROW = re.compile(r"^\|\s*`(?P<case>[^`]+)`\s*\|")


def tests_in_doc(path: Path = DOC) -> set[str]:
    """The tests the doc's table shows, by function name: the test of each matrix column its
    header has, and the test of each single case's row (its parameter left out)."""
    lines = doc_tables.extract_table(path.read_text(encoding="utf-8"), START, END).splitlines()
    header = {cell.strip() for cell in lines[0].strip().strip("|").split("|")}
    shown = {test for test, column in _COLUMNS.items() if column in header}
    for line in lines:
        row = _CASE_ROW.match(line)
        if row is not None:
            shown.add(split_case_name(row["case"])[0])
    return shown


def _order(name: str) -> int:
    from tests.filesystems import KINDS

    return list(KINDS).index(name) if name in KINDS else len(KINDS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the table in the doc")
    parser.add_argument(
        "--workers", type=int, default=2, help="pytest-xdist workers (1 on a busy machine)"
    )
    args = parser.parse_args()
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    table = render_table(run_matrix(args.workers))
    if args.write:
        doc_tables.write_table(DOC, table, START, END, what="filesystem matrix")
    else:
        print(table)


if __name__ == "__main__":
    main()
