"""The retention rules of ``distckpt prune``, from its options, refused in the command line's
own words: the rules' own errors name the Python arguments (``keep_last=0 ... use None``),
which a user of the command line never typed."""

from __future__ import annotations

import argparse
import math

from distckpt import resolve
from distckpt.errors import CheckpointError, InvalidArgument
from distckpt.policy import RetentionPolicy, best_step
from distckpt.storage.views import RootView

#: the options that take a count, by their ``args`` attribute
COUNT_OPTIONS = ("keep_last", "keep_best", "keep_every_n_steps")


def _option(attribute: str) -> str:
    return "--" + attribute.replace("_", "-")


def prune_retention(args: argparse.Namespace) -> RetentionPolicy:
    """The retention rules ``prune``'s options give; :class:`InvalidArgument` naming the
    options when they give none or make no sense together."""
    for attribute in COUNT_OPTIONS:
        count = getattr(args, attribute)
        if count is not None and count < 1:
            raise InvalidArgument(
                f"{_option(attribute)} {count}: give a count of at least 1, or leave the "
                "option out to turn its rule off"
            )
    seconds = _seconds(args.keep_every_n_seconds)
    for attribute in ("keep_best", "keep_unranked"):
        if getattr(args, attribute) not in (None, False) and args.monitor is None:
            raise InvalidArgument(
                f"{_option(attribute)} needs --monitor M --mode min|max (the job's metric "
                "that ranks checkpoints, and its mode)"
            )
    # The root does not record the job's mode, and a wrong guess ranks its checkpoints upside
    # down: the job's best would be removed, and its best link moved to the worst.
    if args.monitor is not None and args.mode is None:
        raise InvalidArgument(
            f"--monitor {args.monitor} needs --mode min or --mode max: the job's own, which "
            "the root does not record"
        )
    if args.mode is not None and args.monitor is None:
        raise InvalidArgument("--mode needs --monitor (the metric it ranks by)")
    retention = RetentionPolicy(
        keep_last=args.keep_last,
        keep_best=args.keep_best,
        monitor=args.monitor,
        mode=args.mode or "min",
        keep_every_n_steps=args.keep_every_n_steps,
        keep_every_n_seconds=seconds,
        keep_unranked=args.keep_unranked,
    )
    if retention.keeps_everything:
        raise CheckpointError(
            "prune needs at least one of --keep-last, --keep-best, --keep-every-n-steps, "
            "--keep-every-n-seconds"
        )
    return retention


def _seconds(typed: str | None) -> float | None:
    """``--keep-every-n-seconds`` as a number, refused as the user typed it (``0``, not the
    ``0.0`` it parses to)."""
    if typed is None:
        return None
    try:
        seconds = float(typed)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise InvalidArgument(
            f"--keep-every-n-seconds {typed}: give a positive number of seconds, or leave "
            "the option out to turn its rule off"
        )
    return seconds


def refuse_a_monitor_ranking_none(view: RootView, retention: RetentionPolicy) -> None:
    """:class:`InvalidArgument` when ``--monitor`` ranks none of the root's checkpoints while
    it has some (a typo, or a metric no checkpoint has a finite value of): that prune would
    remove ``best``. The error names the metrics the checkpoints have."""
    monitor = retention.monitor
    if monitor is None:
        return
    records = [resolve.record_of(manifest) for _, manifest in resolve.iter_valid(view)]
    if not records or best_step(records, monitor, retention.mode) is not None:
        return
    metrics = sorted({name for record in records for name in record.metrics})
    raise InvalidArgument(
        f"--monitor {monitor} ranks no checkpoint: none has a finite {monitor} (the "
        f"checkpoints' metrics: {', '.join(metrics) or 'none'}); give the job's own metric"
    )
