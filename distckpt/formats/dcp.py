"""The "dcp" format: sharded checkpoints written by ``torch.distributed.checkpoint`` (DCP), which
can be restored by a different number of ranks than saved them (resharding).

Layout of a committed dir: one ``__<rank>_0.distcp`` file per rank (the rank's shards of every
DTensor, plus the replicated values DCP assigned to it) and a ``.metadata`` file written by rank
0 that says which bytes of which file hold which chunk of which tensor. Every file is listed in
``manifest.json`` with the size and crc32 that were computed while the bytes were written (the
files are never read back to checksum them).

Saving: ``write`` runs ``dcp.save`` on every rank at once over distckpt's private gloo group
(DCP's no-dist path without torch.distributed). DCP is given a storage writer whose files are
:class:`~distckpt.checksums.ChecksumWriter` streams, fsynced on close when the manager fsyncs. The
only rename DCP does (``.metadata.tmp`` to ``.metadata``) stays inside the staging dir, and the
metadata records no absolute path (``checkpoint_id`` is left empty), so the committed dir does
not depend on where it was staged and can be moved.

What DCP saves, and its limits:

* The top-level state must be a dict. Nested dicts and lists are flattened into dotted keys.
  Dict keys other than strings (ints, floats, bool, None) come back as they were, mapped onto
  the given state's keys; keys that read the same as text, or of other types, are refused
  (:mod:`distckpt.formats.dcp_text_keys`), except in a dict DCP pickles whole with its keys (in
  a tuple, or in a list of plain values). :func:`load_consolidated` (``export``), which has no
  state to map onto, gives them as text.
* DTensors (FSDP2 ``fully_shard`` parameters, their optimizer state) are saved shard by shard.
* DCP writes no entry for an empty dict: a restore takes it from the given state, and
  :func:`load_consolidated` (``export``) gives those a list holds before its last other item
  as None. As nothing in ``.metadata`` bounds how many a list starts with, a checkpoint whose
  lists hold more than :data:`~distckpt.formats.dcp_metadata.MAX_UNNAMED_LIST_ITEMS` (2**20)
  items no key is saved under, in all, is refused as crafted (a save holding that many empty
  dicts in lists is not stopped, and could not be read back).
* Tensors must be plain tensors or DTensors: a subclass of ``torch.Tensor`` (a wrapper
  subclass, a nested tensor of the jagged layout) would be written as a plain tensor's data and
  refused on restore, and a nested tensor of the strided layout fails DCP's write, so the save
  refuses them first (:class:`~distckpt.errors.UnsupportedTensors`); "torch" saves them.
* Everything else -- plain tensors and plain values -- is taken to be the *same on every rank*
  and is saved once, from one rank, unless it is marked per rank: :class:`~distckpt.RNGState`,
  a ``torch.Generator``, a ``StatefulDataLoader``, or any value wrapped in
  :class:`~distckpt.PerRank`. Those are saved
  once per rank and restored to the same rank (see :mod:`distckpt.formats.dcp_per_rank`); a
  restore by another number of ranks that asks for per-rank values the checkpoint holds raises
  :class:`~distckpt.errors.WorldSizeMismatch` naming them (asked-for ones it holds nothing of,
  such as an ``RNGState`` added since the save, are missing keys, as any other).
* Optimizers must be saved FQN-keyed, through ``get_state_dict``: put
  ``{"app": ModelOptimizerState(model, optimizer)}`` in the state rather than the optimizer
  itself. A plain ``optimizer.state_dict()`` (keyed by parameter number) is refused with
  :class:`~distckpt.errors.InvalidArgument`: a fresh optimizer has no state tensors for DCP to
  load into, so its state would be dropped without a word on resume.

Restoring: DCP loads *in place*, so ``restore`` needs ``state=``: the same structure as saved,
whose tensors and DTensors (on the restoring ranks' meshes) receive the data; each rank reads
only the chunks its shards overlap. Keys the state asks for that the checkpoint lacks are left
out of the result and reported as missing, and so is a dict left empty by leaving them out (a
list's items stay, so a list of dicts the checkpoint lacks comes back as ``[{}]``); keys only
in the checkpoint are not loaded and are reported as unexpected; a list of another length than
the saved one is read apart, the saved list into fresh tensors, so none of its items is loaded
into the given ones, and is reported as ``lst[len 3 != 2]``
(:func:`~distckpt.formats.dcp_lists.lists_of_other_length`), as "torch" reports it.
``strict=True`` refuses either, as for the "torch" format, before DCP's collective read starts
(:meth:`DcpFormat.prepare_read` compares the keys with ``.metadata``).
Keys that differ from the checkpoint's only by wrapper prefixes (``torch.compile``'s
``_orig_mod.``, DDP's ``module.``) are mapped, with an INFO line, unless
``fix_key_prefixes=False``; the comparison is made on the keys as they will be read (mapped,
per-rank values under their rank), so a mapped key is no mismatch.
``map_location`` applies to non-tensor values only (tensors land where the given state's
tensors are) and ``mmap`` is ignored. Before DCP's collectives start, every rank checks the
given state and reads ``.metadata`` (:meth:`DcpFormat.prepare_read`), and the caller has the
ranks agree on the outcome, so a rank that fails alone fails every rank instead of leaving
them waiting.
:func:`load_consolidated` (used by :func:`distckpt.export`) reads a whole checkpoint
into full tensors in one plain process.

Untrusted checkpoints. DCP would unpickle ``.metadata`` with ``pickle.load`` and every
non-tensor value with ``torch.load(weights_only=False)``, either of which runs arbitrary code
from a crafted file. Here, unless ``allow_pickle=True``:

* ``.metadata`` is read by a restricted unpickler that resolves only DCP's metadata dataclasses,
  ``torch.Size``, torch dtypes and layouts; any other global (``os.system``, ``builtins.eval``,
  ...), a persistent id, or setting attributes on anything but an instance of those
  dataclasses (patching a class) is refused with :class:`~distckpt.errors.UnsafeCheckpoint`
  before anything is called. The result is then checked field by field (types; that every
  storage entry names a ``.distcp`` file listed in the manifest, within its size; that each
  tensor's chunks lie within its size and hold as many elements as it does), so a crafted file
  cannot make DCP read outside the checkpoint dir, nor describe a tensor larger than its
  chunks. :func:`load_consolidated` (``export``), which allocates the full tensors described,
  also refuses more bytes of them than the data files hold; a restore allocates none (it reads
  into the given tensors).
* Non-tensor values are loaded with ``torch.load(weights_only=True)``.
* Tensor data is loaded by DCP itself with ``torch.load(weights_only=True)``.

What this does not cover: the restricted unpickler still runs the pickle machine (Python's own,
slower than the C one but the file is small), so a crafted ``.metadata`` can make it allocate
memory or burn CPU (a denial of service, not code execution), and the allowed dataclasses'
constructors and ``__setstate__`` run on attacker-chosen arguments (they only assign fields,
and the result is type-checked afterwards). The chunk layout is checked for types, bounds and
element counts, not for overlaps (chunks that overlap leave as many elements unread: an export
gives them as the memory held, a restore as the given tensor held them), and a chunk's bytes
are not compared with its size before they are read: a crafted one can make a load fail or
fill a tensor with the wrong bytes of the checkpoint's own files (as any tampering with tensor
data can). The
objects DCP exchanges between ranks through ``torch.distributed`` object collectives are
pickles too; they are built by the ranks of the job itself from the checked metadata, not read
from the checkpoint.
``allow_pickle=True`` switches all of this off and loads exactly as DCP does: only for
checkpoints from a trusted source.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from distckpt.errors import (
    CheckpointError,
    CorruptCheckpoint,
    InvalidArgument,
)
from distckpt.formats.base import PreparedRead, ReadOptions, ShardContext
from distckpt.formats.dcp_errors import run_dcp
from distckpt.formats.dcp_estimate import dcp_sizes
from distckpt.formats.dcp_keys import (
    dotted,
    key_mismatch_as_read,
    rename_back,
    rename_to_saved,
    saved_paths,
    with_saved_group_settings,
)
from distckpt.formats.dcp_kinds import dict_list_swaps, given_for_saved_tensors
from distckpt.formats.dcp_lists import lists_of_other_length, with_saved_lists
from distckpt.formats.dcp_metadata import DATA_FILE_RE, METADATA_NAME, read_metadata
from distckpt.formats.dcp_per_rank import (
    PerRankSavePlanner,
    per_rank_not_read,
    per_rank_placeholders,
    refuse_unreadable_per_rank,
    restore_per_rank,
    split_per_rank,
    with_per_rank,
)
from distckpt.formats.dcp_saveable import check_keys, check_saveable
from distckpt.formats.dcp_storage import Planner, Reader, Writer, placeholder
from distckpt.formats.dcp_text_keys import get_saved
from distckpt.manifest import FileRecord, Manifest
from distckpt.model_state import ModelOptimizerState
from distckpt.state import copy_containers, remove_path, set_path

logger = logging.getLogger("distckpt")

__all__ = [
    "DcpFormat",
    "ModelOptimizerState",
    "METADATA_NAME",
    "data_file_name",
    "load_consolidated",
    "read_metadata",
]

# The metadata pickle's own frame, whatever the number of items.
_OVERHEAD_BYTES = 64 << 10
# Each item's bytes besides its values and its key: measured with torch 2.13 by saving 2000
# one-element tensors, then 2000 ints, through this format and subtracting the elements from
# the sizes of the files: 1573 B of the data file (DCP writes each tensor as a small
# torch.save archive) and 191 B of .metadata per tensor, 1261 B and 100 B per plain value;
# each key's characters add their count to .metadata.
_ITEM_BYTES = 2 << 10


def data_file_name(rank: int) -> str:
    """``__3_0.distcp``: the file DCP writes for ``rank`` (single file per rank, one thread)."""
    return f"__{rank}_0.distcp"


# ---------------------------------------------------------------------------------------------
# The format


class DcpFormat:
    """Sharded checkpoints through ``torch.distributed.checkpoint``; restorable by any number of
    ranks. See the module doc for what it saves and its limits."""

    name = "dcp"
    marks_per_rank = True  # everything unmarked is saved once, for all ranks
    collective_read = True  # dcp.load plans the read across the ranks

    def required_files(self, manifest: Manifest) -> list[str]:
        """``.metadata`` and one ``.distcp`` file per saving rank (DCP writes one per rank even
        when the rank has nothing to save, since distckpt runs it with one writer thread)."""
        return [METADATA_NAME, *(data_file_name(rank) for rank in range(manifest.world_size))]

    def owns_file(self, name: str) -> bool:
        folded = name.casefold()
        return folded in (METADATA_NAME, METADATA_NAME + ".tmp") or bool(DATA_FILE_RE.match(folded))

    def check_state(self, state: Any) -> None:
        """Refuses what DCP could save but not load back (see the module doc)."""
        check_saveable(state)

    def estimate_bytes(self, state: Any) -> int:
        # DCP writes every element of each tensor (an expanded view in full), not its storage,
        # whatever an async snapshot's buffers hold. Local shards only: replicated values are
        # written by one rank, so this over-counts. Texts count as byte strings do. Many small
        # items cost more in their framing (_ITEM_BYTES each, and their keys) than in values.
        sizes = dcp_sizes(state)
        framing = sizes.items * _ITEM_BYTES + sizes.key_chars
        return sizes.value_bytes + framing + _OVERHEAD_BYTES

    def write(self, state: Any, directory: Path, ctx: ShardContext) -> Mapping[str, FileRecord]:
        """Save this rank's part with ``dcp.save`` over ``ctx.group``; collective. Returns the
        files this rank wrote (its ``__<rank>_0.distcp``; rank 0 also ``.metadata``)."""
        writer = Writer(directory, fsync=ctx.fsync)
        shared, marked = split_per_rank(state)
        to_save = with_per_rank(shared, marked, ctx.rank)
        run_dcp(
            lambda: dcp.save(
                to_save,
                storage_writer=writer,
                planner=PerRankSavePlanner(),
                process_group=ctx.group,
                no_dist=ctx.group is None,
            ),
            f"writing {directory.name}",
            CheckpointError,
            path=directory,
        )
        return {
            name: FileRecord(size=size, checksum=checksum, rank=ctx.rank)
            for name, (size, checksum) in writer.recording.written.items()
        }

    def prepare_read(
        self,
        directory: Path,
        manifest: Manifest,
        ctx: ShardContext,
        template: Any,
        options: ReadOptions,
    ) -> PreparedRead:
        """Checks the template (DCP loads in place, so one is needed), reads ``.metadata``
        safely and compares its keys with the template's (``mismatch``, before DCP's
        collective read); any world size may restore, but not into per-rank values the
        checkpoint holds when it is another than saved it (``WorldSizeMismatch``), nor a plain
        process's rank past the saved ones into them (``CheckpointNotFound``)."""
        if template is None:
            raise InvalidArgument(
                f"restoring {directory} (format 'dcp') needs state=: DCP loads in place into "
                "the tensors and DTensors of the state you pass, so pass the same structure "
                "that was saved (e.g. {'app': ModelOptimizerState(model, optimizer)}); to get "
                "the whole checkpoint as full tensors in one process, use "
                "distckpt.export() or distckpt.formats.dcp.load_consolidated()"
            )
        check_keys(template, "restores into")
        metadata = read_metadata(directory, manifest, allow_pickle=options.allow_pickle)

        already_read: dict[str, Any] = {}

        def read_saved(keys: list[str]) -> dict[str, Any]:
            # The few saved values the checks need before the collective read (a changed number
            # of parameter groups' names, the per-rank lists saved whole), each rank alone;
            # each once, though both the refusal and the key check look at this rank's lists.
            unread = [key for key in keys if key not in already_read]
            if unread:
                already_read.update(
                    _read_alone(directory, manifest, metadata, dict.fromkeys(unread), options)
                )
            return {key: already_read[key] for key in keys if key in already_read}

        _, marked = split_per_rank(template)
        refuse_unreadable_per_rank(marked, directory, manifest, metadata, ctx, read_saved)
        mismatch = key_mismatch_as_read(
            template,
            metadata,
            ctx.rank,
            options.fix_key_prefixes,
            read_saved,
            options.optional_whole_keys,
        )
        return PreparedRead(
            directory, manifest, ctx, template, options, detail=metadata, mismatch=mismatch
        )

    def read(self, prepared: PreparedRead) -> Any:
        """Load into the template's tensors and DTensors with ``dcp.load`` over
        ``ctx.group`` (collective); returns the filled template, without the keys the
        checkpoint lacks or the dicts left empty without them (a list of dicts stays
        ``[{}]``); the checkpoint's keys the template lacks are not loaded (the prepared
        ``mismatch`` reports them, as it reports a dict given for a saved list or the reverse,
        or a dict or list given for a saved tensor, which are not read either); a plain value
        given for a saved tensor takes it; per-rank values not asked for are logged."""
        directory, group, rank = prepared.directory, prepared.ctx.group, prepared.ctx.rank
        shared, marked = split_per_rank(prepared.template)
        state = copy_containers(shared)
        renames: list[Any] = []
        if prepared.options.fix_key_prefixes:
            state, renames = rename_to_saved(state, saved_paths(prepared.detail), directory.name)
        same_ranks = prepared.ctx.world_size == prepared.manifest.world_size
        # After a world-size change, prepare_read refused every per-rank value asked for that
        # the checkpoint holds: the rest are missing, and no rank's namespace is this rank's.
        read_own = bool(marked) and same_ranks
        if read_own:
            state.update(per_rank_placeholders(prepared.detail, rank))
        with_saved_lists(state, lists_of_other_length(state, prepared.detail), prepared.detail)
        with_saved_group_settings(state, prepared.detail)
        containers, plain = given_for_saved_tensors(state, prepared.detail)
        for place in [*dict_list_swaps(state, prepared.detail), *containers]:
            remove_path(state, place)  # reported by the prepared mismatch, left as given
        for place in plain:
            # a plain value takes the saved tensor, as a "torch" restore replaces it
            set_path(state, place, placeholder(prepared.detail.state_dict_metadata[dotted(place)]))
        planner = Planner(prepared.options)
        run_dcp(
            lambda: dcp.load(
                state,
                storage_reader=Reader(directory, prepared.detail),
                planner=planner,
                process_group=group,
                no_dist=group is None,
            ),
            f"reading {directory.name}",
            CorruptCheckpoint,
            path=directory,
            step=prepared.manifest.step,
        )
        for key in planner.missing:
            _remove_with_emptied_dicts(state, planner.path_of(key))
        rename_back(state, renames)
        restored = restore_per_rank(state, marked, rank, prepared.detail) if read_own else []
        not_asked = per_rank_not_read(
            prepared.detail, rank, same_ranks=same_ranks, read_own=restored
        )
        if not_asked:
            logger.warning(
                "%s holds per-rank values the given state does not ask for; not restored: %s",
                directory,
                "; ".join(f"rank {r}: {', '.join(names)}" for r, names in not_asked.items()),
            )
        return state

    def exported_files(self, manifest: Manifest, *, rank: int | None, all_ranks: bool) -> list[str]:
        """The files the consolidated state is read from, :meth:`required_files`
        (``.metadata`` and every rank's data file, not the extra files a save stored beside
        them); none with ``rank`` or ``all_ranks``, which :meth:`export` refuses."""
        return [] if _asks_for_ranks(rank, all_ranks) else self.required_files(manifest)

    def export(
        self,
        directory: Path,
        manifest: Manifest,
        *,
        rank: int | None,
        all_ranks: bool,
        allow_pickle: bool,
    ) -> Any:
        """The consolidated state (:func:`load_consolidated`), every rank's per-rank values
        under ``__per_rank__`` by rank; ``rank`` and ``all_ranks`` are refused."""
        if _asks_for_ranks(rank, all_ranks):
            raise InvalidArgument(
                f"{directory} is a 'dcp' checkpoint: it is exported whole, as full tensors; "
                "rank= and all_ranks= only apply to the 'torch' format"
            )
        return load_consolidated(directory, manifest, allow_pickle=allow_pickle)


