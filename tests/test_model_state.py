"""``ModelOptimizerState`` in a restore, on real gloo ranks: ``strict`` means what it means for
every other value (``strict=False`` loads what matches and reports the rest, optimizer state
included; ``strict=True`` refuses before anything is loaded), in both formats and with FSDP2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo  # imported here once: FSDP2 would import it in every rank
from torch.distributed.checkpoint.state_dict import StateDictOptions

import distckpt
from distckpt.errors import InvalidArgument, KeyMismatch
from distckpt.formats.dcp import ModelOptimizerState
from distckpt.model_state_keys import SCHEDULER_GROUP_KEYS
from tests.ranks import run_ranks, values
from tests.test_dcp import fsdp, full_state, make_model, train

TIMEOUT = 90.0

#: The keys of the layer a model grows between runs (its Linear(5, 5) at index 3), under
#: ``app.``, as both formats report them: the model's parameters one by one, each parameter's
#: Adam state (a whole sub-dict the checkpoint lacks) as its own key.
ADDED_LAYER_KEYS = {
    f"app.{part}"
    for name in ("3.weight", "3.bias")
    for part in (f"model.{name}", f"optim.state.{name}")
}


def grown_model(seed: int) -> torch.nn.Sequential:
    """:func:`make_model` with one more layer at its end (``3.weight``, ``3.bias``)."""
    model = make_model(seed)
    model.append(torch.nn.Linear(5, 5))
    return model


def _outcome(restore: Any) -> tuple[str, Any]:
    """``("ok", (missing, unexpected))`` of a restore, or ``(error type, (message, fields))``."""
    try:
        checkpoint = restore()
    except distckpt.CheckpointError as exc:
        return type(exc).__name__, (str(exc), exc.fields())
    return "ok", (set(checkpoint.missing_keys), set(checkpoint.unexpected_keys))


def _grown_fsdp_model_restores(rank: int, world_size: int, root: str) -> dict[str, Any]:
    saved_model = fsdp(make_model(0), world_size)
    saved_optim = torch.optim.Adam(saved_model.parameters(), lr=0.01)
    train(saved_model, saved_optim, range(2))
    with distckpt.CheckpointManager(root, format="dcp", timeout=30) as mgr:
        mgr.save(2, {"app": ModelOptimizerState(saved_model, saved_optim)})
    saved = full_state(saved_model, saved_optim)

    model = fsdp(grown_model(5), world_size)
    optim = torch.optim.Adam(model.parameters(), lr=0.5)
    before = full_state(model, optim)
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, format="dcp", timeout=30) as mgr:
        state = {"app": ModelOptimizerState(model, optim)}
        out["strict"] = _outcome(lambda: mgr.restore("last", state=state))
        out["unchanged_by_strict"] = full_state(model, optim) == before
        out["lenient"] = _outcome(lambda: mgr.restore("last", state=state, strict=False))
    after = full_state(model, optim)
    out["loaded"] = {key: after[key] == value for key, value in saved.items()}
    out["added_kept"] = {
        key: after[key] == before[key] for key in before if key.split(".")[1] == "3"
    }
    out["lr"] = optim.param_groups[0]["lr"]
    train(model, optim, range(2, 3))  # the optimizer steps every parameter, the new ones too
    return out


def test_a_grown_fsdp_model_restores_what_matches_with_strict_false(tmp_path: Path) -> None:
    """A layer added between runs ("dcp", FSDP2, Adam): a strict restore is refused naming the
    added keys before anything is loaded; ``strict=False`` loads the rest, reports the added
    layer's keys (its optimizer state too) as missing, and leaves the new layer as it was."""
    results = values(
        run_ranks(_grown_fsdp_model_restores, 2, str(tmp_path / "ckpt"), timeout=TIMEOUT)
    )
    for out in results:
        kind, (message, fields) = out["strict"]
        assert kind == "KeyMismatch"
        assert all(key in message for key in ADDED_LAYER_KEYS)
        assert set(fields["missing_keys"]) == ADDED_LAYER_KEYS
        assert fields["unexpected_keys"] == ()
        assert fields["path"] == str(tmp_path / "ckpt" / "step-00000002")
        assert fields["step"] == 2
        assert out["unchanged_by_strict"]
        assert out["lenient"] == ("ok", (ADDED_LAYER_KEYS, set()))
        assert out["loaded"] and all(out["loaded"].values())
        assert out["added_kept"] and all(out["added_kept"].values())
        assert out["lr"] == 0.01  # the saved parameter group's, not the fresh 0.5


