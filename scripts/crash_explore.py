"""The long run of the crash-state explorer (``tests/crashsim``): every workload, both formats,
1 and 2 ranks, and the mutation check that removes each fsync of the library in turn.

    python scripts/crash_explore.py --seed 0 --max-states 400 --mutations --write

``--write`` puts the result into docs/faults.md (between the crash-explorer markers). Exits 1
when any crash state shows a violation, else 0. An fsync removal no workload flags is reported
in the table, not failed: whether it is masked or unneeded is for the reader (docs/faults.md
says why for each).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from doc_tables import write_table

from tests.crashsim import explore, mutate, workloads
from tests.crashsim.workloads import WORKLOADS

DOC = Path(__file__).resolve().parents[1] / "docs" / "faults.md"
START, END = "<!-- crash-explorer:start -->", "<!-- crash-explorer:end -->"


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--formats", nargs="+", default=["torch", "dcp"])
    parser.add_argument("--worlds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-states", type=int, default=400)
    parser.add_argument("--mutations", action="store_true", help="run the mutation check too")
    parser.add_argument(
        "--mutation-workloads",
        nargs="+",
        # delete, killed_swap and killed_remove: where a link swap's, a link removal's and a
        # link repair's own fsync of the root is not masked by another before a trash move;
        # fresh_root and export: where nothing else fsyncs the dirs above a root or an export
        default=[
            "retention",
            "delete",
            "overwrite",
            "overwrite_fallback",
            "fresh_root",
            "pointer",
            "killed_swap",
            "killed_remove",
            "export",
        ],
        choices=list(WORKLOADS),
    )
    parser.add_argument("--mutation-max-states", type=int, default=150)
    parser.add_argument("--write", action="store_true", help="update docs/faults.md")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="explorations run at once (1: forked from this process, much faster each)",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = _parse(argv)
    started = time.monotonic()
    rows = [
        "| Workload | Operations traced | Distinct crash states (checked) | Violations |",
        "|---|---:|---:|---|",
    ]
    cases = workloads.cases(args.workloads, args.formats, args.worlds)
    works: dict[str, Path] = {}
    # One job at a time: workloads and checkers are forked from this process, torch (and
    # DCP) imported once; several at once: new interpreters, as forking from a thread pool
    # is not safe.
    forked = args.jobs == 1
    if forked:
        import distckpt.formats.dcp  # noqa: F401
    with (
        tempfile.TemporaryDirectory(prefix="crash-explore-") as scratch,
        ThreadPoolExecutor(max_workers=args.jobs) as pool,  # each exploration is processes
    ):
        run_all = map if forked else pool.map

        def run_case(case: tuple[str, str, int]) -> explore.Result:
            name, fmt, world = case
            work = works[f"{name}-{fmt}-{world}"]
            explore.setup(name, work, world=world, fmt=fmt, forked=forked)
            result = explore.explore(
                name,
                work,
                world=world,
                fmt=fmt,
                seed=args.seed,
                max_states=args.max_states,
                forked=forked,
            )
            print(result.summary(), flush=True)
            return result

        for name, fmt, world in cases:
            works[f"{name}-{fmt}-{world}"] = Path(scratch) / f"{name}-{fmt}-{world}"
            works[f"{name}-{fmt}-{world}"].mkdir()
        results = dict(zip(works, run_all(run_case, cases)))
        for result in results.values():
            kinds = "; ".join(f"{k} ({n})" for k, n in sorted(result.kinds().items()))
            rows.append(
                f"| {result.label} | {result.operations} | {result.states_found} "
                f"({result.states_checked}) | {kinds or 'none'} |"
            )
        mutation_rows = []
        if args.mutations:
            baselines = {
                key: result
                for key, result in results.items()
                if result.workload in args.mutation_workloads
                and result.world == 1
                and result.format == "torch"
            }
            mutation_rows = [
                "",
                f"Mutation check ({', '.join(baselines)}; at most "
                f"{args.mutation_max_states} states each):",
                "",
                "| fsync removed | Flagged by (new violation kinds) |",
                "|---|---|",
            ]

            def run_site(numbered: tuple[int, mutate.FsyncSite]) -> str:
                number, site = numbered
                outcome = mutate.run_mutation(
                    site,
                    baselines,
                    works,
                    Path(scratch) / f"mutant-{number}",
                    seed=args.seed,
                    max_states=args.mutation_max_states,
                    run=f"mutant-{number}",
                    forked=forked,
                )
                flagged = "; ".join(
                    f"{key}: {', '.join(kinds)}"
                    for key, kinds in outcome.new_kinds.items()
                    if kinds
                )
                print(f"{site.label}: {flagged or 'not flagged'}", flush=True)
                return (
                    f"| `{site.file}:{site.line}` `{site.function}`: `{site.text}` | "
                    f"{flagged or 'not flagged'} |"
                )

            mutation_rows += run_all(run_site, enumerate(mutate.fsync_sites()))
    elapsed = time.monotonic() - started
    table = "\n".join(
        [
            *rows,
            *mutation_rows,
            "",
            f"Generated by `python scripts/crash_explore.py {' '.join(argv)}` in {elapsed:.0f} s.",
        ]
    )
    print(table)
    if args.write:
        write_table(DOC, table + "\n", START, END, what="crash explorer")
    return 1 if any(result.violations for result in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
