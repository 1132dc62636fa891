"""The "dcp" format on real gloo ranks: FSDP2 round trips, resharding, failure mid-write, and
what a restore does with the keys the checkpoint lacks. Crafted, malicious files:
``test_dcp_crafted_files.py``."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo  # imported here once: FSDP2 would import it in every rank

import distckpt
from distckpt import faults
from distckpt.checksums import file_checksum
from distckpt.errors import InvalidArgument
from distckpt.formats.dcp import ModelOptimizerState
from distckpt.formats.dcp_per_rank import split_per_rank
from distckpt.layout import MANIFEST_NAME
from distckpt.manifest import read_manifest
from tests.ranks import run_ranks, values
from tests.stateful_values import Holder

TIMEOUT = 60.0  # seconds for one multi-rank job; a hang fails the test instead of blocking it


# ------------------------------------------------------------------ shared helpers


def make_model(seed: int) -> torch.nn.Sequential:
    """A small MLP; 5 output rows do not divide by 2 or 4 ranks, so shards are uneven."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5))


def batch(step: int) -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(1000 + step))


def fsdp(model: torch.nn.Module, world_size: int) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train(model: torch.nn.Module, optim: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        optim.zero_grad()
        model(batch(step)).square().mean().backward()
        optim.step()


def full_state(model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, list[Any]]:
    """Full (unsharded) parameters and optimizer state, as lists (collective: full_tensor)."""
    state = ModelOptimizerState(model, optim).state_dict()
    out: dict[str, list[Any]] = {}
    for name, value in state["model"].items():
        out[f"model.{name}"] = value.full_tensor().tolist()
    for name, entry in state["optim"]["state"].items():
        for key, value in entry.items():
            full = value.full_tensor() if hasattr(value, "full_tensor") else value
            out[f"optim.{name}.{key}"] = full.tolist()
    return out


def dcp_checkpoint_files(step_dir: Path) -> set[str]:
    return {p.name for p in step_dir.iterdir() if p.name != MANIFEST_NAME}


# ------------------------------------------------------------------ round trip


def _round_trip(rank: int, world_size: int, root: str) -> dict[str, Any]:
    model = fsdp(make_model(0), world_size)
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    tracker = distckpt.StepTracker(optim)
    train(model, optim, range(3))
    with distckpt.CheckpointManager(root, format="dcp", timeout=30) as mgr:
        state = {"app": ModelOptimizerState(model, optim), "steps": tracker, "note": "hello"}
        saved = mgr.save(tracker.step, state)

        fresh = fsdp(make_model(1), world_size)
        fresh_optim = torch.optim.Adam(fresh.parameters(), lr=0.5)
        fresh_tracker = distckpt.StepTracker(fresh_optim)
        ckpt = mgr.restore(
            "last",
            state={
                "app": ModelOptimizerState(fresh, fresh_optim),
                "steps": fresh_tracker,
                "note": None,
            },
        )
    params_equal = all(
        torch.equal(a.to_local(), b.to_local())
        for a, b in zip(model.parameters(), fresh.parameters())
    )
    restored_steps = fresh_tracker.step
    old, new = optim.state_dict(), fresh_optim.state_dict()
    optim_equal = old["param_groups"] == new["param_groups"] and all(
        torch.equal(_local(old["state"][k][n]), _local(new["state"][k][n]))
        for k in old["state"]
        for n in old["state"][k]
    )
    # One more identical step on both: equal only if the optimizer state really came back.
    train(model, optim, range(3, 4))
    train(fresh, fresh_optim, range(3, 4))
    next_equal = all(
        torch.equal(a.to_local(), b.to_local())
        for a, b in zip(model.parameters(), fresh.parameters())
    )
    tracker.close()
    fresh_tracker.close()
    return {
        "path": str(saved.path),
        "params": params_equal,
        "optim": optim_equal,
        "next": next_equal,
        "note": ckpt.state["note"],
        "steps": restored_steps,
        "missing": ckpt.missing_keys,
    }


def _local(value: Any) -> torch.Tensor:
    return value.to_local() if hasattr(value, "to_local") else value


def test_fsdp2_round_trip_is_bit_exact_and_manifest_lists_every_file(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    out = values(run_ranks(_round_trip, 2, str(root), timeout=TIMEOUT))
    for result in out:
        assert result["params"] and result["optim"] and result["next"], result
        assert result["note"] == "hello"
        assert result["steps"] == 3
        assert result["missing"] == ()
    step_dir = Path(out[0]["path"])
    assert step_dir == root / "step-00000003"
    manifest = read_manifest(step_dir)
    assert manifest.format == "dcp" and manifest.world_size == 2
    on_disk = dcp_checkpoint_files(step_dir)
    assert on_disk == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert set(manifest.files) == on_disk
    for name, record in manifest.files.items():
        assert record.size == (step_dir / name).stat().st_size
        assert record.checksum == file_checksum(step_dir / name)
    assert manifest.files[".metadata"].rank == 0
    assert manifest.files["__0_0.distcp"].rank == 0
    assert manifest.files["__1_0.distcp"].rank == 1
    # Nothing written refers to where the checkpoint was staged.
    assert b".staging" not in (step_dir / ".metadata").read_bytes()
    assert not [p for p in (root / ".staging").iterdir() if p.is_dir()]


# ------------------------------------------------------------------ resharding


def _save_for_reshard(rank: int, world_size: int, root: str) -> dict[str, list[Any]]:
    model = fsdp(make_model(0), world_size)
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    train(model, optim, range(2))
    with distckpt.CheckpointManager(root, format="dcp", timeout=30) as mgr:
        mgr.save(2, {"app": ModelOptimizerState(model, optim)})
    return full_state(model, optim)


def _restore_for_reshard(rank: int, world_size: int, root: str) -> dict[str, list[Any]]:
    model = fsdp(make_model(7), world_size)
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    with distckpt.CheckpointManager(root, format="dcp", timeout=30) as mgr:
        mgr.restore("last", state={"app": ModelOptimizerState(model, optim)})
    return full_state(model, optim)


def _unsharded_reference() -> dict[str, torch.Tensor]:
    model = make_model(0)
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    train(model, optim, range(2))
    return {f"model.{k}": v for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("saved_by", "restored_by"), [(4, 2), (2, 4)])
def test_reshard_restores_the_same_full_tensors(
    tmp_path: Path, saved_by: int, restored_by: int
) -> None:
    root = str(tmp_path / "ckpt")
    saved = values(run_ranks(_save_for_reshard, saved_by, root, timeout=TIMEOUT))[0]
    restored = values(run_ranks(_restore_for_reshard, restored_by, root, timeout=TIMEOUT))
    assert read_manifest(tmp_path / "ckpt" / "step-00000002").world_size == saved_by
    for rank_state in restored:
        assert rank_state.keys() == saved.keys()
        for key, value in saved.items():
            # bit-exact: what was saved is what every restoring rank sees in full
            assert torch.equal(torch.tensor(rank_state[key]), torch.tensor(value)), key
    # ...and it is the unsharded model trained the same way (FSDP reduces gradients in another
    # order, so equal up to rounding).
    for key, value in _unsharded_reference().items():
        torch.testing.assert_close(torch.tensor(saved[key]), value, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ failure mid-write


def _fail_on_rank_1(rank: int, world_size: int, root: str) -> tuple[str, str]:
    model = fsdp(make_model(0), world_size)
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    train(model, optim, range(1))
    faults.arm("after_shard_write", "raise", rank=1)
    try:
        with distckpt.CheckpointManager(root, format="dcp", timeout=30) as mgr:
            try:
                mgr.save(1, {"app": ModelOptimizerState(model, optim)})
            except distckpt.CheckpointError as exc:
                return type(exc).__name__, str(exc)
            return "", "no error"
    finally:
        faults.disarm()


def test_rank_failing_mid_write_fails_every_rank_and_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    out = values(run_ranks(_fail_on_rank_1, 2, str(root), timeout=TIMEOUT))
    for error_type, message in out:
        assert error_type, message
        assert "rank 1" in message, message
    assert not list(root.glob("step-*"))
    assert not (root / "last").exists()
    assert not [p for p in (root / ".staging").iterdir() if p.is_dir()]


# ------------------------------------------------------------------ one-process checkpoints


def _save_plain(root: Path, state: dict[str, Any]) -> Path:
    """A committed "dcp" checkpoint from this process alone (DCP's no-dist path)."""
    with distckpt.CheckpointManager(root, format="dcp", fsync=False) as mgr:
        return mgr.save(1, state).path


def _template() -> dict[str, Any]:
    return {"w": torch.zeros(3, 2), "n": 0}


def test_restore_without_state_says_state_is_needed(tmp_path: Path) -> None:
    step_dir = _save_plain(tmp_path / "ckpt", {"w": torch.randn(3, 2), "n": 5})
    with pytest.raises(InvalidArgument, match=r"format 'dcp'\) needs state="):
        distckpt.load_checkpoint(step_dir)


def test_keys_missing_from_the_checkpoint_are_reported(tmp_path: Path) -> None:
    w = torch.randn(3, 2)
    step_dir = _save_plain(tmp_path / "ckpt", {"w": w, "n": 5, "extra": torch.ones(2)})
    template = {"w": torch.zeros(3, 2), "n": 0, "new": torch.zeros(4)}
    with pytest.raises(InvalidArgument, match="new"):
        distckpt.load_checkpoint(step_dir, state=template)
    ckpt = distckpt.load_checkpoint(step_dir, state=template, strict=False)
    assert ckpt.missing_keys == ("new",)
    assert torch.equal(template["w"], w) and ckpt.state["n"] == 5
    assert "new" not in ckpt.state  # as in "torch": the state is what the checkpoint holds
    # Nor a dict left empty without the keys the checkpoint lacks; the held ones stay.
    step_dir = _save_plain(tmp_path / "nested", {"n": {"kept": 7}})
    template = {
        "sub": {"x": 1},
        "deep": {"a": {"x": torch.zeros(2)}},
        "n": {"a": {"x": 1}, "kept": 0},
        "lst": [{"x": 1}],
    }
    ckpt = distckpt.load_checkpoint(step_dir, state=template, strict=False)
    assert set(ckpt.missing_keys) == {"deep", "lst", "n.a", "sub"}
    assert ckpt.state == {"n": {"kept": 7}, "lst": [{}]}  # a list's items are never dropped


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_an_object_the_checkpoint_lacks_is_missing_without_a_changed_keys_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fmt: str
) -> None:
    with distckpt.CheckpointManager(tmp_path / "ckpt", format=fmt, fsync=False) as mgr:
        step_dir = mgr.save(1, {"w": torch.ones(1)}).path
    given = {"n": 3, "t": torch.zeros(1)}
    obj, inner = Holder(given), Holder(given)
    ckpt = distckpt.load_checkpoint(step_dir, state={"obj": obj, "d": {"i": inner}}, strict=False)
    assert set(ckpt.missing_keys) == {"d", "obj"}
    assert obj.state is inner.state is given  # neither loaded
    assert "keys differ" not in caplog.text  # it is absent, not changed
    # One the checkpoint holds, but without a sub-dict it gives: its keys differ, so it is
    # reported and left as given, rather than loaded with that sub-dict emptied.
    with distckpt.CheckpointManager(tmp_path / "partial", format=fmt, fsync=False) as mgr:
        step_dir = mgr.save(1, {"o": {"n": 5}}).path
    given = {"inner": {"x": 1}, "n": 2}
    obj = Holder(given)
    ckpt = distckpt.load_checkpoint(step_dir, state={"o": obj}, strict=False)
    assert ckpt.missing_keys == ("o",) and ckpt.unexpected_keys == ()
    assert obj.state is given and given == {"inner": {"x": 1}, "n": 2}
    assert "o: present in the checkpoint, but its keys differ" in caplog.text
    assert "not loaded" in caplog.text


# ------------------------------------------------------------------ the FSDP2 demo job


def _load_train_fsdp() -> Any:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "launch" / "train_fsdp.py"
    spec = importlib.util.spec_from_file_location("train_fsdp", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_job(rank: int, world_size: int, job: Any, argv: list[str]) -> int:
    return job.main(argv)


def test_train_fsdp_resumes_on_another_world_size(tmp_path: Path) -> None:
    job = _load_train_fsdp()  # loaded before the fork: every rank inherits it

    def run(world_size: int, root: Path, steps: int) -> None:
        argv = ["--root", str(root), "--steps", str(steps), "--save-every", "2", "--timeout", "30"]
        assert values(run_ranks(_run_job, world_size, job, argv, timeout=TIMEOUT)) == [0] * (
            world_size
        )

    run(4, tmp_path / "resumed", 4)
    run(2, tmp_path / "resumed", 6)  # restores step 4, saved by 4 ranks, onto 2
    run(2, tmp_path / "straight", 6)
    resumed = read_manifest(tmp_path / "resumed" / "step-00000006")
    assert resumed.world_size == 2 and resumed.format == "dcp"
    assert read_manifest(tmp_path / "resumed" / "step-00000004").world_size == 4

    from distckpt import export

    a = torch.load(export(tmp_path / "resumed", tmp_path / "a.pt"), weights_only=True)
    b = torch.load(export(tmp_path / "straight", tmp_path / "b.pt"), weights_only=True)
    assert a["steps"] == b["steps"]
    # Same trajectory up to rounding: 4 and 2 ranks sum the gradients in a different order.
    for part in ("model", "optim"):
        assert a["app"][part].keys() == b["app"][part].keys()
    assert a["app"]["optim"]["param_groups"] == b["app"]["optim"]["param_groups"]
    torch.testing.assert_close(a["app"]["model"], b["app"]["model"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        a["app"]["optim"]["state"], b["app"]["optim"]["state"], rtol=1e-4, atol=1e-6
    )


# ------------------------------------------------------------------ refused states


def _stepped_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = make_model(0)
    optimizer = torch.optim.Adam(model.parameters())
    model(batch(0)).sum().backward()
    optimizer.step()  # Adam's per-parameter state exists now, keyed by parameter number
    return model, optimizer


@pytest.mark.parametrize("given", ["the optimizer", "its state_dict()", "nested"])
def test_a_plain_optimizer_state_dict_is_refused(tmp_path: Path, given: str) -> None:
    model, optimizer = _stepped_optimizer()
    state: dict[str, Any] = {
        "the optimizer": {"model": model, "optim": optimizer},
        "its state_dict()": {"model": model, "optim": optimizer.state_dict()},
        "nested": {"train": {"model": model, "optim": optimizer.state_dict()}},
    }[given]
    key = "train.optim" if given == "nested" else "optim"
    with distckpt.CheckpointManager(tmp_path / "ckpt", format="dcp", fsync=False) as mgr:
        with pytest.raises(InvalidArgument) as refused:
            mgr.save(1, state)
        assert isinstance(refused.value, ValueError)
        message = str(refused.value)
        assert f"{key!r} looks like optimizer.state_dict(), keyed by parameter number" in message
        assert "ModelOptimizerState(model, optimizer)" in message
        assert mgr.steps() == []
        # What the message asks for is accepted.
        app = {"app": ModelOptimizerState(model, optimizer)}
        assert mgr.save(1, app).step == 1


Pair = collections.namedtuple("Pair", "weights count")


def test_per_rank_values_leave_a_named_tuple_of_the_same_type() -> None:
    weights = torch.ones(2)
    shared, marked = split_per_rank({"pair": Pair(weights, distckpt.PerRank(3))})
    assert shared == {"pair": Pair(weights, None)} and type(shared["pair"]) is Pair
    assert marked == [(("pair", 1), 3)]


# ------------------------------------------------------------------ reading the data files
