"""The command line: flags, resource checks, one job per configuration, and the output
(terminal, ``--json``, ``--markdown``, ``--doc`` into docs/benchmark.md)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import doc_tables
import torch

import bench
from bench.contenders import CONTENDERS, MIB, SAVE_CONTENDERS
from bench.coordination import coord_job, summarize_coord
from bench.jobs import main_job
from bench.objstore import objstore_job, objstore_targets, render_objstore, summarize_objstore
from bench.plot import write_plot
from bench.render import (
    render_config,
    render_coord,
    render_coord_growth,
    render_small,
    render_targets,
)
from bench.runner import JobFailed, log, run_job, side_job
from bench.small import small_job, summarize_small
from bench.summary import evaluate_targets, summarize

DOC = Path(__file__).resolve().parents[2] / "docs" / "benchmark.md"


def doc_markers(name: str) -> tuple[str, str]:
    """The markers around the generated tables of the run ``name`` in docs/benchmark.md."""
    return f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"


def meminfo(key: str) -> int | None:
    with contextlib.suppress(OSError), open("/proc/meminfo") as file:
        for line in file:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


def fs_type(path: Path) -> str:
    best, kind = "", "unknown"
    with contextlib.suppress(OSError), open("/proc/mounts") as file:
        for line in file:
            parts = line.split()
            if len(parts) > 2 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    return kind


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def int_list_or_none(text: str) -> list[int]:
    """Positive integers, or "0" for none."""
    return [] if text.strip() == "0" else int_list(text)


def contender_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown contender(s) {unknown}; choose from {', '.join(CONTENDERS)}"
        )
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python scripts/bench",
        description=bench.__doc__.split("\n\n")[0],
        epilog="contenders:\n"
        + "\n".join(f"  {name}: {text}" for name, text in CONTENDERS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--world-sizes",
        type=int_list_or_none,
        default=[1, 2, 4],
        metavar="1,2,4",
        help="numbers of ranks, one job each (with every --mib; 0: none)",
    )
    parser.add_argument(
        "--mib",
        type=int_list,
        default=[64, 512],
        metavar="64,512",
        help="state size per rank, in MiB",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds per job; tables show medians over them"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="copy, crc32 and the restores run this many times per round; the round counts "
        "their median (they are short, so one run is at the mercy of a page fault storm)",
    )
    parser.add_argument(
        "--contenders",
        type=contender_list,
        default=list(CONTENDERS),
        metavar="NAME,...",
        help="default: all (see below)",
    )
    parser.add_argument("--json", type=Path, help="write every measurement to this file")
    parser.add_argument("--markdown", type=Path, help="write the tables as markdown here")
    parser.add_argument(
        "--doc",
        metavar="RUN",
        help="also write the tables into docs/benchmark.md, between the markers of RUN "
        "(<!-- bench:RUN:start --> and <!-- bench:RUN:end -->)",
    )
    parser.add_argument("--dir", type=Path, help="where to write (default: the temp dir)")
    parser.add_argument(
        "--coord-ranks",
        type=int_list_or_none,
        default=[2, 4, 8],
        metavar="2,4,8",
        help="ranks of the coordination-overhead jobs, one job each (0: skip them)",
    )
    parser.add_argument(
        "--small-ranks",
        type=int,
        default=2,
        help="ranks of the many-small-tensors job (0: skip it)",
    )
    parser.add_argument(
        "--small-tensors", type=int, default=20_000, help="4 KiB tensors per rank in that job"
    )
    parser.add_argument(
        "--s3-ranks",
        type=int,
        default=2,
        help="ranks of the object-store job, against a moto server the benchmark starts "
        "(needs moto[server]; 0: skip it)",
    )
    parser.add_argument(
        "--s3-mib", type=int, default=64, help="state size per rank in the object-store job"
    )
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="draw save and coordination time against size and ranks (needs matplotlib: the "
        "'bench' extra)",
    )
    parser.add_argument(
        "--coord-saves", type=int, default=20, help="timed saves of the coordination job"
    )
    parser.add_argument(
        "--start-method",
        choices=("spawn", "fork"),
        default="spawn",
        help="how tests/ranks.py starts the ranks (multiprocessing start method)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=0.0,
        help="seconds per job before it counts as hung (0: from the sizes)",
    )
    args = parser.parse_args(argv)
    if min(args.rounds, args.repeats, args.coord_saves, args.small_tensors, args.s3_mib) < 1 or (
        min(args.small_ranks, args.s3_ranks) < 0
    ):
        parser.error(
            "--rounds, --repeats, --coord-saves, --small-tensors and --s3-mib must be >= 1, "
            "--small-ranks and --s3-ranks >= 0"
        )
    if args.doc:
        text = DOC.read_text(encoding="utf-8")
        missing = [marker for marker in doc_markers(args.doc) if marker not in text]
        if missing:
            parser.error(f"--doc {args.doc}: {DOC.name} has no {' or '.join(missing)}")
    return args


def check_resources(args: argparse.Namespace, where: Path) -> list[str]:
    """Why the requested sizes cannot run here (empty: they fit). At most two checkpoints of
    a configuration exist at once (the round's distckpt checkpoint kept for the restore
    measurements, and the contender being measured); each rank holds its state, a copy
    buffer, distckpt's async snapshot and transiently DCP's staging copy or a loaded state."""
    problems = []
    free = shutil.disk_usage(where).free
    available = meminfo("MemAvailable")
    for world in args.world_sizes:
        for mib in args.mib:
            disk = int(2 * world * mib * MIB * 1.1) + 512 * MIB
            if disk > free:
                problems.append(
                    f"{world} ranks x {mib} MiB needs ~{disk / 2**30:.1f} GiB of disk, "
                    f"{free / 2**30:.1f} GiB free at {where}"
                )
            memory = world * (5 * mib * MIB + 512 * MIB)
            if available is not None and memory > available:
                problems.append(
                    f"{world} ranks x {mib} MiB needs ~{memory / 2**30:.1f} GiB of memory, "
                    f"{available / 2**30:.1f} GiB available"
                )
    return problems


def run_objstore(args: argparse.Namespace, run_dir: Path, started: float) -> dict[str, Any] | None:
    """The object-store job against a moto server started for it (and stopped after it); its
    summary, or None (logged) when moto is missing or the job failed."""
    from tests.s3server import S3Server

    for needed in ("moto.server", "boto3"):  # the "test" extra's; the other jobs do without
        if importlib.util.find_spec(needed.split(".")[0]) is None:
            log(started, f"object-store job skipped: {needed} is not installed (moto[server])")
            return None
    server = S3Server().start()
    try:
        job = {
            "url": f"s3://{server.create_bucket()}/bench",
            "storage_options": server.storage_options(),
            "mib": args.s3_mib,
            "rounds": args.rounds,
            "pg_timeout": 600,
        }
        raw = side_job(objstore_job, args.s3_ranks, job, run_dir, "objstore", started, args)
    finally:
        server.stop()
    return summarize_objstore(raw) if raw is not None else None


def exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (``timeout``, ``kill``) ends the run like Ctrl-C does: by an exception, so that
    the running job's clean-up kills its ranks and what they started (Python's default
    SIGTERM handling exits at once and leaves them running)."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    base = args.dir if args.dir else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    run_dir = base / f"distckpt-bench-{uuid.uuid4().hex[:8]}"
    problems = check_resources(args, base)
    if problems:
        print("refusing to run:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    usage = shutil.disk_usage(base)
    machine = {
        "cpus": os.cpu_count(),
        "memory_gib": round((meminfo("MemTotal") or 0) / 2**30, 1),
        "disk_free_gib": round(usage.free / 2**30, 1),
        "disk_total_gib": round(usage.total / 2**30, 1),
        "filesystem": fs_type(base.resolve()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    header = (
        f"machine: {machine['cpus']} CPUs, {machine['memory_gib']} GiB RAM, "
        f"{machine['filesystem']} disk with {machine['disk_free_gib']} of "
        f"{machine['disk_total_gib']} GiB free; torch {machine['torch']}, "
        f"python {machine['python']}; start method {args.start_method}"
    )
    print(header, flush=True)
    print(
        "note: caches are not dropped: every save fsyncs, and restores read what the save just "
        "left in the page cache, except the *_cold ones (the checkpoint's own files evicted "
        "with posix_fadvise first)\n",
        flush=True,
    )
    started = time.monotonic()
    configs: list[dict[str, Any]] = []
    coords: list[dict[str, Any]] = []
    small: dict[str, Any] | None = None
    objstore: dict[str, Any] | None = None
    run_dir.mkdir()
    try:
        for world in args.world_sizes:
            for mib in args.mib:
                fits = check_resources(
                    argparse.Namespace(world_sizes=[world], mib=[mib]), base
                )  # the disk may have filled since
                if fits:
                    configs.append({"world_size": world, "mib_per_rank": mib, "error": fits})
                    log(started, f"skipping {world}x{mib} MiB: {'; '.join(fits)}")
                    continue
                job_dir = run_dir / f"w{world}-m{mib}"
                job_dir.mkdir()
                written = world * mib * ((len(SAVE_CONTENDERS) + 2) * args.rounds + 4)
                timeout = args.timeout or 300 + written / 20
                job = {
                    "dir": os.fspath(job_dir),
                    "mib": mib,
                    "rounds": args.rounds,
                    "repeats": args.repeats,
                    "contenders": args.contenders,
                    "pg_timeout": timeout,
                }
                log(started, f"{world} rank(s) x {mib} MiB: starting")
                try:
                    raw = run_job(main_job, world, job, method=args.start_method, timeout=timeout)
                    summary = summarize(world, mib, raw)
                except JobFailed as exc:
                    summary = {"world_size": world, "mib_per_rank": mib, "error": str(exc)}
                    log(started, f"{world} rank(s) x {mib} MiB FAILED: {exc}")
                finally:
                    shutil.rmtree(job_dir, ignore_errors=True)
                configs.append(summary)
                if "medians" in summary:
                    log(started, f"{world} rank(s) x {mib} MiB: done")
                    print("\n".join(render_config(summary)), flush=True)
        for world in args.coord_ranks:
            job = {"saves": args.coord_saves, "pg_timeout": 300}
            raw_coord = side_job(coord_job, world, job, run_dir, "coordination", started, args)
            if raw_coord is not None:
                coords.append(summarize_coord(raw_coord))
                print("\n".join(render_coord(coords[-1])), flush=True)
        if args.small_ranks:
            job = {"tensors": args.small_tensors, "rounds": args.rounds, "pg_timeout": 600}
            raw_small = side_job(small_job, args.small_ranks, job, run_dir, "small", started, args)
            if raw_small is not None:
                small = summarize_small(raw_small)
                print("\n".join(render_small(small)), flush=True)
        if args.s3_ranks:
            objstore = run_objstore(args, run_dir, started)
            if objstore is not None:
                print("\n".join(render_objstore(objstore)), flush=True)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    targets = evaluate_targets(configs, coords, small) + objstore_targets(objstore)
    print("\n".join(render_targets(targets)), flush=True)
    elapsed = time.monotonic() - started
    log(started, f"finished in {elapsed:.0f} s")
    if args.json:
        payload = {
            "machine": machine,
            "args": {
                k: (os.fspath(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            },
            "elapsed_s": elapsed,
            "contenders": CONTENDERS,
            "configs": configs,
            "coordination": coords,
            "small_tensors": small,
            "object_store": objstore,
            "targets": targets,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    tables: list[str] = []
    for summary in configs:
        if "medians" in summary:
            tables += render_config(summary, markdown=True)
    for coord in coords:
        tables += render_coord(coord, markdown=True)
    if coords:
        tables += render_coord_growth(coords, markdown=True)
    if small:
        tables += render_small(small, markdown=True)
    if objstore:
        tables += render_objstore(objstore, markdown=True)
    tables += render_targets(targets, markdown=True)
    if args.markdown:
        args.markdown.write_text("\n".join([header, "", *tables]) + "\n")
    if args.doc:
        # In the doc, a run's tables sit under a "### Run" heading of their own.
        nested = ["#" + line if line.startswith("### ") else line for line in tables]
        start, end = doc_markers(args.doc)
        doc_tables.write_table(DOC, "\n".join(nested), start, end, what=f"run {args.doc}")
    if args.plot:
        write_plot(args.plot, configs, coords)
    failed_jobs = [c for c in configs if "error" in c]
    return 1 if failed_jobs else 0
