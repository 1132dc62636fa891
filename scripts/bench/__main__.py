"""``python scripts/bench [flags]``: run the benchmark (``--help`` lists the flags)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# torch reads OMP_NUM_THREADS when imported; ranks started later inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

PACKAGE = Path(__file__).resolve().parent
# Run as a directory, Python puts the package's own directory first on sys.path, where its
# modules could be imported a second time under bare names (``cli`` besides ``bench.cli``).
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != PACKAGE]
# The package itself (as ``bench``) and scripts/doc_tables.py, then the repository (distckpt,
# tests/ranks.py) ahead of any installed copy; spawned ranks inherit this sys.path.
for entry in (PACKAGE.parent, PACKAGE.parent.parent):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

if __name__ == "__main__":
    from bench.cli import main

    sys.exit(main())
