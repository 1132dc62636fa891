"""The harness of the end-to-end tests of the demo job ``launch/train.py`` (:class:`Job`, the
reference run, the checks of a root), and its plain single-process run preempted and resumed.
The runs under the real torchrun launcher, ``launch/demo.sh``'s and ``launch/train_fsdp.py``'s,
are in ``tests/test_launch_demo.py``, which starts torchrun as few times as it can.

Results are checked against a reference run computed in this process from the job's own
building blocks (the ranks simulated one after the other), which is bit-exact: for two ranks,
gloo's sum of two floats is ``a + b`` whichever rank adds, and everything else is the same code
on the same data.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from types import ModuleType, TracebackType
from typing import IO

import pytest
import torch

import distckpt
from tests import job_servers
from tests.processes import kill_session, proc_stat, signal_pending
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
LAUNCH_README = (REPO / "launch" / "README.md").read_text(encoding="utf-8")
TORCHRUN_2 = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc-per-node",
    "2",
    str(TRAIN),
]
PLAIN = [sys.executable, str(TRAIN)]
#: torchrun's agent waits this long for workers after forwarding a signal, then SIGKILLs them.
TORCHRUN_SHUTDOWN_WINDOW = 30.0


# A test run under some launcher must not make the plain job believe it is a rank of it.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    # One thread per process: two ranks on a small machine, and reproducible kernels.
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _cmdline(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None


def _stopped_or_gone(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is None or stat.state in ("T", "t")


def _descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))) is not None:
            parents[int(entry.name)] = stat.ppid
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


class Job:
    """A job (a launcher and the ranks it starts) whose merged output is collected line by
    line; leaving the ``with`` block SIGKILLs whatever is left of it.

    torchrun starts every worker in a session of its own, so signalling the launcher's process
    group does not reach the workers: a SIGKILL of the launcher's group alone leaves them
    running, orphaned. The job therefore tracks the launcher's descendants through ``/proc``
    while they are still its children, and kills each of their groups too. The launcher leads
    a session of its own, and its whole session is killed with it: ranks that ``run_ranks``
    forked lead groups of their own there, even once the launcher has ended.
    """

    def __init__(
        self,
        argv: Sequence[str],
        cwd: Path,
        extra_env: Mapping[str, str] | None = None,
        *,
        preloaded: bool = False,
    ) -> None:
        """Start ``argv``; with ``preloaded``, ``argv`` is ``python SCRIPT ARGS...``, run as a
        child of a job server that imported torch once (``tests.job_servers.start_preloaded``),
        for a test whose point is not a fresh interpreter's start."""
        env = {**_env(), **(extra_env or {})}
        self.process: subprocess.Popen[str] | job_servers.PreloadedJob
        output: Callable[[], IO[str]]
        if preloaded:
            assert argv[0] == sys.executable and not argv[1].startswith("-"), argv
            # A FIFO, read as the pipe of a subprocess is: its end is the end of every process
            # of the job that holds it (the ranks and their children).
            self._fifo = Path(tempfile.mkdtemp(prefix="job-output-")) / "output"
            os.mkfifo(self._fifo)
            self.process = job_servers.start_preloaded(argv[1:], self._fifo, env, cwd)
            output = partial(open, self._fifo, encoding="utf-8", errors="replace")
        else:
            popen = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
                start_new_session=True,
            )
            self.process = popen
            output = partial(_pipe_of, popen)
        self.lines: list[str] = []
        self._tree: dict[int, int] = {}  # descendant pid -> its start time, against pid reuse
        # Reentrant, so `output` can be read while wait_for holds the condition.
        self._changed = threading.Condition(threading.RLock())
        self._eof = False
        self._reader = threading.Thread(target=self._read, args=(output,), daemon=True)
        self._reader.start()

    def _read(self, output: Callable[[], IO[str]]) -> None:
        with output() as lines:
            for line in lines:
                with self._changed:
                    self.lines.append(line.rstrip("\n"))
                    self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def _stop_reading(self) -> None:
        """Let the reader end once the job has: a preloaded job killed before it opened its
        FIFO would leave the reader waiting in ``open`` for a writer forever."""
        if isinstance(self.process, job_servers.PreloadedJob):
            with contextlib.suppress(OSError):  # ENXIO: the reader has opened it already
                os.close(os.open(self._fifo, os.O_WRONLY | os.O_NONBLOCK))
        self._reader.join(10)
        if isinstance(self.process, job_servers.PreloadedJob):
            shutil.rmtree(self._fifo.parent, ignore_errors=True)

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first output line matching ``pattern``, waiting for it to be printed."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if match := regex.search(line):
                        self.track_tree()  # whoever printed it is running now
                        return match
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    why = "the job ended" if self._eof else f"{timeout} s passed"
                    pytest.fail(f"{why} before a line matched {pattern!r}:\n{self.output}")
                self._changed.wait(remaining)

    def track_tree(self) -> set[int]:
        """Record the launcher's current descendants (the ranks); returns every pid seen."""
        if self.process.poll() is None:
            for pid in _descendants(self.process.pid):
                if (stat := proc_stat(pid)) is not None:
                    self._tree.setdefault(pid, stat.started)
        return set(self._tree)

    def ranks(self) -> list[int]:
        """Pids of the ranks running now, among the processes :meth:`track_tree` recorded
        (:meth:`wait_for` does as it returns): the children of the job's torchrun agent(s).
        No new look through ``/proc``, which takes a while on a loaded machine."""
        alive = self.alive()
        agents = {pid for pid in alive if "torch.distributed.run" in (_cmdline(pid) or "")}
        stats = {pid: proc_stat(pid) for pid in alive}
        return sorted(
            pid for pid, stat in stats.items() if stat is not None and stat.ppid in agents
        )

    @contextlib.contextmanager
    def ranks_held(self, count: int) -> Iterator[list[int]]:
        """The job's ``count`` ranks stopped (SIGSTOP) for the block, continued after it: what
        the block sends the job reaches them before they train one more step, however late a
        loaded machine lets the test send it, so a run cannot reach its end first. A signal
        that the launcher forwards to them stays pending meanwhile
        (:meth:`wait_until_pending`); a SIGKILL kills them all the same."""
        ranks = self.ranks()
        assert len(ranks) == count, f"ranks {ranks}, not {count}:\n{self.output}"
        try:
            for pid in ranks:
                os.kill(pid, signal.SIGSTOP)
            wait_until(lambda: all(map(_stopped_or_gone, ranks)), f"ranks {ranks} stopped", 30)
            yield ranks
        finally:
            for pid in ranks:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def wait_until_pending(self, ranks: list[int], signum: int) -> None:
        """Wait until ``signum`` is pending on every rank of ``ranks`` held by
        :meth:`ranks_held`: the launcher has forwarded it."""
        wait_until(
            lambda: all(signal_pending(pid, signum) for pid in ranks),
            f"signal {signum} pending on ranks {ranks}",
            TORCHRUN_SHUTDOWN_WINDOW,
        )

    def alive(self) -> list[int]:
        """Pids of the job that still run: the launcher, or any descendant it ever had."""
        pids = [self.process.pid] if self.process.poll() is None else []
        for pid, started in self._tree.items():
            stat = proc_stat(pid)
            # The same pid started at another time is another process (the pid was reused). A
            # start time, not a command line: a killed process's reads empty once its memory is
            # gone, before its files (and their locks: rank 0's lease) are closed.
            if stat is not None and stat.live and stat.started == started:
                pids.append(pid)
        return pids

    def wait(self, timeout: float) -> int:
        """The launcher's exit status, once it has ended and all output has been read."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the job did not end within {timeout} s:\n{self.output}")
        self._stop_reading()
        return code

    def kill(self) -> None:
        """SIGKILL the launcher and every rank, as a machine failure would."""
        self.track_tree()
        # The launcher first, so that it cannot react to its workers' deaths.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        kill_session(self.process.pid)
        for pid in self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                group = os.getpgid(pid)
                if group not in (0, os.getpgrp()):  # never the tests' own group
                    os.killpg(group, signal.SIGKILL)

    def wait_until_dead(self, timeout: float) -> None:
        """Wait, after :meth:`kill`, until the launcher and every rank it ever had have died: a
        killed rank holds its locks (rank 0: the root's lease) until its exit has torn it down,
        which a loaded machine may delay well past the launcher's own end."""
        deadline = time.monotonic() + timeout
        while alive := self.alive():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"processes {alive} of the killed job live on after {timeout:g} s"
                )
            time.sleep(0.02)

    def __enter__(self) -> Job:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()
        self.process.wait(10)
        self._stop_reading()


