"""Lists of another length than the saved one, through the "dcp" format.

DCP saves a list item by item (``lst.0``, ``lst.1.x``), unless it holds only plain values, and
loads into the given state's items the saved ones it finds: a list of another length would load
the items both have and report the rest one by one. "torch" loads none of such a list and
reports it once (``lst[len 3 != 2]``); these functions make "dcp" do the same: the check finds
such lists (:func:`lists_of_other_length`) and reports them (:func:`report_list_lengths`), and
the read loads the saved list apart (:func:`with_saved_lists`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata

from distckpt.formats.dcp_storage import Path_, dotted, placeholder
from distckpt.formats.dcp_text_keys import flattened_whole
from distckpt.load_report import LoadReport, list_length_key
from distckpt.state import set_path

__all__ = ["lists_of_other_length", "report_list_lengths", "with_saved_lists"]


def lists_of_other_length(shared: Any, saved_keys: Iterable[str]) -> list[tuple[Path_, int, int]]:
    """Each list of ``shared`` (the state as the read asks for it) that DCP saves item by item
    (:func:`~distckpt.formats.dcp_text_keys.flattened_whole`), or an empty one, whose saved
    items (``saved_keys``: DCP's flat keys, ``lst.0``, ``lst.1.x``) number another count, as
    (its place, its length, the saved length), outermost first. A list the checkpoint holds
    no item of is none of these: its keys are missing as they are. "torch" loads none of such
    a list, and DCP would load the items both have: :func:`with_saved_lists` keeps it apart."""
    counts: dict[str, int] = {}
    for key in saved_keys:
        parts = key.split(".")
        for depth in range(1, len(parts)):
            if parts[depth].isdigit():
                place = ".".join(parts[:depth])
                counts[place] = max(counts.get(place, 0), int(parts[depth]) + 1)
    found: list[tuple[Path_, int, int]] = []

    def walk(node: Any, path: Path_) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, (*path, key))
        elif isinstance(node, list) and (not node or not flattened_whole(node)):
            saved = counts.get(dotted(path))
            if saved is not None and saved != len(node):
                found.append((path, len(node), saved))
                return
            for index, item in enumerate(node):
                walk(item, (*path, index))

    walk(shared, ())
    return found


def report_list_lengths(report: LoadReport, lists: list[tuple[Path_, int, int]]) -> None:
    """Report each list of another length (:func:`lists_of_other_length`) as "torch" does, one
    missing key ``lst[len 2 != 1]`` (:func:`~distckpt.load_report.list_length_key`) where its
    first missing item was, in place of its items missing, unexpected or of another shape: a
    list's items are not keys a newer version adds, so ``optional_keys`` covers none of them."""
    for path, given, saved in lists:
        place = dotted(path)

        def under(key: str, place: str = place) -> bool:
            return key == place or key.startswith(f"{place}.")

        length_key = list_length_key(place, given, saved)
        items = [index for index, key in enumerate(report.missing_keys) if under(key)]
        kept = [key for key in report.missing_keys if not under(key)]
        kept.insert(items[0] if items else len(kept), length_key)
        report.missing_keys = kept
        report.unexpected_keys = [key for key in report.unexpected_keys if not under(key)]
        report.mismatched_shapes = [
            difference for difference in report.mismatched_shapes if not under(difference[0])
        ]


def with_saved_lists(state: Any, lists: list[tuple[Path_, int, int]], metadata: Metadata) -> None:
    """Put in ``state`` (a copy of the template's containers, as the read loads it), at the
    place of each list of another length (:func:`lists_of_other_length`), a fresh list of
    placeholders of the saved items (:func:`~distckpt.formats.dcp_storage.placeholder`): the
    read loads the saved list there, as "torch" gives it back, and none of it into the given
    list's tensors, which the restore then leaves as they are (reported as
    ``lst[len 2 != 1]``)."""
    paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    for path, _, _ in lists:
        fresh: list[Any] = []
        items = f"{dotted(path)}."
        for key, entry in metadata.state_dict_metadata.items():
            if key.startswith(items):
                saved_path = tuple(paths.get(key, key.split(".")))
                set_path(fresh, saved_path[len(path) :], placeholder(entry))
        set_path(state, path, fresh)
