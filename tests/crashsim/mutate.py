"""Mutation check: remove each fsync of the library in turn, in a temporary copy, and see
whether the explorer notices.

A removal that matters must be flagged: some workload must show a violation kind it does not
show with the intact library. A removal that no workload flags is *masked* (another fsync of
the same directory or file, later in the same operation, makes the same thing durable) or
guards nothing the model can lose; ``docs/faults.md`` says which fsync covers each.
"""

from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass
from pathlib import Path

from tests.crashsim.explore import PROJECT, Result, explore

PACKAGE = PROJECT / "distckpt"


@dataclass(frozen=True)
class FsyncSite:
    """One call of ``os.fsync``, ``fsync_file`` or ``fsync_dir`` in the library: each call of
    the two helpers is a site of its own, as is the ``os.fsync`` inside each."""

    file: str  # relative to the project
    line: int
    column: int
    end_column: int
    text: str
    function: str

    @property
    def label(self) -> str:
        return f"{self.file}:{self.line} {self.function}: {self.text}"


def fsync_sites() -> list[FsyncSite]:
    sites: list[FsyncSite] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if not isinstance(node, ast.Call) or node.lineno != node.end_lineno:
                    continue
                callee = ast.unparse(node.func)
                if callee in ("os.fsync", "fsync_file", "fsync_dir"):
                    sites.append(
                        FsyncSite(
                            str(path.relative_to(PROJECT)),
                            node.lineno,
                            node.col_offset,
                            node.end_col_offset or 0,
                            ast.unparse(node),
                            function.name,
                        )
                    )
    # nested functions are walked twice; keep each call once
    return sorted(set(sites), key=lambda s: (s.file, s.line, s.column))


def mutated_copy(site: FsyncSite, destination: Path) -> Path:
    """A copy of the package with ``site``'s call replaced by ``None``; returns the dir to
    put first on PYTHONPATH."""
    library = destination / "lib"
    shutil.copytree(PACKAGE, library / "distckpt", ignore=shutil.ignore_patterns("__pycache__"))
    target = library / site.file
    lines = target.read_text(encoding="utf-8").splitlines(keepends=True)
    line = lines[site.line - 1]
    lines[site.line - 1] = line[: site.column] + "None" + line[site.end_column :]
    target.write_text("".join(lines), encoding="utf-8")
    return library


@dataclass
class MutationOutcome:
    site: FsyncSite
    #: workload label -> violation kinds the mutant shows that the intact library does not
    new_kinds: dict[str, list[str]]

    @property
    def flagged(self) -> bool:
        return any(self.new_kinds.values())


def run_mutation(
    site: FsyncSite,
    baselines: dict[str, Result],
    works: dict[str, Path],
    scratch: Path,
    *,
    seed: int,
    max_states: int,
    run: str = "mutant",
    forked: bool = False,
    until_flagged: bool = False,
    explore_in: Path | None = None,
) -> MutationOutcome:
    """Explore every workload of ``baselines`` (set up in ``works``) with ``site`` removed;
    ``run`` names the exploration's dir in each work dir (distinct for mutants run at once);
    ``forked`` as for :func:`~tests.crashsim.explore.explore`. ``until_flagged``: a workload's
    states are checked only until one shows a kind its baseline does not (whether the removal
    is flagged, not every kind it shows), and the workloads after a flagging one are not
    explored (``forked`` only). ``explore_in``: each exploration's ``scratch`` (see
    :func:`~tests.crashsim.explore.explore`)."""
    library = mutated_copy(site, scratch)
    new_kinds: dict[str, list[str]] = {}
    try:
        for key, baseline in baselines.items():
            if until_flagged and any(new_kinds.values()):
                break
            mutant = explore(
                baseline.workload,
                works[key],
                world=baseline.world,
                fmt=baseline.format,
                seed=seed,
                max_states=max_states,
                library=library,
                run=run,
                forked=forked,
                until_kind_outside=set(baseline.kinds()) if until_flagged else None,
                scratch=explore_in,
            )
            new_kinds[key] = sorted(set(mutant.kinds()) - set(baseline.kinds()))
    finally:
        shutil.rmtree(library, ignore_errors=True)
    return MutationOutcome(site, new_kinds)
