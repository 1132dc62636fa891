"""The root leases this process holds, known by the tokens it took them with, so that a
refusal tells a root this same process holds (a manager on it not closed) from one another job
holds. A pid alone cannot tell them apart: a process in another PID namespace of this machine
(a container sharing the host's network, and so its hostname) may have the same pid. Both
stores use it: a root directory's lease (:mod:`distckpt.lease`) and an ``s3://`` root's
(:mod:`distckpt.storage.s3_lease`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:  # lease.py imports this module
    from distckpt.lease import LeaseHolder

#: called once by a lease's taking (both stores) as it finds the root held and begins to wait,
#: with the holder's record (None: none could be read); a string, as LeaseHolder is not
#: importable here at run time
HeldCallback: TypeAlias = "Callable[[LeaseHolder | None], None] | None"

_held_tokens: set[str] = set()
_held_tokens_lock = threading.Lock()


def took(token: str) -> None:
    """Count the lease taken with ``token`` as held by this process."""
    with _held_tokens_lock:
        _held_tokens.add(token)


def let_go(token: str) -> None:
    """This process no longer holds the lease taken with ``token`` (idempotent)."""
    with _held_tokens_lock:
        _held_tokens.discard(token)


def held_by_this_process(holder: LeaseHolder) -> bool:
    """Whether ``holder``'s record is of a lease this process took and still holds. A forked
    child inherits the tokens of its parent's leases, which stay the parent's: the record
    names the parent's pid."""
    with _held_tokens_lock:
        return holder.pid == os.getpid() and holder.token in _held_tokens


def held_here_phrase(holder: LeaseHolder | None) -> str | None:
    """How a refusal names ``holder`` when this process holds the root (see
    :func:`held_by_this_process`); None when it does not."""
    if holder is None or not held_by_this_process(holder):
        return None
    return f"this process ({holder.describe()}): another CheckpointManager on it was not closed"


def holder_phrase(holder: LeaseHolder | None) -> str:
    """How a message names the holder of a root: this process (:func:`held_here_phrase`), else
    ``holder.describe()``, else (None: no record could be read) a holder without one."""
    here = held_here_phrase(holder)
    if here is not None:
        return here
    return holder.describe() if holder is not None else "a holder whose record cannot be read"
