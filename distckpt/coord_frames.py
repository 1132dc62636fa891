"""The wire format of the :class:`~distckpt.coord.Coordinator`'s collectives: how one value
becomes the bytes a gloo collective carries, and back.

A module of its own because it is plain bytes: nothing here calls ``torch.distributed``, knows
about ranks or errors, or decides which collective runs. :mod:`distckpt.coord` sends the
tensors these functions make and reads the ones it receives with them; what the values mean
(an :class:`~distckpt.coord_outcomes.Outcome`) is :mod:`distckpt.coord_outcomes`'s.

A value travels pickled, in a fixed-size first-round frame (its length, then up to
:data:`FRAME_BYTES` of it); only a value that does not fit needs a second round, which carries
the rest.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

import torch

#: Bytes of a pickled value that an object collective carries in its first round, after an
#: 8-byte length. torch's ``all_gather_object`` and ``broadcast_object_list`` always spend two
#: collectives (the sizes, then the padded bytes); everything the save protocol exchanges
#: (proposals, one shard's file records, verdicts) fits in this frame, so one collective
#: suffices, and only a longer value's rest follows in a second round sized to the longest.
FRAME_BYTES = 4096
_LENGTH = struct.Struct("<q")


def pack_frame(value: object) -> tuple[torch.Tensor, bytes]:
    """``value`` pickled into a first-round frame (its length, then up to
    :data:`FRAME_BYTES` of it) and the rest that did not fit."""
    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    head = payload[:FRAME_BYTES]
    frame = bytearray(_LENGTH.size + FRAME_BYTES)
    _LENGTH.pack_into(frame, 0, len(payload))
    frame[_LENGTH.size : _LENGTH.size + len(head)] = head
    return torch.frombuffer(frame, dtype=torch.uint8), payload[FRAME_BYTES:]


def frame_length(frame: torch.Tensor) -> int:
    """The pickled length a frame announces."""
    return _LENGTH.unpack(frame[: _LENGTH.size].numpy().tobytes())[0]


def unpack_frame(frame: torch.Tensor, rest: torch.Tensor | None) -> Any:
    """The value of a frame and, if it did not fit, the rest of its bytes (possibly padded)."""
    length = frame_length(frame)
    payload = frame[_LENGTH.size : _LENGTH.size + min(length, FRAME_BYTES)].numpy().tobytes()
    if length > FRAME_BYTES:
        assert rest is not None  # the second round ran: some frame announced more
        payload += rest[: length - FRAME_BYTES].numpy().tobytes()
    # Only the ranks of this job's own private group send these bytes: the same trust as
    # torch's own object collectives, which unpickle too.
    return pickle.loads(payload)


def padded_rest(rest: bytes, size: int) -> torch.Tensor:
    """``rest`` zero-padded to ``size`` bytes, as a second-round tensor."""
    return torch.frombuffer(bytearray(rest.ljust(size, b"\0")), dtype=torch.uint8)
