"""Capture and restore every random number generator a training loop depends on.

The captured state is plain data and tensors only, so it is saved in a checkpoint and loaded
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from distckpt.errors import GeneratorDeviceMismatch

if TYPE_CHECKING:
    from distckpt.load_report import LoadReport

try:
    import numpy as np
except ImportError:  # NumPy is optional
    np = None  # type: ignore[assignment]

logger = logging.getLogger("distckpt")

#: the parts :func:`capture_rng` may capture, each only where its generator exists
RNG_PARTS = ("python", "torch", "numpy", "cuda")


def capture_rng() -> dict[str, Any]:
    """The states of Python's ``random``, NumPy's global generator (when NumPy is installed),
    torch's CPU generator and every CUDA device's generator (when CUDA is available)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if np is not None:
        numpy_state = np.random.get_state(legacy=False)
        state["numpy"] = {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype("int64")),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set every generator captured by :func:`capture_rng`. Parts missing from ``state`` (say
    NumPy's, captured where NumPy was not installed, or CUDA's, captured where CUDA was not
    available) are left as they are; parts this process has no generator for (CUDA's where
    CUDA is not available, NumPy's where NumPy is not installed) are skipped, and logged."""
    skipped = [
        part
        for part, here in (("numpy", np is not None), ("cuda", torch.cuda.is_available()))
        if part in state and not here
    ]
    if skipped:
        logger.warning(
            "random number generator states not restored, having no generator here: %s",
            ", ".join(skipped),
        )
    if "python" in state:
        python = state["python"]
        random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state and np is not None:
        saved = state["numpy"]
        np.random.set_state(
            {
                "bit_generator": saved["bit_generator"],
                "state": {"key": saved["key"].numpy().astype("uint32"), "pos": saved["pos"]},
                "has_gauss": saved["has_gauss"],
                "gauss": saved["gauss"],
            }
        )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restores_partly(template: Any, saved: Any) -> bool:
    """Whether ``template`` is an :class:`RNGState` and ``saved`` a state it restores, if
    only in part (:func:`restore_rng`): a dict of some of :data:`RNG_PARTS`, whichever
    generators existed where it was captured."""
    return (
        isinstance(template, RNGState)
        and isinstance(saved, dict)
        and bool(saved)
        and all(part in RNG_PARTS for part in saved)
    )


class RNGState:
    """The random number generators as a stateful value: put ``{"rng": RNGState()}`` in the
    state you save. Its ``state_dict()`` captures the generators at the moment of each save
    (a :func:`capture_rng` snapshot taken once would save the same stale state every time),
    and restoring loads them back with :func:`restore_rng`: a checkpoint captured where CUDA
    was available restores the other generators where it is not, and the reverse."""

    def state_dict(self) -> dict[str, Any]:
        return capture_rng()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng(state)

    def __repr__(self) -> str:
        return "RNGState()"


#: The keys of a saved :class:`torch.Generator`: its ``get_state()`` and its device's name.
GENERATOR_KEYS = ("generator_state", "device")


def saved_generator(generator: torch.Generator) -> dict[str, Any]:
    """``generator`` as plain data (a byte tensor and a string), which either format saves
    without pickling and a restore sets back into the given generator in place."""
    return {"generator_state": generator.get_state(), "device": str(generator.device)}


def load_generator(
    template: torch.Generator, loaded: Any, path: str, report: LoadReport, *, apply: bool
) -> None:
    """Set ``template`` to the state :func:`saved_generator` saved, in place: the same object
    (the one a sampler holds) continues its stream. A saved generator of another device
    raises :class:`~distckpt.errors.GeneratorDeviceMismatch` (the device's type counts: a
    generator's state does not depend on the device index); anything else saved there is
    reported as a key of another kind."""
    if isinstance(loaded, torch.Generator):
        # Checkpoints from before generators were saved as data hold the pickled generator (read
        # with allow_pickle=True); its state restores the same.
        loaded = saved_generator(loaded)
    if not (isinstance(loaded, Mapping) and set(loaded) == set(GENERATOR_KEYS)):
        report.missing_keys.append(path)
        if isinstance(loaded, (Mapping, list)):
            report.unexpected_keys.append(path)
        return
    saved_device, given_device = str(loaded["device"]), str(template.device)
    if torch.device(saved_device).type != template.device.type:
        raise GeneratorDeviceMismatch(
            f"{path or 'state'}: the checkpoint holds a generator of device {saved_device}, "
            f"restored into one of device {given_device}: make the generator on "
            f"{saved_device}, or load the checkpoint without state= to read its state",
            key=path,
            saved_device=saved_device,
            given_device=given_device,
        )
    if apply:
        template.set_state(loaded["generator_state"].to("cpu", torch.uint8))
