"""What a count and what a number of seconds are, in every option distckpt takes (the save and
retention policies' counts and intervals, the object store's ``storage_options``): defined
once, so a value is taken or refused alike everywhere. The callers word the refusal.

Like :mod:`distckpt.policy`, this module must not import torch or NumPy: NumPy's scalars are
told apart through the :mod:`numbers` classes they register with.
"""

from __future__ import annotations

import math
import numbers
import operator

from distckpt.errors import InvalidArgument


def as_count(value: object, minimum: int) -> int | None:
    """``value`` as an int when it is a whole number of at least ``minimum``, else None.

    Any :class:`numbers.Integral` is one (NumPy's ``int64`` too, read with
    :func:`operator.index`). A bool is not, though Python counts it as an int; nor is a float,
    even ``3.0`` (a float count would be cut, 2.5 attempts to 2), nor a string (``"8"``: no
    option is read from text)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    count = operator.index(value)
    return count if count >= minimum else None


def as_seconds(value: object, *, zero: bool = False) -> float | None:
    """``value`` as a float when it is a positive (with ``zero``, or zero), finite real number
    (any :class:`numbers.Real`: an int, a float, NumPy's ``float32``), else None; never a bool
    or a string, nor an int too large for a float (``10**400``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) and (seconds > 0 or (zero and seconds == 0)) else None


def check_wait(seconds: object) -> float:
    """``seconds`` to wait for a root's lease, refused unless a finite number >= 0 (0: refuse
    at once when another job holds it): :func:`~distckpt.arguments.as_seconds`, as every
    seconds option is read (a NumPy number too), or zero."""
    wait = as_seconds(seconds, zero=True)
    if wait is None:
        raise InvalidArgument(
            f"wait_for_root must be a number of seconds >= 0 (0: fail at once), not {seconds!r}"
        )
    return wait
