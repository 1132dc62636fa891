"""Per-rank values in the "dcp" format on real gloo ranks: RNGState, a StatefulDataLoader and
values wrapped in PerRank are saved once per rank and come back to the same rank; unmarked
values are saved once (so the marks are what keeps them apart); a restore by another number of
ranks refuses them by name; and an FSDP2 job with a different dropout stream on every rank,
SIGKILLed twice and run again each time, resumes bit for bit."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo  # imported here once: FSDP2 would import it in every rank

import distckpt
from distckpt.formats.dcp import ModelOptimizerState
from distckpt.manifest import read_manifest
from tests import killing
from tests.fsdp_job import TOTAL_STEPS, UnmarkedRNG, dropout_model
from tests.ranks import run_ranks, values
from tests.test_dcp import fsdp

TIMEOUT = 90.0
FSDP_JOB = "tests/fsdp_job.py"


def make_loader(rank: int) -> Any:
    from torchdata.stateful_dataloader import StatefulDataLoader

    data = list(range(100 * rank, 100 * rank + 12))  # every rank reads its own data
    return StatefulDataLoader(
        data, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(7)
    )


# ------------------------------------------------------------------ each rank gets its own back


def _save_then_restore(rank: int, world_size: int, root: str, marked: bool) -> dict[str, Any]:
    def mark(value: Any) -> Any:
        return distckpt.PerRank(value) if marked else value

    torch.manual_seed(1000 + rank)  # a different random stream on every rank
    loader = make_loader(rank)
    batches = iter(loader)
    next(batches), next(batches)
    state = {
        "shared": torch.arange(4.0),
        "seen": mark(torch.full((3,), float(rank))),
        "rank_no": mark(rank * 10),
        "rng": distckpt.RNGState() if marked else UnmarkedRNG(),
        "loader": loader,
    }
    with distckpt.CheckpointManager(root, format="dcp", fsync=False, timeout=30) as mgr:
        mgr.save(1, state)
        expected_draw = torch.rand(3)
        expected_batch = next(batches).tolist()

        torch.manual_seed(0)  # the same on every rank: a restored stream must undo this
        fresh_loader = make_loader(rank)
        template = {
            "shared": torch.zeros(4),
            "seen": mark(torch.zeros(3)),
            "rank_no": mark(-1),
            "rng": distckpt.RNGState() if marked else UnmarkedRNG(),
            "loader": fresh_loader,
        }
        ckpt = mgr.restore("last", state=template)
        return {
            "shared": template["shared"].tolist(),
            "seen": (template["seen"].value if marked else template["seen"]).tolist(),
            "rank_no": ckpt.state["rank_no"],
            "draw": torch.equal(torch.rand(3), expected_draw),
            "batch": next(iter(fresh_loader)).tolist() == expected_batch,
            "missing": ckpt.missing_keys,
        }


def test_per_rank_values_come_back_to_their_own_rank(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    out = values(run_ranks(_save_then_restore, 2, str(root), True, timeout=TIMEOUT))
    for rank, result in enumerate(out):
        assert result["shared"] == [0.0, 1.0, 2.0, 3.0]
        assert result["seen"] == [float(rank)] * 3, result
        assert result["rank_no"] == rank * 10
        assert result["draw"] and result["batch"], result
        assert result["missing"] == ()
    step_dir = root / "step-00000001"
    manifest = read_manifest(step_dir)
    # Nothing beyond DCP's own files: each rank's copies are in its own .distcp file...
    assert set(manifest.files) == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    with open(step_dir / ".metadata", "rb") as file:
        keys = set(pickle.load(file).state_dict_metadata)  # our own file, written just above
    for rank in range(2):
        assert f"__per_rank__.{rank}.rank_no" in keys
        assert f"__per_rank__.{rank}.rng.torch" in keys
        assert any(key.startswith(f"__per_rank__.{rank}.loader.") for key in keys)
    assert "rank_no" not in keys and "shared" in keys
    # ...so verify checks them, and export has every rank's, by rank.
    assert distckpt.verify(root).ok
    exported = torch.load(distckpt.export(step_dir, tmp_path / "out.pt"), weights_only=True)
    assert [exported["__per_rank__"][str(r)]["rank_no"] for r in range(2)] == [0, 10]
    assert exported["__per_rank__"]["1"]["seen"].tolist() == [1.0] * 3


def test_unmarked_values_are_saved_once_for_all_ranks(tmp_path: Path) -> None:
    """The counterpart: without the marks, DCP keeps one rank's copy of each value."""
    out = values(run_ranks(_save_then_restore, 2, str(tmp_path / "ckpt"), False, timeout=TIMEOUT))
    assert out[0]["rank_no"] == out[1]["rank_no"]
    assert out[0]["seen"] == out[1]["seen"]
    assert not (out[0]["draw"] and out[1]["draw"])  # one rank got the other's random stream


# ------------------------------------------------------------------ inside lists and tuples


