"""What the ``distckpt`` command line prints: sizes and ages for people, tables, strict JSON,
and the progress bar of a long ``verify``."""

from __future__ import annotations

import json
import time
from typing import Any, TextIO

from distckpt.manifest import encode_float
from distckpt.policy import parse_created_utc

#: Checkpoints larger than this get a progress bar on a terminal while verified.
PROGRESS_MIN_BYTES = 256 << 20


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def age(created_utc: str | None) -> str:
    created = parse_created_utc(created_utc)
    if created is None:
        return "?"
    seconds = time.time() - created
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n")


def write_json(data: Any, out: TextIO, *, indent: int | None = None) -> None:
    """``data`` as one JSON document and a newline; strict JSON (allow_nan=False), which any
    parser reads: a non-finite metric must be encoded first (:func:`encode_metrics`, or
    :func:`non_finite_spelled` for nested values)."""
    json.dump(data, out, indent=indent, allow_nan=False)
    out.write("\n")


class Progress:
    """A one-line progress bar on a terminal's stderr; silent elsewhere."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self.done, self.stream = total, 0, stream
        self.enabled = total >= PROGRESS_MIN_BYTES and stream.isatty()
        self._shown = -1

    def __call__(self, n: int) -> None:
        self.done += n
        percent = min(100, self.done * 100 // max(self.total, 1))
        if self.enabled and percent != self._shown:
            self._shown = percent
            bar = "#" * (percent // 4)
            self.stream.write(f"\rverifying [{bar:<25}] {percent:3d}%")
            self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self.stream.write("\n")


def non_finite_spelled(value: Any) -> Any:
    """``value``, plain JSON values nested in dicts and lists, with each NaN or infinite float
    spelled as a manifest spells a metric's (``"nan"``, ``"inf"``, ``"-inf"``): a manifest
    another tool or an older version wrote may hold them in its metadata, which Python's JSON
    parser reads, but strict JSON cannot hold."""
    if isinstance(value, float):
        return encode_float(value)
    if isinstance(value, dict):
        return {key: non_finite_spelled(item) for key, item in value.items()}
    if isinstance(value, list):
        return [non_finite_spelled(item) for item in value]
    return value
