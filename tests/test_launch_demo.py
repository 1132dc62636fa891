"""End-to-end tests of ``launch/demo.sh`` stopped and crashed as the READMEs say, and of
``launch/train_fsdp.py``'s preemption save, under the real torchrun launcher (the job harness
is ``tests/test_launch.py``'s). A torchrun start costs seconds: this file starts it three times,
twice for the demo (crashed, then resumed and stopped with Ctrl-C) and once for the FSDP job.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest

from tests.test_launch import (
    REPO,
    TORCHRUN_2,
    TORCHRUN_SHUTDOWN_WINDOW,
    Job,
    _run_readme_commands,
    committed_steps,
    last_target,
)

TRAIN_FSDP = REPO / "launch" / "train_fsdp.py"
#: launch/README.md's commands that crash the demo started as ``bash launch/demo.sh ... &``
#: with its pid in ``DEMO``.
CRASH_THE_DEMO = "AGENT=$(pgrep -P $DEMO)\nkill -9 $(pgrep -P $AGENT) $AGENT\n"


def _demo_copy(tmp_path: Path) -> Path:
    """A tree holding the demo's scripts as they are here, in which it makes its runs/demo.
    Its scripts/install.sh only says it ran: the real one pip-installs this package, and the
    tests already import distckpt from this tree (PYTHONPATH), which the demo's ranks inherit."""
    tree = tmp_path / "tree"
    (tree / "launch").mkdir(parents=True)
    (tree / "scripts").mkdir()
    for name in ("demo.sh", "run_local.sh", "train.py"):
        (tree / "launch" / name).write_bytes((REPO / "launch" / name).read_bytes())
    (tree / "scripts" / "install.sh").write_text("echo 'install: already installed'\n")
    return tree


@pytest.mark.torchrun
@pytest.mark.timeout(240)
def test_demo_stopped_by_ctrl_c_or_crashed_as_the_readmes_say_resumes(tmp_path: Path) -> None:
    """The quick start's promise: stopped with Ctrl-C, or crashed with launch/README.md's
    ``kill -9`` commands, the demo leaves no process behind, and run again it resumes."""
    tree = _demo_copy(tmp_path)
    root = tree / "runs" / "demo"
    args = ["--steps", "100", "--save-every", "5", "--log-every", "1"]
    demo = ["bash", "launch/demo.sh", *args]
    python = {"PYTHON": sys.executable}

    with Job([*demo, "--sleep", "0.1"], tree, python) as job:
        job.wait_for(r"^saved step=5$", 90)
        _run_readme_commands(CRASH_THE_DEMO, DEMO=job.process.pid)
        job.wait(30)
        job.wait_until_dead(60)  # no orphaned worker trains on
    assert "done step" not in job.output
    crashed_at = committed_steps(root)[-1]

    # Ctrl-C: the terminal sends SIGINT to its foreground process group, the demo's.
    with Job([*demo, "--sleep", "0.1"], tree, python) as job:
        job.wait_for(rf"^resumed from step {crashed_at} ", 90)
        job.wait_for(rf"^saved step={crashed_at + 5}$", 60)
        os.killpg(job.process.pid, signal.SIGINT)
        job.wait(TORCHRUN_SHUTDOWN_WINDOW + 15)
        job.wait_until_dead(60)
    assert "done step" not in job.output
    assert committed_steps(root)[-1] >= crashed_at + 5


@pytest.mark.torchrun
@pytest.mark.timeout(150)
def test_sigterm_to_the_torchrun_agent_of_the_fsdp_job_saves_that_step(tmp_path: Path) -> None:
    """The FSDP job saves on a preemption notice too, as the SLURM docs say of both jobs."""
    root = tmp_path / "ckpt"
    args = ["--root", str(root), "--steps", "100000", "--save-every", "100000"]
    torchrun = [*TORCHRUN_2[:-1], str(TRAIN_FSDP), *args, "--log-every", "1"]
    with Job(torchrun, tmp_path) as job:
        job.wait_for(r"^step=3 ", 90)
        job.process.send_signal(signal.SIGTERM)
        job.wait(TORCHRUN_SHUTDOWN_WINDOW + 15)
        assert job.alive() == []
    preempted = re.findall(r"^preempted at step=(\d+) rank=(\d+) ", job.output, re.MULTILINE)
    assert sorted(rank for _, rank in preempted) == ["0", "1"], job.output
    assert len({step for step, _ in preempted}) == 1, job.output
    step = int(preempted[0][0])
    assert committed_steps(root) == [step]
    assert last_target(root) == f"step-{step:08d}"
    assert "done step" not in job.output
