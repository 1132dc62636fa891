"""``python -m distckpt``: the command line."""

from distckpt.cli import _entry

_entry()