def _remove_with_emptied_dicts(state: dict[str, Any], place: tuple[Any, ...]) -> None:
    """Drops the key at ``place``, then each dict that removal left empty, walking up: such a
    dict held only keys the checkpoint lacks (DCP keeps no saved empty dict to read back). A
    dict given empty is never reached (nothing was removed from it), and a list's item is never
    dropped (``remove_path``), so a list of dicts stays ``[{}]``."""
    while remove_path(state, place) and len(place) > 1:
        place = place[:-1]
        found, parent = get_saved(state, place)
        if not (found and isinstance(parent, dict) and not parent):
            return


def _asks_for_ranks(rank: int | None, all_ranks: bool) -> bool:
    """Whether an export is asked for ranks, which a "dcp" checkpoint, exported whole, has
    none of."""
    return rank is not None or all_ranks


def _read_alone(
    directory: Path,
    manifest: Manifest,
    metadata: Metadata,
    flat: dict[str, Any],
    options: ReadOptions,
) -> dict[str, Any]:
    """``flat`` (flat keys to placeholders: an empty tensor of the saved size, or None for a
    plain value) filled with the saved values, read by this process alone (no collective,
    even if a process group exists), through the same safe path as restore with
    ``options``."""
    run_dcp(
        lambda: dcp.load(
            flat,
            storage_reader=Reader(directory, metadata),
            planner=Planner(options, flatten=False),
            no_dist=True,
        ),
        f"reading {directory.name}",
        CorruptCheckpoint,
        path=directory,
        step=manifest.step,
    )
    return flat