def _pipe_of(process: subprocess.Popen[str]) -> IO[str]:
    assert process.stdout is not None
    return process.stdout


def _run_readme_commands(commands: str, **pids: int) -> None:
    """Run ``commands``, as launch/README.md writes them, in bash, with the pids they name."""
    assert commands in LAUNCH_README
    env = {**os.environ, **{name: str(pid) for name, pid in pids.items()}}
    done = subprocess.run(
        ["bash", "-c", commands], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr


def import_train() -> ModuleType:
    """``launch/train.py`` imported as a module, for its building blocks."""
    spec = importlib.util.spec_from_file_location("launch_train", TRAIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train() -> ModuleType:
    return import_train()


def expected_run(
    train: ModuleType, *, seed: int, steps: int, world_size: int
) -> tuple[float, dict[str, torch.Tensor]]:
    """The final loss and weights of an uninterrupted run, computed here: each simulated rank
    keeps its own dropout generator, and the gradient buffers are summed as all_reduce does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the jobs (OMP_NUM_THREADS=1)
    try:
        with torch.random.fork_rng(devices=[]):
            model, optimizer, scheduler = train.build(seed, steps)
            generators = []
            for rank in range(world_size):
                train.seed_rank(seed, rank)
                generators.append(torch.get_rng_state())
            loss = float("nan")
            for step in range(steps):
                summed: torch.Tensor | None = None
                for rank in range(world_size):
                    torch.set_rng_state(generators[rank])
                    buffer = train.local_gradients(model, *train.batch_for(seed, rank, step))
                    generators[rank] = torch.get_rng_state()
                    summed = buffer if summed is None else summed + buffer
                assert summed is not None
                loss = train.apply_gradients(model, optimizer, scheduler, summed, world_size)
    finally:
        torch.set_num_threads(threads)
    return loss, {k: v.clone() for k, v in model.state_dict().items()}


def committed_steps(root: Path) -> list[int]:
    """Steps with a committed dir: a ``step-N`` dir holding its manifest (written before the
    atomic rename that publishes it)."""
    return sorted(
        int(p.name.split("-", 1)[1])
        for p in root.glob("step-*")
        if p.is_dir() and (p / "manifest.json").is_file()
    )


def last_target(root: Path) -> str:
    """The dir name ``root/last`` names, whether a symlink or a pointer file."""
    link = root / "last"
    if link.is_symlink():
        return os.readlink(link)
    return link.read_text(encoding="utf-8").strip()


def done_loss(output: str) -> tuple[int, float]:
    match = re.search(r"^done step=(\d+) loss=(\S+)$", output, re.MULTILINE)
    assert match, output
    return int(match.group(1)), float(match.group(2))


def resumed_once_from(step: int, output: str) -> None:
    """The run resumed from ``step`` and did not train that step again."""
    assert re.search(rf"^resumed from step {step} ", output, re.MULTILINE), output
    assert not re.search(rf"^step={step} ", output, re.MULTILINE), "a step ran twice"


def assert_weights(root: Path, world_size: int, weights: dict[str, torch.Tensor]) -> None:
    """Every rank's model in ``root/last`` equals ``weights`` bit for bit."""
    for rank in range(world_size):
        saved = distckpt.load_checkpoint(root / "last", rank=rank).state["model"]
        assert saved.keys() == weights.keys()
        for name, tensor in weights.items():
            assert torch.equal(saved[name], tensor), f"rank {rank}: {name} differs"


def assert_nothing_staged(root: Path) -> None:
    staging = root / ".staging"
    leftovers = sorted(p.name for p in staging.iterdir()) if staging.is_dir() else []
    assert leftovers == [], f"left in .staging: {leftovers}"


@pytest.mark.timeout(120)
def test_plain_python_run_preempted_and_resumed_bit_exactly(
    tmp_path: Path, train: ModuleType
) -> None:
    """Without torchrun: world size 1, and SIGTERM reaches the job itself. Both runs are
    children of a job server that imported torch once: what is tested starts after that."""
    root = tmp_path / "ckpt"
    seed, steps = 5, 30
    args = ["--root", str(root), "--steps", str(steps), "--save-every", "10", "--log-every", "1"]
    args += ["--seed", str(seed)]

    with Job([*PLAIN, *args, "--sleep", "0.05"], tmp_path, preloaded=True) as job:
        job.wait_for(r"^step=15 ", 60)
        job.process.send_signal(signal.SIGTERM)
        code = job.wait(30)
    assert code == 0, job.output
    match = re.search(r"^preempted at step=(\d+) rank=0 ", job.output, re.MULTILINE)
    assert match, job.output
    step = int(match.group(1))
    assert committed_steps(root)[-1] == step
    assert last_target(root) == f"step-{step:08d}"

    with Job([*PLAIN, *args], tmp_path, preloaded=True) as job:
        code = job.wait(60)
    assert code == 0, job.output
    resumed_once_from(step, job.output)

    loss, weights = expected_run(train, seed=seed, steps=steps, world_size=1)
    assert done_loss(job.output) == (steps, loss), job.output
    assert_weights(root, 1, weights)
    assert_nothing_staged(root)
