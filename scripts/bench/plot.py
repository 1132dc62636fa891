"""``--plot FILE.png``: save time against state size and number of ranks, and coordination time
against number of ranks, beside raw ``torch.save``, DCP and the disk floor. Needs matplotlib
(the ``bench`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: The save contenders drawn, with their labels, in drawing order.
SAVE_LINES = {
    "disk_write": "disk floor (os.write + fsync)",
    "raw_torch_save": "raw torch.save + fsync",
    "dcp_save": "DCP save",
    "distckpt_sync_torch": "distckpt sync save",
}
COORD_LINES = {
    "median_s": "distckpt save of a tiny state",
    "raw_torch_save_median_s": "raw torch.save + fsync of it",
    "all_gather_object_median_s": "one all_gather_object",
}
STYLES = ("-", "--", ":", "-.")


def write_plot(path: Path, configs: list[dict[str, Any]], coords: list[dict[str, Any]]) -> None:
    """Two panels: median save time (s) per MiB per rank, a line per contender and world
    size; median coordination time (ms) per number of ranks."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    figure, (saves, coordination) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=90)
    ran = [c for c in configs if "medians" in c]
    worlds = sorted({c["world_size"] for c in ran})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, (name, label) in zip(colors, SAVE_LINES.items()):
        for style, world in zip(STYLES * 4, worlds):
            points = sorted(
                (c["mib_per_rank"], c["medians"][name])
                for c in ran
                if c["world_size"] == world and c["medians"].get(name) is not None
            )
            if points:
                xs, ys = zip(*points)
                shown = f"{label}, {world} rank{'s' if world > 1 else ''}"
                saves.plot(xs, ys, style, color=color, marker="o", label=shown)
    saves.set(xlabel="state per rank (MiB)", ylabel="save time, median (s)", title="Save time")
    saves.legend(fontsize=7)
    saves.grid(alpha=0.3)
    measured = sorted(coords, key=lambda c: c["ranks"])
    for color, (key, label) in zip(colors, COORD_LINES.items()):
        if measured:
            xs = [c["ranks"] for c in measured]
            coordination.plot(
                xs, [c[key] * 1000 for c in measured], color=color, marker="o", label=label
            )
    coordination.set(
        xlabel="ranks", ylabel="time per save, median (ms)", title="Coordination (tiny state)"
    )
    coordination.set_xticks(sorted({c["ranks"] for c in measured}) or [1])
    coordination.legend(fontsize=7)
    coordination.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
