"""Generated tables inside Markdown docs: the text between a start and an end marker."""

from __future__ import annotations


def extract_table(doc: str, start: str, end: str) -> str:
    """The text between the markers (without the newlines next to them)."""
    first, last = doc.index(start) + len(start), doc.index(end)
    return doc[first:last].strip("\n") + "\n"


def replace_table(doc: str, table: str, start: str, end: str) -> str:
    """``doc`` with the text between the markers replaced by ``table``."""
    first, last = doc.index(start) + len(start), doc.index(end)
    return doc[:first] + "\n" + table + doc[last:]
