"""What a check of a checkpoint finds wrong with it: :class:`Problem`, a message naming the
file (or the object) and whether it is damage this version is sure of, and the problems both
backends find, worded alike."""

from __future__ import annotations

from typing import TYPE_CHECKING

from distckpt.checksums import CHECKSUM_ALGORITHM

if TYPE_CHECKING:
    from distckpt.manifest import Manifest

__all__ = [
    "Problem",
    "checksum_mismatch",
    "damage",
    "missing",
    "unjudged",
    "unknown_checksum_algorithm",
    "wrong_size",
]


class Problem(str):
    """One thing wrong with a checkpoint: the message naming it (a ``str``, used as one), and
    whether it is damage this version is sure of (``damage``: a listed file missing or of
    another size, a known algorithm's checksum mismatch, a manifest contradicting the
    checkpoint) or cannot judge (see :class:`~distckpt.CorruptCheckpoint`'s ``damaged``)."""

    damage: bool

    def __new__(cls, message: str, damage: bool = False) -> Problem:
        problem = super().__new__(cls, message)
        problem.damage = damage
        return problem


def damage(message: str) -> Problem:
    """A problem that is damage this version is sure of."""
    return Problem(message, damage=True)


def unjudged(message: str) -> Problem:
    """A problem this version cannot judge to be damage."""
    return Problem(message, damage=False)


# The problems both backends find, worded alike (``where`` names the file or the object).


def missing(where: object) -> Problem:
    return damage(f"{where}: missing")


def wrong_size(where: object, size: int, listed: int) -> Problem:
    return damage(f"{where}: {size} bytes, the manifest says {listed} (truncated?)")


def checksum_mismatch(where: object) -> Problem:
    return damage(f"{where}: checksum mismatch (its bytes changed after it was written)")


def unknown_checksum_algorithm(where: object, manifest: Manifest) -> Problem:
    """Not damage: a later version may write checksums this one does not know."""
    return unjudged(
        f"{where}: unknown checksum algorithm {manifest.checksum_algorithm!r}; this distckpt "
        f"checks {CHECKSUM_ALGORITHM!r}"
    )
