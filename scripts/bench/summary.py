"""From rank 0's raw measurements to medians, paired ratios and the targets' verdicts."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from bench.contenders import MIB, RATIOS
from bench.phases import summarize_phases
from bench.render import format_seconds

TARGET_WORLD, TARGET_MIB = 2, 512
COORD_LIMIT_S = 0.050
#: "a small constant": what a sync save may add to the resident size of a rank holding its state
RSS_LIMIT_MIB = 64.0


def median_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def paired_ratio(a: Sequence[float | None], b: Sequence[float | None]) -> list[float]:
    return [x / y for x, y in zip(a, b) if x is not None and y is not None and y > 0]


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
    }


def evaluate_targets(
    configs: list[dict[str, Any]], coord: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """PASS/FAIL per target, from the target configuration (2 ranks x 512 MiB) when it ran,
    otherwise from the largest configuration that ran (said so in the line)."""
    targets: list[dict[str, Any]] = []
    ran = [c for c in configs if "medians" in c]
    chosen = next(
        (c for c in ran if (c["world_size"], c["mib_per_rank"]) == (TARGET_WORLD, TARGET_MIB)),
        None,
    )
    where = f"{TARGET_WORLD}x{TARGET_MIB} MiB"
    if chosen is None and ran:
        chosen = max(ran, key=lambda c: (c["mib_per_rank"] * c["world_size"], c["world_size"]))
        where = (
            f"{chosen['world_size']}x{chosen['mib_per_rank']} MiB, NOT the target "
            f"{TARGET_WORLD}x{TARGET_MIB} MiB"
        )

    def ratio(name: str) -> float | None:
        found = chosen["ratios"].get(name) if chosen else None
        return found["median"] if found else None

    def add(label: str, value: float | None, limit: float, shown: str, strict: bool) -> None:
        passed = None if value is None else (value < limit if strict else value <= limit)
        targets.append(
            {"target": label, "value": value, "limit": limit, "where": where, "passed": passed}
        )
        targets[-1]["shown"] = shown if value is not None else "not measured"

    r = ratio("distckpt_sync_torch / raw_torch_save")
    add("distckpt sync save <= 1.10x raw torch.save + fsync", r, 1.10, f"{r or 0:.3f}x", False)
    r = ratio("distckpt_sync_torch / dcp_save")
    add("distckpt sync save <= 1.0x DCP save", r, 1.0, f"{r or 0:.3f}x", False)
    r = ratio("crc32 / distckpt_sync_torch")
    add("checksum cost < 10% of the sync save", r, 0.10, f"{(r or 0) * 100:.1f}%", True)
    r = ratio("restore_mmap / restore_full")
    cold = ratio("restore_mmap_cold / restore_full_cold")
    shown = f"{(r or 0) * 100:.1f}% with the page cache hot"
    if cold is not None:
        shown += f" ({cold * 100:.1f}% cold, not judged)"
    add("restore(mmap=True) < 10% of a full read", r, 0.10, shown, True)
    r = ratio("distckpt_async_torch.blocking / copy")
    add("async blocking <= 1.5x copy_ into preallocated buffers", r, 1.5, f"{r or 0:.2f}x", False)
    r = ratio("distckpt_async_torch.blocking / distckpt_sync_torch")
    add("async blocking < 10% of the sync save", r, 0.10, f"{(r or 0) * 100:.1f}%", True)
    r = ratio("train_during_distckpt_async / train_idle")
    theirs = ratio("train_during_dcp_async / train_idle")
    add(
        "distckpt async training slowdown <= DCP async_save's",
        r if theirs is not None else None,
        theirs or 0.0,
        f"{r or 0:.2f}x vs {theirs or 0:.2f}x",
        False,
    )
    rss = chosen["info"].get("rss") if chosen else None
    extra = max(e["extra"] for e in rss) / MIB if rss else None
    add(
        f"peak RSS of a sync save <= state + {RSS_LIMIT_MIB:.0f} MiB (max over ranks)",
        extra,
        RSS_LIMIT_MIB,
        f"+{extra or 0:.1f} MiB",
        False,
    )
    value = coord["median_s"] if coord else None
    targets.append(
        {
            "target": f"coordination overhead < 50 ms median at {coord['ranks'] if coord else 4} "
            "ranks",
            "value": value,
            "limit": COORD_LIMIT_S,
            "where": "tiny state",
            "passed": None if value is None else value < COORD_LIMIT_S,
            "shown": format_seconds(value) if value is not None else "not measured",
        }
    )
    return targets
