"""A checkpoint file with one damaged byte: every read either loads it (the byte was one
nothing reads, or data only a checksum tells) or raises a :class:`distckpt.CheckpointError`
naming the file, and never :class:`distckpt.UnsafeCheckpoint` (which advises
``allow_pickle=True``) for a file that is merely damaged.

Each case flips one bit of a byte at a time, in a small checkpoint saved here, at positions
chosen deterministically: every byte of a "torch" rank file's header, index and skeleton, and
every few bytes of a "dcp" data file (an export costs tens of milliseconds)."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch

import distckpt
from distckpt import export
from distckpt.formats.base import ReadOptions
from distckpt.formats.raw_rank_file import HEADER
from distckpt.formats.torch_files import safe_torch_load
from tests import hostile_cases

pytestmark = pytest.mark.filterwarnings(
    # a flipped byte of a pickle's protocol opcode makes torch warn of that protocol
    "ignore:Detected pickle protocol:UserWarning"
)

STATE = {"w": torch.arange(4.0), "n": 3, "s": "hi", "nested": {"a": [1, 2.5], "t": (None, True)}}


def _saved(root: Path, fmt: str, state: dict[str, object] = STATE) -> Path:
    with distckpt.CheckpointManager(root, fsync=False, format=fmt) as mgr:
        mgr.save(1, state)
    return root / "step-00000001"


def _outcomes(file: Path, positions: Iterable[int], read: Callable[[], object]) -> set[str]:
    """What ``read()`` does with each of ``positions`` of ``file`` damaged in turn (one bit,
    which bit by the position, so all eight are flipped somewhere): "loaded" or the name of
    the CheckpointError it raised. Anything else, or an error not naming ``file``, fails."""
    original = file.read_bytes()
    seen: set[str] = set()
    # The one byte is written in place and put back, not the whole file rewritten: ext4 starts
    # writing back a file truncated and written again as soon as it is closed, which took
    # most of the time of a case's thousand reads.
    fd = os.open(file, os.O_WRONLY)
    try:
        for position in positions:
            os.pwrite(fd, bytes([original[position] ^ 1 << (position % 8)]), position)
            try:
                read()
            except distckpt.CheckpointError as exc:
                assert str(file) in str(exc), (position, exc)
                assert not isinstance(exc, distckpt.UnsafeCheckpoint), (position, exc)
                seen.add(type(exc).__name__)
            else:
                seen.add("loaded")
            finally:
                os.pwrite(fd, original[position : position + 1], position)
    finally:
        os.close(fd)
    assert file.read_bytes() == original
    return seen


def test_a_damaged_byte_of_a_torch_rank_file_is_a_corrupt_checkpoint(tmp_path: Path) -> None:
    step_dir = _saved(tmp_path / "root", "torch")
    rank_file = step_dir / "rank-00000.pt"
    header = rank_file.read_bytes()[: HEADER.size]
    _magic, _version, _reserved, index_bytes, skeleton_bytes = HEADER.unpack(header)
    end_of_skeleton = HEADER.size + index_bytes + skeleton_bytes
    seen = _outcomes(rank_file, range(end_of_skeleton), lambda: distckpt.load_checkpoint(step_dir))
    assert "CorruptCheckpoint" in seen, seen
    assert seen <= {"loaded", "CorruptCheckpoint"}, seen


def test_a_damaged_magic_is_no_torch_save_file(tmp_path: Path) -> None:
    """A rank file whose first byte changed starts like no file distckpt or torch writes:
    damaged, not a ``torch.save`` file of objects outside the allow-list."""
    step_dir = _saved(tmp_path / "root", "torch")
    rank_file = step_dir / "rank-00000.pt"
    data = bytearray(rank_file.read_bytes())
    data[0] ^= 1
    rank_file.write_bytes(bytes(data))
    with pytest.raises(distckpt.CorruptCheckpoint, match="not a distckpt rank file"):
        distckpt.load_checkpoint(step_dir)


def test_a_damaged_byte_of_a_dcp_file_is_a_corrupt_checkpoint(tmp_path: Path) -> None:
    step_dir = _saved(tmp_path / "root", "dcp")
    data_file = step_dir / "__0_0.distcp"
    out = tmp_path / "exported.pt"
    seen = _outcomes(
        data_file,
        range(0, data_file.stat().st_size, 13),
        # Unchecked: the checksum would refuse every damaged byte before DCP's reader saw it.
        lambda: export(step_dir, out, fsync=False, verify=False),
    )
    assert "CorruptCheckpoint" in seen, seen
    assert seen <= {"loaded", "CorruptCheckpoint"}, seen


def test_a_damaged_byte_of_a_dcp_metadata_file_is_refused_by_its_checksum(tmp_path: Path) -> None:
    """DCP's ``.metadata`` says where each value lies in the data files: read unchecked, a
    damaged byte of it could load values from the wrong place, or read as a pickle asking for
    an unsafe global. Its checksum is compared before it is unpickled: always damage."""
    step_dir = _saved(tmp_path / "root", "dcp", {"w": torch.arange(4.0), "v": torch.ones(2)})
    metadata_file = step_dir / ".metadata"
    size = metadata_file.stat().st_size
    seen = _outcomes(
        metadata_file,
        range(0, size, max(1, size // 16)),
        lambda: distckpt.load_checkpoint(
            step_dir, state={"w": torch.zeros(4), "v": torch.zeros(2)}
        ),
    )
    assert seen == {"CorruptCheckpoint"}, seen


def test_a_damaged_byte_of_a_whole_torch_save_file_with_allow_pickle(tmp_path: Path) -> None:
    """With ``allow_pickle=True`` torch's full unpickler reads the file: a damaged byte is still
    a CheckpointError naming the file, a damaged class name an UnimportableClass saying the
    file may be damaged, never whatever the zip reader or the unpickler raised inside."""
    step_dir = _saved(tmp_path / "root", "torch")
    rank_file = step_dir / "rank-00000.pt"
    torch.save(STATE, rank_file)
    hostile_cases.reseal(step_dir, "rank-00000.pt")
    seen = _outcomes(
        rank_file,
        range(rank_file.stat().st_size),
        lambda: distckpt.load_checkpoint(step_dir, allow_pickle=True),
    )
    assert {"CorruptCheckpoint", "UnimportableClass"} <= seen, seen
    assert seen <= {"loaded", "CorruptCheckpoint", "UnimportableClass"}, seen


class _FailsToRebuild:
    """Its own ``__setstate__`` raises AttributeError: a bug of its code, its module present."""

    def __init__(self) -> None:
        self.x = 1

    def __setstate__(self, state: dict[str, object]) -> None:
        self.x = state["x"].upper()  # type: ignore[attr-defined]


def test_an_objects_own_attribute_error_is_no_unimportable_class(tmp_path: Path) -> None:
    """An AttributeError of an object's own code while unpickling is no missing class: it is
    a CorruptCheckpoint chained to it, as the unpickler cannot tell it from damage."""
    step_dir = _saved(tmp_path / "root", "torch", {"o": _FailsToRebuild()})
    with pytest.raises(distckpt.CorruptCheckpoint, match="has no attribute 'upper'") as err:
        distckpt.load_checkpoint(step_dir, allow_pickle=True)
    assert not isinstance(err.value, distckpt.UnimportableClass)
    assert isinstance(err.value.__cause__, AttributeError)


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_a_torch_save_file_of_a_newer_pickle_protocol_is_unsafe_not_corrupt(
    tmp_path: Path, zipped: bool
) -> None:
    """A whole file, pickled with protocol 4 (which torch's weights-only unpickler does not
    read), in place of a rank file and sealed into the manifest, is no damage: it is refused
    as unsafe, with the way to opt in, and loads with ``allow_pickle=True``; so is one in
    torch's legacy format (no zip archive: the file is the pickle)."""
    step_dir = _saved(tmp_path / "root", "torch")
    torch.save(
        STATE,
        step_dir / "rank-00000.pt",
        pickle_protocol=4,
        _use_new_zipfile_serialization=zipped,
    )
    hostile_cases.reseal(step_dir, "rank-00000.pt")
    with pytest.raises(distckpt.UnsafeCheckpoint, match=r"protocol 4.*allow_pickle=True"):
        distckpt.load_checkpoint(step_dir)
    assert distckpt.load_checkpoint(step_dir, allow_pickle=True).state["s"] == "hi"


