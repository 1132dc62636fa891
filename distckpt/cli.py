"""The ``distckpt`` command line: a thin front end over the library's own functions.

Every command takes a local root or path, or an ``s3://BUCKET/PREFIX`` URL (``lease --break``
only a local root); for an ``s3://`` URL the endpoint and credentials come from the environment
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``) and
the AWS config files.

``ls``, ``info``, ``verify`` and ``lease`` only read (``lease --break`` rewrites only the
lease record, for a holder on another machine that is known to be dead). ``prune``,
``delete`` and ``gc`` act through the same store a training job's rank 0 uses (its retention
rules, its lock, its cleanup), with no process group, and ``export`` through the same reader, so
running one next to a live job is safe. Output is for people by default, JSON with ``--json``.
Exit status: 0 on success, 1 when ``verify`` finds a problem or ``gc`` must leave files a
process still holds open, 2 on bad input or any other error. Bad input includes a path holding
no checkpoint for ``info``, ``verify`` and ``export``, a checkpoint ``export`` refuses as
damaged (a file of another size, or unless ``--no-verify`` a checksum that does not match:
``verify`` reports the same as a problem, status 1), a step ``delete`` finds no committed
checkpoint of, and for the commands that take a root (``ls``, ``lease``, ``prune``, ``delete``,
``gc``) a path that is no root: nothing there (an ``s3://`` prefix holding no object is what a
missing directory is; a root a job opened holds its lease, and is a root; a missing bucket is
the store's ``NoSuchBucket``), a directory or prefix that is no root by
:meth:`~distckpt.storage.views.RootView.holds_a_root` (one of roots, even holding a ``last``
link to one of them; an empty directory; a set-aside checkpoint's prefix), or a checkpoint
or ``last``/``best`` link, in which ``prune``, ``delete`` and ``gc`` would create the root's
lock file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import PurePath
from typing import Any, TextIO

from distckpt import resolve
from distckpt.cli_output import (
    Progress,
    age,
    human_size,
    non_finite_spelled,
    table,
    write_json,
)
from distckpt.cli_prune import prune_retention, refuse_a_monitor_ranking_none
from distckpt.errors import CheckpointError, CheckpointNotFound, InvalidArgument
from distckpt.layout import LINK_NAMES, parse_step_dir_name
from distckpt.lease import LeaseHolder
from distckpt.manifest import MANIFEST_CHECKSUM_KEY, encode_metrics
from distckpt.policy import RetentionPolicy
from distckpt.protocol import check_step_number
from distckpt.storage import (
    Located,
    RootStore,
    RootView,
    link_mode_in_use,
    open_store,
    open_view,
)
from distckpt.storage.nesting import refuse_a_nested_root
from distckpt.verify import verify

EXIT_OK, EXIT_PROBLEMS, EXIT_ERROR = 0, 1, 2


#: why a leftover's writer may be alive or dead
_WRITER_UNKNOWN = "its lock cannot be opened for writing here to probe it"


def _leftovers(store: RootStore, *, force: bool = False) -> list[dict[str, Any]]:
    """The store's leftovers as ``ls`` and ``gc`` report them; ``force``: as ``gc --force``
    judges them."""
    return [
        {
            "path": os.fspath(item.path),
            "kind": item.kind,
            "writer_alive": item.writer_alive,
            "in_use": item.in_use,
            "kept_because": item.kept_because,
        }
        for item in store.leftovers(force=force)
    ]


def _existing_view(root: str) -> RootView:
    """The view of the root at ``root``; refused when ``root`` is no root (nothing is there,
    or it names a checkpoint or a ``last``/``best`` link: a command working on a root must
    never take a checkpoint for one, nor create its lock file inside one; or it sits inside
    another root under that root's own names, as a manager refuses it)."""
    # Classified first: a root's pointer object is no prefix holding objects, so an s3:// link
    # would otherwise be reported as a missing root instead of as the link it is.
    try:
        located: Located | None = resolve.classify_path(root)
    except CheckpointNotFound:
        if os.path.isfile(root):
            raise  # "is a file, not a checkpoint root", not "no root there"
        located = None  # nothing there: said below, as a missing root
    if located is not None and located.kind != "root":
        what = "a checkpoint" if located.kind == "step_dir" else f"the {located.pointer} link"
        raise InvalidArgument(
            f"{root} is {what}, not a checkpoint root: give its root, {located.view.root}",
            path=root,
        )
    view = open_view(root)
    if not view.exists():
        raise CheckpointNotFound(f"no checkpoint root at {view.root}", path=view.root)
    if not view.holds_a_root():
        # A directory of roots (``runs/`` for ``runs/exp1``), or any other: "nothing to
        # collect" there would hide the mistake, and prune and gc would leave a lock file.
        raise InvalidArgument(
            f"{view.root} is not a checkpoint root: it holds no lease record (.lease.json; in "
            "a bucket, a .lease object holding one), committed checkpoint (step-N/manifest.json;"
            " in a bucket, step-N/COMMIT) or last/best link to one; give the root itself",
            path=root,
        )
    refuse_a_nested_root(root)
    return view


_LIVENESS = {
    True: "alive",
    False: "dead: the next writer takes over",
    None: "alive or not: unknown here",
}


def _holder_json(holder: LeaseHolder | None) -> dict[str, Any] | None:
    return None if holder is None else dataclasses.asdict(holder)


def _holder_line(holder: LeaseHolder | None) -> str:
    if holder is None:
        return "lease: none\n"
    return f"lease: {holder.describe()} ({_LIVENESS[holder.alive]})\n"


def cmd_ls(args: argparse.Namespace, out: TextIO) -> int:
    view = _existing_view(args.root)
    store = open_store(view.root, read_only=True)
    links = {name: view.read_pointer(name) for name in LINK_NAMES}

    def links_to(step: int) -> list[str]:
        # a link's target may be a dir of any zero padding, as ./step-1 or an absolute path
        return [
            name
            for name, target in links.items()
            if target is not None and parse_step_dir_name(PurePath(target).name) == step
        ]

    newer: list[int] = []  # listed, not refused: `distckpt delete` is one way out of them
    infos, damaged = resolve.survey(view, newer=newer)
    set_aside = [os.fspath(where) for where in view.set_aside_checkpoints()]
    leftovers = _leftovers(store)
    holder = store.lease_holder()
    if args.json:
        payload = {
            "root": os.fspath(view.root),
            "links": links,
            "checkpoints": [
                {
                    "step": i.step,
                    "epoch": i.epoch,
                    "metrics": encode_metrics(i.metrics),
                    "size_bytes": i.size_bytes,
                    "created_utc": i.created_utc,
                    "format": i.format,
                    "world_size": i.world_size,
                    "links": links_to(i.step),
                }
                for i in infos
            ],
            "damaged_steps": damaged,
            "newer_format_steps": newer,
            "set_aside": set_aside,
            "leftovers": leftovers,
            "lease": _holder_json(holder),
        }
        write_json(payload, out, indent=1)
        return EXIT_OK
    if not infos and not damaged and not newer:
        out.write(f"no checkpoints in {view.root}\n")
    else:
        by_step: dict[int, list[str]] = {}
        for info in infos:
            metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(info.metrics.items()))
            by_step[info.step] = [
                str(info.step),
                "" if info.epoch is None else str(info.epoch),
                metrics,
                human_size(info.size_bytes),
                age(info.created_utc),
                info.format,
                str(info.world_size),
                ",".join(links_to(info.step)),
            ]
        for steps, what in (
            (damaged, "DAMAGED (run verify)"),
            (newer, "NEWER FORMAT (upgrade distckpt)"),
        ):
            for step in steps:
                by_step[step] = [str(step), "", what, "", "", "", "", ",".join(links_to(step))]
        header = ["STEP", "EPOCH", "METRICS", "SIZE", "AGE", "FORMAT", "RANKS", "LINKS"]
        rows = [header, *(by_step[step] for step in sorted(by_step))]
        table(rows, out)
    for where in set_aside:
        out.write(f"set aside as damaged: {where} (not committed; nothing removes it)\n")
    for item in leftovers:
        if item["writer_alive"]:
            state = "writer alive"
        elif item["writer_alive"] is None:
            state = f"writer unknown: {_WRITER_UNKNOWN}; gc leaves it"
        elif item["in_use"]:
            state = "in use: a process holds a deleted file in it open; gc retries later"
        elif item["kept_because"]:
            state = f"gc keeps it: {item['kept_because']}"
        elif item["kind"] == "stray":
            state = "stray file: gc removes it"
        else:
            state = "dead writer: gc removes it"
        out.write(f"leftover {item['kind']}: {item['path']} ({state})\n")
    out.write(_holder_line(holder))
    return EXIT_OK


