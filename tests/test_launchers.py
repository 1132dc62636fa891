"""The SLURM and multi-node launchers in launch/: their dry runs, stand-ins for Slurm's commands,
and their refusals (two torchrun agents with c10d rendezvous train end to end in
``tests/test_launch_demo.py``)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from pathlib import Path

import pytest

from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[1]


def _dry_run(tmp_path: Path, **variables: str) -> str:
    """What slurm.sbatch prints with DRY_RUN=1, given ``variables`` besides a job's own."""
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("SCRIPT", "WAIT_FOR_ROOT")},
        "DRY_RUN": "1",
        "SLURM_JOB_NODELIST": "node7,node8",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "4242",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_SUBMIT_DIR": str(REPO),
        **variables,
    }
    return subprocess.run(
        ["bash", str(REPO / "launch" / "slurm.sbatch"), "--root", "/shared/ckpt"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout


def test_slurm_script_dry_run(tmp_path: Path) -> None:
    out = _dry_run(tmp_path)
    command = shlex.split(out.splitlines()[0])
    assert command[:2] == ["srun", "--kill-on-bad-exit=1"]
    joined = " ".join(command)
    assert "--nnodes 2" in joined and "--nproc-per-node 8" in joined
    assert "--rdzv-backend c10d" in joined and "--rdzv-endpoint node7:29500" in joined
    assert "--rdzv-id 4242" in joined
    # The requeued job waits for a predecessor's rank 0 still holding the root; the
    # submission's own arguments come after the flag, so they can override it.
    assert command[-5:] == ["launch/train.py", "--wait-for-root", "300", "--root", "/shared/ckpt"]
    assert "scontrol requeue 4242" in out
    script = (REPO / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@120" in script and "#SBATCH --requeue" in script


@pytest.mark.parametrize(
    ("variables", "script_and_flag"),
    [
        ({"WAIT_FOR_ROOT": "60"}, ["launch/train.py", "--wait-for-root", "60"]),
        ({"WAIT_FOR_ROOT": ""}, ["launch/train.py"]),  # set but empty: no flag
        # A script of the user's may not know the flag: it gets it only when asked for.
        ({"SCRIPT": "mine.py"}, ["mine.py"]),
        ({"SCRIPT": "mine.py", "WAIT_FOR_ROOT": ""}, ["mine.py"]),
        ({"SCRIPT": "mine.py", "WAIT_FOR_ROOT": "60"}, ["mine.py", "--wait-for-root", "60"]),
    ],
)
def test_slurm_script_passes_wait_for_root_to_train_py_unless_emptied_else_only_if_set(
    tmp_path: Path, variables: dict[str, str], script_and_flag: list[str]
) -> None:
    command = shlex.split(_dry_run(tmp_path, **variables).splitlines()[0])
    start = command.index(script_and_flag[0])
    assert command[start:] == [*script_and_flag, "--root", "/shared/ckpt"]


# Stand-ins for Slurm's commands: no Slurm runs on this machine. The batch script is real bash
# and is signalled the way Slurm signals it; only what srun and scontrol would do is played.
# srun records that it started, then ends with STAND_IN_SRUN_STATUS, or, given "preempt", runs
# until a SIGTERM and then exits 1 as torchrun does after forwarding a preemption signal.
STAND_IN_SRUN = """#!/usr/bin/env bash
echo started >> "$STAND_IN_LOG"
if [ "$STAND_IN_SRUN_STATUS" != preempt ]; then exit "$STAND_IN_SRUN_STATUS"; fi
sleep 60 & sleeper=$!
trap 'kill "$sleeper"; exit 1' TERM
wait "$sleeper"
"""
# scontrol, given STAND_IN_GO, first logs "resolving" and waits for that file to exist: the
# batch script is then in its setup, before srun starts. Its requeue ends with
# STAND_IN_REQUEUE_STATUS (default 0).
STAND_IN_SCONTROL = """#!/usr/bin/env bash
if [ "$1 $2" = "show hostnames" ]; then
  if [ -n "${STAND_IN_GO:-}" ]; then
    echo resolving >> "$STAND_IN_LOG"
    while [ ! -e "$STAND_IN_GO" ]; do sleep 0.05; done
  fi
  echo "$3" | tr ',' '\\n'; exit 0
fi
echo "scontrol $*" >> "$STAND_IN_LOG"
if [ "$1" = requeue ]; then exit "${STAND_IN_REQUEUE_STATUS:-0}"; fi
"""


def _start_batch_script(
    tmp_path: Path, srun_status: str, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], Path]:
    """slurm.sbatch started as Slurm would start it, with the stand-ins first on PATH; returns
    the batch shell and the log the stand-ins write."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", STAND_IN_SRUN), ("scontrol", STAND_IN_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "stand-in.log"
    log.touch()
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "node7",
        "SLURM_JOB_ID": "4242",
        "SLURM_CPUS_PER_TASK": "1",
        "SLURM_SUBMIT_DIR": str(REPO),
        "STAND_IN_LOG": str(log),
        "STAND_IN_SRUN_STATUS": srun_status,
        **(extra_env or {}),
    }
    batch = subprocess.Popen(
        ["bash", str(REPO / "launch" / "slurm.sbatch"), "--root", str(tmp_path / "ckpt")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return batch, log


@pytest.mark.parametrize("srun_status", [0, 3])
def test_slurm_script_exits_with_the_status_of_srun(tmp_path: Path, srun_status: int) -> None:
    """Slurm marks a job FAILED (and holds back its `afterok` dependants) from this status."""
    batch, _ = _start_batch_script(tmp_path, str(srun_status))
    out, _ = batch.communicate(timeout=30)
    assert batch.returncode == srun_status, out


def test_slurm_script_exits_0_once_it_requeued_the_job_on_a_preemption_notice(
    tmp_path: Path,
) -> None:
    batch, log = _start_batch_script(tmp_path, "preempt")
    try:
        wait_until(lambda: "started" in log.read_text(), "the stand-in srun to start", 30)
        batch.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends before the limit
        out, _ = batch.communicate(timeout=30)
    finally:
        batch.kill()
    assert "scontrol requeue 4242" in log.read_text()
    assert "preemption notice: requeueing job 4242" in out
    assert batch.returncode == 0, out


@pytest.mark.parametrize(("requeue_status", "batch_status"), [(0, 0), (1, 1)])
def test_slurm_script_requeues_and_starts_nothing_on_a_notice_before_srun(
    tmp_path: Path, requeue_status: int, batch_status: int
) -> None:
    """The notice comes while the batch shell resolves its nodes: the trap is already set (not
    bash's default for SIGUSR1, which ends the shell and loses the requeue), and finds no srun
    to stop (under ``set -u``, not an unbound variable). Requeued, the job exits 0; when the
    requeue fails, 1, since nothing ran (Slurm marks it FAILED)."""
    go = tmp_path / "go"
    extra_env = {"STAND_IN_GO": str(go), "STAND_IN_REQUEUE_STATUS": str(requeue_status)}
    batch, log = _start_batch_script(tmp_path, "preempt", extra_env)
    try:
        wait_until(lambda: "resolving" in log.read_text(), "the batch script's setup", 30)
        batch.send_signal(signal.SIGUSR1)
        go.touch()
        out, _ = batch.communicate(timeout=30)
    finally:
        batch.kill()
    assert "scontrol requeue 4242" in log.read_text()
    assert "started" not in log.read_text(), "srun started after the notice"
    assert "preemption notice before srun started: not starting it" in out
    assert "unbound variable" not in out
    assert batch.returncode == batch_status, out


def test_slurm_script_refuses_to_run_outside_slurm(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(
        ["bash", str(REPO / "launch" / "slurm.sbatch")],
        cwd=tmp_path,
        env={**env, "DRY_RUN": "1"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0 and "not inside a SLURM job" in out.stderr


def test_multinode_script_names_missing_variables(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("NNODES", "RDZV_ENDPOINT")}
    out = subprocess.run(
        ["bash", str(REPO / "launch" / "multinode.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0 and "NNODES" in out.stderr
