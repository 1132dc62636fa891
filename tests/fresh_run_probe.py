"""A job for ``tests/test_killing.py``: writes, as one JSON line of ``OUT/probe.txt``, what a
run of it finds of the interpreter it runs in; from an exit handler, as JSON in
``OUT/exited.txt``, whether ``__main__`` is still this script there (a class of it pickles);
``OUT/finalized.txt`` from a finalizer at the interpreter's shutdown; and into
``OUT/unflushed.txt`` a line it never flushes nor closes (only the shutdown writes it out).

Usage: ``python tests/fresh_run_probe.py OUT``
"""

from __future__ import annotations

import sys

# Looked at before this job imports anything: what a fresh interpreter has not imported.
ALREADY_IMPORTED = sorted(name for name in ("distckpt", "pytest", "tests") if name in sys.modules)

import atexit  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from distckpt import faults  # noqa: E402


class ProbeState:
    """A class of the script's own: pickled by name, it is found only while ``__main__`` is
    this script."""


class WritesWhenFinalized:
    """Writes ``path`` when collected: at the interpreter's shutdown, as a module global."""

    def __init__(self, path: str) -> None:
        self.path = path
        # Held here: by the time this is collected, even ``__main__``'s builtins may be gone.
        self.open = open

    def __del__(self) -> None:
        with self.open(self.path, "w") as finalized:
            finalized.write("finalizer ran\n")


def record_exit(path: Path) -> None:
    """Write to ``path`` what an exit handler finds of ``__main__``."""
    main_module = sys.modules["__main__"]
    try:
        pickle.dumps(ProbeState())
        pickled = True
    except pickle.PicklingError:
        pickled = False
    found = {"main_is_this_script": getattr(main_module, "main", None) is main, "pickled": pickled}
    path.write_text(json.dumps(found))


#: Kept until the interpreter's shutdown collects them.
_finalized_at_shutdown: list[object] = []


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
    atexit.register(record_exit, out / "exited.txt")
    _finalized_at_shutdown.append(WritesWhenFinalized(str(out / "finalized.txt")))
    unflushed = open(out / "unflushed.txt", "w")  # noqa: SIM115 - left for the shutdown to close
    unflushed.write("written out at shutdown\n")
    _finalized_at_shutdown.append(unflushed)


if __name__ == "__main__":
    main()
