"""``launch/train.py`` and ``launch/train_fsdp.py`` started while another process holds their
root's lease, as a requeued job is when the previous run's rank 0 lingers: refused at once
without ``--wait-for-root``, waiting for the root and then resuming with it. ``train.py`` runs
as a plain process (world size 1, no torchrun: the lease is rank 0's alone, whatever the
number of ranks); ``train_fsdp.py`` on two ranks forked by ``tests/ranks.py``, also refused
after a short wait. Also: the values ``--wait-for-root`` takes, and the table of ``train.py``'s
flags in ``launch/README.md``, which names the flag.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from distckpt.layout import LEASE_RECORD_NAME
from tests.lease_holders import Holder
from tests.ranks import RankResult, run_ranks, values
from tests.test_dcp import _load_train_fsdp, _run_job  # test_dcp imports torch._dynamo once
from tests.test_launch import LAUNCH_README, PLAIN, Job, committed_steps, done_loss, import_train

STARTUP = 120.0  # a job's start: seconds, or tens of them on a loaded machine


@pytest.mark.timeout(300)
def test_a_lingering_holder_refuses_train_py_unless_it_waits_for_the_root(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    args = ["--root", str(root), "--save-every", "5", "--log-every", "5"]
    # The first job, run in this process (a job of its own would cost another torch import);
    # it seeds torch's global generator, which is this process's.
    with torch.random.fork_rng(devices=[]):
        assert import_train().main([*args, "--steps", "10"]) == 0
    assert committed_steps(root) == [5, 10]

    # The first job's rank 0 lingering: a process of its own holding the root's lease.
    holder = Holder(root)
    try:
        assert holder.line() == "held 2", "the first job held generation 1"
        more = [*PLAIN, *args, "--steps", "20"]
        # Run by the job servers, which imported torch once: the point is the lease, not a
        # fresh interpreter's start (test_launch's jobs start train.py fresh).
        refused = Job(more, tmp_path, preloaded=True)
        waiting = Job([*more, "--wait-for-root", "300"], tmp_path, preloaded=True)
        with refused, waiting:
            assert refused.wait(STARTUP) == 1, refused.output
            assert re.search(r"RootInUse: root .* is in use by .*, pid \d+,", refused.output)
            assert f"pid {holder.pid}," in refused.output, refused.output
            assert "resumed from step" not in refused.output

            line = rf"^waiting up to 300 s for {re.escape(str(root))} if another job holds it$"
            waiting.wait_for(line, STARTUP)
            # distckpt's word that the root is held and the job waits for it: into its wait.
            # Then the holder lets the root go: here it dies; an orphaned rank 0 releases it
            # when its next save fails.
            waiting.wait_for(_held_by(root, holder.pid, 300), STARTUP)
            assert waiting.process.poll() is None, waiting.output
            assert "resumed from step" not in waiting.output
            holder.kill()
            assert waiting.wait(STARTUP) == 0, waiting.output
    finally:
        holder.kill()
    assert re.search(r"^resumed from step 10 ", waiting.output, re.MULTILINE), waiting.output
    assert done_loss(waiting.output)[0] == 20
    assert committed_steps(root) == [10, 15, 20]  # keep_last=3
    record = json.loads((root / LEASE_RECORD_NAME).read_text())
    assert record["generation"] == 3 and record["released_utc"] is not None


def _held_by(root: Path, pid: int, seconds: int) -> str:
    """distckpt's log line (on the script's stderr) saying that the holder ``pid`` holds
    ``root``, and that the start waits up to ``seconds`` for it."""
    held = rf"checkpoint root {re.escape(str(root))} is held by .*, pid {pid}, .*"
    return rf"^distckpt INFO: {held}: waiting up to {seconds} s for it to end$"


def _wait_for_output(
    capfd: pytest.CaptureFixture[str], pattern: str, timeout: float
) -> tuple[str, str]:
    """Until a line matching ``pattern`` is printed on stdout or stderr (by this process or its
    forked ranks, which share its captured output); what was printed on each until then. Each
    is searched alone: a line half written on one must not join a line of the other."""
    out = err = ""
    deadline = time.monotonic() + timeout
    while not any(re.search(pattern, printed, re.MULTILINE) for printed in (out, err)):
        assert time.monotonic() < deadline, f"not printed within {timeout} s: {pattern!r}"
        time.sleep(0.05)
        captured = capfd.readouterr()
        out, err = out + captured.out, err + captured.err
    return out, err


def _run_logging_job(rank: int, world_size: int, job: Any, argv: list[str]) -> int:
    """The script's rank as ``python train_fsdp.py`` runs it: distckpt's log on its stderr."""
    job.log_distckpt()
    return job.main(argv)


def test_train_fsdp_waits_for_the_root_on_every_rank_with_wait_for_root(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "ckpt"
    job = _load_train_fsdp()  # loaded before the fork: every rank inherits it
    argv = ["--root", str(root), "--steps", "2", "--save-every", "1", "--timeout", "30"]
    holder = Holder(root)
    try:
        assert holder.line() == "held 1"
        refused = run_ranks(_run_job, 2, job, argv, timeout=60)
        assert [r.error_type for r in refused] == ["RootInUse", "RootInUse"], refused
        assert all(f"pid {holder.pid}," in (r.error or "") for r in refused), refused
        # With a short wait and the holder staying, every rank is refused after the wait: the
        # flag reached the lease, whenever the ranks got to it.
        refused = run_ranks(_run_job, 2, job, [*argv, "--wait-for-root", "1"], timeout=60)
        assert [r.error_type for r in refused] == ["RootInUse", "RootInUse"], refused
        waits = [re.search(r"\(waited ([0-9.e+]+) s\)", r.error or "") for r in refused]
        assert all(w is not None and float(w.group(1)) >= 1.0 for w in waits), refused

        waited: list[list[RankResult]] = []

        def wait_for_the_root(waiting_argv: list[str]) -> None:
            waited.append(run_ranks(_run_logging_job, 2, job, waiting_argv, timeout=60))

        capfd.readouterr()  # what came before: the lines waited for below are the next run's
        waiting_argv = [*argv, "--wait-for-root", "60"]
        waiting = threading.Thread(target=wait_for_the_root, args=(waiting_argv,))
        waiting.start()
        # distckpt's word that the root is held and rank 0 waits for it: into its wait.
        printed, _ = _wait_for_output(capfd, _held_by(root, holder.pid, 60), 60)
        launcher_said = f"waiting up to 60 s for {root} if another job holds it\n"
        assert launcher_said in printed, printed
        assert waiting.is_alive(), waited
        holder.kill()
        waiting.join(90)
    finally:
        holder.kill()
    assert not waiting.is_alive()
    assert values(waited[0]) == [0, 0]
    assert committed_steps(root) == [1, 2]


@pytest.mark.parametrize("script", ["train.py", "train_fsdp.py"])
def test_wait_for_root_takes_only_a_finite_number_of_seconds_at_least_0(
    script: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parse_args = (import_train() if script == "train.py" else _load_train_fsdp()).parse_args
    for seconds in ("-1", "nan", "inf"):
        with pytest.raises(SystemExit) as refused:
            parse_args(["--root", "r", "--wait-for-root", seconds])
        assert refused.value.code == 2, seconds  # argparse's usage error, before any work
        assert "--wait-for-root: wait_for_root must be a number of seconds >= 0" in (
            capsys.readouterr().err
        )
    for seconds in ("0", "1e7"):
        assert parse_args(["--root", "r", "--wait-for-root", seconds]).wait_for_root == float(
            seconds
        )


@pytest.mark.parametrize("script", ["train.py", "train_fsdp.py"])
def test_timeout_takes_only_the_seconds_the_manager_takes(
    script: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """launch/README.md: --timeout is the manager's timeout: what it refuses is refused before
    any work (init_process_group took 0 as a store timeout of 0 ms, nan as a crash)."""
    parse_args = (import_train() if script == "train.py" else _load_train_fsdp()).parse_args
    for seconds in ("0", "-1", "nan", "inf", "0.0001", "0.05", "1e7"):
        with pytest.raises(SystemExit) as refused:
            parse_args(["--root", "r", "--timeout", seconds])
        assert refused.value.code == 2, seconds  # argparse's usage error, before any work
        assert "--timeout: timeout must be a number of seconds" in capsys.readouterr().err
    assert parse_args(["--root", "r", "--timeout", "0.5"]).timeout == 0.5


def test_launch_readme_flags_table_gives_every_flag_of_train_py_its_default() -> None:
    rows = re.findall(r"^\| `(--[a-z-]+)` *\| `?([^|`]+?)`? *\|", LAUNCH_README, re.MULTILINE)
    table = dict(rows)
    defaults = vars(import_train().parse_args([]))
    assert sorted(table) == sorted(f"--{name.replace('_', '-')}" for name in defaults)
    for name, default in defaults.items():
        written = table[f"--{name.replace('_', '-')}"]
        assert written == default or float(written) == default, (name, written, default)