def _items_marked(rank: int, value: Any) -> dict[str, Any]:
    """Per-rank values as items of a list of plain values (which DCP pickles whole) and of
    tuples (which it always pickles whole; a restore cannot assign into them)."""
    return {
        "w": torch.arange(3.0),
        "listed": [distckpt.PerRank(value), 5],
        "paired": (distckpt.PerRank(value), "tag"),
        "extras": (distckpt.RNGState(), "tag"),
    }


def _save_restore_items(rank: int, world_size: int, root: str, fmt: str) -> dict[str, Any]:
    torch.manual_seed(rank)
    with distckpt.CheckpointManager(root, format=fmt, fsync=False, timeout=30) as mgr:
        mgr.save(1, _items_marked(rank, rank * 10))
        expected_draw = torch.rand(2)
        torch.manual_seed(123)  # the same on every rank: the restored stream must undo this
        template = _items_marked(rank, -1)
        ckpt = mgr.restore("last", state=template)
        return {
            "listed": [ckpt.state["listed"], template["listed"][0].value],
            "paired": [ckpt.state["paired"], template["paired"][0].value],
            "draw": torch.equal(torch.rand(2), expected_draw),
            "missing": ckpt.missing_keys,
        }


@pytest.mark.parametrize("fmt", ["dcp", "torch"])
def test_per_rank_items_of_lists_and_tuples_come_back(tmp_path: Path, fmt: str) -> None:
    """A strict restore finds a per-rank item of a list DCP saved whole (no key of its own),
    and puts one back into a tuple, which it rebuilds."""
    out = values(run_ranks(_save_restore_items, 2, str(tmp_path / "ckpt"), fmt, timeout=TIMEOUT))
    for rank, result in enumerate(out):
        assert result["listed"] == [[rank * 10, 5], rank * 10], result
        assert result["paired"] == [(rank * 10, "tag"), rank * 10], result
        assert result["draw"] and result["missing"] == (), result


# ------------------------------------------------------------------ another number of ranks


def _save_two(rank: int, world_size: int, root: str) -> None:
    with distckpt.CheckpointManager(root, format="dcp", fsync=False, timeout=30) as mgr:
        mgr.save(
            1, {"w": torch.arange(3.0), "rng": distckpt.RNGState(), "n": distckpt.PerRank(rank)}
        )


def _restore_one(rank: int, world_size: int, root: str) -> dict[str, Any]:
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("distckpt").addHandler(handler)
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, format="dcp", timeout=30) as mgr:
        template = {"w": torch.zeros(3), "rng": distckpt.RNGState(), "n": distckpt.PerRank(-1)}
        try:
            mgr.restore("last", state=template)
        except distckpt.WorldSizeMismatch as exc:
            out["error"] = str(exc)
        w = torch.zeros(3)
        mgr.restore("last", state={"w": w})  # without them, the rest restores
    out["w"] = w.tolist()
    out["logged"] = records
    return out


def test_per_rank_values_are_refused_by_name_on_another_world_size(tmp_path: Path) -> None:
    root = str(tmp_path / "ckpt")
    values(run_ranks(_save_two, 2, root, timeout=TIMEOUT))
    (out,) = values(run_ranks(_restore_one, 1, root, timeout=TIMEOUT))
    assert "error" in out, out
    assert "rng, n" in out["error"] and "saved by 2 ranks" in out["error"]
    assert out["w"] == [0.0, 1.0, 2.0]
    # What it did not ask for is named in the log, not dropped without a word.
    notes = [line for line in out["logged"] if "per-rank values" in line]
    assert len(notes) == 1 and "rank 0: n, rng; rank 1: n, rng" in notes[0], out["logged"]


def _save_with_one_marked(rank: int, world_size: int, root: str) -> None:
    with distckpt.CheckpointManager(root, format="dcp", fsync=False, timeout=30) as mgr:
        mgr.save(1, {"w": torch.arange(3.0), "n": distckpt.PerRank(rank)})


def _restore_one_with_added(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """Restores with an RNGState the save did not have, as a newer version of a job adds one."""
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, format="dcp", timeout=30) as mgr:
        for name, kwargs in [
            ("optional", {"optional_keys": ["rng"]}),
            ("lenient", {"strict": False}),
            ("strict", {}),
        ]:
            w = torch.zeros(3)
            try:
                ckpt = mgr.restore("last", state={"w": w, "rng": distckpt.RNGState()}, **kwargs)
                out[name] = (w.tolist(), ckpt.missing_keys)
            except distckpt.CheckpointError as exc:
                out[name] = (type(exc).__name__, str(exc))
        try:
            state = {"w": torch.zeros(3), "n": distckpt.PerRank(-1), "rng": distckpt.RNGState()}
            mgr.restore("last", state=state, optional_keys=["rng"])
        except distckpt.WorldSizeMismatch as exc:
            out["held"] = str(exc)
    return out


