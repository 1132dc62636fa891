"""Named fault points in the save protocol, for tests that prove a crash loses nothing.

Off by default, and then a fault point costs one dict lookup. Arm one with the environment
variable ``DISTCKPT_FAULT`` (read when distckpt is imported, so it reaches processes started by
torchrun) or with :func:`arm` in-process::

    DISTCKPT_FAULT="after_rename:kill:0"     # SIGKILL rank 0 right after the directory rename
    DISTCKPT_FAULT="after_shard_write:raise:1"  # raise on rank 1 after it wrote its shard

The format is ``point:action[:rank[:nth]]``: ``action`` is ``raise`` (an :class:`InjectedFault`)
or ``kill`` (SIGKILL of this process); ``rank`` limits it to one rank (default: every rank);
``nth`` fires on the n-th time the point is reached (default 1), so a later save can be hit.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from distckpt.errors import InjectedFault, InvalidArgument

#: Every fault point, in protocol order.
POINTS = (
    "before_staging",
    "before_shard_write",
    "after_shard_write",
    "before_agreement",
    "after_agreement",
    "before_manifest",
    "after_manifest",
    "before_rename",
    "after_rename",
    "during_link_swap",
    "during_retention",
    "during_delete",
    "during_staging_cleanup",
)
ACTIONS = ("raise", "kill")


@dataclass
class _Armed:
    point: str
    action: str
    rank: int | None
    nth: int
    hits: int = 0


_armed: dict[str, _Armed] = {}


def arm(point: str, action: str = "raise", *, rank: int | None = None, nth: int = 1) -> None:
    """Arm ``point`` in this process (see the module doc)."""
    if point not in POINTS:
        raise InvalidArgument(f"unknown fault point {point!r}; known: {', '.join(POINTS)}")
    if action not in ACTIONS:
        raise InvalidArgument(f"unknown fault action {action!r}; known: {', '.join(ACTIONS)}")
    _armed[point] = _Armed(point, action, rank, nth)


def disarm() -> None:
    _armed.clear()


def parse(spec: str) -> None:
    """Arm the points named in ``spec`` (``DISTCKPT_FAULT``'s syntax, comma-separated)."""
    for item in filter(None, (part.strip() for part in spec.split(","))):
        fields = item.split(":")
        if not 2 <= len(fields) <= 4:
            raise InvalidArgument(f"DISTCKPT_FAULT item {item!r} is not point:action[:rank[:nth]]")
        rank = int(fields[2]) if len(fields) > 2 and fields[2] not in ("", "*") else None
        nth = int(fields[3]) if len(fields) > 3 else 1
        arm(fields[0], fields[1], rank=rank, nth=nth)


def hit(point: str, rank: int) -> None:
    """Called by the protocol at ``point``; does nothing unless that point is armed."""
    armed = _armed.get(point)
    if armed is None or (armed.rank is not None and armed.rank != rank):
        return
    armed.hits += 1
    if armed.hits != armed.nth:
        return
    if armed.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(f"fault injected at {point} on rank {rank}")


if os.environ.get("DISTCKPT_FAULT"):
    parse(os.environ["DISTCKPT_FAULT"])