def _model_only_into_model_and_optimizer(rank: int, world_size: int, root: str) -> dict[str, Any]:
    torch.manual_seed(0)
    saved_model = torch.nn.Linear(3, 2)
    with distckpt.CheckpointManager(root, format="dcp", timeout=30) as mgr:
        mgr.save(1, {"app": ModelOptimizerState(saved_model)})
    model = torch.nn.Linear(3, 2)
    torch.nn.init.zeros_(model.weight)
    optim = torch.optim.Adam(model.parameters(), lr=0.25)
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, format="dcp", timeout=30) as mgr:
        state = {"app": ModelOptimizerState(model, optim)}
        out["strict"] = _outcome(lambda: mgr.restore("last", state=state))
        out["weight_after_strict"] = model.weight.detach().clone()
        out["lenient"] = _outcome(lambda: mgr.restore("last", state=state, strict=False))
    out["weight_loaded"] = torch.equal(model.weight, saved_model.weight)
    out["lr"] = optim.param_groups[0]["lr"]
    model(torch.ones(1, 3)).sum().backward()
    optim.step()  # the optimizer kept every setting it needs
    return out


def test_a_model_only_checkpoint_loads_the_model_and_keeps_the_optimizer(tmp_path: Path) -> None:
    """A checkpoint of the model alone restored into a model and its optimizer: refused with
    ``strict=True`` before the model is touched; with ``strict=False`` the model is loaded
    and the optimizer keeps its own state and settings, reported as missing."""
    for out in values(
        run_ranks(_model_only_into_model_and_optimizer, 2, str(tmp_path / "c"), timeout=TIMEOUT)
    ):
        kind, (message, _) = out["strict"]
        assert kind == "KeyMismatch"
        assert "['app.optim']" in message  # the whole optimizer, as "torch" reports it
        assert not out["weight_after_strict"].any()
        result, (missing, unexpected) = out["lenient"]
        assert result == "ok"
        assert not unexpected
        assert missing == {"app.optim"}
        assert not any(key.startswith("app.model") for key in missing)
        assert out["weight_loaded"]
        assert out["lr"] == 0.25


def _torch_format_grown_model(rank: int, world_size: int, root: str) -> dict[str, Any]:
    torch.manual_seed(rank)
    saved_model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    saved_optim = torch.optim.SGD(saved_model.parameters(), lr=0.1, momentum=0.9)
    saved_model(torch.ones(1, 3)).sum().backward()
    saved_optim.step()
    with distckpt.CheckpointManager(root, format="torch", timeout=30) as mgr:
        mgr.save(1, {"app": ModelOptimizerState(saved_model, saved_optim)})
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2), torch.nn.Linear(2, 2))
    for parameter in model.parameters():
        torch.nn.init.zeros_(parameter)
    optim = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9)
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, format="torch", timeout=30) as mgr:
        state = {"app": ModelOptimizerState(model, optim)}
        out["strict"] = _outcome(lambda: mgr.restore("last", state=state))
        out["untouched"] = not any(p.any() for p in model.parameters())
        out["lr_after_strict"] = optim.param_groups[0]["lr"]
        out["lenient"] = _outcome(lambda: mgr.restore("last", state=state, strict=False))
    out["loaded"] = torch.equal(model[0].weight, saved_model[0].weight)
    out["lr"] = optim.param_groups[0]["lr"]
    return out


def test_the_torch_format_refuses_a_grown_model_before_loading_and_reports_it(
    tmp_path: Path,
) -> None:
    """The "torch" format compares a ModelOptimizerState's keys, the optimizer's too, before
    torch loads anything (torch itself would load the matching parameters, then raise). As
    for any nested dict in this format, a whole dict missing is reported by its own key."""
    added = {"app.model.2.weight", "app.model.2.bias"}
    added |= {"app.optim.state.2.weight", "app.optim.state.2.bias"}
    for out in values(
        run_ranks(_torch_format_grown_model, 2, str(tmp_path / "c"), timeout=TIMEOUT)
    ):
        kind, (message, fields) = out["strict"]
        assert kind == "KeyMismatch"
        assert all(key in message for key in added)
        assert set(fields["missing_keys"]) == added
        assert fields["path"] == str(tmp_path / "c" / "step-00000001")
        assert fields["step"] == 1
        assert out["untouched"] and out["lr_after_strict"] == 0.7
        assert out["lenient"] == ("ok", (added, set()))
        assert out["loaded"] and out["lr"] == 0.1