def test_per_rank_values_the_checkpoint_lacks_are_missing_on_another_world_size(
    tmp_path: Path,
) -> None:
    """Refused for another world size are only the per-rank values the checkpoint holds per
    rank; one it holds nothing of is an ordinary missing key, which optional_keys or
    strict=False let through."""
    root = str(tmp_path / "ckpt")
    values(run_ranks(_save_with_one_marked, 2, root, timeout=TIMEOUT))
    (out,) = values(run_ranks(_restore_one_with_added, 1, root, timeout=TIMEOUT))
    assert out["optional"] == ([0.0, 1.0, 2.0], ("rng",)), out
    assert out["lenient"] == ([0.0, 1.0, 2.0], ("rng",)), out
    assert out["strict"][0] == "KeyMismatch" and "['rng']" in out["strict"][1], out
    assert out["held"].endswith(
        "cannot be resharded to 1 ranks: n. Restore with 2 ranks, or leave these keys out of "
        "state= to restore everything else (they then start afresh on every rank)"
    ), out


# ------------------------------------------------------------------ async saves


def _async_per_rank(rank: int, world_size: int, root: str) -> list[float]:
    seen = torch.full((2,), float(rank))
    with distckpt.CheckpointManager(root, format="dcp", async_save=True, timeout=30) as mgr:
        mgr.save(1, {"seen": distckpt.PerRank(seen)})
        seen.fill_(99.0)  # after save returns: must not reach the checkpoint
        mgr.wait()
        into = torch.zeros(2)
        mgr.restore("last", state={"seen": distckpt.PerRank(into)})
    return into.tolist()


def test_async_save_snapshots_per_rank_values(tmp_path: Path) -> None:
    out = values(run_ranks(_async_per_rank, 2, str(tmp_path / "ckpt"), timeout=TIMEOUT))
    assert out == [[0.0, 0.0], [1.0, 1.0]]


def test_per_rank_values_in_the_torch_format_are_plain(tmp_path: Path) -> None:
    with distckpt.CheckpointManager(tmp_path / "ckpt", fsync=False) as mgr:
        mgr.save(1, {"n": distckpt.PerRank(5), "t": distckpt.PerRank(torch.ones(2))})
    # The rank file holds plain values, no mark: it loads with weights_only, marks unknown.
    exported = distckpt.export(tmp_path / "ckpt" / "last", tmp_path / "rank0.pt")
    plain = torch.load(exported, weights_only=True)
    assert plain["n"] == 5 and torch.equal(plain["t"], torch.ones(2))
    into = torch.zeros(2)
    ckpt = distckpt.load_checkpoint(
        tmp_path / "ckpt", state={"n": distckpt.PerRank(0), "t": distckpt.PerRank(into)}
    )
    assert ckpt.state["n"] == 5 and torch.equal(into, torch.ones(2))


def _mark_sharded(rank: int, world_size: int, root: str) -> str:
    model = fsdp(dropout_model(), world_size)
    with distckpt.CheckpointManager(root, format="dcp", fsync=False, timeout=30) as mgr:
        try:
            mgr.save(1, {"app": distckpt.PerRank(ModelOptimizerState(model))})
        except distckpt.InvalidArgument as exc:
            return str(exc)
    return "no error"


def test_dtensors_marked_per_rank_are_refused(tmp_path: Path) -> None:
    out = values(run_ranks(_mark_sharded, 2, str(tmp_path / "ckpt"), timeout=TIMEOUT))
    assert all("app: marked per rank but holds DTensors" in message for message in out), out
    assert not list((tmp_path / "ckpt").glob("step-*"))


def test_the_per_rank_namespace_is_reserved(tmp_path: Path) -> None:
    with (
        distckpt.CheckpointManager(tmp_path / "ckpt", format="dcp", fsync=False) as mgr,
        pytest.raises(distckpt.InvalidArgument, match="__per_rank__"),
    ):
        mgr.save(1, {"__per_rank__": 1})


# ------------------------------------------------------------------ FSDP2 with dropout, killed


def test_fsdp2_with_per_rank_dropout_killed_twice_resumes_bit_exactly(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``tests/fsdp_job.py`` (FSDP2, "dcp", a dropout stream per rank), SIGKILLed (every rank)
    twice at seeded moments of the first third of its run, each time run again with the same
    command: every step's loss on every rank and the final full parameters, optimizer and RNG
    states equal the uninterrupted run's."""
    reference = killing.shared_reference(tmp_path_factory, "fsdp", FSDP_JOB)
    assert killing.losses(reference, 0) != killing.losses(reference, 1)  # streams differ
    out = tmp_path / "resumed"
    out.mkdir()
    command = [FSDP_JOB, str(tmp_path / "root"), str(out)]
    moments = killing.kill_moments(1, 2, 3, TOTAL_STEPS // 3)
    assert killing.run_killed(command, out, moments) == 2
    killing.assert_same_run(reference, out, 2)


def test_fsdp2_with_unmarked_rng_killed_does_not_resume_exactly(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The counterpart: RNGs in a Stateful value distckpt does not know to be per rank are
    saved once for both ranks, and after a resume one rank draws the other's dropout masks."""
    reference = killing.shared_reference(tmp_path_factory, "fsdp", FSDP_JOB)
    out = tmp_path / "resumed"
    out.mkdir()
    command = [FSDP_JOB, str(tmp_path / "root"), str(out), "--rng", "unmarked"]
    assert killing.run_killed(command, out, [7]) == 1  # past the save of step 4 at least
    with pytest.raises(AssertionError, match="losses differ"):
        killing.assert_same_run(reference, out, 2)
