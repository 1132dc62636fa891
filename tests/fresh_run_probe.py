"""A job for ``tests/test_killing.py``: writes, as one JSON line of ``OUT/probe.txt``, what a
run of it finds of the interpreter it runs in, and ``OUT/exited.txt`` from an exit handler.

Usage: ``python tests/fresh_run_probe.py OUT``
"""

from __future__ import annotations

import sys

# Looked at before this job imports anything: what a fresh interpreter has not imported.
ALREADY_IMPORTED = sorted(name for name in ("distckpt", "pytest", "tests") if name in sys.modules)

import atexit  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from distckpt import faults  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    found = {
        "already_imported": ALREADY_IMPORTED,
        "string_hash": hash("distckpt"),
        "setting": os.environ.get("PROBE_SETTING"),
        "armed": sorted(faults._armed),
        "default_dtype": str(torch.get_default_dtype()),
    }
    with open(out / "probe.txt", "a") as probe:
        probe.write(json.dumps(found) + "\n")
    atexit.register((out / "exited.txt").write_text, "exit handlers ran\n")


if __name__ == "__main__":
    main()
