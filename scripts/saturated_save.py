"""How much longer an async save takes while training keeps every core busy, by background_nice.

    python scripts/saturated_save.py --mib 64,512 --nice 0,10,19 --rounds 5

A lower-priority background thread (``CheckpointManager(background_nice=N)``) gives training
steps the cores when both want them; the cost is a longer save when training leaves no core
idle. This measures that worst case: every rank's main thread runs matrix products without
pause (no collective, so no idle gap) from the moment ``save`` returns until its background
save is done, on as many ranks as the machine has cores (``--ranks``, default: that count).
Each round times, for every nice value in turn (rotating the order), one async save with the
ranks idle and one with them busy; the table shows the medians (slowest rank) and their
paired ratio. A save always finishes: the scheduler gives a runnable thread of any nice value
a share of the CPU (about 10% of a core against one busy nice-0 thread at nice 10).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

# torch reads OMP_NUM_THREADS when imported: one thread per busy rank, as a rank per core has.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
for where in (REPO, REPO / "scripts"):
    if str(where) not in sys.path:
        sys.path.insert(0, str(where))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from save_rounds import rotated  # noqa: E402

import distckpt  # noqa: E402
from tests.ranks import run_ranks, values  # noqa: E402

MIB = 1 << 20
#: The busy loop's matrix side: one product takes a few ms, so the loop checks often whether
#: the save is done.
BUSY_SIDE = 256


def timed_save(mgr: distckpt.CheckpointManager, step: int, state: dict, busy: bool) -> float:
    """Seconds from ``save`` until the background save is done on this rank; ``busy``: this
    thread computes without pause meanwhile, as a training loop that saturates its core."""
    a, b = torch.randn(BUSY_SIDE, BUSY_SIDE), torch.randn(BUSY_SIDE, BUSY_SIDE)
    dist.barrier()
    started = time.perf_counter()
    mgr.save(step, state)
    while busy and mgr.save_in_flight:
        torch.mm(a, b)
    mgr.wait()
    seconds = time.perf_counter() - started
    mgr.delete(step)
    return seconds


def measure_rank(
    rank: int, world_size: int, root: str, mib: int, nice_values: list[int], rounds: int
) -> dict[int, dict[str, list[float]]]:
    """One rank's times: ``{nice: {"idle": [...], "busy": [...]}}``, a value per round."""
    state = {f"rank{rank}.w": torch.empty(mib * MIB // 4).uniform_(-1, 1)}
    managers = {
        nice: distckpt.CheckpointManager(
            Path(root) / f"nice-{nice}", async_save=True, background_nice=nice, timeout=300
        )
        for nice in nice_values
    }
    times: dict[int, dict[str, list[float]]] = {nice: {"idle": [], "busy": []} for nice in managers}
    try:
        for mgr in managers.values():  # untimed: allocates the snapshot buffers
            timed_save(mgr, 1, state, busy=False)
        for r in range(rounds):
            for nice in rotated(nice_values, r):
                for busy in (False, True):
                    seconds = timed_save(managers[nice], 2 + r, state, busy)
                    times[nice]["busy" if busy else "idle"].append(seconds)
    finally:
        for mgr in managers.values():
            mgr.close()
    return times


def summarize(per_rank: list[dict[int, dict[str, list[float]]]], mib: int, ranks: int) -> str:
    """A markdown table: per nice value, the medians of the slowest rank and the ratio."""
    lines = [
        f"| {ranks} ranks x {mib} MiB, background_nice | save, ranks idle | save, ranks busy "
        "| busy / idle (paired) |",
        "|---|---:|---:|---:|",
    ]
    for nice in per_rank[0]:
        idle = [max(ts) for ts in zip(*(times[nice]["idle"] for times in per_rank))]
        busy = [max(ts) for ts in zip(*(times[nice]["busy"] for times in per_rank))]
        ratios = [b / i for b, i in zip(busy, idle)]
        lines.append(
            f"| {nice} | {statistics.median(idle) * 1000:.0f} ms "
            f"| {statistics.median(busy) * 1000:.0f} ms | {statistics.median(ratios):.2f}x "
            f"({min(ratios):.2f}..{max(ratios):.2f}) |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", default="64,512", help="state sizes per rank, comma-separated")
    parser.add_argument("--nice", default="0,10,19", help="background_nice values to compare")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ranks", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dir", help="where to save (default: a temporary directory)")
    args = parser.parse_args(argv)
    nice_values = [int(v) for v in args.nice.split(",")]
    print(f"load average before: {os.getloadavg()}", flush=True)
    for mib in (int(v) for v in args.mib.split(",")):
        with tempfile.TemporaryDirectory(dir=args.dir) as root:
            per_rank = values(
                run_ranks(
                    measure_rank,
                    args.ranks,
                    root,
                    mib,
                    nice_values,
                    args.rounds,
                    timeout=3600,
                    pg_timeout=600,
                )
            )
        print(summarize(per_rank, mib, args.ranks), flush=True)
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
