"""From rank 0's raw measurements to medians, paired ratios and the targets' verdicts."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from bench.contenders import MIB, RATIOS
from bench.phases import summarize_phases
from bench.render import format_seconds

#: The (ranks, MiB per rank) configurations the per-configuration targets are judged at.
TARGET_CONFIGS = ((2, 512), (2, 64))
COORD_RANKS = 4
COORD_LIMIT_S = 0.015
SMALL_LIMIT = 1.2
MMAP_RATIO = "restore_mmap / raw_torch_load_mmap"
ASYNC_BLOCKING = "distckpt_async_torch.blocking / distckpt_sync_torch"
ASYNC_TOTAL = "distckpt_async_torch.total / distckpt_sync_torch"
#: "a small constant": what a sync save may add to the resident size of a rank holding its state
RSS_LIMIT_MIB = 64.0


def median_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def paired_ratio(a: Sequence[float | None], b: Sequence[float | None]) -> list[float]:
    return [x / y for x, y in zip(a, b) if x is not None and y is not None and y > 0]


def summarize_side_job(raw: dict[str, Any], ratios: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """A side job's summary: what rank 0 returned, each time's median (``medians``) and, for
    each ``name: (a, b)`` of ``ratios``, the median of the per-round ratios a / b."""
    times = raw["times"]
    summary = {**raw, "medians": {name: statistics.median(v) for name, v in times.items()}}
    for name, (a, b) in ratios.items():
        summary[name] = statistics.median(paired_ratio(times[a], times[b]))
    return summary


def summarize(world: int, mib: int, raw: dict[str, Any]) -> dict[str, Any]:
    times = raw["times"]
    medians = {name: median_or_none(values) for name, values in times.items()}
    user = raw["cpu"].get("user", {})

    def user_cpu(metric: str) -> list[float | None] | None:
        base, _, key = metric.partition(".")
        # A train_* measurement's CPU time covers all its steps (and a save): not per step.
        whole = key in ("", "total") and not base.startswith("train_")
        return user.get(base) if whole else None

    ratios = {}
    for a, b in RATIOS:
        if a in times and b in times:
            per_round = paired_ratio(times[a], times[b])
            if per_round:
                cpu_a, cpu_b = user_cpu(a), user_cpu(b)
                # Only where the denominator does real work in user space (not disk_write).
                meaningful = cpu_a and cpu_b and (median_or_none(cpu_b) or 0) > 0.005
                cpu_ratio = paired_ratio(cpu_a, cpu_b) if meaningful else []
                ratios[f"{a} / {b}"] = {
                    "median": statistics.median(per_round),
                    "min": min(per_round),
                    "max": max(per_round),
                    "per_round": per_round,
                    "user_cpu_median": statistics.median(cpu_ratio) if cpu_ratio else None,
                }
    cpu_medians = {
        kind: {name: median_or_none(values) for name, values in by_name.items()}
        for kind, by_name in raw["cpu"].items()
    }
    return {
        "world_size": world,
        "mib_per_rank": mib,
        "times": times,
        "medians": medians,
        "cpu": raw["cpu"],
        "cpu_medians": cpu_medians,
        "ratios": ratios,
        "skipped": raw["skipped"],
        "info": raw["info"],
        "sync_phases": summarize_phases(raw["info"].get("distckpt_sync_torch.phases_by_rank", [])),
        "async_phases": summarize_phases(
            raw["info"].get("distckpt_async_torch.phases_by_rank", [])
        ),
    }


def ratio_of(config: dict[str, Any] | None, name: str) -> float | None:
    """The median paired ratio ``name`` ("a / b") of a configuration, if measured."""
    found = config["ratios"].get(name) if config else None
    return found["median"] if found else None


def target(label: str, value: float | None, limit: float, where: str, shown: str) -> dict:
    """One PASS/FAIL line: ``value <= limit`` (None: not measured)."""
    return {
        "target": label,
        "value": value,
        "limit": limit,
        "where": where,
        "passed": None if value is None else value <= limit,
        "shown": shown if value is not None else "not measured",
    }


def config_targets(config: dict[str, Any] | None, where: str) -> list[dict[str, Any]]:
    """The targets one (world size, MiB) configuration is judged by (issue 19)."""
    rows: list[dict[str, Any]] = []

    def add_ratio(label: str, name: str, limit: float, percent: bool = False) -> None:
        r = ratio_of(config, name)
        shown = f"{(r or 0) * 100:.1f}%" if percent else f"{r or 0:.3f}x"
        rows.append(target(label, r, limit, where, shown))

    add_ratio("sync save <= 1.15x the disk floor", "distckpt_sync_torch / disk_write", 1.15)
    add_ratio(
        "sync save <= 0.9x raw torch.save + fsync", "distckpt_sync_torch / raw_torch_save", 0.9
    )
    add_ratio("sync save <= 0.9x DCP save", "distckpt_sync_torch / dcp_save", 0.9)
    add_ratio("checksum cost <= 10% of the sync save", "crc32 / distckpt_sync_torch", 0.1, True)
    add_ratio("full restore <= 1.0x torch.load", "restore_full / raw_torch_load", 1.0)
    add_ratio("restore(mmap=True) <= 1.1x torch.load(mmap=True)", MMAP_RATIO, 1.1)
    add_ratio(
        "async blocking <= 1.0x a copy into buffers", "distckpt_async_torch.blocking / copy", 1.0
    )
    add_ratio("async blocking <= 8% of the sync save", ASYNC_BLOCKING, 0.08, True)
    add_ratio("async total <= 1.1x the sync save", ASYNC_TOTAL, 1.1)
    mine = ratio_of(config, "train_during_distckpt_async / train_idle")
    theirs = ratio_of(config, "train_during_dcp_async / train_idle")
    rows.append(
        target(
            "training step during an async save <= during DCP async_save's",
            mine if theirs is not None else None,
            theirs or 0.0,
            where,
            f"{mine or 0:.2f}x vs {theirs or 0:.2f}x of an idle step",
        )
    )
    for key, label, limit_of in (
        (
            "rss",
            f"peak RSS of a sync save <= state + {RSS_LIMIT_MIB:.0f} MiB",
            lambda _: RSS_LIMIT_MIB,
        ),
        ("rss_async", "peak RSS of an async save <= 2x state", lambda state: state),
    ):
        rss = config["info"].get(key) if config else None
        extra = max(e["extra"] for e in rss) / MIB if rss else None
        state = max(e["state_bytes"] for e in rss) / MIB if rss else 0.0
        # Two decimals: the async save's buffers alone equal the state, so tenths of a MiB
        # beyond them decide that target.
        shown = f"state + {extra or 0:.2f} MiB (state {state:.2f} MiB; max over ranks)"
        rows.append(target(label, extra, limit_of(state), where, shown))
    return rows


def evaluate_targets(
    configs: list[dict[str, Any]],
    coords: list[dict[str, Any]],
    small: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """PASS/FAIL per target: the per-configuration targets for each of TARGET_CONFIGS that
    ran (or, if none did, for the largest that ran, said so in the line), then coordination
    at COORD_RANKS ranks and the many-small-tensors targets."""
    ran = [c for c in configs if "medians" in c]
    chosen = [c for c in ran if (c["world_size"], c["mib_per_rank"]) in TARGET_CONFIGS]
    targets: list[dict[str, Any]] = []
    for config in chosen:
        targets += config_targets(config, f"{config['world_size']}x{config['mib_per_rank']} MiB")
    if not chosen:
        largest = max(ran, key=lambda c: c["mib_per_rank"] * c["world_size"], default=None)
        where = "nothing ran"
        if largest is not None:
            where = (
                f"{largest['world_size']}x{largest['mib_per_rank']} MiB, NOT a target configuration"
            )
        targets += config_targets(largest, where)
    coord = next((c for c in coords if c["ranks"] == COORD_RANKS), None)
    value = coord["median_s"] if coord else None
    targets.append(
        target(
            f"coordination per save <= {COORD_LIMIT_S * 1000:.0f} ms at {COORD_RANKS} ranks",
            value,
            COORD_LIMIT_S,
            "tiny state",
            format_seconds(value) if value is not None else "",
        )
    )
    where = f"{small['ranks']} ranks x {small['tensors']} tensors of 4 KiB" if small else "-"
    for label, name in (
        ("many small tensors: save <= 1.2x raw torch.save + fsync", "save_ratio"),
        ("many small tensors: restore <= 1.2x torch.load", "restore_ratio"),
    ):
        r = small.get(name) if small else None
        targets.append(target(label, r, SMALL_LIMIT, where, f"{r or 0:.3f}x"))
    return targets
