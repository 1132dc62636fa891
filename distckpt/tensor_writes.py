"""Writing a checkpoint's tensor into a given one in place (a restore's ``state=``), and telling
before anything is loaded whether that can be done.

``copy_`` refuses some given tensors only once it runs, after the tensors before them in the
state were loaded: one whose elements share memory (an expanded view, whose strides are 0), one
of another layout than the saved one (sparse and strided), one made under
``torch.inference_mode()``, one of a dtype torch has no copy from the saved one into
(``bits16`` from anything else, ``float4_e2m1fn_x2`` from another dtype), or a quantized one
of another qscheme or dtype than the saved quantized one; into a tensor on the
``meta`` device, which holds no data, it copies nothing, without a word.
:func:`unwritable_reason` finds them for a restore's dry run, which refuses them before
anything is loaded; those that take nothing whatever is saved (:func:`unwritable_given`: on
``meta``, sharing memory, made under inference mode), a module's too, are refused before a
"dcp" read, which loads into the others as it goes, under the keys it will write. A tensor of
a sub-byte dtype (:data:`SUB_BYTE_DTYPES`) takes a saved one of its own dtype through
``uint8`` views of both (:func:`through_bytes`), as an async save's snapshot copies it. Any
other copy that fails is the caller's to report.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from distckpt.model_state_keys import join_key
from distckpt.per_rank import PerRank

#: Dtypes of fewer than 8 bits, each element in a byte of its own: torch has no copy (nor
#: clone) for them, so their bytes are copied through ``uint8`` views of them.
SUB_BYTE_DTYPES: frozenset[torch.dtype] = frozenset(
    getattr(torch, f"{kind}{bits}")
    for kind in ("uint", "int")
    for bits in range(1, 8)
    if hasattr(torch, f"{kind}{bits}")
)


def through_bytes(target: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``target``, ``source``) as a copy fills ``target`` from ``source``: ``uint8`` views of
    both for a sub-byte dtype, which torch has no copy for."""
    if source.dtype in SUB_BYTE_DTYPES:
        return target.view(torch.uint8), source.view(torch.uint8)
    return target, source


def unwritable_reason(given: torch.Tensor, loaded: torch.Tensor) -> str | None:
    """Why ``loaded`` (of the same shape) cannot be copied into ``given`` in place, or None
    when it can (converted to ``given``'s dtype, as ``Module.load_state_dict`` does)."""
    reason = given_unwritable_reason(given)
    if reason is not None:
        return reason
    if given.layout != loaded.layout:
        return f"torch has no copy from the saved {loaded.layout} tensor into a {given.layout} one"
    if given.is_quantized and loaded.is_quantized:
        # _copies cannot make a quantized tensor to try; torch's rule for a pair of them is
        # known: the same qscheme and dtype (qparams are copied along).
        if (given.qscheme(), given.dtype) != (loaded.qscheme(), loaded.dtype):
            return (
                "torch copies a quantized tensor only into one of its own qscheme and dtype: "
                f"saved {loaded.qscheme()} {loaded.dtype}, given {given.qscheme()} {given.dtype}"
            )
        return None
    if given.is_quantized:
        # torch quantizes into a quantized tensor from float32 alone
        if loaded.dtype == torch.float32:
            return None
        return f"torch quantizes only a float32 tensor into a quantized one, not {loaded.dtype}"
    # Into no element, torch copies between any two dtypes: the probe's answer would be wrong.
    if given.numel() != 0 and not _copies(given.dtype, loaded.dtype):
        return f"torch has no copy from the saved {loaded.dtype} into {given.dtype}"
    return None


def given_unwritable_reason(given: torch.Tensor) -> str | None:
    """Why nothing can be copied into ``given`` in place, whatever is saved, or None."""
    if given.device.type == "meta":
        return (
            "it is on the meta device, which holds no data to load into: make it a tensor of "
            "a real device first (Module.to_empty)"
        )
    if given.is_inference() and not torch.is_inference_mode_enabled():
        return (
            "it was made under torch.inference_mode(), which allows no change to it outside: "
            "give a tensor made outside it (.clone())"
        )
    # The check copy_ itself makes before writing (its private name is the only one torch
    # exposes): YES (1) only, as copy_ refuses only that, not TOO_HARD (2). A plain tensor's
    # only (a DTensor's shards are DCP's to write), and not a contiguous one's, which never
    # overlaps: the common case asks one cheap question, for every tensor of a restore.
    if (
        type(given) is torch.Tensor
        and not given.is_contiguous()
        and given.layout == torch.strided
        and torch._debug_has_internal_overlap(given) == 1
    ):
        return (
            "several of its elements share memory (an expanded view, strides of 0): "
            "give a tensor of its own memory (.clone())"
        )
    return None


def unwritable_given(state: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, why) of each tensor of ``state`` (a restore's template reduced to plain
    data: a module's tensors too) that nothing can be copied into
    (:func:`given_unwritable_reason`). Every mapping is looked into, as a restore loads into
    any (and DCP flattens any)."""
    if isinstance(state, torch.Tensor):
        reason = given_unwritable_reason(state)
        if reason is not None:
            yield path, reason
    elif isinstance(state, PerRank):
        yield from unwritable_given(state.value, path)
    elif isinstance(state, Mapping):
        for key, value in state.items():
            yield from unwritable_given(value, join_key(path, key))
    elif isinstance(state, (list, tuple)) and any(
        # told by the set of the items' types, so a long list of token ids costs no look at each
        issubclass(kind, (torch.Tensor, Mapping, list, tuple, PerRank))
        for kind in set(map(type, state))
    ):
        for index, value in enumerate(state):
            yield from unwritable_given(value, join_key(path, index))


def copy_into(given: torch.Tensor, loaded: torch.Tensor) -> None:
    """Copy ``loaded`` into ``given`` in place (as bytes for a sub-byte dtype), untracked by
    autograd (a parameter is a leaf that requires grad)."""
    target, source = (
        through_bytes(given, loaded) if given.dtype == loaded.dtype else (given, loaded)
    )
    with torch.no_grad():
        target.copy_(source)


@functools.cache
def _copies(target: torch.dtype, source: torch.dtype) -> bool:
    """Whether torch copies ``source`` into ``target`` (once per pair: by trying it on one
    element, since torch publishes no table of its copy kernels)."""
    if target == source and target in SUB_BYTE_DTYPES:
        return True  # through_bytes
    try:
        one = [
            torch.zeros(dtype.itemsize, dtype=torch.uint8).view(dtype)[:1]
            for dtype in (target, source)
        ]
    except (RuntimeError, TypeError):
        return True  # no plain tensor takes this dtype (a quantized one): the copy tells
    into, source = one
    if source.is_complex() and not into.is_complex():
        # copy_ takes the real part of a complex value into a real tensor, warning that it
        # does: asked of that part, the probe warns of nothing, with no change to the warning
        # filters (process-wide, so not for one thread to change while others run).
        source = source.real
    try:
        into.copy_(source)
    except RuntimeError:  # NotImplementedError too: torch's "not implemented for 'UInt4'"
        return False
    return True
