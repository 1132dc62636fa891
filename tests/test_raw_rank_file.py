"""The "torch" format's raw rank files (manifest format version 2), against torch.save/torch.load
round trips of the same states: their layout, checksum and size, what they load and map, the
unpicklers that refuse to run code, and damaged indexes and truncated files."""

from __future__ import annotations

import io
import json
import pickle
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distckpt
from distckpt.errors import CorruptCheckpoint, UnsafeCheckpoint
from distckpt.formats.base import ReadOptions
from distckpt.formats.raw_rank_file import ALIGNMENT, HEADER, MAGIC, write_rank_file
from distckpt.formats.raw_rank_reader import load_rank_file, read_index
from distckpt.formats.torch_files import load_skeleton, plain_values_of
from distckpt.memory import DIRECT_ALIGNMENT, DIRECT_MIN_BYTES
from distckpt.state_sizes import local_tensors
from tests.raw_rank_states import _torch_round_trip, assert_same_as, fixture_state

#: A checkpoint of manifest format version 2 whose rank file is in layout 1 (every storage at a
#: multiple of 64), as distckpt 0.1.0 wrote it: :func:`fixture_state` and ``"large"``, 3000
#: float32 from 0 (``torch.arange``), saved with ``CheckpointManager(root, fsync=False)``.
LAYOUT_1_FIXTURE = Path(__file__).parent / "fixtures" / "torch-layout-1"

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.complex64,
    torch.complex128,
]


def _load(path: Path, **options: Any) -> Any:
    return load_rank_file(path, ReadOptions(**options), load_skeleton)


def _tensor_of(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype, generator=generator)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(0, 100, shape, generator=generator).to(dtype)


def _views_of(base: torch.Tensor) -> list[torch.Tensor]:
    """Views sharing ``base``'s storage: non-contiguous, offset, 0-dim, empty, stride 0."""
    views = [base.view(-1)]
    if base.dim() >= 2:
        views.append(base.t() if base.dim() == 2 else base.transpose(0, -1))
    if base.numel() >= 2:
        flat = base.view(-1)
        views += [flat[1:], flat[::2], flat[1], flat[1:1], flat[:1].expand(3)]
    return views


