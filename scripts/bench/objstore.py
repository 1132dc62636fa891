"""The object-store job: checkpoints to an ``s3://`` root of an S3-protocol server (moto, which
the benchmark starts on 127.0.0.1 for this job), against the floor of that store and client.

Each rank holds ``job["mib"]`` MiB (:func:`bench.contenders.make_state`). Each round measures,
in alternating order, ``raw_upload`` (every rank at once streams ``torch.save`` of its state
into one object through ``ObjectStore.open_write``: the same client, the same parallel
multipart upload and the same bytes a rank file holds, with no coordination, manifest or
commit) and ``distckpt_sync_torch`` (a save of the same state by a ``CheckpointManager`` on the
root); each one's objects are deleted before the next measurement. Then an async save
(``distckpt_async_torch``): ``blocking`` until ``save`` returns, ``total`` until ``wait`` does.
The blocking part copies the state into buffers and nothing else: it does not grow with the
upload's time, which ``total`` shows.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from bench.contenders import async_marks, make_state
from bench.render import format_seconds, table
from bench.summary import summarize_side_job, target
from bench.timing import Ranks
from distckpt import CheckpointManager
from distckpt.layout import rank_file_name
from distckpt.objstore import ObjectStore

#: distckpt's sync save against the plain parallel upload of the same bytes
SAVE_LIMIT = 1.15
#: an async save's blocking part against the sync save (the same limit as on a local disk)
BLOCKING_LIMIT = 0.08


def upload(store: ObjectStore, name: str, state: Any) -> None:
    """``raw_upload``: ``torch.save`` streamed into one object, published when it closes."""
    with store.open_write(name) as writer:
        torch.save(state, writer)


def objstore_job(rank: int, world: int, job: dict[str, Any]) -> dict[str, Any] | None:
    """Rank 0 returns the per-round times of the three measurements."""
    logging.getLogger("distckpt").setLevel(logging.ERROR)
    ranks = Ranks(rank, world)
    url, options = job["url"], job["storage_options"]
    state = make_state(rank, job["mib"])
    store = ObjectStore(url, options)
    times: dict[str, list[float]] = {}

    def clear(prefix: str) -> None:
        ranks.barrier()
        if rank == 0:
            store.delete(info.key for info in store.list(prefix))
        ranks.barrier()

    # No retention: each save is deleted after its measurement, so no save deletes another.
    sync = CheckpointManager(f"{url}/sync", storage_options=options, timeout=job["pg_timeout"])
    sync.save(0, state)  # untimed warm-up: connections, the lease, imports
    ranks.delete_checkpoint(sync, 0)
    upload(store, f"raw/warm-up/{rank_file_name(rank)}", state)
    clear("raw/")
    for r in range(job["rounds"]):
        step = r + 1
        name = f"raw/{step}/{rank_file_name(rank)}"
        contenders = [
            ("raw_upload", lambda name=name: upload(store, name, state)),
            ("distckpt_sync_torch", lambda step=step: sync.save(step, state)),
        ]
        for metric, fn in contenders[r % 2 :] + contenders[: r % 2]:
            times.setdefault(metric, []).append(ranks.measure(lambda t0, fn=fn: fn())[""])
        clear("raw/")
        ranks.delete_checkpoint(sync, step)
    sync.close()

    pending = CheckpointManager(
        f"{url}/async",
        storage_options=options,
        timeout=job["pg_timeout"],
        keep_last=1,
        async_save=True,
    )
    async_marks(0.0, pending, 0, state)  # untimed warm-up: the buffers are made here
    for r in range(job["rounds"]):
        marks = ranks.measure(lambda t0, r=r: async_marks(t0, pending, r + 1, state))
        for key, value in marks.items():
            times.setdefault(f"distckpt_async_torch.{key}", []).append(value)
    pending.close()
    if rank != 0:
        return None
    return {"ranks": world, "mib_per_rank": job["mib"], "times": times}


def summarize_objstore(raw: dict[str, Any]) -> dict[str, Any]:
    """Medians, and the paired per-round ratios the targets judge."""
    return summarize_side_job(
        raw,
        {
            "save_ratio": ("distckpt_sync_torch", "raw_upload"),
            "blocking_ratio": ("distckpt_async_torch.blocking", "distckpt_sync_torch"),
        },
    )


def objstore_targets(summary: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The object-store case's PASS/FAIL lines (not measured when it did not run)."""
    where = f"{summary['ranks']} ranks x {summary['mib_per_rank']} MiB" if summary else "-"
    save = summary["save_ratio"] if summary else None
    blocking = summary["blocking_ratio"] if summary else None
    return [
        target(
            f"object store: sync save <= {SAVE_LIMIT}x a plain parallel upload",
            save,
            SAVE_LIMIT,
            where,
            f"{save or 0:.3f}x",
        ),
        target(
            f"object store: async blocking <= {BLOCKING_LIMIT:.0%} of the sync save",
            blocking,
            BLOCKING_LIMIT,
            where,
            f"{(blocking or 0) * 100:.1f}%",
        ),
    ]


def render_objstore(summary: dict[str, Any], markdown: bool = False) -> list[str]:
    """The object-store job: medians, throughput and the paired ratios."""
    title = (
        f"object store (moto on 127.0.0.1): {summary['ranks']} ranks x "
        f"{summary['mib_per_rank']} MiB"
    )
    lines = [f"### {title}" if markdown else f"== {title}", ""]
    total_mib = summary["ranks"] * summary["mib_per_rank"]
    rows = []
    for name, value in summary["medians"].items():
        whole = not name.endswith(".blocking")
        rate = f"{total_mib / value:.0f} MiB/s" if whole and value > 0 else "-"
        rows.append([name, format_seconds(value), rate])
    rows += [
        ["distckpt_sync_torch / raw_upload", f"{summary['save_ratio']:.3f}x", ""],
        ["async blocking / distckpt_sync_torch", f"{summary['blocking_ratio'] * 100:.1f}%", ""],
    ]
    headers = ["what (medians; ratios paired per round)", "value", "all ranks"]
    return [*lines, *table(headers, rows, markdown), ""]
