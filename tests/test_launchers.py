"""The multi-node and SLURM launchers in launch/."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import distckpt
from tests.ranks import ReservedPort

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.torchrun
@pytest.mark.timeout(240)
def test_two_torchrun_agents_with_c10d_rendezvous(tmp_path: Path) -> None:
    """Two "nodes" (two torchrun agents on 127.0.0.1, --nnodes 2) train and checkpoint into
    one root; the checkpoint holds both ranks' files."""
    # The rendezvous port is held by this process until the agents are done: torch's TCPStore
    # can still bind it (it sets SO_REUSEADDR), and no other process can meanwhile.
    rendezvous = ReservedPort()
    env = {
        **os.environ,
        "NNODES": "2",
        "NPROC_PER_NODE": "1",
        "RDZV_ENDPOINT": f"127.0.0.1:{rendezvous.port}",
        "RDZV_ID": f"test-{os.getpid()}",
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
    }
    args = ["bash", "launch/multinode.sh", "--root", str(tmp_path), "--steps", "12"]
    args += ["--save-every", "5"]
    agents = [
        subprocess.Popen(
            args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = []
    try:
        for agent in agents:
            out, _ = agent.communicate(timeout=200)
            outputs.append(out)
    finally:
        for agent in agents:
            agent.kill()
        rendezvous.close()
    for agent, out in zip(agents, outputs):
        assert agent.returncode == 0, out[-3000:]
    assert distckpt.CheckpointManager(tmp_path).steps() == [5, 10, 12] or (
        distckpt.CheckpointManager(tmp_path).latest_step() is not None
    )
    info = distckpt.CheckpointManager(tmp_path).checkpoints()[-1]
    assert info.world_size == 2
    assert distckpt.verify(tmp_path).ok


def test_slurm_script_dry_run(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "SLURM_JOB_NODELIST": "node7,node8",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "4242",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_SUBMIT_DIR": str(REPO),
        "PATH": os.environ["PATH"],
    }
    out = subprocess.run(
        ["bash", str(REPO / "launch" / "slurm.sbatch"), "--root", "/shared/ckpt"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    command = shlex.split(out.splitlines()[0])
    assert command[:2] == ["srun", "--kill-on-bad-exit=1"]
    joined = " ".join(command)
    assert "--nnodes 2" in joined and "--nproc-per-node 8" in joined
    assert "--rdzv-backend c10d" in joined and "--rdzv-endpoint node7:29500" in joined
    assert "--rdzv-id 4242" in joined
    assert command[-3:] == ["launch/train.py", "--root", "/shared/ckpt"]
    assert "scontrol requeue 4242" in out
    script = (REPO / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@120" in script and "#SBATCH --requeue" in script


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