def cmd_lease(args: argparse.Namespace, out: TextIO) -> int:
    root = _existing_view(args.root).root
    store = open_store(root, read_only=True)
    holder = store.break_lease() if args.break_lease else store.lease_holder()
    if args.json:
        write_json({"root": os.fspath(root), "lease": _holder_json(holder)}, out, indent=1)
    elif args.break_lease and holder is not None and holder.broken_utc is not None:
        out.write(f"broke the lease of {holder.describe()}\n")
    else:
        out.write(_holder_line(holder))
    return EXIT_OK


def cmd_info(args: argparse.Namespace, out: TextIO) -> int:
    source, manifest = resolve.resolve_path(args.path)
    directory = source.location
    # Spelled as strict JSON holds them: another tool or an older version may have written
    # NaN into the metadata, which reading the manifest accepts.
    metadata = non_finite_spelled(dict(manifest.metadata))
    if args.json:
        data = json.loads(dataclasses.replace(manifest, metadata=metadata).to_json())
        # What the file records, not the checksum of the content as this version writes it
        # again (which a manifest without one, or with keys this version drops, does not hold).
        data[MANIFEST_CHECKSUM_KEY] = manifest.manifest_crc32
        data["path"] = os.fspath(directory)
        write_json(data, out, indent=1)
        return EXIT_OK
    out.write(f"path        {directory}\n")
    out.write(f"step        {manifest.step}\n")
    out.write(f"epoch       {manifest.epoch}\n")
    out.write(f"format      {manifest.format} ({manifest.world_size} ranks)\n")
    out.write(f"created     {manifest.created_utc or 'unknown'}\n")
    out.write(f"versions    distckpt {manifest.library_version}, torch {manifest.torch_version}\n")
    for key, value in sorted(manifest.metrics.items()):
        out.write(f"metric      {key} = {value}\n")
    if manifest.metadata:
        out.write(f"metadata    {json.dumps(metadata, sort_keys=True, allow_nan=False)}\n")
    out.write(f"files       {len(manifest.files)}, {human_size(manifest.total_bytes)}\n")
    for name, record in sorted(manifest.files.items()):
        out.write(f"  {name}  {human_size(record.size)}  {record.checksum}\n")
    return EXIT_OK


