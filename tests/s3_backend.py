"""Whether this tree has the ``s3://`` storage backend yet (issue 17), for the end-to-end tests
written against its public API before it landed.

Until it lands, those tests still run, marked :data:`pending_backend`: an expected failure
that names the reason, so a run shows them as ``xfail`` instead of hiding them; once
``CheckpointManager`` takes ``storage_options`` they are ordinary tests that must pass.
"""

from __future__ import annotations

import inspect

import pytest

import distckpt

BACKEND_LANDED = "storage_options" in inspect.signature(distckpt.CheckpointManager).parameters

pending_backend = pytest.mark.xfail(
    not BACKEND_LANDED,
    reason="the s3:// storage backend (issue 17) is not in this tree yet",
    strict=False,
)
