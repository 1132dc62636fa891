"""What ``restore(state=...)`` does to the given state, the same in both formats: plain values
inside its dicts and lists are updated in place (as DCP users expect), and ``strict`` refuses,
or with ``strict=False`` reports, keys on one side only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt.errors import InvalidArgument
from tests.ranks import run_ranks, values

FORMATS = ("torch", "dcp")
TIMEOUT = 60.0


def saved_state() -> dict[str, Any]:
    return {
        "w": torch.arange(6.0).reshape(3, 2),
        "count": 7,
        "name": "run-b",
        "nested": {"lr": 0.5, "ids": [4, 5, 6], "pair": (1, 2), "bias": torch.ones(2)},
        "history": [torch.full((2,), 3.0), 9, {"epoch": 3}],
    }


def fresh_state() -> dict[str, Any]:
    """The same structure as :func:`saved_state`, with other values."""
    return {
        "w": torch.zeros(3, 2),
        "count": 0,
        "name": "run-a",
        "nested": {"lr": 0.1, "ids": [0, 0, 0], "pair": (0, 0), "bias": torch.zeros(2)},
        "history": [torch.zeros(2), 0, {"epoch": 0}],
    }


def assert_loaded(state: dict[str, Any]) -> None:
    expected = saved_state()
    assert torch.equal(state["w"], expected["w"])
    assert (state["count"], state["name"]) == (7, "run-b")
    assert state["nested"]["lr"] == 0.5 and state["nested"]["ids"] == [4, 5, 6]
    assert tuple(state["nested"]["pair"]) == (1, 2)
    assert torch.equal(state["nested"]["bias"], torch.ones(2))
    assert torch.equal(state["history"][0], torch.full((2,), 3.0))
    assert state["history"][1:] == [9, {"epoch": 3}]


@pytest.mark.parametrize("fmt", FORMATS)
def test_restore_updates_plain_values_in_place(root: Path, fmt: str) -> None:
    with distckpt.CheckpointManager(root, format=fmt, fsync=False) as mgr:
        mgr.save(1, saved_state())
        state = fresh_state()
        containers = (state["nested"], state["nested"]["ids"], state["history"])
        tensors = (state["w"], state["nested"]["bias"], state["history"][0])
        ckpt = mgr.restore(state=state)
    assert ckpt is not None and ckpt.missing_keys == () and ckpt.unexpected_keys == ()
    assert_loaded(state)
    # The very dicts, lists and tensors passed in were filled, not replaced.
    assert (state["nested"], state["nested"]["ids"], state["history"]) == containers
    assert all(
        a is b
        for a, b in zip(containers, (state["nested"], state["nested"]["ids"], state["history"]))
    )
    assert all(
        a is b for a, b in zip(tensors, (state["w"], state["nested"]["bias"], state["history"][0]))
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_strict_refuses_keys_on_either_side_before_changing_anything(root: Path, fmt: str) -> None:
    with distckpt.CheckpointManager(root, format=fmt, fsync=False) as mgr:
        mgr.save(1, {"w": torch.ones(2), "n": 5, "old": torch.ones(3)})
        missing = {"w": torch.zeros(2), "n": 0, "old": torch.zeros(3), "new": torch.zeros(4)}
        with pytest.raises(InvalidArgument, match=r"missing from the checkpoint \['new'\]"):
            mgr.restore(state=missing)
        unexpected = {"w": torch.zeros(2), "n": 0}
        with pytest.raises(InvalidArgument, match=r"not in the given state \['old'\]"):
            mgr.restore(state=unexpected)
    # Refused before anything was loaded, in both formats.
    assert torch.equal(missing["w"], torch.zeros(2)) and missing["n"] == 0
    assert torch.equal(unexpected["w"], torch.zeros(2)) and unexpected["n"] == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_strict_false_loads_the_rest_and_reports_both_sides(root: Path, fmt: str) -> None:
    with distckpt.CheckpointManager(root, format=fmt, fsync=False) as mgr:
        mgr.save(1, {"w": torch.ones(2), "n": 5, "old": torch.ones(3)})
        state = {"w": torch.zeros(2), "n": 0, "new": torch.zeros(4)}
        ckpt = mgr.restore(state=state, strict=False)
    assert ckpt is not None
    assert ckpt.missing_keys == ("new",)
    assert ckpt.unexpected_keys == ("old",)
    assert torch.equal(state["w"], torch.ones(2)) and state["n"] == 5
    assert torch.equal(state["new"], torch.zeros(4))


@pytest.mark.parametrize("fmt", FORMATS)
def test_strict_lets_the_optional_keys_alone_be_missing(root: Path, fmt: str) -> None:
    """A checkpoint saved before ``extras.added`` existed: strict lets exactly the optional
    keys be missing (reported, left as given); any other key on one side only is still
    refused before anything is loaded."""
    with distckpt.CheckpointManager(root, format=fmt, fsync=False) as mgr:
        mgr.save(1, {"w": torch.ones(2), "extras": {"kept": 5}})
        state = {"w": torch.zeros(2), "extras": {"kept": 0, "added": 1}}
        ckpt = mgr.restore(state=state, optional_keys=["extras.added", "later"])
        assert ckpt is not None and ckpt.missing_keys == ("extras.added",)
        assert torch.equal(state["w"], torch.ones(2))
        assert state["extras"] == {"kept": 5, "added": 1}
        refused = {"w": torch.zeros(2), "extras": {"kept": 0, "added": 1}, "new": 0}
        with pytest.raises(InvalidArgument, match=r"missing from the checkpoint \['new'\]"):
            mgr.restore(state=refused, optional_keys=["extras.added"])
    assert torch.equal(refused["w"], torch.zeros(2))


class KeyedTensors:
    """An object with ``state_dict()``, as a user's own stateful object is: its keys are
    named tensors, so a newer version can add one."""

    def __init__(self, *names: str) -> None:
        self.tensors = {name: torch.zeros(2) for name in names}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.tensors.update(state)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_missing_key_under_an_optional_key_is_optional_and_reported_as_it(
    root: Path, fmt: str
) -> None:
    """A whole sub-dict a newer version added, named by its key: strict lets it be missing
    (its leaves too), reported as that key in both formats, and left as given."""
    with distckpt.CheckpointManager(root, format=fmt, fsync=False) as mgr:
        mgr.save(1, {"w": torch.ones(2)})
        state = {"w": torch.zeros(2), "extras": {"a": torch.zeros(1), "b": 1}}
        ckpt = mgr.restore(state=state, optional_keys=["extras"])
        assert ckpt is not None and ckpt.missing_keys == ("extras",)
        assert torch.equal(state["w"], torch.ones(2)) and state["extras"]["b"] == 1
        # Naming its leaves as well changes nothing.
        ckpt = mgr.restore(state=state, optional_keys=["extras", "extras.a", "extras.b"])
        assert ckpt is not None and ckpt.missing_keys == ("extras",)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_missing_sub_dict_whose_every_leaf_is_optional_is_optional(root: Path, fmt: str) -> None:
    """A whole sub-dict a newer version added, named by its leaves alone: as optional as named
    by its key, reported as that key in both formats; one leaf of two named is not enough."""
    with distckpt.CheckpointManager(root, format=fmt, fsync=False) as mgr:
        mgr.save(1, {"w": torch.ones(2)})
        state = {"w": torch.zeros(2), "extras": {"added": torch.zeros(1)}}
        ckpt = mgr.restore(state=state, optional_keys=["extras.added"])
        assert ckpt is not None and ckpt.missing_keys == ("extras",)
        assert torch.equal(state["w"], torch.ones(2))
        two = {"w": torch.zeros(2), "extras": {"a": torch.zeros(1), "b": 3}}
        ckpt = mgr.restore(state=two, optional_keys=["extras.a", "extras.b"])
        assert ckpt is not None and ckpt.missing_keys == ("extras",)
        with pytest.raises(InvalidArgument, match=r"missing from the checkpoint \['extras'\]"):
            mgr.restore(state=two, optional_keys=["extras.a"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_nested_sub_dict_on_one_side_only_is_reported_as_its_key(root: Path, fmt: str) -> None:
    """One level down as at the top: a whole sub-dict missing from the checkpoint (optional by
    its key or by its every leaf, or refused) and a whole saved sub-dict the state lacks are
    each reported as its own key in both formats, not as their leaves."""
    with distckpt.CheckpointManager(root, format=fmt, fsync=False) as mgr:
        mgr.save(1, {"a": {"w": torch.ones(1), "old": {"x": torch.ones(1), "y": 3}}})

        def state() -> dict[str, Any]:
            added = {"x": torch.zeros(1), "y": torch.zeros(1)}
            return {"a": {"w": torch.zeros(1), "old": {"x": torch.zeros(1), "y": 0}, "new": added}}

        for optional in (["a.new"], ["a.new.x", "a.new.y"]):
            ckpt = mgr.restore(state=state(), optional_keys=optional)
            assert ckpt is not None and ckpt.missing_keys == ("a.new",)
        with pytest.raises(InvalidArgument) as refused:
            mgr.restore(state=state())
        assert refused.value.fields()["missing_keys"] == ("a.new",)
        given = state()
        del given["a"]["old"]
        ckpt = mgr.restore(state=given, strict=False)
        assert ckpt is not None
        assert (ckpt.missing_keys, ckpt.unexpected_keys) == (("a.new",), ("a.old",))


@pytest.mark.parametrize("optional", [["lst"], ["lst.1"]])
@pytest.mark.parametrize("fmt", FORMATS)
def test_optional_keys_do_not_cover_a_lists_items(
    root: Path, fmt: str, optional: list[str]
) -> None:
    """A list longer than the saved one is refused whatever ``optional_keys`` name, the list or
    its new item, in both formats, named as the list with both lengths; nothing is loaded."""
    with distckpt.CheckpointManager(root, format=fmt, fsync=False) as mgr:
        mgr.save(1, {"lst": [torch.ones(1)]})
        state = {"lst": [torch.zeros(1), torch.zeros(1)]}
        with pytest.raises(InvalidArgument, match=r"\['lst\[len 2 != 1\]'\]"):
            mgr.restore(state=state, optional_keys=optional)
        assert torch.equal(state["lst"][0], torch.zeros(1))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_key_inside_an_object_with_a_state_dict_is_optional_as_the_whole_object(
    root: Path, fmt: str
) -> None:
    """A key a newer version added inside an object with ``state_dict()`` is optional only as
    the object: ``"obj.added"`` alone is refused (the object named as present with other
    keys, in both formats), ``"obj"`` lets it load with the object reported missing and left as
    given."""
    with distckpt.CheckpointManager(root, format=fmt, fsync=False) as mgr:
        mgr.save(1, {"w": torch.ones(2), "obj": KeyedTensors("kept")})
        with pytest.raises(InvalidArgument, match=r"'obj' present, but its keys differ") as got:
            mgr.restore(
                state={"w": torch.zeros(2), "obj": KeyedTensors("kept", "added")},
                optional_keys=["obj.added"],
            )
        assert got.value.fields()["changed_keys"] == (("obj", ("kept",), ("kept", "added")),)
        state = {"w": torch.zeros(2), "obj": KeyedTensors("kept", "added")}
        ckpt = mgr.restore(state=state, optional_keys=["obj"])
        assert ckpt is not None and ckpt.missing_keys == ("obj",)
        assert torch.equal(state["w"], torch.ones(2))


@pytest.mark.parametrize("fmt", FORMATS)
def test_optional_keys_as_a_plain_string_are_refused(root: Path, fmt: str) -> None:
    """A string is no collection of keys (it would be taken as its characters): refused, as
    is a key that is no string, before anything is read, naming the argument given
    (``optional_keys`` or ``optional_whole_keys``)."""
    with distckpt.CheckpointManager(root, format=fmt, fsync=False) as mgr:
        mgr.save(1, {"extras": {"kept": 5}})
        state = {"extras": {"kept": 0, "added": 1}}
        with pytest.raises(InvalidArgument, match=r"not the string 'extras\.added'"):
            mgr.restore(state=state, optional_keys="extras.added")
        with pytest.raises(InvalidArgument, match="optional_keys must be strings"):
            mgr.restore(state=state, optional_keys=[1])
        # The error names the argument that was passed.
        with pytest.raises(InvalidArgument, match=r"^optional_whole_keys must .* 'extras'"):
            mgr.restore(state=state, optional_whole_keys="extras")
        with pytest.raises(InvalidArgument, match=r"^optional_whole_keys must be strings"):
            mgr.restore(state=state, optional_whole_keys=[1])
        assert state["extras"]["kept"] == 0
    ckpt = distckpt.load_checkpoint(root, state=state, optional_keys=["extras.added"])
    assert ckpt.missing_keys == ("extras.added",) and state["extras"] == {"kept": 5, "added": 1}


def _restore_on_ranks(rank: int, world_size: int, root: str, fmt: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, format=fmt, fsync=False, timeout=TIMEOUT) as mgr:
        mgr.save(1, {**saved_state(), "old": torch.ones(3)})
        state = fresh_state()
        try:
            mgr.restore(state=state)
        except InvalidArgument as exc:
            out["strict"] = str(exc)
        ckpt = mgr.restore(state=state, strict=False)
        assert ckpt is not None
        assert_loaded(state)
        out["unexpected"] = ckpt.unexpected_keys
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_in_place_and_strict_on_two_ranks(root: Path, fmt: str) -> None:
    for out in values(run_ranks(_restore_on_ranks, 2, str(root), fmt, timeout=TIMEOUT * 2)):
        assert "not in the given state ['old']" in out["strict"]
        assert out["unexpected"] == ("old",)


def _restore_optional_as_a_whole(rank: int, world_size: int, root: str, fmt: str) -> Any:
    """Save ``extras`` with one of its two keys, restore it with ``extras`` optional as a
    whole: refused, naming the key; then a state with no ``extras`` saved loads, reporting it."""
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, format=fmt, fsync=False, timeout=TIMEOUT) as mgr:
        mgr.save(1, {"w": torch.ones(2), "extras": {"kept": torch.ones(1)}})
        mgr.save(2, {"w": torch.ones(2)})
        state = {"w": torch.zeros(2), "extras": {"kept": torch.zeros(1), "added": 0}}
        try:
            mgr.restore(1, state=state, optional_whole_keys=["extras"])
        except InvalidArgument as exc:
            out["refused"] = str(exc)
        out["untouched"] = torch.equal(state["w"], torch.zeros(2)) and torch.equal(
            state["extras"]["kept"], torch.zeros(1)
        )
        ckpt = mgr.restore(2, state=state, optional_whole_keys=["extras"])
        assert ckpt is not None
        out["missing"] = ckpt.missing_keys
        out["loaded"] = torch.equal(state["w"], torch.ones(2))
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_optional_whole_keys_may_be_missing_only_as_a_whole_on_two_ranks(
    root: Path, fmt: str
) -> None:
    """``optional_whole_keys``: a key under one of them missing is refused on every rank
    before anything is loaded; the whole of it missing is let through and reported."""
    restores = run_ranks(_restore_optional_as_a_whole, 2, str(root), fmt, timeout=TIMEOUT * 2)
    results = values(restores)
    for out in results:
        assert "missing from the checkpoint ['extras.added']" in out["refused"]
        assert out["untouched"] and out["loaded"]
        assert out["missing"] == ("extras",)


def _save_then_refuse_on_rank_one(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """Save one step, then restore it with a template that only rank 1's strict check refuses
    (a key only it has): what each rank's state holds after the restore raised."""
    with distckpt.CheckpointManager(root, fsync=False, timeout=TIMEOUT) as mgr:
        mgr.save(1, {"w": torch.full((4,), 1.0 + rank), "n": 1})
        state: dict[str, Any] = {"w": torch.zeros(4), "n": 0}
        if rank == 1:
            state["extra"] = torch.zeros(1)
        with pytest.raises(InvalidArgument):
            mgr.restore(state=state)
    return {"w": state["w"].tolist(), "n": state["n"]}