def test_a_class_that_cannot_be_imported_is_no_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole checkpoint naming a class whose module is gone when it is read (uninstalled,
    renamed) is no corrupt checkpoint, which invites deleting it: with ``allow_pickle=True``
    it is an :class:`distckpt.UnimportableClass` saying so."""
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "gone_module.py").write_text("class Gone:\n    pass\n")
    # sys.path is the only way to make a module importable for the save and then not
    monkeypatch.syspath_prepend(str(modules))
    import gone_module  # type: ignore[import-not-found]

    step_dir = _saved(tmp_path / "root", "torch", {"g": gone_module.Gone()})
    saved = io.BytesIO()
    torch.save({"g": gone_module.Gone()}, saved)
    saved_bytes = saved.getvalue()
    (modules / "gone_module.py").unlink()
    monkeypatch.delitem(sys.modules, "gone_module")
    with pytest.raises(distckpt.UnimportableClass, match="No module named 'gone_module'") as err:
        distckpt.load_checkpoint(step_dir, allow_pickle=True)
    assert not isinstance(err.value, distckpt.CorruptCheckpoint)
    assert isinstance(err.value, ImportError)
    assert err.value.path == str(step_dir / "rank-00000.pt")
    assert "or the file is damaged: run distckpt verify" in str(err.value)
    with pytest.raises(distckpt.UnsafeCheckpoint, match=r"gone_module\.Gone"):
        distckpt.load_checkpoint(step_dir)
    # bytes in memory (a "dcp" value) are no file: named in the message, no path
    with pytest.raises(distckpt.UnimportableClass, match="value 'g' names gone_module") as err:
        safe_torch_load(io.BytesIO(saved_bytes), ReadOptions(allow_pickle=True), name="value 'g'")
    assert err.value.path is None


class _RunsACommand:
    """Unpickling this runs ``true``: a global of a module torch never unpickles."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("true",))


