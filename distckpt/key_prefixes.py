"""State-dict key prefixes that wrappers add: ``_orig_mod.`` (a ``torch.compile``'d module) and
``module.`` (DDP, DataParallel). A checkpoint saved from a wrapped model has every key of the
model prefixed; restoring it into the bare model (or the reverse) would otherwise fail with
every key missing. Keys are mapped only when the mapping makes every key match, and the
mapping is logged once, at INFO, naming it.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

__all__ = ["WRAPPER_PREFIXES", "matching_prefixes", "log_prefix_mapping"]

logger = logging.getLogger("distckpt")

#: prefixes wrappers put in front of every key of the wrapped module's state dict
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def _bare(key: str) -> str:
    """``key`` without any leading wrapper prefixes (``module._orig_mod.x`` -> ``x``)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix) and len(key) > len(prefix):
                key = key[len(prefix) :]
                stripped = True
    return key


def _leading_prefix(key: str) -> str:
    """The wrapper prefixes in front of ``key`` (``module._orig_mod.``), or ``""``."""
    return key[: len(key) - len(_bare(key))]


def matching_prefixes(target: Collection[str], saved: Collection[str]) -> dict[str, str] | None:
    """``{target key: saved key}`` when the two key sets differ only by wrapper prefixes (one
    to one, every key matched), else None (also when they already match, or share no key)."""
    target_set, saved_set = set(target), set(saved)
    if target_set == saved_set or not target_set:
        return None
    if not all(isinstance(key, str) for key in target_set | saved_set):
        return None
    bare_target = {_bare(key): key for key in target_set}
    bare_saved = {_bare(key): key for key in saved_set}
    if (
        len(bare_target) != len(target_set)
        or len(bare_saved) != len(saved_set)
        or bare_target.keys() != bare_saved.keys()
    ):
        return None
    return {key: bare_saved[bare] for bare, key in bare_target.items()}


def log_prefix_mapping(where: str, mapping: dict[str, str]) -> None:
    """One INFO line saying which prefix became which under ``where``."""
    pairs = sorted(
        {(_leading_prefix(saved), _leading_prefix(target)) for target, saved in mapping.items()}
    )
    shown = ", ".join(f"{saved or '(none)'!r} -> {target or '(none)'!r}" for saved, target in pairs)
    logger.info(
        "%s: the checkpoint's keys differ from the given state's only by wrapper prefixes "
        "(torch.compile's '_orig_mod.', DDP's 'module.'); mapped %s for %d keys "
        "(fix_key_prefixes=False turns this off)",
        where or "state",
        shown,
        len(mapping),
    )
