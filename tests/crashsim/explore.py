"""One exploration: set a workload up, trace it, generate its crash states, replay and check
each, and say what was violated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.crashsim import model, syscalls, trace
from tests.crashsim.workloads import WORKLOADS

PROJECT = Path(__file__).resolve().parents[2]


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


def setup(workload: str, work: Path, *, world: int, fmt: str) -> None:
    """Run the untraced setup phase into ``work/initial`` (done once, reused by mutations)."""
    base, markers = work / "initial" / "base", work / "initial" / "markers"
    base.mkdir(parents=True)
    markers.mkdir()
    command = [sys.executable, "-m", "tests.crashsim.workloads", workload, "setup"]
    done = subprocess.run(
        [*command, os.fspath(base), os.fspath(markers), str(world), fmt],
        cwd=work,
        env=_env(None),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"setup of {workload} failed:\n{done.stderr[-4000:]}")


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
) -> Result:
    """Trace ``workload`` (set up in ``work`` by :func:`setup` first) with ``library`` on the
    path (default: this checkout), and check up to ``max_states`` of its crash states."""
    started = time.monotonic()
    result = Result(workload, world, fmt)
    here = work / run
    base, markers = here / "base", here / "markers"
    subprocess.run(["cp", "-a", os.fspath(work / "initial"), os.fspath(here)], check=True)
    initial = model.Tree.from_disk(base)
    initial_markers = sorted(os.listdir(markers))
    trace_file = here / "trace.txt"
    command = [sys.executable, "-m", "tests.crashsim.workloads", workload, "traced"]
    trace.record(
        [*command, os.fspath(base), os.fspath(markers), str(world), fmt],
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
    spec_file = here / "states.json"
    spec_file.write_text(json.dumps(specs))
    done = subprocess.run(
        [sys.executable, "-m", "tests.crashsim.check", os.fspath(spec_file)],
        env=_env(library),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the checker failed:\n{done.stderr[-4000:]}")
    verdicts = json.loads(done.stdout.strip().splitlines()[-1])
    for spec, found in zip(specs, verdicts):
        result.violations += [Violation(spec["describe"], kind, detail) for kind, detail in found]
    subprocess.run(["rm", "-rf", os.fspath(here)], check=True)
    result.states_checked = len(specs)
    result.seconds = time.monotonic() - started
    return result
