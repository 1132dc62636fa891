"""Generated tables inside Markdown docs: the text between a start and an end marker."""

from __future__ import annotations

from pathlib import Path


def extract_table(doc: str, start: str, end: str) -> str:
    """The text between the markers (without the newlines next to them)."""
    first, last = doc.index(start) + len(start), doc.index(end)
    return doc[first:last].strip("\n") + "\n"


def replace_table(doc: str, table: str, start: str, end: str) -> str:
    """``doc`` with the text between the markers replaced by ``table``."""
    first, last = doc.index(start) + len(start), doc.index(end)
    return doc[:first] + "\n" + table + doc[last:]


def write_table(doc_path: Path, table: str, start: str, end: str, *, what: str) -> None:
    """Put ``table`` between the markers of ``doc_path`` if it changed; say which it was."""
    doc = doc_path.read_text(encoding="utf-8")
    updated = replace_table(doc, table, start, end)
    if updated != doc:
        doc_path.write_text(updated, encoding="utf-8")
        print(f"updated {doc_path.name} ({what})")
    else:
        print(f"{doc_path.name} is up to date ({what})")
