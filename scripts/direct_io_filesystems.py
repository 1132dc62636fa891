"""How long an async save takes with direct I/O and with buffered writes, on each file system.

    python scripts/direct_io_filesystems.py --mib 128 --ranks 2 --rounds 5 --filesystems all
    python scripts/direct_io_filesystems.py --filesystems ext4,btrfs --markdown table.md
    python scripts/direct_io_filesystems.py --doc   # and write the table into docs/filesystems.md

Needs root: it mounts every writable file system of the test matrix that takes ``O_DIRECT``
and keeps checkpoints (``tests/filesystems.py``: loop-device images, tmpfs, FUSE), each large
enough for every rank's ``--mib`` twice over. A file system that cannot be mounted is named and
left out, the others are measured, and the exit status is 1. fusefat (fat16, fat32) is not
measured: it loses every directory it renames, so no save commits there, and the lost files'
clusters stay allocated (``fsck.vfat`` reclaims them), so repeated saves fill any image.
Stopped by SIGTERM or Ctrl-C, it unmounts what it has mounted before it exits.

On each file system, ``--ranks`` forked ranks save a state of one ``--mib`` MiB tensor each, with
three managers: ``async_save=True`` with ``direct_io=True`` (the default), the same with
``direct_io=False`` (page cache, early writeback, fsync), and a sync save for reference. Each
manager first makes one untimed save (it allocates the snapshot buffers); then every round
makes one timed save with each, rotating their order, and deletes it. An async save is timed
until ``save`` returns (blocking) and until ``wait`` returns (total); every time is the slowest
rank's. The table shows the medians and the per-round ratio of the direct to the buffered
total (paired: the same round's saves), with its range: below 1, direct I/O was faster.
Whether the rank file really was written direct is read from strace of one more async save on
that file system (the check the filesystem matrix makes). The load average before and after
is printed, as the machine's other work changes every number.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

REPO = Path(__file__).resolve().parent.parent
for where in (REPO, REPO / "scripts"):
    if str(where) not in sys.path:
        sys.path.insert(0, str(where))

# What imports torch is imported where it is used, after the arguments were checked: a
# refused argument is reported at once, not after the seconds torch takes to import.
from tests.filesystems import KINDS, LOSES_RENAMED_DIRS, MountFactory  # noqa: E402

if TYPE_CHECKING:
    import distckpt

MIB = 1 << 20
DOC = REPO / "docs" / "filesystems.md"
START, END = "<!-- direct-io:start -->", "<!-- direct-io:end -->"
#: The writable file systems of the matrix that keep checkpoints (each takes O_DIRECT on the
#: kernels docs/filesystems.md names; ramfs, outside the matrix, refuses it: nothing to compare).
FILESYSTEMS = [
    name for name, kind in KINDS.items() if not kind.read_only and name not in LOSES_RENAMED_DIRS
]
#: The three managers each round times: async direct, async buffered, and sync as reference.
MODES = ("direct", "buffered", "sync")
#: Room on each mount beyond the checkpoints themselves: manifests, metadata, a file system's
#: own overhead (a journal, FAT tables).
MARGIN_MIB = 128

#: per mode, per round: (blocking seconds, total seconds) of one rank
RankTimes = dict[str, list[tuple[float, float]]]


def timed_save(mgr: distckpt.CheckpointManager, step: int, state: dict) -> tuple[float, float]:
    """This rank's seconds until ``save`` returned and until the save was done (``wait``), every
    rank starting together; the checkpoint is deleted after."""
    import torch.distributed as dist

    dist.barrier()
    started = time.perf_counter()
    mgr.save(step, state)
    blocking = time.perf_counter() - started
    mgr.wait()
    total = time.perf_counter() - started
    mgr.delete(step)
    return blocking, total


def measure_rank(rank: int, world_size: int, root: str, mib: int, rounds: int) -> RankTimes:
    """One rank's times on the file system holding ``root``: each mode's manager saves into a
    root of its own under it."""
    import torch
    from save_rounds import measure_in_rounds

    import distckpt

    state = {f"rank{rank}.w": torch.empty(mib * MIB // 4).uniform_(-1, 1)}
    options = {
        "direct": {"async_save": True, "direct_io": True},
        "buffered": {"async_save": True, "direct_io": False},
        "sync": {},
    }
    managers = {
        mode: distckpt.CheckpointManager(Path(root) / mode, timeout=300, **options[mode])
        for mode in MODES
    }
    return measure_in_rounds(managers, rounds, lambda mgr, step: timed_save(mgr, step, state))


@dataclass
class FilesystemResult:
    """One file system's slowest-rank times per round, and whether its saves go direct."""

    name: str
    #: per mode: [(blocking, total) per round], each the slowest rank's
    slowest: dict[str, list[tuple[float, float]]]
    #: whether strace saw the async save's rank file opened with O_DIRECT (None: no strace)
    written_direct: bool | None

    def medians(self, mode: str) -> tuple[float, float]:
        """The median blocking and total times of ``mode``'s saves."""
        blocking, total = zip(*self.slowest[mode])
        return statistics.median(blocking), statistics.median(total)

    def total_ratios(self) -> list[float]:
        """Per round: the direct save's total over the buffered one's."""
        return [d[1] / b[1] for d, b in zip(self.slowest["direct"], self.slowest["buffered"])]


