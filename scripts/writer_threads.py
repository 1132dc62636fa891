"""How long a sync "torch" save takes by ``writer_threads``, every rank saving at once.

    python scripts/writer_threads.py --mib 512 --threads 1,2,4 --rounds 5 --ranks 2

Each round saves, for every thread count in turn (rotating the order, so no count always
follows the same one), a fresh step of ``--mib`` MiB per rank with
``CheckpointManager(format="torch", fsync=True, writer_threads=N)``, then deletes it. The table
shows the median of the slowest rank's save and the ratio to 1 thread, paired by round (the
same round's 1-thread save), with the ratios' range: a ratio below 1 is a benefit. The load
average before and after is printed, as the machine's other work changes every number.
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

REPO = Path(__file__).resolve().parent.parent
for where in (REPO, REPO / "scripts"):
    if str(where) not in sys.path:
        sys.path.insert(0, str(where))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from save_rounds import measure_in_rounds  # noqa: E402

import distckpt  # noqa: E402
from tests.ranks import run_ranks, values  # noqa: E402

MIB = 1 << 20


def timed_save(mgr: distckpt.CheckpointManager, step: int, state: dict) -> float:
    """Seconds this rank's ``save`` took, every rank starting together."""
    dist.barrier()
    started = time.perf_counter()
    mgr.save(step, state)
    seconds = time.perf_counter() - started
    mgr.delete(step)
    return seconds


def measure_rank(
    rank: int, world_size: int, root: str, mib: int, thread_counts: list[int], rounds: int
) -> dict[int, list[float]]:
    """One rank's save times: ``{threads: [seconds per round]}``."""
    # a few large tensors and many small ones, as a model's state has
    state = {
        "big": [torch.empty(mib * MIB // 16).uniform_(-1, 1) for _ in range(3)],
        "small": [torch.full((1024,), float(n)) for n in range(mib * MIB // 4 // 4096)],
    }
    managers = {
        n: distckpt.CheckpointManager(
            Path(root) / f"threads-{n}", fsync=True, writer_threads=n, timeout=300
        )
        for n in thread_counts
    }
    return measure_in_rounds(managers, rounds, lambda mgr, step: timed_save(mgr, step, state))


def summarize(per_rank: list[dict[int, list[float]]], mib: int, ranks: int) -> str:
    """A markdown table: per thread count, the slowest rank's median and the paired ratio."""
    slowest = {n: [max(ts) for ts in zip(*(times[n] for times in per_rank))] for n in per_rank[0]}
    baseline = slowest[min(slowest)]
    lines = [
        f"| {ranks} ranks x {mib} MiB, writer_threads | sync save (median) "
        f"| / {min(slowest)} thread (paired: median, range) |",
        "|---|---:|---:|",
    ]
    for n, seconds in slowest.items():
        ratios = [s / b for s, b in zip(seconds, baseline)]
        lines.append(
            f"| {n} | {statistics.median(seconds) * 1000:.0f} ms "
            f"| {statistics.median(ratios):.2f}x ({min(ratios):.2f}..{max(ratios):.2f}) |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512, help="state size per rank")
    parser.add_argument("--threads", default="1,2,4", help="writer_threads values to compare")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--dir", help="where to save (default: a temporary directory)")
    args = parser.parse_args(argv)
    thread_counts = sorted(int(v) for v in args.threads.split(","))
    print(f"load average before: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        job = (root, args.mib, thread_counts, args.rounds)
        per_rank = values(run_ranks(measure_rank, args.ranks, *job, timeout=3600, pg_timeout=600))
    print(summarize(per_rank, args.mib, args.ranks), flush=True)
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