@st.composite
def tensors(draw: st.DrawFn) -> list[torch.Tensor]:
    """A tensor of any dtype and shape (0-dim and empty included), sometimes with views."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    base = _tensor_of(dtype, shape, draw(st.integers(0, 1000)))
    views = _views_of(base)
    chosen = draw(st.lists(st.sampled_from(range(len(views))), max_size=3, unique=True))
    return [base] + [views[i] for i in chosen]


plain_values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False), st.text()
)


@st.composite
def states(draw: st.DrawFn) -> Any:
    """Nested dicts (plain and ordered), lists and tuples of tensors (views of one storage
    spread over the tree) and plain values."""
    leaves = [t for group in draw(st.lists(tensors(), max_size=4)) for t in group]
    leaves += draw(st.lists(plain_values, max_size=3))
    leaves = draw(st.permutations(leaves))

    def nest(items: list[Any], depth: int) -> Any:
        kind = draw(st.sampled_from(["dict", "ordered", "list", "tuple"]))
        if depth < 2 and len(items) > 2 and draw(st.booleans()):
            middle = len(items) // 2
            items = [*items[:middle], nest(items[middle:], depth + 1)]
        if kind == "list":
            return list(items)
        if kind == "tuple":
            return tuple(items)
        pairs = [(f"k{i}" if i % 2 else i, item) for i, item in enumerate(items)]
        return dict(pairs) if kind == "dict" else OrderedDict(pairs)

    return {"state": nest(leaves, 0), "step": draw(st.integers(0, 10**6))}


def assert_same_sharing(loaded: Any, expected: Any) -> None:
    """Two tensors share a storage in ``loaded`` exactly where they do in ``expected``."""
    ours = [t.untyped_storage().data_ptr() for t in local_tensors(loaded)]
    theirs = [t.untyped_storage().data_ptr() for t in local_tensors(expected)]
    for i in range(len(theirs)):
        for j in range(i):
            if theirs[i] and theirs[j]:  # an empty storage has no address to compare
                assert (ours[i] == ours[j]) == (theirs[i] == theirs[j]), (i, j)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(state=states())
def test_a_raw_rank_file_loads_what_torch_load_loads(tmp_path: Path, state: Any) -> None:
    path = tmp_path / "rank.pt"
    path.unlink(missing_ok=True)
    write_rank_file(state, path, fsync=False)
    expected = _torch_round_trip(state)
    for mmap in (False, True):
        loaded = _load(path, mmap=mmap)
        assert_same_as(loaded, expected)
        assert_same_sharing(loaded, expected)


def test_the_checksum_and_size_cover_every_byte_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "rank.pt"
    writer = write_rank_file({"w": torch.randn(1000), "n": 3}, path, fsync=True)
    assert writer.size == path.stat().st_size
    assert writer.checksum == distckpt.checksums.file_checksum(path)


def test_tensor_bytes_lie_raw_and_aligned_where_the_index_says(tmp_path: Path) -> None:
    """Layout 2: the data starts on a page, a storage of at least 1 MiB starts on one (one of
    exactly 1 MiB too, after a storage that ends off a page), a smaller one at a multiple of 64
    (a page-sized one too: it gains nothing from a page of its own), and the data ends at
    one."""
    path = tmp_path / "rank.pt"
    state = {
        "a": torch.ones(3, dtype=torch.int8),
        "w": torch.arange(10, dtype=torch.float64),
        "page": torch.arange(1024, dtype=torch.float32),  # exactly a page
        "b": torch.ones(5, dtype=torch.int16),
        "mib": torch.arange(DIRECT_MIN_BYTES // 4, dtype=torch.int32),  # exactly 1 MiB
        "odd": torch.arange(1500, dtype=torch.float64),  # 12000 bytes: pages and a part
        "large": torch.arange(300_000, dtype=torch.float32),  # 1.14 MiB: on a page
        "c": torch.ones(1, dtype=torch.int8),
    }
    write_rank_file(state, path, fsync=False)
    raw = path.read_bytes()
    assert raw.startswith(b"DCKPTRAW") and HEADER.size == 32 and HEADER.format.startswith("<")
    assert HEADER.unpack(raw[: HEADER.size])[1] == 2
    with open(path, "rb", buffering=0) as file:
        index = read_index(file, "rank.pt")
    assert index.data_start % DIRECT_ALIGNMENT == 0
    for entry, tensor in zip(index.tensors, state.values()):
        offset, nbytes = index.storages[entry.storage]
        start = index.data_start + offset
        assert nbytes == tensor.numel() * tensor.element_size()
        assert start % (DIRECT_ALIGNMENT if nbytes >= DIRECT_MIN_BYTES else ALIGNMENT) == 0
        assert raw[start : start + nbytes] == tensor.numpy().tobytes()
    last_offset, _ = index.storages[-1]
    assert len(raw) == index.data_start + last_offset + ALIGNMENT  # one byte, padded to 64
    for mmap in (False, True):
        assert_same_as(_load(path, mmap=mmap), state)


def test_a_rank_file_of_layout_1_still_loads_maps_and_verifies(tmp_path: Path) -> None:
    """Rank files written before layout 2 (storages at multiples of 64 only) load, read or
    mapped, and verify; the reader gathers their small storages across 64-byte gaps."""
    root = tmp_path / "layout-1"
    shutil.copytree(LAYOUT_1_FIXTURE, root)
    step_dir = root / "step-00000003"
    rank_file = step_dir / "rank-00000.pt"
    assert HEADER.unpack(rank_file.read_bytes()[: HEADER.size])[1] == 1
    with open(rank_file, "rb", buffering=0) as file:
        index = read_index(file, "rank.pt")
    assert index.data_start % ALIGNMENT == 0 and index.data_start % DIRECT_ALIGNMENT != 0
    expected = fixture_state()
    expected["empty"] = torch.empty(0, 3)
    expected["large"] = torch.arange(3000, dtype=torch.float32)
    assert distckpt.verify(root).ok
    for mmap in (False, True):
        loaded = distckpt.load_checkpoint(step_dir, mmap=mmap).state
        assert_same_as(loaded, expected)
        assert loaded["view"].untyped_storage().data_ptr() == (
            loaded["base"].untyped_storage().data_ptr()
        )


@pytest.mark.parametrize("version", [0, 3])
def test_a_rank_file_of_an_unknown_layout_is_a_corrupt_checkpoint(
    tmp_path: Path, version: int
) -> None:
    path = tmp_path / "rank.pt"
    write_rank_file({"w": torch.randn(4)}, path, fsync=False)
    raw = bytearray(path.read_bytes())
    magic, _, reserved, index_bytes, skeleton_bytes = HEADER.unpack(raw[: HEADER.size])
    raw[: HEADER.size] = HEADER.pack(magic, version, reserved, index_bytes, skeleton_bytes)
    path.write_bytes(raw)
    with pytest.raises(CorruptCheckpoint, match=rf"rank\.pt: rank-file layout {version}"):
        _load(path)


def test_one_tensor_object_met_twice_loads_as_one_object(tmp_path: Path) -> None:
    weights = torch.randn(4)
    path = tmp_path / "rank.pt"
    write_rank_file({"a": weights, "b": [weights], "c": (weights, 1)}, path, fsync=False)
    loaded = _load(path)
    assert loaded["a"] is loaded["b"][0] is loaded["c"][0]


def test_tensors_the_layout_does_not_describe_stay_in_the_skeleton(tmp_path: Path) -> None:
    """Parameters, tensors needing grad, lazily conjugated ones: as torch.save writes them."""
    state = {
        "param": torch.nn.Parameter(torch.randn(3)),
        "grad": torch.randn(2, requires_grad=True),
        "conj": torch.randn(2, dtype=torch.complex64).conj(),
        "plain": torch.randn(2),
    }
    path = tmp_path / "rank.pt"
    write_rank_file(state, path, fsync=False)
    loaded = _load(path)
    expected = _torch_round_trip(state)
    assert type(loaded["param"]) is torch.nn.Parameter
    assert loaded["grad"].requires_grad and loaded["conj"].is_conj()
    for key in state:
        assert torch.equal(loaded[key].detach(), expected[key].detach()), key


class TaggedList(list[object]):
    """A subclass of list: a class of the user's, which the layout does not take apart."""