def _bytes_to_verify(located: Located) -> int:
    """What verifying ``located`` will read, for the progress bar (0 when unknown)."""
    try:
        if located.kind == "root":
            return sum(info.size_bytes for info in resolve.list_checkpoints(located.view))
        return located.source.read_manifest().total_bytes if located.source is not None else 0
    except (CheckpointError, OSError):
        return 0  # verify reports what is wrong with it


def cmd_verify(args: argparse.Namespace, out: TextIO) -> int:
    total = _bytes_to_verify(resolve.classify_path(args.path))
    progress = Progress(total, sys.stderr)
    try:
        report = verify(args.path, checksums=not args.no_checksums, progress=progress)
    finally:
        progress.finish()
    if not report.checkpoints and not report.problems:
        # Nothing was verified: "all is well" would hide a wrong path.
        raise CheckpointNotFound(f"no checkpoint in {report.path}: nothing to verify")
    if args.json:
        write_json(report.to_dict(), out, indent=1)
    else:
        out.write(str(report) + "\n")
    return EXIT_OK if report.ok else EXIT_PROBLEMS


def _open_store(root: str | RootView, retention: RetentionPolicy | None = None) -> RootStore:
    """The root's store, as a job's rank 0 uses it: no manager and no process group needed;
    its links stay the kind they are (a job's pointer files stay pointer files). ``root``: its
    location, checked here (:func:`_existing_view`), or its view, checked already."""
    found = (_existing_view(root) if isinstance(root, str) else root).root
    return open_store(found, retention=retention, link=link_mode_in_use(found))


