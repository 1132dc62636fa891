"""An exported state as ``torch.save`` can write it (:func:`distckpt.export`).

A checkpoint holds what ``torch.save`` refuses in one file: views of one storage in two dtypes
(a weight and its bits as ``int32``), which a "torch" rank file keeps shared as its raw bytes;
and tensors of a sub-byte dtype (``uint4``, ``int1``), which ``torch.save`` has no storage type
for. The first are written apart (:func:`savable_state`: each view of another dtype than the
first one met in its storage is cloned, so only the tensors of that first dtype still share
it); the second are refused before anything is written, naming each
(:class:`~distckpt.errors.UnsupportedTensors`). Any other failure of ``torch.save`` writing a
local file or an ``s3://`` object is raised as an :class:`~distckpt.errors.InvalidArgument`
(:func:`torch_save`).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import IO, Any

import torch

from distckpt.containers import same_kind_of_mapping, same_kind_of_tuple
from distckpt.errors import InvalidArgument, UnsupportedTensors
from distckpt.model_state_keys import join_key
from distckpt.tensor_writes import SUB_BYTE_DTYPES


def savable_state(state: Any) -> Any:
    """``state`` with every view of a storage whose tensors came in another dtype before it (in
    the order of a walk of its dicts, OrderedDicts, lists and tuples, as a rank file's) cloned;
    refused with :class:`~distckpt.errors.UnsupportedTensors` when it holds a tensor of a
    sub-byte dtype. Values of any other type are left as they are: ``torch.save`` judges
    them."""
    first_dtype: dict[int, torch.dtype] = {}
    sub_byte: list[tuple[str, torch.dtype]] = []

    def walk(value: Any, path: str) -> Any:
        kind = type(value)
        if kind is torch.Tensor and value.layout == torch.strided:
            if value.dtype in SUB_BYTE_DTYPES:
                sub_byte.append((path, value.dtype))
            address = value.untyped_storage().data_ptr()
            # torch.save tells storages apart by their address, and none at 0 (no bytes)
            if address and first_dtype.setdefault(address, value.dtype) != value.dtype:
                return value.clone()
            return value
        if kind is dict or kind is OrderedDict:
            return same_kind_of_mapping(
                value, {key: walk(item, join_key(path, key)) for key, item in value.items()}
            )
        if kind is list:
            return [walk(item, join_key(path, index)) for index, item in enumerate(value)]
        if kind is tuple or (isinstance(value, tuple) and hasattr(value, "_fields")):
            items = [walk(item, join_key(path, index)) for index, item in enumerate(value)]
            return same_kind_of_tuple(value, items)
        return value

    savable = walk(state, "")
    if sub_byte:
        listed = ", ".join(f"{key} ({dtype})" for key, dtype in sub_byte)
        raise UnsupportedTensors(
            f"torch.save has no storage type for a sub-byte dtype, so export cannot write "
            f"{listed}: load the checkpoint with distckpt.load_checkpoint and save those tensors "
            "viewed as torch.uint8 (tensor.view(torch.uint8))",
            keys=tuple(key for key, _ in sub_byte),
            kinds=tuple(f"torch.Tensor ({dtype})" for _, dtype in sub_byte),
        )
    return savable


def torch_save(state: Any, file: IO[bytes], out: str | os.PathLike[str]) -> None:
    """``torch.save(state, file)`` for the export to ``out`` (a local file or an ``s3://``
    URL); a failure of torch's (a value it cannot pickle) raised as
    :class:`~distckpt.errors.InvalidArgument` naming ``out`` and torch's reason. An
    ``OSError`` passes as it is; one a local file met under torch's own error is raised
    by :func:`~distckpt.fsutil.atomic_write` instead, and an object writer's failed upload
    under it (:attr:`~distckpt.objstreams.ObjectWriter.failure`) here."""
    try:
        torch.save(state, file)
    except OSError:
        raise
    except Exception as exc:
        failure = getattr(file, "failure", None)  # an object writer's own failed upload
        if failure is not None:
            raise failure from exc
        raise InvalidArgument(
            f"torch.save cannot write the exported state to {os.fspath(out)}: "
            f"{type(exc).__name__}: {exc}",
            path=out,
        ) from exc