def slowest_rank(per_rank: list[RankTimes]) -> dict[str, list[tuple[float, float]]]:
    """Per mode and round, the slowest rank's blocking and total (each its own maximum)."""
    return {
        mode: [
            (max(b for b, _ in rounds), max(t for _, t in rounds))
            for rounds in zip(*(times[mode] for times in per_rank))
        ]
        for mode in MODES
    }


def probe_direct(mounted: dict[str, Path], scratch: Path) -> dict[str, bool | None]:
    """Whether an async save's rank file on each mounted file system is written with direct I/O,
    from strace of a real save on each (None where strace is not available); the trace's log
    goes to ``scratch``. One traced interpreter saves on every mount in turn: one per file
    system would import torch under strace once per file system (a fresh one: the tests' job
    servers are no part of a script users run)."""
    from tests.crashsim.trace import StraceUnavailable, ensure_strace
    from tests.syscall_trace import async_saves_traced

    if not mounted:
        return {}
    try:
        ensure_strace()
    except StraceUnavailable as exc:
        for name in mounted:
            print(f"{name}: not checked whether direct I/O was taken: {exc}", file=sys.stderr)
        return dict.fromkeys(mounted)
    probes = {name: path / "direct-io-probe" for name, path in mounted.items()}
    saves = async_saves_traced(list(probes.values()), scratch, preloaded=False)
    return {name: saves[probe].written_direct(commits=True) for name, probe in probes.items()}


def render(results: list[FilesystemResult], mib: int, ranks: int, rounds: int) -> list[str]:
    """The markdown table, one row per file system."""
    from bench.render import format_seconds, table

    headers = [
        f"{ranks} ranks x {mib} MiB, {rounds} rounds",
        "written direct (strace)",
        "direct: blocking",
        "direct: total",
        "buffered: blocking",
        "buffered: total",
        "sync save",
        "direct / buffered total (paired: median, range)",
    ]
    rows = []
    for result in results:
        direct, buffered = result.medians("direct"), result.medians("buffered")
        ratios = result.total_ratios()
        shown = {True: "yes", False: "no", None: "not checked"}[result.written_direct]
        rows.append(
            [
                result.name,
                shown,
                *(format_seconds(seconds) for seconds in (*direct, *buffered)),
                format_seconds(result.medians("sync")[1]),
                f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}..{max(ratios):.2f})",
            ]
        )
    return table(headers, rows, markdown=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=128, help="state size per rank")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--filesystems", default="all", help=f"all, or some of {','.join(FILESYSTEMS)}"
    )
    parser.add_argument("--markdown", type=Path, help="write the table to this file")
    parser.add_argument("--doc", action="store_true", help=f"write the table into docs/{DOC.name}")
    args = parser.parse_args(argv)
    names = FILESYSTEMS if args.filesystems == "all" else args.filesystems.split(",")
    unknown = sorted(set(names) - set(FILESYSTEMS))
    if unknown:
        parser.error(
            f"not measured: {', '.join(unknown)} (of the matrix, measured are the writable file "
            f"systems that keep checkpoints: {', '.join(FILESYSTEMS)})"
        )
    from bench.cli import exit_on_sigterm
    from doc_tables import write_table

    import distckpt  # noqa: F401  imported once here, not in every forked rank
    from tests.ranks import run_ranks, values

    # SIGTERM (`timeout`, `kill`) ends the run by an exception, so the mounts are undone below
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    load_before = os.getloadavg()
    print(f"load average before: {load_before}", flush=True)
    results: list[FilesystemResult] = []
    not_mounted: dict[str, str] = {}
    # two checkpoints of every rank's state: what a root keeping its last one holds while it
    # writes the next (each save here is deleted before the next, so this is room to spare)
    size_mib = 2 * args.ranks * args.mib + MARGIN_MIB
    with tempfile.TemporaryDirectory(prefix="direct-io-") as base:
        mounts = MountFactory(Path(base), min_size_mib=size_mib)
        try:
            mounted: dict[str, Path] = {}
            for name in names:
                try:
                    mounted[name] = mounts.mount(name).path
                except RuntimeError as exc:
                    not_mounted[name] = str(exc)
                    print(f"{name}: not mounted, not measured: {exc}", file=sys.stderr)
            slowest: dict[str, dict[str, list[tuple[float, float]]]] = {}
            for name, path in mounted.items():
                job = (os.fspath(path / "speed"), args.mib, args.rounds)
                per_rank = values(
                    run_ranks(measure_rank, args.ranks, *job, timeout=3600, pg_timeout=600)
                )
                slowest[name] = slowest_rank(per_rank)
                print(f"{name}: measured", flush=True)
            # after the timings, which thus start without waiting for a traced torch import
            written_direct = probe_direct(mounted, Path(base))
            for name, times in slowest.items():
                results.append(FilesystemResult(name, times, written_direct[name]))
        finally:
            problems = mounts.cleanup()
            for problem in problems:
                print(problem, file=sys.stderr)
    load_after = os.getloadavg()
    print(f"load average after: {load_after}")
    lines = render(results, args.mib, args.ranks, args.rounds)
    lines += [""] + [f"{name}: not mounted ({reason})" for name, reason in not_mounted.items()]
    lines.append(
        f"Linux {platform.release()}, {os.cpu_count()} cores; load average (1, 5, 15 min) "
        f"before {', '.join(f'{v:.2f}' for v in load_before)}, "
        f"after {', '.join(f'{v:.2f}' for v in load_after)}."
    )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")
    if args.doc:
        write_table(DOC, text, START, END, what="direct I/O by file system")
    return 1 if not_mounted else 0


if __name__ == "__main__":
    sys.exit(main())
