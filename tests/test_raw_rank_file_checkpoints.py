"""Raw rank files through the manager: stateful objects restored from them, checkpoints of
format version 1 (torch.save rank files) and a torch.save file resealed into a new checkpoint
still loading, and the space a save asks for covering its rank file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import distckpt
from distckpt.formats.raw_rank_file import write_rank_file
from distckpt.formats.raw_rank_reader import is_raw_rank_file
from distckpt.manifest import FORMAT_VERSION, read_manifest
from tests.raw_rank_states import _torch_round_trip, assert_same_as, fixture_state

FIXTURE = Path(__file__).parent / "fixtures" / "torch-format-v1"


# ------------------------------------------------------------------- through the manager


def _shares(first: torch.Tensor, second: torch.Tensor) -> bool:
    return first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()


@pytest.mark.parametrize("mmap", [False, True])
def test_views_share_a_storage_after_a_restore_but_conjugate_and_negative_ones(
    tmp_path: Path, mmap: bool
) -> None:
    """As the README says: plain views of one storage share it again, as with torch.load; a
    lazy conjugate or negative view (kept by a save's detach, written as torch.save writes it)
    comes back as a tensor of its own, its values exact."""
    x = torch.randn(4, dtype=torch.complex64)
    y = torch.randn(4)
    state = {
        "x": x,
        "x_tail": x[1:],
        "x_conj": x.conj(),
        "y": y,
        "y_square": y.view(2, 2),
        "y_neg": torch._neg_view(y),
    }
    with distckpt.CheckpointManager(tmp_path / "ckpt", fsync=False) as mgr:
        mgr.save(1, state)
        restored = mgr.restore("last", mmap=mmap).state
    for key, value in state.items():
        assert torch.equal(restored[key], value), key
    assert _shares(restored["x"], restored["x_tail"])
    assert _shares(restored["y"], restored["y_square"])
    assert not _shares(restored["x"], restored["x_conj"])
    assert not _shares(restored["y"], restored["y_neg"])
    restored["x"].add_(1)  # so the conjugate view no longer follows its base
    assert torch.equal(restored["x_tail"], restored["x"][1:])
    assert not torch.equal(restored["x_conj"], restored["x"].conj())


def test_stateful_objects_restore_from_raw_rank_files(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    optim.step()
    with distckpt.CheckpointManager(tmp_path / "ckpt", fsync=False) as mgr:
        mgr.save(1, {"model": model, "optim": optim, "epoch": 2})
    step_dir = tmp_path / "ckpt" / "step-00000001"
    assert read_manifest(step_dir).format_version == FORMAT_VERSION == 2
    assert is_raw_rank_file(step_dir / "rank-00000.pt")

    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    fresh_optim = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    with distckpt.CheckpointManager(tmp_path / "ckpt", fsync=False) as mgr:
        mgr.restore("last", state={"model": fresh, "optim": fresh_optim, "epoch": 0})
    expected = _torch_round_trip({"model": model.state_dict(), "optim": optim.state_dict()})
    assert_same_as(
        {"model": fresh.state_dict(), "optim": fresh_optim.state_dict()}, expected, "restored"
    )
    exported = torch.load(distckpt.export(step_dir, tmp_path / "out.pt"), weights_only=True)
    for key, tensor in expected["model"].items():  # the manager saves plain dicts
        assert_same_as(exported["model"][key], tensor, key)
    assert distckpt.verify(step_dir).ok


@pytest.fixture
def version_1_root(tmp_path: Path) -> Path:
    root = tmp_path / "v1"
    shutil.copytree(FIXTURE, root)
    return root


def test_a_format_version_1_checkpoint_still_loads(version_1_root: Path, tmp_path: Path) -> None:
    step_dir = version_1_root / "step-00000003"
    assert read_manifest(step_dir).format_version == 1
    assert not is_raw_rank_file(step_dir / "rank-00000.pt")
    expected = fixture_state()
    expected["empty"] = torch.empty(0, 3)  # its bytes are none; the value is what counts

    assert distckpt.verify(version_1_root).ok
    assert_same_as(distckpt.load_checkpoint(step_dir).state, expected)
    exported = torch.load(distckpt.export(step_dir, tmp_path / "out.pt"), weights_only=True)
    assert_same_as(exported, expected)
    with distckpt.CheckpointManager(version_1_root, fsync=False) as mgr:
        for mmap in (False, True):
            restored = mgr.restore(3, mmap=mmap).state
            assert_same_as(restored, expected)
            assert restored["view"].untyped_storage().data_ptr() == (
                restored["base"].untyped_storage().data_ptr()
            )
        # The next save into the same root writes the new layout beside the old one.
        mgr.save(4, expected)
    assert is_raw_rank_file(version_1_root / "step-00000004" / "rank-00000.pt")
    assert_same_as(distckpt.load_checkpoint(version_1_root).state, expected)


def test_a_torch_save_file_resealed_into_a_new_checkpoint_is_read_as_one(
    tmp_path: Path,
) -> None:
    """A rank file a person replaced with ``torch.save`` output (and resealed) still loads,
    and unsafely pickled content in it is still refused."""
    from tests.hostile_cases import reseal

    with distckpt.CheckpointManager(tmp_path / "ckpt", fsync=False) as mgr:
        mgr.save(1, {"w": torch.zeros(2)})
    step_dir = tmp_path / "ckpt" / "step-00000001"
    (step_dir / "rank-00000.pt").unlink()
    torch.save({"w": torch.ones(2)}, step_dir / "rank-00000.pt")
    reseal(step_dir, "rank-00000.pt")
    assert torch.equal(distckpt.load_checkpoint(step_dir).state["w"], torch.ones(2))


@pytest.mark.parametrize(
    "sizes",
    [
        [1025] * 1000,  # 4100 bytes each: 64-byte padding only
        [(1 << 18) + 1] * 12,  # just over 1 MiB each: each padded up to a page
        [3, (1 << 20) // 4 + 7, 5, (3 << 20) // 4 + 1, 1],
    ],
    ids=["small", "just-over-a-mebibyte", "mixed"],
)
def test_the_space_estimate_covers_the_file(tmp_path: Path, sizes: list[int]) -> None:
    """What a save asks the disk to have free (before its margin) is at least the rank file
    it then writes, padding included."""
    state = {f"t{i}": torch.zeros(n) for i, n in enumerate(sizes)}
    path = tmp_path / "rank.pt"
    writer = write_rank_file(state, path, fsync=False)
    assert distckpt.formats.format_named("torch").estimate_bytes(state) >= writer.size
