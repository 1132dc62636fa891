"""Reading one rank's part of one checkpoint, never collective by itself: prepare what this rank
can check alone (:func:`prepare_read`), read and check that it loads into ``state=`` without
changing it (:func:`read_state`), then load it (:func:`apply_read`). :mod:`distckpt.reader`
runs these steps on every rank and agrees on the outcome of each; a checkpoint deleted by
another process mid-read is reported as :class:`~distckpt.errors.CheckpointVanished`
(:func:`vanish_checked`), which it resolves again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

from distckpt.errors import (
    CheckpointError,
    CheckpointVanished,
    CorruptCheckpoint,
    InvalidArgument,
)
from distckpt.formats import PreparedRead, ReadOptions, ShardContext, format_named
from distckpt.formats.base import check_saved_rank
from distckpt.load_report import LoadReport, dotted_prefixes, optional_cover
from distckpt.manifest import Manifest
from distckpt.model_state_keys import init_state_places
from distckpt.results import Checkpoint
from distckpt.state import apply_load, check_load, to_plain
from distckpt.storage.views import CheckpointSource, errors_name_the_location
from distckpt.tensor_writes import unwritable_given

T = TypeVar("T")


def vanish_checked(
    source: CheckpointSource, func: Callable[[], T], directory: Path | None = None
) -> T:
    """``func()``, with a file missing because its whole checkpoint was deleted meanwhile
    reported as :class:`CheckpointVanished` (retried by the caller), otherwise as damage.
    With ``directory``, the local copy ``func`` reads, its errors name ``source``'s location
    instead of the copy (:func:`~distckpt.storage.views.errors_name_the_location`)."""
    try:
        if directory is None:
            return func()
        with errors_name_the_location(source, directory):
            return func()
    except (FileNotFoundError, CorruptCheckpoint) as exc:
        if not source.exists():
            raise CheckpointVanished(
                f"{source.location} was deleted while it was being read"
            ) from exc
        if isinstance(exc, CheckpointError):
            raise
        raise CorruptCheckpoint(f"{source.location}: a file is missing: {exc}") from exc


def prepare_read(
    source: CheckpointSource,
    directory: Path,
    manifest: Manifest,
    *,
    rank: int,
    world_size: int | None,
    template: Any,
    rank_named: bool,
    options: ReadOptions,
    strict: bool = True,
    group: dist.ProcessGroup | None = None,
) -> PreparedRead:
    """Check that this rank can read the checkpoint ``source``, whose files are in the local
    ``directory`` (from :meth:`~distckpt.storage.views.CheckpointSource.local_copy`; the format's
    :meth:`~distckpt.formats.base.CheckpointFormat.prepare_read`), with ``template`` reduced to
    plain data; refuse the tensors of another shape the format found already, and with
    ``strict`` the keys on one side only.
    ``world_size`` is the number of ranks restoring, or None when a plain process reads one
    rank's part: then a rank the caller named (``rank_named``) must be one that saved it, in
    either format (:func:`~distckpt.formats.base.check_saved_rank`); a rank taken from
    torch.distributed is left to the format, as only the ranks that wrote a part have one
    ("torch" refuses the others, "dcp" only when they ask for per-rank values it holds: the
    rest of its state is the same for every rank). ``group`` is the ranks' private
    group, on which the format's read may run collectives. Never collective itself."""
    ctx = ShardContext(
        rank=rank,
        world_size=manifest.world_size if world_size is None else world_size,
        fsync=False,
        group=group,
    )
    fmt = format_named(manifest.format)
    plain = (
        to_plain(template, mark_per_rank=fmt.marks_per_rank, template=True)
        if template is not None
        else None
    )

    def prepare() -> PreparedRead:
        if world_size is None and rank_named:
            check_saved_rank(directory, manifest, rank)
        return fmt.prepare_read(directory, manifest, ctx, plain, options)

    prepared = vanish_checked(source, prepare, directory)
    # Told before the optimizer state made by torch's creating step is taken out of the missing
    # keys below: the read writes none of them either.
    not_written = frozenset(prepared.mismatch.missing_keys if prepared.mismatch else ())
    if prepared.mismatch is not None and template is not None:
        # The optimizer state torch's creating step made for a ModelOptimizerState's template
        # is there to load into, not expected: the saving run may have had none (an unused head).
        missing = frozenset(prepared.mismatch.missing_keys)
        made_by_init = frozenset(
            state
            for state, weights in init_state_places(template)
            if optional_cover(weights, missing) is None  # a parameter added since is missing
        )
        prepared.mismatch.missing_keys = [
            key
            for key in prepared.mismatch.missing_keys
            if optional_cover(key, made_by_init) is None
        ]
    if prepared.mismatch is not None:
        prepared.mismatch.check(
            strict=strict,
            where=source.location,
            step=manifest.step,
            optional_keys=options.optional_keys,
            optional_whole_keys=options.optional_whole_keys,
        )
    if fmt.collective_read and plain is not None:
        # A collective read ("dcp") loads into the given tensors as it goes, so the dry run
        # after it comes too late for a tensor nothing can be copied into; "torch"'s dry run
        # comes before any load. A key the checkpoint lacks is never written: not refused.
        LoadReport(
            unwritable=[
                (key, reason)
                for key, reason in unwritable_given(plain)
                if optional_cover(key, not_written) is None
            ]
        ).check_writable(source.location, manifest.step)
    return prepared


