"""Soak: SIGKILL a checkpointing job at random instants, many times, and check that nothing is
ever lost.

    python scripts/soak.py --trials 200 --ranks 2 --format torch --seed 0
    python scripts/soak.py --trials 50 --ranks 4 --format dcp --modes job

Each trial starts a job of ``--ranks`` real gloo ranks (forked, no torchrun) that opens the
root, resumes from ``last`` and saves every step with ``keep_last=2, monitor="loss"``; at a
random instant it is SIGKILLed, all ranks at once (``job``) or one rank (``rank``, whose
survivors must raise a distckpt error promptly). After each kill every checkpoint must pass
``verify``, every save that returned must still be there, and the next trial's start must find
no leftovers and resume from the newest step with exactly the state saved at it. The trials
chain on one root, like a job that is preempted over and over; a clean restart checks it once
more at the end. The long version of ``tests/test_random_kills.py::test_random_kills``.

Prints a summary line; exits 0 when nothing was found, 1 otherwise (listing the problems), 2
when the run cannot start (e.g. a format that is not available).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.fault_checks import state_matches, template_of  # noqa: E402
from tests.test_random_kills import KillTally, run_random_kills  # noqa: E402


def check_format(fmt: str) -> str | None:
    """Why ``fmt`` cannot be soaked here (a save and restore in one process fails), or None."""
    import torch

    import distckpt

    try:
        with (
            tempfile.TemporaryDirectory() as tmp,
            distckpt.CheckpointManager(Path(tmp) / "ckpt", format=fmt, timeout=30) as mgr,
        ):
            mgr.save(1, {"step": 1, "rank0": torch.full((4,), 10.0)})
            template = template_of(0)
            ckpt = mgr.restore("last", state=template)
            if not state_matches(ckpt.state, template, 1, 0):
                return f"format {fmt!r} restored something else than it saved"
    except Exception as exc:
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return f"format {fmt!r} is not available: {last}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--ranks", type=int, choices=(2, 4), default=2)
    parser.add_argument("--format", choices=("torch", "dcp"), default="torch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--modes",
        default="job,rank",
        help="comma-separated kill modes: job (every rank), rank (one rank); default both",
    )
    parser.add_argument("--root", help="run in this dir (kept) instead of a temporary one")
    parser.add_argument("--max-seconds", type=float, help="stop starting trials after this")
    args = parser.parse_args(argv)
    modes = tuple(m for m in args.modes.split(",") if m)
    if not modes or set(modes) - {"job", "rank"}:
        parser.error(f"--modes takes job and/or rank, not {args.modes!r}")

    problem = check_format(args.format)
    if problem is not None:
        print(f"soak: cannot run: {problem}", file=sys.stderr)
        return 2

    def progress(trial: int, tally: KillTally, found: list[str]) -> None:
        for line in found:
            print(f"  PROBLEM {line}", flush=True)
        if (trial + 1) % 25 == 0:
            print(f"  {trial + 1} trials, newest step {tally.newest}", flush=True)

    with tempfile.TemporaryDirectory(prefix="distckpt-soak-") as tmp:
        work = Path(args.root) if args.root else Path(tmp)
        root = work / "ckpt"
        if root.exists() or (work / "status").exists():
            print(f"soak: {work} already holds a run; use an empty dir", file=sys.stderr)
            return 2
        started = time.time()
        tally = run_random_kills(
            root,
            trials=args.trials,
            world_size=args.ranks,
            fmt=args.format,
            seed=args.seed,
            modes=modes,
            max_seconds=args.max_seconds,
            progress=progress,
        )
        stamp = time.strftime("%Y-%m-%d", time.gmtime(started))
    print(f"soak {stamp}: {tally.summary(args.ranks, args.format, args.seed)}")
    for name, message in sorted(tally.survivor_examples.items()):
        print(f"  e.g. {name}: {message}")
    for line in tally.problems:
        print(f"PROBLEM {line}")
    return 0 if not tally.problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
