"""Metric values given by the user, turned into the plain floats a manifest stores.

Kept apart from :mod:`distckpt.policy`, which ranks the stored floats: converting arbitrary
user values (Python numbers, tensors, NumPy scalars) is input handling, not a rule. Like the
policies, this module must not import torch or NumPy: values are converted by duck typing.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

from distckpt.errors import InvalidArgument


def _element_count(value: object) -> int | None:
    """How many elements an array-like holds (torch ``numel()``, NumPy ``size``, or 1 for a
    0-dim ``ndim``), or None if ``value`` does not look like an array."""
    numel = getattr(value, "numel", None)
    if callable(numel):
        count = numel()
        return count if isinstance(count, int) else None
    size = getattr(value, "size", None)
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    ndim = getattr(value, "ndim", None)
    if isinstance(ndim, int) and not isinstance(ndim, bool):
        return 1 if ndim == 0 else None
    return None


def _to_float(key: str, value: object) -> float:
    if isinstance(value, (bool, int, float)):
        try:
            return float(value)
        except OverflowError:
            raise InvalidArgument(f"metric {key!r} is too large for a float: {value!r}") from None

    # Tensors and NumPy values: both also define __float__, but going through item() lets a
    # multi-element value be reported clearly instead of with the library's own message.
    item = getattr(value, "item", None)
    if callable(item):
        count = _element_count(value)
        if count is not None and count != 1:
            raise InvalidArgument(
                f"metric {key!r} must be a single number, got a value with {count} elements"
            )
        try:
            scalar = item()
        except Exception as exc:
            raise InvalidArgument(f"metric {key!r} could not be read as a number: {exc}") from exc
        if scalar is value:
            # An item() that returns itself would recurse forever.
            raise InvalidArgument(f"metric {key!r} is not a number: {value!r}")
        return _to_float(key, scalar)

    # Other real numbers (Fraction, Decimal, ...). Strings are refused even when they parse:
    # a str metric is almost always a logging mistake, not a number.
    if isinstance(value, numbers.Real) or (
        hasattr(type(value), "__float__")
        and not isinstance(value, (str, bytes, bytearray, complex))
    ):
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidArgument(f"metric {key!r} is not a number: {value!r}") from exc

    raise InvalidArgument(f"metric {key!r} must be a number, got {type(value).__name__}")


def normalize_metrics(metrics: Mapping[str, object] | None) -> dict[str, float]:
    """``metrics`` as a plain ``dict[str, float]``, ready to be written to a manifest.

    Accepts Python ints, floats and bools (``True`` becomes ``1.0``: refusing them would make a
    save fail over a logging detail), other real numbers, and single-element array values such
    as 0-dim torch tensors, NumPy scalars and 0-d arrays (read with ``.item()``; torch and NumPy
    are never imported). NaN and infinities are kept: they are facts, and ranking ignores them.

    Raises InvalidArgument naming the key for a key that is not a str, a non-numeric value
    (including strings and complex numbers), or a multi-element tensor or array. None gives
    an empty dict. The input is not modified.
    """
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise InvalidArgument(f"metrics must be a mapping of str to number, got {metrics!r}")
    normalized: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise InvalidArgument(f"metric names must be str, got {key!r}")
        normalized[key] = _to_float(key, value)
    return normalized
