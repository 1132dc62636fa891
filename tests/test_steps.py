"""StepTracker counts real optimizer steps with real torch optimizers."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from distckpt.errors import InvalidArgument
from distckpt.manager import CheckpointManager
from distckpt.model_state import ModelOptimizerState
from distckpt.steps import StepTracker, steps_not_counted


def make_model() -> tuple[nn.Linear, torch.optim.SGD]:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


def backward(model: nn.Module) -> None:
    model(torch.randn(4, 3)).pow(2).mean().backward()


def test_manual_steps_are_counted() -> None:
    model, optimizer = make_model()
    tracker = StepTracker(optimizer)
    assert tracker.step == 0
    for expected in range(1, 6):
        optimizer.zero_grad()
        backward(model)
        optimizer.step()
        assert tracker.step == expected
    tracker.close()


def test_gradient_accumulation_counts_one_per_step() -> None:
    model, optimizer = make_model()
    with StepTracker(optimizer) as tracker:
        for _ in range(3):
            optimizer.zero_grad()
            for _micro_batch in range(4):
                backward(model)
            optimizer.step()
        assert tracker.step == 3


def test_step_in_a_batch_end_hook_is_counted() -> None:
    model, optimizer = make_model()
    tracker = StepTracker(optimizer)

    # A toy framework loop that only calls user hooks and never steps the optimizer itself.
    def fit(batches: int, on_batch_end: Callable[[int], None]) -> None:
        for index in range(batches):
            backward(model)
            on_batch_end(index)

    def on_batch_end(index: int) -> None:
        if index % 2 == 1:
            optimizer.step()
            optimizer.zero_grad()

    fit(6, on_batch_end)
    assert tracker.step == 3
    tracker.close()


def test_two_optimizers_count_follows_the_first() -> None:
    torch.manual_seed(0)
    generator, discriminator = nn.Linear(3, 3), nn.Linear(3, 1)
    opt_g = torch.optim.SGD(generator.parameters(), lr=0.01)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=0.01)
    tracker = StepTracker(opt_g, opt_d)
    for _ in range(4):
        # Two discriminator steps per generator step, as some GAN loops do.
        for _ in range(2):
            opt_d.zero_grad()
            discriminator(generator(torch.randn(2, 3)).detach()).mean().backward()
            opt_d.step()
        opt_g.zero_grad()
        discriminator(generator(torch.randn(2, 3))).mean().backward()
        opt_g.step()
    assert tracker.step == 4
    assert tracker.steps_by_optimizer == (4, 8)
    # A step of only the second optimizer is not a training step.
    opt_d.step()
    assert tracker.step == 4
    assert tracker.steps_by_optimizer == (4, 9)
    tracker.close()


def test_same_optimizer_twice_is_refused() -> None:
    _, optimizer = make_model()
    with pytest.raises(InvalidArgument, match="more than once"):
        StepTracker(optimizer, optimizer)
    # The refused tracker left no hook behind.
    optimizer.step()
    with StepTracker(optimizer) as tracker:
        optimizer.step()
        assert tracker.step == 1


def test_not_an_optimizer_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="optimizer 0"):
        StepTracker(object())  # type: ignore[arg-type]


def test_state_dict_round_trip() -> None:
    model, optimizer = make_model()
    with StepTracker(optimizer) as tracker:
        for _ in range(7):
            backward(model)
            optimizer.step()
        state = tracker.state_dict()
    assert state["step"] == 7
    assert state["by_optimizer"] == [7]

    # A fresh process: new optimizer, new tracker, restored count keeps going.
    model2, optimizer2 = make_model()
    with StepTracker(optimizer2) as restored:
        restored.load_state_dict(state)
        assert restored.step == 7
        backward(model2)
        optimizer2.step()
        assert restored.step == 8
        assert restored.state_dict() == {"step": 8, "by_optimizer": [8]}


def test_state_dict_survives_torch_save(tmp_path: object) -> None:
    _, optimizer = make_model()
    with StepTracker(optimizer) as tracker:
        optimizer.step()
        path = f"{tmp_path}/tracker.pt"
        torch.save(tracker.state_dict(), path)
        loaded = torch.load(path, weights_only=True)
    with StepTracker(make_model()[1]) as restored:
        restored.load_state_dict(loaded)
        assert restored.step == 1


def test_load_state_dict_step_only_and_optimizer_count_change() -> None:
    _, opt_a = make_model()
    _, opt_b = make_model()
    with StepTracker(opt_a, opt_b) as tracker:
        tracker.load_state_dict({"step": 12})
        assert tracker.steps_by_optimizer == (12, 0)
        tracker.load_state_dict({"step": 5, "by_optimizer": [5, 9]})
        assert tracker.steps_by_optimizer == (5, 9)
        # Saved with one optimizer, resumed with two: the step survives, the other starts at 0.
        tracker.load_state_dict({"step": 3, "by_optimizer": [3]})
        assert tracker.steps_by_optimizer == (3, 0)


@pytest.mark.parametrize(
    "state",
    [
        {},
        {"step": -1},
        {"step": 1.5},
        {"step": "3"},
        {"step": True},
        {"step": 3, "by_optimizer": [4]},
        {"step": 3, "by_optimizer": []},
        {"step": 3, "by_optimizer": [3, -2]},
        {"step": 3, "by_optimizer": 3},
        [("step", 3)],
    ],
)
def test_load_state_dict_validates(state: object) -> None:
    _, optimizer = make_model()
    with StepTracker(optimizer) as tracker:
        optimizer.step()
        with pytest.raises(InvalidArgument):
            tracker.load_state_dict(state)  # type: ignore[arg-type]
        # A refused state changes nothing.
        assert tracker.step == 1


def test_close_removes_hooks() -> None:
    model, optimizer = make_model()
    hooks_before = len(optimizer._optimizer_step_post_hooks)
    tracker = StepTracker(optimizer)
    assert len(optimizer._optimizer_step_post_hooks) == hooks_before + 1
    backward(model)
    optimizer.step()
    tracker.close()
    assert tracker.closed
    assert len(optimizer._optimizer_step_post_hooks) == hooks_before
    optimizer.step()
    assert tracker.step == 1
    tracker.close()  # idempotent
    assert tracker.step == 1


def test_context_manager_closes_on_error() -> None:
    _, optimizer = make_model()
    with pytest.raises(RuntimeError), StepTracker(optimizer) as tracker:
        optimizer.step()
        raise RuntimeError("training crashed")
    assert tracker.closed
    optimizer.step()
    assert tracker.step == 1


def test_failed_step_is_not_counted() -> None:
    model, optimizer = make_model()

    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("bad step")

    with StepTracker(optimizer) as tracker:
        backward(model)
        with pytest.raises(RuntimeError):
            optimizer.step(closure=explode)
        assert tracker.step == 0


def train_one_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """One real step, gradients dropped after it (``zero_grad(set_to_none=True)``, as
    Lightning does): torch's ``get_state_dict`` / ``set_state_dict`` then create the empty
    state of a plain SGD by a zero-learning-rate step of their own."""
    backward(model)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("checkpoint_format", ["torch", "dcp"])
def test_saving_a_plain_sgd_through_model_optimizer_state_counts_no_step(
    tmp_path: Path, checkpoint_format: str
) -> None:
    """Plain SGD (no momentum) keeps no state, so torch steps it at every ``get_state_dict``:
    the tracker counts the real steps only, and each checkpoint lands at its real step."""
    model, optimizer = make_model()
    with (
        StepTracker(optimizer) as tracker,
        CheckpointManager(tmp_path, format=checkpoint_format, fsync=False) as mgr,
    ):
        state = {"steps": tracker, "app": ModelOptimizerState(model, optimizer)}
        for real_steps in range(1, 5):
            train_one_step(model, optimizer)
            mgr.save(tracker.step, state)
            assert tracker.step == real_steps
        assert mgr.steps() == [1, 2, 3, 4]


@pytest.mark.parametrize("tracker_first", [True, False], ids=["tracker-first", "tracker-last"])
@pytest.mark.parametrize("checkpoint_format", ["torch", "dcp"])
def test_a_restored_tracker_resumes_the_exact_count_wherever_it_sits_in_the_state(
    tmp_path: Path, checkpoint_format: str, tracker_first: bool
) -> None:
    """First in the state, the tracker is restored before ``set_state_dict`` steps the fresh
    SGD to create its state; last, after it: either way that step does not move the restored
    count (nor does the restore's own ``get_state_dict``, for its template)."""
    model, optimizer = make_model()
    with (
        StepTracker(optimizer) as tracker,
        CheckpointManager(tmp_path, format=checkpoint_format, fsync=False) as mgr,
    ):
        for _ in range(3):
            train_one_step(model, optimizer)
        mgr.save(tracker.step, {"steps": tracker, "app": ModelOptimizerState(model, optimizer)})

    resumed_model, resumed_optimizer = make_model()
    with (
        StepTracker(resumed_optimizer) as resumed,
        CheckpointManager(tmp_path, format=checkpoint_format, fsync=False) as mgr,
    ):
        app = ModelOptimizerState(resumed_model, resumed_optimizer)
        state = {"steps": resumed, "app": app} if tracker_first else {"app": app, "steps": resumed}
        checkpoint = mgr.restore("last", state=state)
        assert checkpoint is not None and checkpoint.step == 3
        assert resumed.step == 3
        train_one_step(resumed_model, resumed_optimizer)
        assert resumed.step == 4


def test_a_step_in_another_thread_is_counted_while_one_thread_is_not_counting() -> None:
    """:func:`steps_not_counted` covers its own thread only: a real step the training thread
    takes while another thread is inside the block counts, and one taken inside it does not."""
    model, optimizer = make_model()
    inside, release = threading.Event(), threading.Event()

    def hold_the_block() -> None:
        with steps_not_counted():
            inside.set()
            release.wait(timeout=30)

    holder = threading.Thread(target=hold_the_block)
    with StepTracker(optimizer) as tracker:
        holder.start()
        try:
            assert inside.wait(timeout=30)
            train_one_step(model, optimizer)
            assert tracker.step == 1
        finally:
            release.set()
            holder.join(timeout=30)
        with steps_not_counted():
            train_one_step(model, optimizer)
        assert tracker.step == 1


def test_a_real_step_during_an_async_save_is_counted(tmp_path: Path) -> None:
    """An async save takes ``state_dict()`` in the calling thread (torch's step there is not
    counted) and writes in the background: a real step meanwhile counts."""
    model, optimizer = make_model()
    with (
        StepTracker(optimizer) as tracker,
        CheckpointManager(tmp_path, format="dcp", fsync=False, async_save=True) as mgr,
    ):
        state = {"steps": tracker, "app": ModelOptimizerState(model, optimizer)}
        for real_steps in range(1, 4):
            train_one_step(model, optimizer)
            mgr.save(tracker.step, state)
            train_one_step(model, optimizer)
            assert tracker.step == 2 * real_steps
        mgr.wait()
        assert mgr.steps() == [1, 3, 5]


def test_the_readmes_recipe_sets_back_an_older_count_keeping_the_other_optimizers(
    tmp_path: Path,
) -> None:
    """The README's recipe for an older "dcp" checkpoint whose tracker holds one more than its
    step, run with two optimizers: the first optimizer's count is set back to the
    checkpoint's step, the second's stays as restored (the recipe must not zero it)."""
    model = nn.Linear(3, 1)
    first = torch.optim.SGD([model.weight], lr=0.01)
    second = torch.optim.SGD([model.bias], lr=0.01)
    with StepTracker(first, second) as tracker:
        # As such a checkpoint holds it: saved at step 5, its tracker's count one more.
        tracker.load_state_dict({"step": 6, "by_optimizer": [6, 3]})
        with CheckpointManager(tmp_path / "root", fsync=False) as manager:
            manager.save(5, {"steps": tracker})
        with StepTracker(first, second) as resumed:
            with CheckpointManager(tmp_path / "root", fsync=False) as manager:
                ckpt = manager.restore(state={"steps": resumed})
            assert ckpt is not None and resumed.steps_by_optimizer == (6, 3)
            resumed.load_state_dict(
                {"step": ckpt.step, "by_optimizer": [ckpt.step, *resumed.steps_by_optimizer[1:]]}
            )
            assert resumed.steps_by_optimizer == (5, 3)
