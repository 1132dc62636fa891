"""Damaged checkpoints that a writing job's restore passed over are set aside, not counted.

A restarted job resumes from the newest intact checkpoint (``restore("last")`` skips damaged
ones with a warning) and then saves the steps after it again. Were a damaged checkpoint newer
than the one loaded still committed, the step rules would refuse each of those saves as lower
than it (:class:`~distckpt.InvalidStep`) and return it as saved at its own step, on every
restart, until someone deleted it. So rank 0 sets such a checkpoint aside while it resolves
the restore (:meth:`~distckpt.storage.RootStore.set_aside`: renamed, never deleted), on the
verdicts that resolution made: no checkpoint is read again to judge it, and the save path
checks nothing more than before.

Only content damage this version is sure of counts (:class:`~distckpt.CorruptCheckpoint`'s
``damaged``): a checkpoint that could not be judged (an I/O error other than a missing file,
a checksum algorithm or format this version does not know, a newer format version) stays
committed, and the step rules' message names it.
"""

from __future__ import annotations

import logging
import os
import shlex

from distckpt import resolve
from distckpt.checksums import CHECKSUM_ALGORITHM
from distckpt.errors import CheckpointError, CorruptCheckpoint, describe_error
from distckpt.resolve import Found, Skipped
from distckpt.storage import RootStore
from distckpt.storage.s3_root import COMMIT_NAME
from distckpt.storage.views import RootView

logger = logging.getLogger("distckpt")


def set_aside_damaged_newer(store: RootStore, found: Found | None, skipped: list[Skipped]) -> None:
    """Rank 0, once a restore resolved ``found`` (None: nothing to load, with ``missing_ok``):
    set aside the checkpoints of ``store``'s root newer than it that the resolution skipped as
    damaged, each with a warning saying where it went. A failure to set one aside, of any kind,
    is logged with its traceback and leaves it committed, as before: the restore itself is
    sound either way, and goes on."""
    loaded_step = found[1].step if found is not None else None
    damaged = {
        skip.step: skip
        for skip in skipped
        if skip.damaged
        and (loaded_step is None or skip.step > loaded_step)
        # skipped in this root, not in another one a path named
        and store.view.holds_checkpoint(skip.location, skip.step)
    }
    for step, skip in sorted(damaged.items()):
        try:
            where = store.set_aside(step, skip.location)
        except Exception as exc:
            # Rank 0 alone runs this, within the restore's resolution: an exception escaping it
            # would fail a restore that is sound, on every rank. Any exception, a bug's too:
            # logged with its traceback, to report.
            logger.error(
                "could not set aside the damaged checkpoint %s (saves of steps below %d are "
                "refused until it is deleted): %s",
                skip.location,
                step,
                describe_error(exc),
                exc_info=exc,
            )
            continue
        if where is not None:
            logger.warning(
                "set aside the damaged checkpoint %s as %s: it no longer counts as committed, "
                "so step %d and the steps below it are saved again; nothing deletes it: look "
                "at it, and remove it once it is not needed (%s)",
                skip.location,
                where,
                step,
                skip.reason,
            )


def verdicts_on_newer(view: RootView, step: int, committed: list[int]) -> str:
    """For the step rules' refusal of ``step``: what this version makes of the committed
    checkpoints newer than it that are not plainly intact, newest first down to the first
    intact one (which refuses ``step`` whatever the others are), as sentences naming each and
    what to do ("" when the newest is intact). Only on that error path, from manifests and
    sizes (and the checksum algorithm a manifest names): no file is read."""
    notes = []
    for newer in sorted((s for s in committed if s > step), reverse=True):
        source = view.checkpoint(newer)
        # the command that deletes it, also where no manager can open the root (a newer format)
        delete = f"distckpt delete {shlex.quote(os.fspath(view.root))} {newer}"
        try:
            manifest = resolve.check(source)
        except (CheckpointError, OSError) as exc:  # UnsupportedVersion too: not judged
            if isinstance(exc, CorruptCheckpoint) and exc.damaged and _commit_object_of(exc):
                # no save to name in a set-aside record: the store's set_aside keeps it
                notes.append(
                    f"{source.location} is damaged ({exc}); its commit object names no save, so "
                    f"a restore cannot set it aside: delete it ({delete})"
                )
            elif isinstance(exc, CorruptCheckpoint) and exc.damaged:
                notes.append(
                    f"{source.location} is damaged ({exc}); a restore('last') by a manager "
                    f"that can write sets it aside, or delete it ({delete})"
                )
            else:
                notes.append(
                    f"{source.location} could not be judged ({describe_error(exc)}): it is "
                    "kept, as it may be whole; upgrade distckpt, or delete it if it is damaged "
                    f"({delete})"
                )
            continue
        if manifest.checksum_algorithm != CHECKSUM_ALGORITHM:
            notes.append(
                f"{source.location} has checksums of an algorithm this version does not know "
                f"({manifest.checksum_algorithm!r}), so it could not be judged and a restore "
                "with verify=True skips it without setting it aside; upgrade distckpt to check "
                f"it, or delete it if it is damaged ({delete})"
            )
        else:
            break  # intact
    return "".join(f". {note}" for note in notes)


def _commit_object_of(exc: CorruptCheckpoint) -> bool:
    """Whether the damage is an ``s3://`` step's ``COMMIT`` object itself."""
    return str(exc.path or "").endswith(f"/{COMMIT_NAME}")
