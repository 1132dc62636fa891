"""Lists of another length than the saved one, through the "dcp" format.

DCP saves a list item by item (``lst.0``, ``lst.1.x``), unless it holds only plain values, and
loads into the given state's items the saved ones it finds: a list of another length would load
the items both have and report the rest one by one. "torch" loads none of such a list and
reports it once (``lst[len 3 != 2]``); these functions make "dcp" do the same: the check finds
such lists (:func:`lists_of_other_length`) and reports them (:func:`report_list_lengths`), and
the read loads the saved list apart (:func:`with_saved_lists`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from distckpt.formats.dcp_storage import Path_, dotted, flat_state, placeholder, saved_paths
from distckpt.formats.dcp_text_keys import flattened_whole, get_saved, keys_like
from distckpt.load_report import LoadReport, list_length_key
from distckpt.state import set_path

__all__ = ["lists_of_other_length", "report_list_lengths", "with_saved_lists"]

#: a list of another length: its place in the given state, its length, and the saved length
#: (None when the checkpoint holds the list as one value, whose length only reading it tells)
OtherLength = tuple[Path_, int, int | None]


def lists_of_other_length(shared: Any, metadata: Metadata) -> list[OtherLength]:
    """Each list of ``shared`` (the state as the read asks for it) that DCP saves item by item
    (:func:`~distckpt.formats.dcp_text_keys.flattened_whole`), or an empty one, saved with
    another length (:data:`OtherLength`), outermost first. The saved items are found by their
    places (``metadata.planner_data``: list indices are ints there), so a dict key that reads
    like an item (``"hist.5"`` beside a list ``hist``) is none. DCP writes no key for an empty
    dict (nor for a dict whose values are all per-rank, moved elsewhere), so the saved length
    counts up to the last item holding a key: the lengths differ when the saved places hold an
    item at or after the given length, or when the given list has an item at or after that
    count that DCP would give a key. A single value (no tensor) saved at the place of a list
    the state gives item by item is the list (DCP saves an empty list, or one of plain
    values, whole). A list the checkpoint holds nothing of is none of these: its keys are
    missing as they are. "torch" loads none of such a list, and DCP would load the items both
    have:
    :func:`with_saved_lists` keeps it apart."""
    places = saved_paths(metadata)
    entries = metadata.state_dict_metadata.values()
    # a tensor saved where a list is given is another kind of value, not the list
    whole = {
        place
        for place, entry in zip(places, entries)
        if not isinstance(entry, TensorStorageMetadata)
    }
    counts: dict[Path_, int] = {}
    for place in places:
        for depth, part in enumerate(place):
            if depth and isinstance(part, int):
                counts[place[:depth]] = max(counts.get(place[:depth], 0), part + 1)
    found: list[OtherLength] = []

    def walk(node: Any, path: Path_, saved_path: Path_) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                # DCP records a dict's keys as their text
                walk(value, (*path, key), (*saved_path, str(key)))
        elif isinstance(node, list) and (not node or not flattened_whole(node)):
            if node and saved_path in whole:
                found.append((path, len(node), None))
                return
            saved = counts.get(saved_path)
            if saved is not None and (
                saved > len(node) or any(flat_state({"item": item}) for item in node[saved:])
            ):
                found.append((path, len(node), saved))
                return
            for index, item in enumerate(node):
                walk(item, (*path, index), (*saved_path, index))

    walk(shared, (), ())
    return found


def report_list_lengths(
    report: LoadReport,
    lists: list[OtherLength],
    read_saved: Callable[[list[str]], Mapping[str, Any]] | None,
) -> None:
    """Report each list of another length (:func:`lists_of_other_length`) as "torch" does, one
    missing key ``lst[len 2 != 1]`` (:func:`~distckpt.load_report.list_length_key`) where its
    first missing item was, in place of its items missing, unexpected or of another shape: a
    list's items are not keys a newer version adds, so ``optional_keys`` covers none of them.
    The length of a list saved as one value is read with ``read_saved`` (flat keys to saved
    values); one of the given length (plain values given as tensors or containers), or one
    not read (no ``read_saved``), keeps its keys reported as they are."""
    whole = [dotted(path) for path, _, saved in lists if saved is None]
    values = read_saved(whole) if whole and read_saved is not None else {}
    for path, given, saved in lists:
        place = dotted(path)
        if saved is None:
            value = values.get(place)
            if not isinstance(value, list) or len(value) == given:
                continue
            saved = len(value)

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


def with_saved_lists(state: Any, lists: list[OtherLength], metadata: Metadata) -> None:
    """Put in ``state`` (a copy of the template's containers, as the read loads it), at the
    place of each list of another length (:func:`lists_of_other_length`), a fresh list of
    placeholders of the saved items (:func:`~distckpt.formats.dcp_storage.placeholder`), its
    dicts' keys those of the given list's items where their text matches
    (:func:`~distckpt.formats.dcp_text_keys.keys_like`), or a placeholder of the list saved as
    one value: the read loads the saved list there, as "torch" gives it back, and none of it
    into the given list's tensors, which the restore then leaves as they are (reported as
    ``lst[len 2 != 1]``)."""
    entries = list(metadata.state_dict_metadata.values())
    places = saved_paths(metadata)
    for path, _, saved in lists:
        _, given = get_saved(state, path)
        saved_path = tuple(part if isinstance(part, int) else str(part) for part in path)
        fresh: Any = []
        for place, entry in zip(places, entries):
            if place == saved_path and saved is None:
                fresh = placeholder(entry)
            elif place[: len(path)] == saved_path and len(place) > len(path):
                set_path(fresh, place[len(path) :], placeholder(entry))
        set_path(state, path, keys_like(given, fresh))