def _lenient_options_in_a_strict_restore(rank: int, world_size: int, root: str) -> Any:
    torch.manual_seed(0)
    saved = torch.nn.Linear(3, 2)
    with distckpt.CheckpointManager(root, format="torch", timeout=30) as mgr:
        mgr.save(1, {"run": [ModelOptimizerState(saved)]})
        model = torch.nn.Linear(3, 2)
        lenient = ModelOptimizerState(model, options=StateDictOptions(strict=False))
        same_keys = _outcome(lambda: mgr.restore("last", state={"run": [lenient]}))
        loaded = torch.equal(model.weight, saved.weight)
        grown = torch.nn.Sequential(torch.nn.Linear(3, 2))
        other = ModelOptimizerState(grown, options=StateDictOptions(strict=False))
        other_keys = _outcome(lambda: mgr.restore("last", state={"run": [other]}))
    return {"same_keys": same_keys, "loaded": loaded, "other_keys": other_keys}


def test_options_strict_false_in_a_strict_restore_loads_when_the_keys_match(
    tmp_path: Path,
) -> None:
    """The restore's ``strict`` decides, whatever the object's ``options.strict``: with the
    keys matching it loads on every rank; with a key on one side only it is a KeyMismatch."""
    for out in values(
        run_ranks(_lenient_options_in_a_strict_restore, 2, str(tmp_path / "c"), timeout=TIMEOUT)
    ):
        assert out["same_keys"] == ("ok", (set(), set()))
        assert out["loaded"]
        kind, (_, fields) = out["other_keys"]
        assert kind == "KeyMismatch"
        assert set(fields["missing_keys"]) == {"run.0.model.0.weight", "run.0.model.0.bias"}
        assert set(fields["unexpected_keys"]) == {"run.0.model.weight", "run.0.model.bias"}


def _scheduler_built_after_restore(
    rank: int, world_size: int, root: str, fmt: str, tensor_lr: bool
) -> Any:
    """Two runs of the same training code, each building its LR scheduler after the restore
    from the restored step (as a resumed job does): the first saves the scheduler's
    ``initial_lr`` in the group settings, which the second's fresh groups lack (a tensor when
    the learning rate is one)."""
    learning_rates = []
    for run in (1, 2):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        if tensor_lr:
            optim = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.1), foreach=False)
        else:
            optim = torch.optim.AdamW(model.parameters(), lr=0.1)
        state = {"app": ModelOptimizerState(model, optim)}
        with distckpt.CheckpointManager(root, format=fmt, timeout=30) as mgr:
            checkpoint = mgr.restore("last", state=state, missing_ok=True)
            start = checkpoint.step if checkpoint is not None else 0
            scheduler = torch.optim.lr_scheduler.StepLR(optim, 1, 0.5, last_epoch=start - 1)
            model(torch.randn(3, 4)).sum().backward()
            optim.step()
            scheduler.step()
            mgr.save(run, state)
        learning_rates.append(float(optim.param_groups[0]["lr"]))
    return learning_rates


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_a_scheduler_built_after_the_restore_resumes(
    tmp_path: Path, fmt: str, tensor_lr: bool
) -> None:
    """A strict restore does not compare the settings an LR scheduler adds to a parameter
    group (``initial_lr``) and loads the saved ones, so the second run resumes the schedule."""
    for learning_rates in values(
        run_ranks(
            _scheduler_built_after_restore,
            2,
            str(tmp_path / "c"),
            fmt,
            tensor_lr,
            timeout=TIMEOUT,
        )
    ):
        # run 2 starts from the saved 0.05 and halves it twice: once as StepLR's constructor
        # steps to last_epoch + 1, once by the run's own step (torch's rule, not ours)
        assert learning_rates == pytest.approx([0.05, 0.0125])


