"""One exploration: set a workload up, trace it, generate its crash states, replay and check
each, and say what was violated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.crashsim import check, model, syscalls, trace
from tests.crashsim.workloads import WORKLOADS, run_phase
from tests.ranks import run_ranks, values

PROJECT = Path(__file__).resolve().parents[2]
#: the free room a tmpfs needs to be an exploration's ``scratch``: every crash state of the
#: largest short-run case is made before the first is checked
SCRATCH_MIN_FREE_BYTES = 1 << 30


@dataclass(frozen=True)
class Violation:
    state: str
    kind: str
    detail: str


@dataclass
class Result:
    workload: str
    world: int
    format: str
    operations: int = 0
    states_found: int = 0
    states_checked: int = 0
    seconds: float = 0.0
    violations: list[Violation] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.workload} ({self.format}, {self.world} rank{'s' if self.world > 1 else ''})"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Result:
        fields = json.loads(text)
        violations = [Violation(**v) for v in fields.pop("violations")]
        return cls(**fields, violations=violations)

    def kinds(self) -> Counter[str]:
        return Counter(v.kind for v in self.violations)

    def summary(self) -> str:
        kinds = ", ".join(f"{kind}: {count}" for kind, count in sorted(self.kinds().items()))
        return (
            f"{self.label}: {self.operations} operations, {self.states_checked} of "
            f"{self.states_found} distinct crash states checked, "
            f"{len(self.violations)} violations{' (' + kinds + ')' if kinds else ''}"
        )


def _env(library: Path | None) -> dict[str, str]:
    # The library under test first (a mutated copy, or this checkout), then the tests package.
    paths = [os.fspath(library)] if library is not None else []
    paths.append(os.fspath(PROJECT))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTCKPT_FAULT")}
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def setup(workload: str, work: Path, *, world: int, fmt: str, forked: bool = False) -> None:
    """Run the untraced setup phase into ``work/initial`` (done once, reused by mutations);
    ``forked``: see :func:`explore`."""
    base, markers = work / "initial" / "base", work / "initial" / "markers"
    base.mkdir(parents=True)
    markers.mkdir()
    if forked:
        run_phase(workload, "setup", os.fspath(base), os.fspath(markers), world, fmt)
        return
    phase = (workload, "setup", os.fspath(base), os.fspath(markers), str(world), fmt)
    _run_module("tests.crashsim.workloads", *phase, env=_env(None), cwd=work, timeout=300)


def explore(
    workload: str,
    work: Path,
    *,
    world: int = 1,
    fmt: str = "torch",
    seed: int = 0,
    max_states: int = 200,
    library: Path | None = None,
    run: str = "run",
    forked: bool = False,
    until_kind_outside: Collection[str] | None = None,
    scratch: Path | None = None,
) -> Result:
    """Trace ``workload`` (set up in ``work`` by :func:`setup` first) with ``library`` on the
    path (default: this checkout), and check up to ``max_states`` of its crash states; with
    ``until_kind_outside``, only until one shows a violation of a kind not among those
    (:func:`~tests.crashsim.check.check_all`; ``forked`` only). The traced run, its trace and
    its crash states are made in ``work/run``, or with ``scratch`` in a new directory under it
    (a tmpfs: what a crash keeps is the model's to say, not the disk's; the filesystem changes
    only timing, and with it which interleaving a 2-rank trace records), removed once the
    states are checked.

    ``forked``: run the workload and the checker in children forked from this process
    instead of new interpreters, each of which would spend seconds importing torch (import
    torch and DCP here first). Only from a process that forks ranks anyway, as a test does,
    never from a thread pool whose other threads may hold a lock the child needs. The checker
    is then this checkout's library whatever ``library`` is; what it checks is the disk, which
    the library under test wrote."""
    if until_kind_outside is not None and not forked:
        raise ValueError("until_kind_outside needs forked: a new interpreter checks every state")
    started = time.monotonic()
    result = Result(workload, world, fmt)
    here = work / run if scratch is None else Path(tempfile.mkdtemp(dir=scratch)) / run
    base, markers = here / "base", here / "markers"
    subprocess.run(["cp", "-a", os.fspath(work / "initial"), os.fspath(here)], check=True)
    initial = model.Tree.from_disk(base)
    initial_markers = sorted(os.listdir(markers))
    trace_file = here / "trace.txt"
    phase = (workload, "traced", os.fspath(base), os.fspath(markers), world, fmt)
    if forked:

        def traced() -> None:
            if library is not None:
                _import_library_from(library)
            run_phase(*phase)

        trace.record_forked(traced, trace_file, cwd=here, timeout=300)
    else:
        trace.record(
            [sys.executable, "-m", "tests.crashsim.workloads", *map(str, phase)],
            trace_file,
            cwd=here,
            env=_env(library),
            timeout=300,
        )
    ops = syscalls.parse_trace(
        trace_file.read_text(encoding="ascii"), base=base, markers=markers, cwd=here
    )
    trace_file.unlink()  # tens of MB of hex; the operations are what matters
    steps = model.lower(ops, initial, base)
    result.operations = sum(1 for step in steps if step.kind != "marker")
    states, result.states_found = model.distinct_states(
        initial, steps, max_states=max_states, seed=seed
    )
    specs = []
    for number, (state, tree, state_markers) in enumerate(states):
        directory = here / "states" / f"{number:05d}"
        tree.materialize(directory)
        specs.append(
            {
                "dir": os.fspath(directory),
                "root": WORKLOADS[workload].root,
                "markers": [*initial_markers, *state_markers],
                "format": fmt,
                "world": world,
                "overwrite_window": WORKLOADS[workload].overwrite_window,
                "describe": state.describe(steps),
            }
        )
    if forked:
        verdicts = values(run_ranks(_check_job, 0, specs, until_kind_outside, timeout=900))[0]
    else:
        spec_file = here / "states.json"
        spec_file.write_text(json.dumps(specs))
        printed = _run_module(
            "tests.crashsim.check",
            os.fspath(spec_file),
            env=_env(library),
            cwd=here,
            timeout=900,
        )
        verdicts = json.loads(printed.strip().splitlines()[-1])
    for spec, found in zip(specs, verdicts):
        result.violations += [Violation(spec["describe"], kind, detail) for kind, detail in found]
    subprocess.run(["rm", "-rf", os.fspath(here if scratch is None else here.parent)], check=True)
    result.states_checked = len(verdicts)
    result.seconds = time.monotonic() - started
    return result


def _run_module(module: str, *args: str, env: dict[str, str], cwd: Path, timeout: float) -> str:
    """``python -m module args`` in a new interpreter; what it printed, or RuntimeError."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{done.stderr[-4000:]}")
    return done.stdout


def _check_job(
    rank: int, world: int, specs: list[dict[str, Any]], until_kind_outside: Collection[str] | None
) -> list[list[tuple[str, str]]]:
    return check.check_all(specs, until_kind_outside)


def _import_library_from(library: Path) -> None:
    """In a forked child: make ``import distckpt`` load the (mutated) copy in ``library``
    from now on. The workloads import distckpt only inside their functions, so nothing holds
    on to the modules dropped here."""
    for name in [name for name in sys.modules if name.partition(".")[0] == "distckpt"]:
        del sys.modules[name]
    sys.path.insert(0, os.fspath(library))
