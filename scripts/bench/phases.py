"""Where a distckpt save spends its time, from the phase events the library emits.

Within :func:`recording`, a :class:`PhaseRecorder` listens to :mod:`distckpt.events` in one
rank's process; after each measured save, :meth:`PhaseRecorder.take` sums that save's events
per phase name (a phase may run several times in one save, e.g. ``collective.all_gather``).
:func:`summarize_phases` turns every rank's per-save sums into one row per phase: the median
over saves, on the rank whose median is the highest. :func:`ordered_phases` lists them in
:data:`PHASE_ORDER`, with None for a phase that never arrived, then any other phase that did,
by name.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from distckpt import events

#: The phases of a save, in display order; ``propose.*`` run inside ``save.propose`` (the
#: snapshot, and rank 0's root work beside it), ``commit.*`` inside ``save.commit`` (rank 0's
#: publication under the root lock).
PHASE_ORDER = (
    "save.propose",
    "propose.snapshot",
    "propose.copy",
    "propose.root",
    "save.write",
    "save.agree",
    "save.commit",
    "commit.lock",
    "commit.manifest",
    "commit.publish",
    "commit.links",
    "commit.retention",
    "collective.all_gather",
    "collective.gather",
    "collective.broadcast",
)
#: Phases that run inside another (``propose.*`` in ``save.propose``, ``commit.*`` in
#: ``save.commit``), shown indented beneath it.
NESTED_PREFIXES = ("propose.", "commit.")

#: One save on one rank: phase name -> (seconds summed over its runs, number of runs).
SavePhases = dict[str, tuple[float, int]]


class PhaseRecorder:
    """The phase events of this process while :func:`recording` runs; events of an async
    save's background thread count too."""

    def __init__(self) -> None:
        # list.append is atomic, so events from a background thread need no lock.
        self.events: list[events.PhaseEvent] = []

    def take(self) -> SavePhases:
        """The events since the last ``take``, summed per phase name; forgets them."""
        taken, self.events[:] = list(self.events), []
        sums: SavePhases = {}
        for event in taken:
            seconds, runs = sums.get(event.phase, (0.0, 0))
            sums[event.phase] = (seconds + event.seconds, runs + 1)
        return sums


def summarize_phases(by_rank: list[list[SavePhases]]) -> dict[str, dict[str, Any]]:
    """Per phase name: ``median_s`` (the median over saves of its per-save sum, on the slowest
    rank), ``rank`` (that rank) and ``runs`` (its median number of runs per save). A save in
    which a rank did not run a phase it ran in other saves counts as 0 s there."""
    names = {name for saves in by_rank for save in saves for name in save}
    summary: dict[str, dict[str, Any]] = {}
    for name in names:
        candidates = []
        for rank, saves in enumerate(by_rank):
            if not any(name in save for save in saves):
                continue
            seconds = statistics.median(save.get(name, (0.0, 0))[0] for save in saves)
            runs = statistics.median(save.get(name, (0.0, 0))[1] for save in saves)
            candidates.append((seconds, rank, runs))
        seconds, rank, runs = max(candidates, key=lambda c: (c[0], -c[1]))
        summary[name] = {"median_s": seconds, "rank": rank, "runs": runs}
    return summary


def ordered_phases(
    summary: dict[str, dict[str, Any]],
) -> list[tuple[str, dict[str, Any] | None]]:
    """Every phase of :data:`PHASE_ORDER` (None where it never arrived), then the other
    phases that arrived, by name."""
    extra = sorted(name for name in summary if name not in PHASE_ORDER)
    return [(name, summary.get(name)) for name in (*PHASE_ORDER, *extra)]


@contextmanager
def recording() -> Iterator[PhaseRecorder]:
    """A :class:`PhaseRecorder` listening to :mod:`distckpt.events` within the block."""
    recorder = PhaseRecorder()
    remove_listener = events.add_listener(recorder.events.append)
    try:
        yield recorder
    finally:
        remove_listener()
