"""The exceptions of :mod:`distckpt.errors` as a process pool or a multiprocessing queue
carries them: pickled and back, with their type, message and structured fields."""

from __future__ import annotations

import inspect
import pickle
from typing import Any

import pytest

import distckpt.errors as errors
from distckpt.errors import CheckpointError, RankFailure

#: Arguments for the classes whose ``__init__`` takes more than a message; the others are
#: made with one message and every base field set.
_SPECIAL_ARGUMENTS: dict[type[CheckpointError], tuple[tuple[Any, ...], dict[str, Any]]] = {
    RankFailure: (("save", {1: "OSError: disk full", 0: "timeout"}), {}),
    errors.RootInUse: (("root in use", {"host": "node-a"}), {}),
    errors.LeaseTakenMeanwhile: (("taken meanwhile", {"host": "node-b"}, {"host": "node-a"}), {}),
    # made from what it names, with no message of its own
    errors.LightningInternalMissing: (("Trainer._signal_connector", "2.6.6"), {}),
}

_ERROR_CLASSES = sorted(
    (
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, CheckpointError)
    ),
    key=lambda cls: cls.__name__,
)


def _example(cls: type[CheckpointError]) -> CheckpointError:
    """An instance of ``cls`` with every field its ``__init__`` takes set to a value."""
    if cls in _SPECIAL_ARGUMENTS:
        args, kwargs = _SPECIAL_ARGUMENTS[cls]
        return cls(*args, **kwargs)
    values: dict[str, Any] = {
        "rank": 3,
        "path": "root/step-00000007/manifest.json",
        "step": 7,
        "damaged": True,
        "recorded": "0000abcd",
        "computed": "ffff1234",
        "mismatches": (("w", (2,), (3,)),),
        "where": "optimizer",
        "keys": ("(1, 2)",),
        "kinds": ("TwoTensor",),
        "state_key": "on_save_checkpoint",
        "refused": "numpy scalar",
        "reason": "No module named 'gone_module'",
        "written_bytes": 10,
        "found_bytes": 4,
        "missing_keys": ("model.2.weight",),
        "unexpected_keys": ("model.3.bias",),
        "saved_world_size": 4,
        "world_size": 2,
        "key": "sampler.generator",
        "saved_device": "cuda:0",
        "given_device": "cpu",
        "call": "save",
    }
    taken = inspect.signature(cls.__init__).parameters
    return cls("what went wrong", **{k: v for k, v in values.items() if k in taken})


def test_every_error_class_is_covered() -> None:
    assert len(_ERROR_CLASSES) > 30
    assert errors.ManifestChecksumMismatch in _ERROR_CLASSES


@pytest.mark.parametrize("cls", _ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_an_error_survives_pickling_with_its_message_and_fields(
    cls: type[CheckpointError],
) -> None:
    error = _example(cls)
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is cls
    assert str(back) == str(error)
    assert vars(back) == vars(error)
    assert back.fields() == error.fields()


#: The classes whose ``__init__`` requires more than a message, with their optional fields None.
_SPARSE_ARGUMENTS: dict[type[CheckpointError], tuple[Any, ...]] = {
    RankFailure: ("save", {1: "OSError: disk full"}),
    errors.RootInUse: ("root in use by a process whose record is not written yet",),
    errors.LeaseTakenMeanwhile: ("taken meanwhile", None, None),
    errors.LightningInternalMissing: ("Trainer._signal_connector", "2.6.6"),
}


def _sparse_example(cls: type[CheckpointError]) -> CheckpointError:
    """An instance of ``cls`` made with only the arguments its ``__init__`` requires: every
    optional field is None."""
    if cls in _SPARSE_ARGUMENTS:
        return cls(*_SPARSE_ARGUMENTS[cls])
    full = vars(_example(cls))
    required = [
        name
        for name, parameter in inspect.signature(cls.__init__).parameters.items()
        if name not in ("self", "message") and parameter.default is inspect.Parameter.empty
    ]
    return cls("what went wrong", **{name: full[name] for name in required})


@pytest.mark.parametrize("cls", _ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_an_error_rebuilt_on_another_rank_has_every_field_even_those_that_are_none(
    cls: type[CheckpointError],
) -> None:
    """What crosses between ranks is ``fields()``; the error rebuilt from it must have every
    attribute the raised one had (a refused job read ``RootInUse.holder`` and met an
    ``AttributeError`` when the holder's record was not written yet)."""
    error = _sparse_example(cls)
    back = cls.rebuild(str(error), error.fields())
    assert vars(back) == vars(error)