def _two_layer_optimizer(
    kind: type[torch.optim.Optimizer], group_count: int, swapped: bool = False, *, seed: int
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Two Linear layers and an optimizer of ``kind`` over them, in one parameter group or in
    two (one per layer, each with a learning rate of its own; the second layer's first when
    ``swapped``)."""
    assert group_count == 2 or not swapped, "a single group has no order to swap"
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    params = list(model.parameters())
    groups = [{"params": params[:2], "lr": 0.1}, {"params": params[2:], "lr": 0.2}]
    if swapped:
        groups.reverse()
    if group_count == 1:
        groups = [{"params": params}]
    return model, kind(groups, lr=0.1)


def _saved_then_restored(
    root: Path,
    fmt: str,
    saved: tuple[Any, ...],
    restored: tuple[Any, ...],
    strict: bool,
    fresh: list[tuple[torch.nn.Module, torch.optim.Optimizer]] | None = None,
) -> torch.optim.Optimizer:
    """Save one step of a model with ``saved`` (optimizer class, group count, optionally
    whether the groups are swapped), restore it into a fresh one with ``restored`` (the model
    and optimizer appended to ``fresh`` first, to look at when the restore raises); the
    restored optimizer."""
    model, optim = _two_layer_optimizer(*saved, seed=0)
    model(torch.randn(2, 3)).sum().backward()
    optim.step()
    with distckpt.CheckpointManager(root, format=fmt, timeout=30) as mgr:
        mgr.save(1, {"app": ModelOptimizerState(model, optim)})
    model, optim = _two_layer_optimizer(*restored, seed=1)
    if fresh is not None:
        fresh.append((model, optim))
    with distckpt.CheckpointManager(root, format=fmt, timeout=30) as mgr:
        mgr.restore("last", state={"app": ModelOptimizerState(model, optim)}, strict=strict)
    return optim


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_a_strict_restore_refuses_another_optimizer_class(tmp_path: Path, fmt: str) -> None:
    """Adam's per-parameter state keys are RAdam's too, but their group settings differ
    (``amsgrad``, ``fused``): a strict restore compares them and refuses, naming them."""
    with pytest.raises(KeyMismatch) as raised:
        _saved_then_restored(
            tmp_path, fmt, (torch.optim.Adam, 1), (torch.optim.RAdam, 1), strict=True
        )
    assert "app.optim.param_groups.0.amsgrad" in raised.value.unexpected_keys


#: the names of a Linear layer's parameters
PARAMS = ("weight", "bias")


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("fmt", ["torch", "dcp"])
@pytest.mark.parametrize("saved_groups, restored_groups", [(1, 2), (2, 1)])
def test_a_changed_set_of_parameter_groups_is_refused_whatever_strict_is(
    tmp_path: Path, fmt: str, strict: bool, saved_groups: int, restored_groups: int
) -> None:
    """The optimizer loads groups by position: one group saved and two restored (or the
    reverse) moves parameters between groups, which nothing can load; refused in both formats,
    naming each group with its saved and given parameters, before anything is loaded."""
    fresh: list[tuple[torch.nn.Module, torch.optim.Optimizer]] = []
    with pytest.raises(KeyMismatch) as raised:
        _saved_then_restored(
            tmp_path,
            fmt,
            (torch.optim.Adam, saved_groups),
            (torch.optim.Adam, restored_groups),
            strict=strict,
            fresh=fresh,
        )
    assert "parameter groups" in str(raised.value)
    assert "app.optim.param_groups.0: saved [" in str(raised.value)
    assert "app.optim.param_groups.1: saved [" in str(raised.value)
    named = {*raised.value.missing_keys, *raised.value.unexpected_keys}
    assert named == {f"app.optim.param_groups.{i}.params.1.{p}" for i in (0, 1) for p in PARAMS}
    as_built, _ = _two_layer_optimizer(torch.optim.Adam, restored_groups, seed=1)
    for loaded, built in zip(fresh[0][0].parameters(), as_built.parameters()):
        assert torch.equal(loaded, built)  # refused before anything was loaded


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_parameters_moved_between_as_many_groups_are_refused_even_when_not_strict(
    tmp_path: Path, fmt: str
) -> None:
    """Two groups saved (a learning rate each), the same two restored in the other order: each
    group's parameters are another group's now, which is refused ("torch": before anything is
    loaded; "dcp": before the optimizer's own load, which would have filled its state)."""
    fresh: list[tuple[torch.nn.Module, torch.optim.Optimizer]] = []
    with pytest.raises(KeyMismatch) as raised:
        _saved_then_restored(
            tmp_path,
            fmt,
            (torch.optim.Adam, 2),
            (torch.optim.Adam, 2, True),
            strict=False,
            fresh=fresh,
        )
    assert "parameter groups" in str(raised.value)
    named = {*raised.value.missing_keys, *raised.value.unexpected_keys}
    assert named == {
        f"app.optim.param_groups.{group}.params.{layer}.{name}"
        for group in (0, 1)
        for layer in (0, 1)
        for name in PARAMS
    }
    model, optimizer = fresh[0]
    assert not optimizer.state_dict()["state"]
    if fmt == "torch":  # a "dcp" read has loaded the tensors in place before the check
        as_built, _ = _two_layer_optimizer(torch.optim.Adam, 2, seed=1, swapped=True)
        for loaded, built in zip(model.parameters(), as_built.parameters()):
            assert torch.equal(loaded, built)


def test_a_strict_load_state_dict_refuses_parts_it_does_not_have() -> None:
    """Called directly (not through a restore, whose key check comes first), a strict load of a
    state with a part besides ``model`` refuses it instead of dropping it without a word."""
    app = ModelOptimizerState(torch.nn.Linear(2, 2))
    saved = {
        "model": {key: torch.zeros_like(value) for key, value in app.model.state_dict().items()}
    }
    with pytest.raises(InvalidArgument, match=r"expects a state dict with keys \['model'\]"):
        app.load_state_dict({**saved, "optim": {}}, strict=True)
    assert app.model.weight.any()  # refused before anything was loaded
    app.load_state_dict({**saved, "optim": {}}, strict=False)
    assert not app.model.weight.any()


def test_load_state_dict_keeps_torchs_whole_message() -> None:
    """The keys torch names are on the lines after its first: none is cut off."""
    app = ModelOptimizerState(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)))
    partial = {"model": {"0.weight": torch.zeros(2, 2), "0.bias": torch.zeros(2)}}
    with pytest.raises(InvalidArgument) as raised:
        app.load_state_dict(partial, strict=True)
    assert "1.weight" in str(raised.value)
    app.load_state_dict(partial, strict=False)
    assert not app.model[0].weight.any()