def _agree_then_fail_on_rank_one(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """The manager's agreement on work after a restore: each rank's value, then the error of
    work failing on rank 1 alone, as each rank raised it."""
    with distckpt.CheckpointManager(root, fsync=False, timeout=TIMEOUT) as mgr:
        kept = mgr.agree_on(lambda: f"rank {rank}'s own", what="loading the rest")

        def fails_on_rank_one() -> None:
            if rank == 1:
                raise ValueError("rank 1 cannot load the rest")

        with pytest.raises(distckpt.RankFailure) as raised:
            mgr.agree_on(fails_on_rank_one, what="loading the rest")

        def refuses_on_rank_one() -> None:
            if rank == 1:
                raise InvalidArgument("rank 1 refuses the rest")

        with pytest.raises(InvalidArgument) as refused:
            mgr.agree_on(refuses_on_rank_one, what="loading the rest")
    return {"kept": kept, "error": str(raised.value), "refused": str(refused.value)}


def test_agree_on_keeps_each_ranks_value_and_raises_one_ranks_failure_on_every_rank(
    root: Path,
) -> None:
    results = values(run_ranks(_agree_then_fail_on_rank_one, 2, str(root), timeout=TIMEOUT))
    assert [result["kept"] for result in results] == ["rank 0's own", "rank 1's own"]
    for result in results:
        assert result["error"] == (
            "loading the rest failed on rank 1: rank 1: ValueError: rank 1 cannot load the rest"
        )
        # A distckpt error comes through as itself, on every rank, naming the rank.
        assert result["refused"] == "rank 1 refuses the rest (on rank 1)"


def test_agree_on_in_one_process_raises_a_distckpt_error_as_itself_and_any_other_as_rank_failure(
    root: Path,
) -> None:
    """The same rule without a process group: a single process is rank 0 of one."""

    def refuses() -> None:
        raise InvalidArgument("cannot load the rest")

    def fails() -> None:
        raise ValueError("cannot load the rest")

    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        with pytest.raises(InvalidArgument, match=r"^cannot load the rest$"):
            mgr.agree_on(refuses, what="loading the rest")
        with pytest.raises(distckpt.RankFailure) as raised:
            mgr.agree_on(fails, what="loading the rest")
    assert isinstance(raised.value.__cause__, ValueError)


def _restore_expecting_damage(rank: int, world_size: int, root: str) -> dict[str, Any]:
    with distckpt.CheckpointManager(root, fsync=False, timeout=TIMEOUT) as mgr:
        state = {"w": torch.zeros(4), "n": 0}
        with pytest.raises(distckpt.CorruptCheckpoint):
            mgr.restore(state=state)
    return {"w": state["w"].tolist(), "n": state["n"]}


def test_a_restore_failing_on_one_rank_changes_no_rank_state(root: Path) -> None:
    """A rank whose read or check fails leaves every rank's state as it was, not only its own:
    the ranks load only once all of them read and checked their part (the "torch" format,
    whose ranks read alone)."""
    untouched = {"w": [0.0] * 4, "n": 0}
    refused = values(run_ranks(_save_then_refuse_on_rank_one, 2, str(root), timeout=TIMEOUT * 2))
    assert refused == [untouched, untouched]
    # Rank 1's file damaged, its size kept: only rank 1's read can find out.
    (rank_file,) = root.glob("step-*/rank-00001.pt")
    damaged = bytearray(rank_file.read_bytes())
    damaged[40:60] = bytes(20)
    rank_file.write_bytes(bytes(damaged))
    corrupt = values(run_ranks(_restore_expecting_damage, 2, str(root), timeout=TIMEOUT * 2))
    assert corrupt == [untouched, untouched]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_module_of_another_shape_is_refused_before_anything_is_loaded(
    root: Path, fmt: str
) -> None:
    with distckpt.CheckpointManager(root, format=fmt, fsync=False) as mgr:
        mgr.save(1, {"w": torch.ones(4), "m": torch.nn.Linear(2, 2), "n": 3})
        module = torch.nn.Linear(2, 3)
        before = {key: value.clone() for key, value in module.state_dict().items()}
        state = {"w": torch.zeros(4), "m": module, "n": 0}
        with pytest.raises(distckpt.ShapeMismatch) as raised:
            mgr.restore(state=state)
    assert sorted(raised.value.mismatches) == [("m.bias", (2,), (3,)), ("m.weight", (2, 2), (3, 2))]
    assert torch.equal(state["w"], torch.zeros(4)) and state["n"] == 0
    assert all(torch.equal(module.state_dict()[key], value) for key, value in before.items())


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_module_with_a_parameter_the_checkpoint_lacks_is_refused_before_loading(
    root: Path, fmt: str
) -> None:
    """A layer's bias added since the save: strict refuses the module, loading none of it,
    rather than loading the weight and keeping a bias that was never trained. (Only the
    "torch" case guards the key comparison of a module: "dcp" finds the missing key through
    its own format check as well.)"""
    with distckpt.CheckpointManager(root, format=fmt, fsync=False) as mgr:
        mgr.save(1, {"m": torch.nn.Linear(2, 2, bias=False)})
        module = torch.nn.Linear(2, 2)
        before = {key: value.clone() for key, value in module.state_dict().items()}
        with pytest.raises(distckpt.KeyMismatch) as raised:
            mgr.restore(state={"m": module})
    assert raised.value.missing_keys == ("m.bias",) and raised.value.unexpected_keys == ()
    assert all(torch.equal(module.state_dict()[key], value) for key, value in before.items())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("strict", [True, False])
def test_a_tensor_of_another_shape_is_refused_whatever_strict_is(
    root: Path, fmt: str, strict: bool
) -> None:
    """A tensor saved with one shape and restored into another is neither missing nor loaded:
    both formats refuse it with ShapeMismatch naming the key and both shapes, strict or not."""
    with distckpt.CheckpointManager(root, format=fmt, fsync=False) as mgr:
        mgr.save(1, {"w": torch.ones(4), "v": torch.ones(2)})
        state = {"w": torch.zeros(5), "v": torch.zeros(2)}
        with pytest.raises(distckpt.ShapeMismatch, match=r"w: saved \[4\], given \[5\]") as raised:
            mgr.restore(state=state, strict=strict)
    assert raised.value.mismatches == (("w", (4,), (5,)),)
    assert raised.value.path == str(root / "step-00000001")  # the checkpoint refused
    assert torch.equal(state["v"], torch.zeros(2))


def _restore_into_a_mismatched_optimizer_on_rank_1(
    rank: int, world_size: int, root: str
) -> tuple[str, int | None, bool]:
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with distckpt.CheckpointManager(root, fsync=False, timeout=30) as mgr:
        mgr.save(1, {"model": model, "opt": optimizer})
        # Rank 1's optimizer, made again on restart, covers one parameter only: the keys and
        # shapes check out, and only the optimizer's own load_state_dict refuses it.
        params = [model.weight] if rank == 1 else list(model.parameters())
        again = torch.optim.SGD(params, lr=0.1)
        try:
            mgr.restore(state={"model": model, "opt": again})
        except distckpt.CheckpointError as exc:
            # The next collective still works: no rank went on alone.
            saved = mgr.save(2, {"model": model}, force=True) is not None
            return type(exc).__name__, exc.rank, saved
    raise AssertionError("the restore into a mismatched optimizer succeeded")


def test_a_load_state_dict_failing_on_one_rank_is_raised_on_every_rank(tmp_path: Path) -> None:
    out = values(run_ranks(_restore_into_a_mismatched_optimizer_on_rank_1, 2, str(tmp_path)))
    assert [(rank, saved) for _, rank, saved in out] == [(1, True), (1, True)]