def cmd_prune(args: argparse.Namespace, out: TextIO) -> int:
    retention = prune_retention(args)
    view = _existing_view(args.root)  # once: on an s3:// root, each check costs requests
    # Before the store opens (its prune would remove best): a refusal leaves the root alone.
    refuse_a_monitor_ranking_none(view, retention)
    store = _open_store(view, retention)
    removed = store.prune()
    store.tidy()  # the bytes of what it removed
    kept = open_view(args.root).committed_steps()
    if args.json:
        write_json({"removed": removed, "kept": kept}, out)
    else:
        out.write(f"removed steps: {', '.join(map(str, removed)) or 'none'}\n")
        out.write(f"kept steps:    {', '.join(map(str, kept)) or 'none'}\n")
    return EXIT_OK


def cmd_gc(args: argparse.Namespace, out: TextIO) -> int:
    store = _open_store(args.root)
    removed = [os.fspath(p) for p in store.collect_leftovers(force=args.force)]
    # What the collection had to leave: files a reader still holds open (retried by the next
    # gc or start), leftovers of writers that are still alive, and (without --force) those a
    # lease holder on another machine may be writing, where locks are local to each machine.
    kept = [item for item in _leftovers(store, force=args.force) if item["path"] not in removed]
    if args.json:
        write_json({"removed": removed, "left": kept}, out)
    else:
        out.write("".join(f"removed {p}\n" for p in removed))
        for item in kept:
            why = "writer alive" if item["writer_alive"] else "in use" if item["in_use"] else ""
            if item["writer_alive"] is None:
                why = f"writer unknown: {_WRITER_UNKNOWN}"
            if item["kept_because"]:
                why = f"kept: {item['kept_because']}"
            out.write(f"left {item['path']}" + (f" ({why}; retried later)\n" if why else "\n"))
        if not removed and not kept:
            out.write("nothing to collect\n")
    return EXIT_OK if not any(item["in_use"] for item in kept) else EXIT_PROBLEMS


def cmd_delete(args: argparse.Namespace, out: TextIO) -> int:
    check_step_number(args.step)
    store = _open_store(args.root)
    # The store's own delete, as a manager's: links moved off the step first, under the commit
    # lock on a local root. An object store has no lock that keeps a live job's commit out: a
    # pointer moves by compare-and-swap, and ``last`` never moves back off a step committed
    # meanwhile; the job's next commit repoints ``best``. It reads no manifest of the step, so
    # a checkpoint this version cannot judge (a newer format, an unknown one) goes too.
    store.delete(args.step)
    store.tidy()  # the bytes of what it removed
    kept = open_view(args.root).committed_steps()
    if args.json:
        write_json({"deleted": args.step, "kept": kept}, out)
    else:
        out.write(f"deleted step {args.step}\n")
        out.write(f"kept steps:   {', '.join(map(str, kept)) or 'none'}\n")
    return EXIT_OK


