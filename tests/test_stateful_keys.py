"""Objects with ``state_dict()`` whose saved top-level keys differ from the given object's:
an ``RNGState`` captured where CUDA was available restores its other generators where it is
not, and the reverse; any other object is refused by a strict restore as present with other
keys (both lists named, in the error's message and its ``changed_keys``), not as missing, and
left as it was, with a warning, by a restore with ``strict=False``."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt.errors import KeyMismatch
from distckpt.rng import capture_rng
from tests.stateful_values import Holder

FORMATS = ("torch", "dcp")


def _pretend_cuda(monkeypatch: pytest.MonkeyPatch, set_calls: list[Any]) -> None:
    # No GPU on the machines these tests run on: torch.cuda is made to answer as on a node with
    # one device, so that the restore's RNGState captures a CUDA part and restore_rng would set
    # one (recorded in set_calls).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda, "get_rng_state_all", lambda: [torch.zeros(16, dtype=torch.uint8)]
    )
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_calls.append)


def _draws() -> tuple[list[float], float]:
    return torch.rand(3).tolist(), random.random()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("saved_with_cuda", [True, False], ids=["cuda-to-cpu", "cpu-to-cuda"])
def test_an_rng_state_restores_the_generators_both_sides_have(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fmt: str,
    saved_with_cuda: bool,
) -> None:
    """A strict restore takes the CPU, Python (and NumPy) generators of a checkpoint captured
    where CUDA was available into a process without it, logging the CUDA part it skips, and
    those of one captured without CUDA into a process with it, leaving CUDA's as it is."""
    torch.manual_seed(3)
    random.seed(3)
    captured = capture_rng()
    if saved_with_cuda:
        captured["cuda"] = [torch.zeros(16, dtype=torch.uint8)]  # one device's generator
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        # saved where an RNGState's state is, as it would have captured it there
        mgr.save(1, {"rng": distckpt.PerRank(captured)})
    expected = _draws()
    set_calls: list[Any] = []
    if not saved_with_cuda:
        _pretend_cuda(monkeypatch, set_calls)
    with (
        caplog.at_level(logging.WARNING, logger="distckpt"),
        distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr,
    ):
        restored = mgr.restore("last", state={"rng": distckpt.RNGState()})
    assert restored.missing_keys == () and restored.unexpected_keys == ()
    assert _draws() == expected
    assert set_calls == []
    skipped = [r.getMessage() for r in caplog.records if "not restored" in r.getMessage()]
    assert skipped == (
        ["random number generator states not restored, having no generator here: cuda"]
        if saved_with_cuda
        else []
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_object_saved_with_other_keys_is_named_with_both(tmp_path: Path, fmt: str) -> None:
    """A strict restore refuses it as present with other keys, not as missing; its
    ``changed_keys`` carry both lists. (Per rank in "dcp", whose restore compares a per-rank
    value by its place only, as a data loader is saved.)"""
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        mgr.save(1, {"obj": distckpt.PerRank(Holder({"pos": 4, "workers": []}))})
    given = Holder({"pos": 0, "snapshot": {}})
    with (
        distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr,
        pytest.raises(KeyMismatch) as caught,
    ):
        mgr.restore("last", state={"obj": distckpt.PerRank(given)})
    assert caught.value.changed_keys == (("obj", ("pos", "workers"), ("pos", "snapshot")),)
    assert caught.value.missing_keys == () and caught.value.unexpected_keys == ()
    assert (
        "'obj' present, but its keys differ: saved ['pos', 'workers'] vs expected "
        "['pos', 'snapshot']" in str(caught.value)
    )
    assert "missing from the checkpoint" not in str(caught.value)
    assert given.state == {"pos": 0, "snapshot": {}}


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_lenient_restore_leaves_an_object_saved_with_other_keys_and_says_why(
    tmp_path: Path, fmt: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With ``strict=False`` the object is left as given, reported in ``missing_keys`` (it
    was not loaded), and a warning names both lists of keys."""
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        mgr.save(1, {"obj": distckpt.PerRank(Holder({"pos": 4, "workers": []}))})
    given = Holder({"pos": 0, "snapshot": {}})
    with (
        caplog.at_level(logging.WARNING, logger="distckpt"),
        distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr,
    ):
        restored = mgr.restore("last", state={"obj": distckpt.PerRank(given)}, strict=False)
    assert restored.missing_keys == ("obj",)
    assert given.state == {"pos": 0, "snapshot": {}}
    assert any(
        "obj: present in the checkpoint, but its keys differ: saved ['pos', 'workers'] vs "
        "expected ['pos', 'snapshot']; not loaded" in record.getMessage()
        for record in caplog.records
    )


def test_an_optional_object_saved_with_other_keys_is_reported_not_refused(tmp_path: Path) -> None:
    """An object named in ``optional_keys`` is excused as a whole, with other keys as missing:
    a strict restore reports it and leaves it as given."""
    with distckpt.CheckpointManager(tmp_path, timeout=30) as mgr:
        mgr.save(1, {"obj": Holder({"pos": 4, "workers": []})})
    given = Holder({"pos": 0, "snapshot": {}})
    with distckpt.CheckpointManager(tmp_path, timeout=30) as mgr:
        restored = mgr.restore("last", state={"obj": given}, optional_keys=["obj"])
    assert restored.missing_keys == ("obj",)
    assert given.state == {"pos": 0, "snapshot": {}}


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_shared_object_saved_with_other_keys(
    tmp_path: Path, fmt: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Not per rank: "torch" names it with both lists as above; "dcp", which reads only the
    keys asked for, refuses it by its keys on one side only; under ``strict=False`` both
    formats warn with both lists, the saved keys the read left out among the saved ones. The
    object's own ``load_state_dict`` is not run, in either format."""
    with distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr:
        mgr.save(1, {"obj": Holder({"pos": 4, "t": torch.ones(1), "workers": 2})})
    with (
        distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr,
        pytest.raises(KeyMismatch) as caught,
    ):
        mgr.restore("last", state={"obj": Holder({"pos": 0, "t": torch.zeros(1), "snap": 1})})
    refused = caught.value
    given = Holder({"pos": 0, "t": torch.zeros(1), "snap": 1})
    with (
        caplog.at_level(logging.WARNING, logger="distckpt"),
        distckpt.CheckpointManager(tmp_path, format=fmt, timeout=30) as mgr,
    ):
        restored = mgr.restore("last", state={"obj": given}, strict=False)
    warnings = [r.getMessage() for r in caplog.records if "keys differ" in r.getMessage()]
    assert restored.missing_keys == ("obj",)
    assert given.state["pos"] == 0 and given.state["snap"] == 1
    # "dcp" reads into the given tensors in place, before the keys are compared
    assert given.state["t"].tolist() == ([1.0] if fmt == "dcp" else [0.0])
    assert warnings == [
        "obj: present in the checkpoint, but its keys differ: saved ['pos', 't', 'workers'] "
        "vs expected ['pos', 't', 'snap']; not loaded"
    ]
    if fmt == "torch":
        assert refused.changed_keys == (("obj", ("pos", "t", "workers"), ("pos", "t", "snap")),)
        assert restored.unexpected_keys == ()
    else:
        assert refused.changed_keys == ()
        assert (refused.missing_keys, refused.unexpected_keys) == (("obj.snap",), ("obj.workers",))
        assert restored.unexpected_keys == ("obj.workers",)
