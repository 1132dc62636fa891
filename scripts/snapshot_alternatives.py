"""What an async snapshot costs a training loop: a copy into buffers against a ``fork``.

    python scripts/snapshot_alternatives.py --mib 64,512 --rounds 7

An async save must hold a copy of the state that training cannot change. distckpt copies the
tensors into reusable buffers, and ``save`` blocks for that copy. The other way a CPU process
can hold such a copy is ``fork``: the child sees the state as it was, and the kernel copies a
page only when the parent first writes to it after the fork (copy-on-write). ``fork`` returns
sooner than the copy, but the cost is not gone: the training step that next updates the
state pays a page fault and a page copy for every page it writes.

Each round, for each way in turn (the order alternates between rounds), this script takes the
snapshot of ``--mib`` MiB of float32 tensors and then runs one in-place update of every tensor
(``add_``, what an optimizer step does to the parameters), and also times that update with no
snapshot held. The child of ``fork`` writes nothing: it keeps its view of the pages until the
parent's update is done, so the update's extra time is the copy-on-write alone, not a disk
competing for the CPU. The table shows medians of:

* ``blocks``: the time the snapshot takes (the copy; ``fork`` until it returns in the parent);
* ``next update``: the update's time minus the update's time with no snapshot held;
* ``training loses``: the two together, per snapshot.

Buffers are reused, as distckpt reuses them (the first copy, which allocates, is untimed).
``--threads`` sets torch's intra-op threads (default 1: one rank per core, as the benchmark's
2 ranks on 2 cores run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch

MIB = 1 << 20
#: How many tensors the state is split into (a model's state has many).
TENSORS = 16


def in_place_update(state: list[torch.Tensor]) -> float:
    """Seconds for one ``add_`` to every tensor: what an optimizer step does to them."""
    started = time.perf_counter()
    for tensor in state:
        tensor.add_(1e-3)
    return time.perf_counter() - started


def copy_snapshot(state: list[torch.Tensor], buffers: list[torch.Tensor]) -> tuple[float, float]:
    """(seconds the copy blocks, seconds of the update that follows it)."""
    started = time.perf_counter()
    for buffer, tensor in zip(buffers, state):
        buffer.copy_(tensor)
    blocks = time.perf_counter() - started
    return blocks, in_place_update(state)


def fork_snapshot(state: list[torch.Tensor]) -> tuple[float, float]:
    """(seconds ``fork`` blocks the parent, seconds of the update while the child holds the
    old pages)."""
    read_end, write_end = os.pipe()
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        # The child holds the snapshot's pages until the parent closes the pipe; it touches no
        # torch state and leaves without running any exit handler.
        os.close(write_end)
        os.read(read_end, 1)
        os._exit(0)
    blocks = time.perf_counter() - started
    os.close(read_end)
    try:
        update = in_place_update(state)
    finally:
        os.close(write_end)
        os.waitpid(pid, 0)
    return blocks, update


def measure(mib: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Per way ("copy", "fork"): seconds per round of what it blocks and the update's extra."""
    numel = mib * MIB // 4 // TENSORS
    state = [torch.randn(numel) for _ in range(TENSORS)]
    buffers = [torch.empty_like(tensor) for tensor in state]
    copy_snapshot(state, buffers)  # allocates the buffers' pages: untimed, as distckpt's first
    ways: dict[str, Callable[[], tuple[float, float]]] = {
        "copy": lambda: copy_snapshot(state, buffers),
        "fork": lambda: fork_snapshot(state),
    }
    results: dict[str, dict[str, list[float]]] = {
        way: {"blocks": [], "next update": [], "training loses": []} for way in ways
    }
    for round_index in range(rounds):
        order = list(ways) if round_index % 2 == 0 else list(reversed(ways))
        for way in order:
            idle = in_place_update(state)
            blocks, update = ways[way]()
            extra = update - idle
            results[way]["blocks"].append(blocks)
            results[way]["next update"].append(extra)
            results[way]["training loses"].append(blocks + extra)
    return results


def table(mib: int, results: dict[str, dict[str, list[float]]]) -> str:
    """The results as a markdown table of medians, in ms."""
    columns = ("blocks", "next update", "training loses")
    lines = [
        f"#### {mib} MiB of float32 in {TENSORS} tensors",
        "",
        "| snapshot | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for way, measured in results.items():
        cells = [f"{statistics.median(measured[c]) * 1e3:.1f} ms" for c in columns]
        lines.append(f"| {way} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", default="64,512", help="state sizes in MiB, comma-separated")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()[0]:.2f}; torch threads: {args.threads}")
    for mib in (int(size) for size in args.mib.split(",")):
        print(table(mib, measure(mib, args.rounds)))
        print()
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