def read_state(
    source: CheckpointSource, prepared: PreparedRead, *, template: Any, strict: bool
) -> Checkpoint:
    """Read one rank's state of ``source`` as prepared (collective when the format's read
    is), and check that it loads into ``template`` (:func:`~distckpt.state.check_load`),
    changing nothing of it: the caller loads it with :func:`apply_read` once every rank read
    and checked its part. The keys on one side only are what the format found while preparing
    and what the check found."""
    manifest = prepared.manifest
    fmt = format_named(manifest.format)
    loaded = vanish_checked(source, lambda: fmt.read(prepared), prepared.directory)
    report = (
        check_load(
            template,
            loaded,
            strict=strict,
            fix_key_prefixes=prepared.options.fix_key_prefixes,
            where=source.location,
            step=manifest.step,
            optional_keys=prepared.options.optional_keys,
            optional_whole_keys=prepared.options.optional_whole_keys,
            # what the format found saved but did not read ("dcp" reads the template's keys)
            unread_keys=prepared.mismatch.unexpected_keys if prepared.mismatch else (),
        )
        if template is not None
        else None
    )
    if report is not None and prepared.mismatch is not None:
        for found, known in (
            (report.missing_keys, prepared.mismatch.missing_keys),
            (report.unexpected_keys, prepared.mismatch.unexpected_keys),
        ):
            found += [key for key in known if key not in found]
            # The format's keys and the check's may name one missing sub-tree at two depths
            # (DCP's leaves, the check's sub-dict): it is listed once, as the sub-tree.
            found[:] = [
                key
                for key in found
                if not any(parent in found for parent in dotted_prefixes(key)[:-1])
            ]
    return Checkpoint(
        state=loaded,
        step=manifest.step,
        epoch=manifest.epoch,
        metrics=dict(manifest.metrics),
        metadata=dict(manifest.metadata),
        path=source.location,
        manifest=manifest,
        missing_keys=tuple(report.missing_keys) if report else (),
        unexpected_keys=tuple(report.unexpected_keys) if report else (),
    )


def apply_read(
    checkpoint: Checkpoint, template: Any, options: ReadOptions, *, strict: bool = True
) -> Checkpoint:
    """Load ``checkpoint`` (from :func:`read_state`, checked with the same ``strict``) into
    ``template`` in place, if any; ``checkpoint`` itself."""
    if template is not None:
        try:
            apply_load(
                template,
                checkpoint.state,
                # A strict check that passed with keys missing excused them (optional keys): a
                # ModelOptimizerState, whose keys are compared one by one, then loads what it
                # has and keeps its current values for those, instead of torch refusing them.
                strict=strict and not checkpoint.missing_keys,
                fix_key_prefixes=options.fix_key_prefixes,
                unread_keys=checkpoint.unexpected_keys,
            )
        except InvalidArgument as exc:
            if type(exc) is not InvalidArgument or exc.path is not None:
                raise
            # A failed copy or load_state_dict knows its key, not the checkpoint: named here,
            # as the restore's other errors name it.
            raise InvalidArgument(
                f"{checkpoint.path}: {exc}", path=checkpoint.path, step=checkpoint.step
            ) from exc
    return checkpoint