def test_a_subclass_of_list_stays_in_the_skeleton_as_its_own_class(tmp_path: Path) -> None:
    """Only a plain dict, OrderedDict, list or tuple (or named tuple) is taken apart: a
    subclass of one is pickled as it is, its tensors with it, and loads as its own class."""
    weights = torch.randn(3)
    path = tmp_path / "rank.pt"
    write_rank_file({"tagged": TaggedList([weights, 1])}, path, fsync=False)
    loaded = _load(path, allow_pickle=True)["tagged"]
    assert type(loaded) is TaggedList
    assert torch.equal(loaded[0], weights) and loaded[1] == 1


def test_map_location_places_raw_tensors_as_torch_load_does(tmp_path: Path) -> None:
    path = tmp_path / "rank.pt"
    write_rank_file({"w": torch.randn(3), "v": torch.randn(3)[1:]}, path, fsync=False)
    loaded = _load(path, map_location="meta")
    assert loaded["w"].device.type == "meta" and loaded["v"].storage_offset() == 1


def test_mmap_maps_the_file_instead_of_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "rank.pt"
    write_rank_file({"w": torch.randn(1 << 16)}, path, fsync=False)
    loaded = _load(path, mmap=True)
    maps = Path("/proc/self/maps").read_text()
    assert str(path) in maps
    loaded["w"].add_(1)  # private mapping: the file keeps what was saved
    assert not torch.equal(_load(path)["w"], loaded["w"])


class Opaque:
    def __init__(self, value: int) -> None:
        self.value = value


def test_objects_outside_the_allow_list_are_refused_before_any_tensor_is_read(
    tmp_path: Path,
) -> None:
    path = tmp_path / "rank.pt"
    write_rank_file({"w": torch.randn(4 << 20), "obj": Opaque(7)}, path, fsync=False)
    read_before = _bytes_read()
    with pytest.raises(UnsafeCheckpoint, match=r"rank\.pt.*Opaque.*allow_pickle=True"):
        _load(path)
    assert _bytes_read() - read_before < 1 << 20  # of a 16 MiB file
    assert _load(path, allow_pickle=True)["obj"].value == 7


def test_a_skeleton_that_would_run_code_is_refused_and_runs_none(tmp_path: Path) -> None:
    from tests.hostile_cases import Exploit

    marker = tmp_path / "PWNED"
    path = tmp_path / "rank.pt"
    write_rank_file({"w": torch.randn(4), "evil": Exploit(marker)}, path, fsync=False)
    with pytest.raises(UnsafeCheckpoint, match="allow_pickle=True"):
        _load(path)
    assert not marker.exists()


def _saved(value: Any) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return buffer


def test_a_skeleton_of_plain_values_loads_as_torch_load_loads_it() -> None:
    plain = ({"a": [0], "b": ([1], "x", 2.5, None, True, -(2**70)), "c": {3: [2]}}, [[0], [1]])
    assert plain_values_of(_saved(plain)) == torch.load(_saved(plain), weights_only=True)
    loaded = load_skeleton(_saved(plain), ReadOptions(), "rank.pt")
    assert loaded == plain and loaded[0]["a"] is not loaded[1][0]


def test_the_plain_values_unpickler_refuses_every_other_class_and_runs_nothing(
    tmp_path: Path,
) -> None:
    from tests.hostile_cases import Exploit

    marker = tmp_path / "PWNED"
    for value in (Exploit(marker), torch.ones(2), torch.float32):
        with pytest.raises(pickle.UnpicklingError, match="not a plain value"):
            plain_values_of(_saved(value))
    assert not marker.exists()