def load_consolidated(
    directory: Path, manifest: Manifest, *, allow_pickle: bool = False
) -> dict[str, Any]:
    """The whole "dcp" checkpoint in ``directory`` as one nested state of full (unsharded)
    tensors on the CPU, read in this process alone (no process group, even if one exists):
    what the state looked like before sharding. Needs memory for every tensor at full size.
    Reads through the same safe path as restore (see the module doc)."""
    metadata = read_metadata(directory, manifest, allow_pickle=allow_pickle)
    tensors = {
        key: entry
        for key, entry in metadata.state_dict_metadata.items()
        if isinstance(entry, TensorStorageMetadata)
    }
    # Every element is stored once in the data files, so the full tensors cannot be larger:
    # a crafted .metadata must not make this process allocate without bound.
    full_bytes = sum(
        entry.size.numel() * torch.empty((), dtype=entry.properties.dtype).element_size()
        for entry in tensors.values()
    )
    stored_bytes = sum(r.size for n, r in manifest.files.items() if DATA_FILE_RE.match(n))
    if full_bytes > stored_bytes:
        raise CorruptCheckpoint(
            f"{directory / METADATA_NAME} describes {full_bytes} bytes of tensors but the data "
            f"files hold {stored_bytes}"
        )
    flat: dict[str, Any] = {
        key: torch.empty(tensors[key].size, dtype=tensors[key].properties.dtype)
        if key in tensors
        else None  # a placeholder DCP replaces with the unpickled value
        for key in metadata.state_dict_metadata
    }
    options = ReadOptions(map_location="cpu", allow_pickle=allow_pickle)
    _read_alone(directory, manifest, metadata, flat, options)
    paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    nested: dict[str, Any] = {}
    try:
        for key, value in flat.items():
            set_path(nested, paths.get(key, (key,)), value)
    except (TypeError, KeyError, IndexError) as exc:
        # Key paths that contradict each other (one says list, another dict).
        raise CorruptCheckpoint(
            f"{directory / METADATA_NAME}: its key paths do not form one nested state: {exc!r}"
        ) from exc
    return nested