def test_a_global_of_a_blocked_module_is_unsafe_with_the_one_way_in(tmp_path: Path) -> None:
    """``os.system`` in a rank file: no allow-list entry lets it through, so the refusal
    names it and its module and advises ``allow_pickle=True`` alone, without torch's advice."""
    step_dir = _saved(tmp_path / "root", "torch", {"x": _RunsACommand()})
    with pytest.raises(distckpt.UnsafeCheckpoint) as refused:
        distckpt.load_checkpoint(step_dir)
    message = str(refused.value)
    assert f"{os.name}.system, of the module {os.name}" in message, message
    assert message.endswith("pass allow_pickle=True"), message
    assert "add_safe_globals" not in message, message
    assert "PyTorch 2.6" not in message, message  # torch's own advice


@pytest.mark.parametrize("allow_pickle", [False, True])
def test_a_legacy_torch_save_file_loads_with_mmap(tmp_path: Path, allow_pickle: bool) -> None:
    """torch maps only a zip archive: a whole file in torch's legacy format, whole and sealed
    into the manifest, is read instead of mapped, not called corrupt."""
    step_dir = _saved(tmp_path / "root", "torch")
    torch.save(STATE, step_dir / "rank-00000.pt", _use_new_zipfile_serialization=False)
    hostile_cases.reseal(step_dir, "rank-00000.pt")
    loaded = distckpt.load_checkpoint(step_dir, mmap=True, allow_pickle=allow_pickle)
    assert torch.equal(loaded.state["w"], STATE["w"]) and loaded.state["s"] == "hi"