def test_a_non_strict_load_state_dict_keeps_the_groups_the_state_lacks() -> None:
    """Called directly with a state holding the first of two parameter groups, a non-strict load
    takes that group's settings and keeps the second's current ones, as it keeps any other
    setting the state lacks (a restore refuses another number of groups before this)."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    groups = [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[1].parameters()}]
    optim = torch.optim.SGD(groups, lr=0.2, momentum=0.9)
    optim.param_groups[1]["lr"] = 0.3  # as a scheduler sets it: kept is told from reset (0.2)
    app = ModelOptimizerState(model, optim)
    saved = app.state_dict()
    first = {**saved["optim"]["param_groups"][0], "lr": 0.5}
    app.load_state_dict({**saved, "optim": {"state": {}, "param_groups": [first]}}, strict=False)
    assert [group["lr"] for group in optim.param_groups] == [0.5, 0.3]


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda optim: torch.optim.lr_scheduler.StepLR(optim, 1),
        lambda optim: torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=0.1, total_steps=10),
        lambda optim: torch.optim.lr_scheduler.CyclicLR(optim, base_lr=0.01, max_lr=0.1),
    ],
    ids=["StepLR", "OneCycleLR", "CyclicLR"],
)
def test_scheduler_group_keys_names_every_setting_a_scheduler_adds(make_scheduler: Any) -> None:
    """The settings a restore leaves out of its comparison are all a scheduler adds to a
    group: a torch release whose schedulers add another must extend SCHEDULER_GROUP_KEYS."""
    optim = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
    before = set(optim.param_groups[0])
    make_scheduler(optim)
    added = set(optim.param_groups[0]) - before
    assert added and added <= SCHEDULER_GROUP_KEYS