def test_the_plain_values_unpickler_takes_an_ordered_dict_with_its_metadata() -> None:
    """A module's ``state_dict()``, as torch's weights-only unpickler takes it."""
    saved = torch.nn.BatchNorm1d(2).state_dict()
    skeleton = OrderedDict((key, index) for index, key in enumerate(saved))
    skeleton._metadata = saved._metadata  # type: ignore[attr-defined]
    loaded = plain_values_of(_saved(skeleton))
    assert type(loaded) is OrderedDict and list(loaded) == list(saved)
    assert loaded._metadata == saved._metadata


def test_a_skeleton_beyond_plain_values_is_left_to_torch_load(tmp_path: Path) -> None:
    from tests.hostile_cases import Exploit

    kept = {"order": OrderedDict(b=2, a=1), "grad": torch.ones(2, requires_grad=True)}
    loaded = load_skeleton(_saved(kept), ReadOptions(), "rank.pt")
    assert list(loaded["order"]) == ["b", "a"] and loaded["grad"].requires_grad
    marker = tmp_path / "PWNED"
    with pytest.raises(UnsafeCheckpoint, match=r"rank\.pt.*allow_pickle=True"):
        load_skeleton(_saved({"evil": Exploit(marker)}), ReadOptions(), "rank.pt")
    assert not marker.exists()
    with pytest.raises(CorruptCheckpoint, match=r"rank\.pt"):
        load_skeleton(io.BytesIO(b"PK\x03\x04 damaged"), ReadOptions(), "rank.pt")


def _bytes_read() -> int:
    """Bytes this process has read with read system calls so far (Linux's ``rchar``)."""
    lines = Path("/proc/self/io").read_text().splitlines()
    return next(int(line.split()[1]) for line in lines if line.startswith("rchar:"))


def _rewrite_index(path: Path, change: Any) -> None:
    """Rewrite a raw rank file with its index changed by ``change`` (the data moved along)."""
    raw = path.read_bytes()
    _, version, reserved, index_bytes, skeleton_bytes = HEADER.unpack(raw[: HEADER.size])
    with open(path, "rb", buffering=0) as file:
        data_start = read_index(file, "rank.pt").data_start
    entries = json.loads(raw[HEADER.size : HEADER.size + index_bytes])
    change(entries)
    index = json.dumps(entries).encode()
    skeleton = raw[HEADER.size + index_bytes : HEADER.size + index_bytes + skeleton_bytes]
    head = HEADER.pack(MAGIC, version, reserved, len(index), skeleton_bytes) + index + skeleton
    # the file was written in layout 2, whose data starts at a multiple of DIRECT_ALIGNMENT
    path.write_bytes(head + bytes(-len(head) % DIRECT_ALIGNMENT) + raw[data_start:])


def _one_element_past_its_storage(index: Any) -> None:
    """The first tensor (float32, one dimension) made one element longer than its storage."""
    entry = index["tensors"][0]
    entry[2] = [index["storages"][entry[0]][1] // 4 + 1]


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda index: index["tensors"][0].__setitem__(2, [1000]), id="too-large"),
        pytest.param(_one_element_past_its_storage, id="one-element-too-long"),
        pytest.param(lambda index: index["tensors"][0].__setitem__(4, -1), id="negative-offset"),
        pytest.param(lambda index: index["tensors"][0].__setitem__(0, 5), id="no-such-storage"),
        pytest.param(lambda index: index["tensors"][0].__setitem__(1, "no"), id="bad-dtype"),
        pytest.param(lambda index: index["storages"][0].__setitem__(1, 1 << 40), id="past-end"),
        pytest.param(lambda index: index["tensors"].pop(), id="placeholder-count"),
    ],
)
def test_a_damaged_index_is_a_corrupt_checkpoint(tmp_path: Path, damage: Any) -> None:
    path = tmp_path / "rank.pt"
    write_rank_file({"w": torch.randn(4), "v": torch.randn(2)}, path, fsync=False)
    _rewrite_index(path, damage)
    with pytest.raises(CorruptCheckpoint, match=r"rank\.pt"):
        _load(path)


def test_a_truncated_rank_file_is_a_corrupt_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "rank.pt"
    write_rank_file({"w": torch.randn(1000)}, path, fsync=False)
    for size in (4, HEADER.size + 3, path.stat().st_size - 8):
        path.write_bytes(path.read_bytes()[:size])
        with pytest.raises(CorruptCheckpoint, match=r"rank\.pt"):
            _load(path)
