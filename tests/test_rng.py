"""An ``RNGState``: its restore continues every global stream it captured (Python's, NumPy's and
torch's), each generator's whole state included."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

import distckpt


def _seed_every_global_generator(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Gaussians come in pairs: after one, Python and NumPy each hold the pair's second value,
    # which the next Gaussian returns without drawing, so it is state a restore must bring back.
    random.gauss(0.0, 1.0)
    np.random.standard_normal()


def _global_draws() -> tuple[float, ...]:
    return (
        random.gauss(0.0, 1.0),
        random.random(),
        float(np.random.standard_normal()),
        float(np.random.rand()),
        *torch.rand(3).tolist(),
    )


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_an_rng_state_continues_every_global_stream_after_a_restore(root: Path, fmt: str) -> None:
    """The expected draws come from seeding again, not from ``restore_rng``: a restore that
    left out a part of a generator's state (NumPy's position in its key, a cached Gaussian)
    would make both sides of a comparison through it the same."""
    _seed_every_global_generator(5)
    expected = _global_draws()
    with distckpt.CheckpointManager(root, format=fmt, fsync=False) as mgr:
        _seed_every_global_generator(5)  # the generators as the save captures them
        mgr.save(1, {"rng": distckpt.RNGState()})
        _seed_every_global_generator(6)  # the run moves on, then restarts
        mgr.restore("last", state={"rng": distckpt.RNGState()})
        assert _global_draws() == expected
