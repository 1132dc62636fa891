"""A restore into given tensors (``state=``) that torch cannot write in place: a sub-byte dtype
is loaded as its bytes; a tensor nothing can be copied into (an expanded view, a tensor on the
``meta`` device, a dtype torch has no copy into) is refused before anything is loaded; any
other failing copy is an ``InvalidArgument``."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt.errors import InvalidArgument


def save(root: Path, middle: torch.Tensor) -> None:
    with distckpt.CheckpointManager(root, fsync=False) as manager:
        manager.save(1, {"a": torch.full((4,), 7.0), "middle": middle, "z": torch.full((4,), 7.0)})


def given(middle: torch.Tensor) -> dict[str, Any]:
    return {"a": torch.zeros(4), "middle": middle, "z": torch.zeros(4)}


def test_a_sub_byte_tensor_is_restored_in_place_as_its_bytes(root: Path) -> None:
    saved = torch.arange(4, dtype=torch.uint8).view(torch.uint4)
    save(root, saved)
    state = given(torch.zeros(4, dtype=torch.uint8).view(torch.uint4))
    distckpt.load_checkpoint(root, state=state)
    assert state["middle"].dtype == torch.uint4
    assert state["middle"].view(torch.uint8).tolist() == [0, 1, 2, 3]
    assert state["a"].tolist() == state["z"].tolist() == [7.0] * 4


def inference_tensor() -> torch.Tensor:
    with torch.inference_mode():
        return torch.zeros(4)


#: (saved tensor, the given one it cannot be copied into, what the refusal says)
UNWRITABLE: dict[str, tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor], str]] = {
    "expanded": (
        lambda: torch.arange(4.0),
        lambda: torch.zeros(1).expand(4),
        "share memory",
    ),
    "meta": (lambda: torch.arange(4.0), lambda: torch.empty(4, device="meta"), "meta device"),
    "no-copy-dtype": (
        lambda: torch.arange(4, dtype=torch.int16),
        lambda: torch.zeros(4, dtype=torch.int16).view(torch.bits16),
        "no copy from the saved torch.int16 into torch.bits16",
    ),
    "quantized-into-plain": (
        lambda: torch.quantize_per_tensor(torch.arange(4.0), 0.5, 0, torch.qint8),
        lambda: torch.zeros(4),
        "no copy from the saved torch.qint8 into torch.float32",
    ),
    "quantized-of-another-qscheme": (
        lambda: torch.quantize_per_channel(
            torch.arange(4.0),
            torch.tensor([0.5] * 4),
            torch.zeros(4, dtype=torch.int64),
            0,
            torch.qint8,
        ),
        lambda: torch.quantize_per_tensor(torch.zeros(4), 0.1, 0, torch.qint8),
        "quantized tensor only into one of its own qscheme and dtype",
    ),
    "sparse-into-strided": (
        lambda: torch.arange(4.0).to_sparse(),
        lambda: torch.zeros(4),
        "no copy from the saved torch.sparse_coo tensor into a torch.strided one",
    ),
    "inference": (lambda: torch.arange(4.0), inference_tensor, "inference_mode"),
    "other-sub-byte-dtype": (
        lambda: torch.arange(4, dtype=torch.uint8),
        lambda: torch.zeros(4, dtype=torch.uint8).view(torch.uint4),
        "no copy from the saved torch.uint8 into torch.uint4",
    ),
}


@pytest.mark.parametrize("case", UNWRITABLE)
def test_a_tensor_nothing_can_be_copied_into_is_refused_before_anything_is_loaded(
    root: Path, case: str
) -> None:
    make_saved, make_given, reason = UNWRITABLE[case]
    save(root, make_saved())
    state = given(make_given())
    with pytest.raises(InvalidArgument, match=reason) as raised:
        distckpt.load_checkpoint(root, state=state)
    assert "middle:" in str(raised.value) and raised.value.step == 1
    assert state["a"].tolist() == state["z"].tolist() == [0.0] * 4


@pytest.mark.parametrize("case", ["expanded", "meta", "inference"])
def test_a_dcp_restore_refuses_them_before_its_read_loads_the_others(root: Path, case: str) -> None:
    make_saved, make_given, reason = UNWRITABLE[case]
    state = given(make_given())
    with distckpt.CheckpointManager(root, format="dcp", fsync=False) as manager:
        manager.save(1, {"a": torch.full((4,), 7.0), "middle": make_saved(), "z": torch.ones(4)})
        with pytest.raises(InvalidArgument, match=reason):
            manager.restore("last", state=state)
    assert state["a"].tolist() == state["z"].tolist() == [0.0] * 4


def test_a_module_on_the_meta_device_is_refused_before_anything_is_loaded(root: Path) -> None:
    with distckpt.CheckpointManager(root, fsync=False) as manager:
        manager.save(1, {"a": torch.ones(2), "lin": torch.nn.Linear(2, 2)})
        with torch.device("meta"):
            lin = torch.nn.Linear(2, 2)
        state = {"a": torch.zeros(2), "lin": lin}
        with pytest.raises(InvalidArgument, match=r"lin\.weight: it is on the meta device"):
            manager.restore("last", state=state)
    assert state["a"].tolist() == [0.0, 0.0]


def test_a_manager_restore_refuses_it_too_leaving_the_state_as_it_was(root: Path) -> None:
    save(root, torch.arange(4.0))
    state = given(torch.zeros(1).expand(4))
    with (
        distckpt.CheckpointManager(root, fsync=False) as manager,
        pytest.raises(InvalidArgument, match="middle: several of its elements"),
    ):
        manager.restore("last", state=state)
    assert state["a"].tolist() == state["z"].tolist() == [0.0] * 4


@pytest.mark.parametrize(
    ("fmt", "case"),
    # "dcp" with a meta tensor is left out: DCP itself, reading into one, asks for the default
    # process group, which a plain process has none of.
    [("torch", "meta"), ("torch", "inference"), ("dcp", "inference")],
)
def test_a_tensor_under_a_key_the_checkpoint_lacks_is_not_refused(
    root: Path, fmt: str, case: str
) -> None:
    """It is never written: a key added since the save, optional or with strict=False."""
    _, make_given, _ = UNWRITABLE[case]
    with distckpt.CheckpointManager(root, format=fmt, fsync=False) as manager:
        manager.save(1, {"a": torch.full((4,), 7.0)})
        for options in ({"optional_keys": ["new"]}, {"strict": False}):
            state = {"a": torch.zeros(4), "new": make_given()}
            restored = manager.restore("last", state=state, **options)
            assert restored.missing_keys == ("new",) and state["a"].tolist() == [7.0] * 4


class Frozen(torch.Tensor):
    """A tensor refusing every in-place copy into it, as a user's frozen weights might: only
    running the copy tells."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.Tensor.copy_:
            raise RuntimeError("this tensor is frozen")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_copy_torch_refuses_only_as_it_runs_is_an_invalid_argument(root: Path) -> None:
    save(root, torch.arange(4.0))
    state = given(torch.zeros(4).as_subclass(Frozen))
    with pytest.raises(
        InvalidArgument, match=r"middle: cannot load .* it: this tensor is frozen"
    ) as raised:
        distckpt.load_checkpoint(root, state=state)
    assert raised.value.path == str(root / "step-00000001") and raised.value.step == 1


