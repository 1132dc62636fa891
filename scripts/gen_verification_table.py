"""Render the hostile-input cases of ``tests/hostile_case_table.py`` as the Markdown table in
``docs/verification.md``.

    python scripts/gen_verification_table.py           # print the table
    python scripts/gen_verification_table.py --write   # replace it in docs/verification.md

The table sits between ``<!-- cases:start -->`` and ``<!-- cases:end -->``; a test checks that
the doc's table equals the rendered one, so the doc says what the tests assert.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "verification.md"
START = "<!-- cases:start -->"
END = "<!-- cases:end -->"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.hostile_case_table import CASES, Case  # noqa: E402
from tests.hostile_cases import LINKS, STEP2  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import doc_tables  # noqa: E402  (beside this script)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _verdict(case: Case) -> str:
    if not case.verify:
        return "passes"
    parts = []
    for name, says in case.verify.items():
        quoted = " … ".join(f"`{part}`" for part in says)
        label = "root's links" if name == LINKS else f"`{name}`"
        parts.append(f"{label} broken: {quoted}")
    return "; ".join(parts)


def _explicit(case: Case) -> str:
    text = f"`{case.target_text()}`: {case.explicit.describe()}"
    if case.explicit_verified is not None:
        text += f"; with `verify=True`: {case.explicit_verified.describe()}"
    return text


def render_table(cases: Sequence[Case]) -> str:
    """The Markdown table, one row per case."""
    rows = [
        '| Case | What was done | `verify(root)` | `restore("last")` '
        '| `restore("last", verify=True)` | Explicit restore | `export` of it '
        "| Set aside at a restart |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        what = case.description + (f" <br>*{case.notes}*" if case.notes else "")
        verified = case.last_verified.describe() if case.last_verified else "the same"
        cells = [
            f"`{case.id}`",
            what,
            _verdict(case),
            case.last.describe(),
            verified,
            _explicit(case),
            f'`export(root / "{case.export_target}", out)`: '
            + case.explicit_checked.describe(verb="writes"),
            f"yes: `{STEP2}` becomes `damaged-{STEP2}-<token>`" if case.set_aside else "no",
        ]
        rows.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(rows) + "\n"


def extract_table(doc: str) -> str:
    return doc_tables.extract_table(doc, START, END)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update docs/verification.md")
    args = parser.parse_args(argv)
    table = render_table(CASES)
    if not args.write:
        sys.stdout.write(table)
        return 0
    doc_tables.write_table(DOC, table, START, END, what=f"{len(CASES)} cases")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
