"""The benchmark's tables, as aligned text for the terminal or as markdown for the docs."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from bench.contenders import METRIC_ORDER, MIB, WHOLE_STATE
from bench.phases import NESTED_PREFIXES, ordered_phases


def format_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.3f} s"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> list[str]:
    if markdown:
        # Leading spaces mark parts of the row above; markdown would drop them.
        rows = [[nbsp(row[0]), *row[1:]] for row in rows]
        lines = ["| " + " | ".join(headers) + " |"]
        lines.append("|" + "|".join("---:" if i else "---" for i in range(len(headers))) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return lines
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*headers), *(fmt.format(*row) for row in rows)]


def nbsp(text: str) -> str:
    stripped = text.lstrip(" ")
    return "&nbsp;" * (len(text) - len(stripped)) + stripped


def render_config(summary: dict[str, Any], markdown: bool = False) -> list[str]:
    world, mib = summary["world_size"], summary["mib_per_rank"]
    info = summary["info"]
    state_mib = info["state_bytes_per_rank"] / MIB
    rounds = max((len(v) for v in summary["times"].values()), default=0)
    title = (
        f"{world} rank(s) x {mib} MiB per rank ({state_mib:.1f} MiB of tensors per rank, "
        f"{info['tensors_per_rank']} tensors), {rounds} rounds; time = slowest rank"
    )
    lines = [f"### {title}" if markdown else f"== {title}", ""]
    rows = []
    raw_median = summary["medians"].get("raw_torch_save")
    cpu = summary.get("cpu_medians", {})
    for name in METRIC_ORDER:
        values = [v for v in summary["times"].get(name, []) if v is not None]
        if not values:
            continue
        median = statistics.median(values)
        rate = f"{world * state_mib / median:.0f}" if name in WHOLE_STATE else ""
        base, _, key = name.partition(".")
        training = base.startswith("train_")  # a step, or a save slowed by training
        vs_raw = f"{median / raw_median:.2f}x" if raw_median and not training else ""
        shown = key in ("", "total") and not base.startswith("train_")
        user = cpu.get("user", {}).get(base) if shown else None
        system = cpu.get("sys", {}).get(base) if shown else None
        rows.append(
            [
                name,
                format_seconds(median),
                format_seconds(min(values)),
                format_seconds(max(values)),
                rate,
                format_seconds(user) if user is not None else "",
                format_seconds(system) if system is not None else "",
                vs_raw,
            ]
        )
    headers = ["contender", "median", "min", "max", "MiB/s (all ranks)"]
    headers += ["user CPU", "sys CPU", "/ raw_torch_save"]
    lines += table(headers, rows, markdown)
    lines.append("")
    ratio_rows = [
        [
            name,
            f"{r['median']:.3f}",
            f"{r['min']:.3f} .. {r['max']:.3f}",
            f"{r['user_cpu_median']:.2f}" if r.get("user_cpu_median") is not None else "",
        ]
        for name, r in summary["ratios"].items()
    ]
    if ratio_rows:
        headers = ["ratio (paired per round)", "median", "range", "user CPU ratio"]
        lines += table(headers, ratio_rows, markdown)
        lines.append("")
    for key, contender in (
        ("sync_phases", "distckpt_sync_torch"),
        ("async_phases", "distckpt_async_torch"),
    ):
        if summary.get(key):
            lines += [f"{contender}, by phase:", ""]
            lines += render_phases(summary[key], markdown)
            lines.append("")
    extra = []
    for key, kind in (("rss", "sync"), ("rss_async", "async")):
        for entry in info.get(key, []):
            note = " (peak was set before the save)" if entry["peak_set_earlier"] else ""
            extra.append(
                f"peak RSS rank {entry['rank']}: {entry['peak_after'] / MIB:.1f} MiB "
                f"({entry['source']}), {entry['rss_before'] / MIB:.1f} MiB resident before the "
                f"first {kind} save (state {entry['state_bytes'] / MIB:.2f} MiB): "
                f"+{entry['extra'] / MIB:.2f} MiB beyond it{note}"
            )
    for key in ("distckpt_sync_torch.first_save", "distckpt_async_torch.first_save"):
        if key in info:
            extra.append(f"{key} (untimed warm-up): {format_seconds(info[key])}")
    saves_of = info.get("train_saves", {})
    for name, counts in info.get("train_steps_during_save", {}).items():
        saves = saves_of.get(name)
        extra.append(
            f"{name}: {', '.join(str(c) for c in counts)} training steps per round overlapped "
            + (f"its saves ({', '.join(str(n) for n in saves)} saves)" if saves else "the save")
        )
    for name, why in summary["skipped"].items():
        extra.append(f"SKIPPED {name}: {why}")
    lines += [f"* {e}" if markdown else f"  {e}" for e in extra]
    return [*lines, ""]


def render_phases(phases: dict[str, dict[str, Any]], markdown: bool = False) -> list[str]:
    """One row per phase (:func:`bench.phases.ordered_phases`): the median per save on the
    slowest rank, that rank, and how often the phase ran per save; "-" where no event of the
    phase arrived."""
    rows = []
    for name, entry in ordered_phases(phases):
        label = ("    " if name.startswith(NESTED_PREFIXES) else "  ") + name
        if entry is None:
            rows.append([label, "-", "-", "-"])
        else:
            runs = entry["runs"]
            shown_runs = f"{runs:g}" if runs != int(runs) else str(int(runs))
            rows.append([label, format_seconds(entry["median_s"]), str(entry["rank"]), shown_runs])
    headers = ["phase (events; nested rows are parts of the row above)", "median", "rank", "runs"]
    return table(headers, rows, markdown)


def render_coord(coord: dict[str, Any], markdown: bool = False) -> list[str]:
    title = (
        f"coordination overhead: {coord['ranks']} ranks, ~1 KiB state per rank, keep_last=2, "
        f"{len(coord['saves'])} saves after 3 warm-up saves"
    )
    lines = [f"### {title}" if markdown else f"== {title}", ""]
    rows = [
        ["distckpt sync save (total per save)", format_seconds(coord["median_s"])],
        ["  p90", format_seconds(coord["p90_s"])],
        [
            "raw torch.save + fsync of the same state",
            format_seconds(coord["raw_torch_save_median_s"]),
        ],
        [
            "difference: the coordination itself",
            format_seconds(coord["median_s"] - coord["raw_torch_save_median_s"]),
        ],
        [
            "one all_gather_object (timing group)",
            format_seconds(coord["all_gather_object_median_s"]),
        ],
    ]
    lines += table(["what (medians)", "time"], rows, markdown)
    lines.append("")
    lines += render_phases(coord["phases"], markdown)
    return [*lines, ""]


def render_coord_growth(coords: list[dict[str, Any]], markdown: bool = False) -> list[str]:
    """Coordination per save against the number of ranks (one row per coordination job)."""
    lines = ["### coordination by number of ranks" if markdown else "== coordination by ranks", ""]
    rows = [
        [
            str(c["ranks"]),
            format_seconds(c["median_s"]),
            format_seconds(c["raw_torch_save_median_s"]),
            format_seconds(c["all_gather_object_median_s"]),
        ]
        for c in sorted(coords, key=lambda c: c["ranks"])
    ]
    headers = ["ranks", "distckpt save (tiny)", "raw torch.save + fsync", "all_gather_object"]
    return [*lines, *table(headers, rows, markdown), ""]


def render_small(small: dict[str, Any], markdown: bool = False) -> list[str]:
    """The many-small-tensors job: medians and the paired ratios."""
    title = f"many small tensors: {small['ranks']} ranks x {small['tensors']} tensors of 4 KiB"
    lines = [f"### {title}" if markdown else f"== {title}", ""]
    rows = [[name, format_seconds(value)] for name, value in small["medians"].items()]
    rows += [
        ["distckpt_sync_torch / raw_torch_save", f"{small['save_ratio']:.3f}x"],
        ["restore_full / raw_torch_load", f"{small['restore_ratio']:.3f}x"],
    ]
    return [
        *lines,
        *table(["what (medians; ratios paired per round)", "value"], rows, markdown),
        "",
    ]


def render_targets(targets: list[dict[str, Any]], markdown: bool = False) -> list[str]:
    lines = ["### Targets" if markdown else "== Targets", ""]
    for t in targets:
        verdict = {True: "PASS", False: "FAIL", None: "N/A "}[t["passed"]]
        line = f"{verdict}  {t['target']}: {t['shown']} ({t['where']})"
        lines.append(f"* **{verdict}** {line[6:]}" if markdown else line)
    return [*lines, ""]