def test_a_tensor_of_another_dtype_takes_the_saved_values_converted(root: Path) -> None:
    with distckpt.CheckpointManager(root, fsync=False) as manager:
        manager.save(
            1,
            {
                "wide": torch.tensor([3e300, 1.5], dtype=torch.float64),
                "f": torch.tensor([1.7, -2.9]),
            },
        )
    state = {"wide": torch.zeros(2), "f": torch.zeros(2, dtype=torch.int64)}
    distckpt.load_checkpoint(root, state=state)
    assert state["wide"].dtype == torch.float32 and state["wide"].tolist() == [float("inf"), 1.5]
    assert state["f"].dtype == torch.int64 and state["f"].tolist() == [1, -2]


def test_an_empty_tensor_takes_an_empty_one_of_a_dtype_torch_has_no_copy_for(root: Path) -> None:
    """Into no element torch copies between any dtypes: the dtype pair is not asked about."""
    save(root, torch.zeros(0, dtype=torch.int16))
    state = given(torch.zeros(0, dtype=torch.int16).view(torch.bits16))
    distckpt.load_checkpoint(root, state=state)
    assert state["middle"].dtype == torch.bits16 and state["a"].tolist() == [7.0] * 4


def test_a_complex_tensor_loads_into_a_real_one_as_its_real_part(root: Path) -> None:
    """The copy probe asks about a complex into a real dtype without warning filters."""
    save(root, torch.tensor([1.5 + 2j, -3 + 0j, 0j, 4j]))
    state = given(torch.zeros(4))
    with warnings.catch_warnings():
        # torch's own copy warns that it drops the imaginary parts; that is what is asked
        warnings.simplefilter("ignore")
        distckpt.load_checkpoint(root, state=state)
    assert state["middle"].tolist() == [1.5, -3.0, 0.0, 0.0]


class _Wrapper:
    """The usual Stateful wrapper of a training script: its ``load_state_dict`` loads a module."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
@pytest.mark.parametrize("case", ["meta", "inference"])
def test_a_module_inside_a_stateful_wrapper_is_checked_too(root: Path, fmt: str, case: str) -> None:
    """A meta-device (or inference-mode) module inside an object with ``state_dict()`` is
    refused before anything is loaded, as it is given directly: it is not left on ``meta``
    with nothing loaded and no word said."""
    with distckpt.CheckpointManager(root, fsync=False, format=fmt) as manager:
        manager.save(1, {"a": torch.ones(2), "app": _Wrapper(torch.nn.Linear(2, 2))})
        with torch.device("meta") if case == "meta" else torch.inference_mode():
            model = torch.nn.Linear(2, 2)
        state = {"a": torch.zeros(2), "app": _Wrapper(model)}
        with pytest.raises(InvalidArgument, match=r"app\.model\.weight: .*nothing was loaded"):
            manager.restore("last", state=state)
    assert state["a"].tolist() == [0.0, 0.0]


def test_a_quantized_tensor_takes_a_saved_float32_one_quantized(root: Path) -> None:
    """torch quantizes a float32 tensor copied into a quantized one (``Module.load_state_dict``
    accepts it): so does a restore; from another dtype it is refused before anything loads."""
    with distckpt.CheckpointManager(root, fsync=False) as manager:
        manager.save(1, {"q": torch.arange(4.0), "d": torch.arange(4, dtype=torch.float64)})
        quantized = torch.quantize_per_tensor(torch.zeros(4), 1.0, 0, torch.qint8)
        state: dict[str, Any] = {"q": quantized}
        manager.restore("last", state=state, strict=False)
        assert state["q"].dequantize().tolist() == [0.0, 1.0, 2.0, 3.0]
        other = {"d": torch.quantize_per_tensor(torch.zeros(4), 1.0, 0, torch.qint8)}
        with pytest.raises(InvalidArgument, match="quantizes only a float32 tensor"):
            manager.restore("last", state=other, strict=False)
