"""distckpt.lightning.DistckptCallback with ``save_on_signal``, in real Trainer fits: the
signals' handlers after a fit, and preemption."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning")

from tests import killing

pytestmark = pytest.mark.timeout(120)

#: A failed fit saving on SIGTERM, then a SIGTERM to its own process: ``sys.argv[1]`` is the root.
FAILED_FIT_THEN_SIGTERM = """
import os, signal, sys
import lightning
from distckpt.lightning import DistckptCallback
from tests.lightning_callbacks_job import ONE_QUIET_DEVICE
from tests.lightning_tiny import FailsInSecondEpoch

callback = DistckptCallback(sys.argv[1], save_on_signal=(signal.SIGTERM,), fsync=False)
trainer = lightning.Trainer(max_epochs=2, callbacks=[callback], **ONE_QUIET_DEVICE)
try:
    trainer.fit(FailsInSecondEpoch())
except RuntimeError:
    print("the fit failed", flush=True)
os.kill(os.getpid(), signal.SIGTERM)
print("survived SIGTERM", flush=True)
sys.exit(3)
"""


def test_sigterm_after_a_failed_fit_terminates_the_process(tmp_path: Path) -> None:
    """Lightning wraps the callback's handler in its own during the fit and puts the closed
    manager's handler back at its teardown: the signal's default action must still be taken
    (the process went on, its SIGTERM swallowed)."""
    finished = subprocess.run(
        [sys.executable, "-c", FAILED_FIT_THEN_SIGTERM, str(tmp_path / "root")],
        cwd=killing.ROOT,
        env=killing._env(),
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert finished.stdout == "the fit failed\n", finished.stderr
    assert finished.returncode == -signal.SIGTERM, finished.stderr