def cmd_export(args: argparse.Namespace, out: TextIO) -> int:
    from distckpt import export

    written = export(
        args.path, args.out, rank=args.rank, all_ranks=args.all_ranks, verify=not args.no_verify
    )
    if args.json:
        write_json({"out": os.fspath(written)}, out)
    else:
        out.write(f"wrote {written}\n")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distckpt", description="Inspect, verify and maintain distckpt checkpoint roots."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--json", action="store_true", help="machine-readable output")
        return sub

    sub = command("ls", "list the checkpoints of a root, its links and leftovers")
    sub.add_argument("root")
    sub.set_defaults(run=cmd_ls)
    sub = command("info", "show the manifest of a checkpoint (a step dir, a root, last/best)")
    sub.add_argument("path")
    sub.set_defaults(run=cmd_info)
    sub = command("verify", "check sizes and checksums of a checkpoint or of a whole root")
    sub.add_argument("path")
    sub.add_argument(
        "--no-checksums",
        action="store_true",
        help="check sizes and each manifest's own checksum, not the files' (fast)",
    )
    sub.set_defaults(run=cmd_verify)
    sub = command("prune", "apply retention rules now, with the manager's rules and lock")
    sub.add_argument("root")
    sub.add_argument("--keep-last", type=int)
    sub.add_argument("--keep-best", type=int)
    sub.add_argument(
        "--monitor",
        help="metric for --keep-best and the best link: the job's own (the root does not "
        "record it; another metric moves best to its own best, the checkpoint best named "
        "before is kept)",
    )
    sub.add_argument(
        "--mode",
        choices=("min", "max"),
        help="whether the lowest or the highest --monitor value is best: the job's own, which "
        "the root does not record (required with --monitor)",
    )
    sub.add_argument(
        "--keep-every-n-steps",
        type=int,
        help="keep milestones: for each multiple of N from N on, the first checkpoint at or "
        "after it, plus step 0",
    )
    sub.add_argument(
        "--keep-every-n-seconds", metavar="S", help="keep one checkpoint per S seconds of history"
    )
    sub.add_argument(
        "--keep-unranked",
        action="store_true",
        help="keep checkpoints saved without the --monitor metric",
    )
    sub.set_defaults(run=cmd_prune)
    sub = command(
        "delete",
        "delete one committed checkpoint as a job's mgr.delete does (a local root's commit "
        "lock; last moved to the newest left first, never back off a step a live job "
        "committed meanwhile); best, if it named the step, is removed until the "
        "job's next start or save points it again (the root does not record the job's monitor)",
    )
    sub.add_argument("root")
    sub.add_argument("step", type=int, help="the committed step to delete")
    sub.set_defaults(run=cmd_delete)
    sub = command("gc", "remove leftovers of dead writers (a live writer's are kept)")
    sub.add_argument("root")
    sub.add_argument(
        "--force",
        action="store_true",
        help="also remove staging a lease holder on another machine may be writing, where locks "
        "are local to each machine: only when no job runs on this root",
    )
    sub.set_defaults(run=cmd_gc)
    sub = command("lease", "show which job holds a root's writer lease; --break breaks it")
    sub.add_argument("root")
    sub.add_argument(
        "--break",
        dest="break_lease",
        action="store_true",
        help="break the lease of a holder on another machine that is known to be dead",
    )
    sub.set_defaults(run=cmd_lease)
    sub = command(
        "export",
        "write a checkpoint as one torch.save file, or as one object of an s3:// URL "
        "(uploaded as it is written; it appears whole or not at all)",
    )
    sub.add_argument("path")
    sub.add_argument("out", help="a file, or an s3://BUCKET/KEY URL")
    sub.add_argument("--rank", type=int, help='"torch" format: the rank to export (default 0)')
    sub.add_argument("--all-ranks", action="store_true", help='"torch" format: every rank')
    sub.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the check of the exported files' checksums (saves one read of them)",
    )
    sub.set_defaults(run=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    stream = out if out is not None else sys.stdout
    try:
        return int(args.run(args, stream))
    except (CheckpointError, OSError, ValueError) as exc:
        sys.stderr.write(f"distckpt {args.command}: error: {exc}\n")
        return EXIT_ERROR


def _entry() -> None:
    """The console script: exit with :func:`main`'s status."""
    sys.exit(main())


if __name__ == "__main__":
    _entry()
