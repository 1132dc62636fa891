"""One line naming an exception: how distckpt quotes an error inside its own messages."""

from __future__ import annotations


def describe_error(exc: BaseException) -> str:
    """``TypeName: first line of the message`` (or the type's name alone)."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
