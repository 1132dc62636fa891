"""``storage_options`` values: each checked for type and range, a bad one refused with
``InvalidArgument`` naming the key (a credential by its type only, never its value), by every
entry point and on every rank; NumPy numbers taken as numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import distckpt
from distckpt import InvalidArgument
from distckpt.objstore import MIN_PART_SIZE, ObjectStore
from tests.ranks import run_ranks, values
from tests.s3server import S3Server

UNUSABLE_OPTIONS = [
    ("default_block_size", "16MiB"),
    ("default_block_size", str(16 << 20)),
    ("default_block_size", float(16 << 20)),
    ("default_block_size", True),
    ("default_block_size", MIN_PART_SIZE - 1),
    ("max_concurrency", "x"),
    ("max_concurrency", "8"),
    ("max_concurrency", 0),
    ("max_concurrency", -1),
    ("max_concurrency", True),
    ("max_concurrency", 2.0),
    ("retries", 2.5),
    ("retries", 0),
    ("retries", "5"),
    ("retries", False),
    ("connect_timeout", "x"),
    ("connect_timeout", 0),
    ("connect_timeout", -1.0),
    ("connect_timeout", float("nan")),
    ("connect_timeout", True),
    ("read_timeout", float("inf")),
    ("read_timeout", "60"),
    ("endpoint_url", 9000),
    ("region", 1),
    ("config_kwargs", [("connect_timeout", 1)]),
]


@pytest.mark.parametrize(("key", "value"), UNUSABLE_OPTIONS, ids=repr)
def test_a_storage_option_value_the_client_cannot_use_is_refused_naming_it(
    s3_server: S3Server, s3_url: str, key: str, value: object
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        ObjectStore(s3_url, {**s3_server.storage_options(), key: value})
    assert f"storage_options {key} " in str(refused.value) and repr(value) in str(refused.value)


#: Credentials of another type than text: each is refused naming its type only (a message ends
#: up in logs), in the fsspec keys and in the botocore arguments client_kwargs passes on, and
#: so is a client_kwargs that is no dict (it may hold them as text).
UNUSABLE_CREDENTIALS = [
    (
        {"client_kwargs": "aws_secret_access_key=wJalrXUtnFEMI"},
        "storage_options client_kwargs",
        "aws_secret_access_key=wJalrXUtnFEMI",
    ),
    ({"key": b"AKIAEXAMPLEKEYID"}, "storage_options key", b"AKIAEXAMPLEKEYID"),
    ({"secret": b"wJalrXUtnFEMI/K7MDENG"}, "storage_options secret", b"wJalrXUtnFEMI/K7MDENG"),
    (
        {"token": bytearray(b"FwoGZXIvYXdzEXAMPLE")},
        "storage_options token",
        bytearray(b"FwoGZXIvYXdzEXAMPLE"),
    ),
    (
        {"client_kwargs": {"aws_secret_access_key": 1234567890}},
        "storage_options client_kwargs aws_secret_access_key",
        1234567890,
    ),
    (
        {"client_kwargs": {"aws_session_token": b"IQoJb3JpZ2luEXAMPLE"}},
        "storage_options client_kwargs aws_session_token",
        b"IQoJb3JpZ2luEXAMPLE",
    ),
]


@pytest.mark.parametrize(("options", "named", "credential"), UNUSABLE_CREDENTIALS, ids=repr)
def test_a_credential_of_another_type_is_refused_without_its_value(
    s3_server: S3Server, s3_url: str, options: dict[str, object], named: str, credential: object
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        ObjectStore(s3_url, {**s3_server.storage_options(), **options})
    message = str(refused.value)
    wanted = "dict" if named.endswith("client_kwargs") else "str"
    assert f"{named} must be a {wanted}, not a {type(credential).__name__} " in message, message
    text = credential.decode() if isinstance(credential, (bytes, bytearray)) else str(credential)
    for shown in (str(refused.value), repr(refused.value)):
        assert text not in shown and repr(credential) not in shown, shown


#: Values of each count and timeout that are whole numbers, or positive finite numbers of
#: seconds, of the kinds configs hold: NumPy's scalars (a count read from an array, a timeout
#: computed in float32), and for a timeout any int or float.
USABLE_NUMBERS = [
    ("default_block_size", np.int64(8 << 20), "part_size", 8 << 20),
    ("max_concurrency", np.int32(3), "max_concurrency", 3),
    ("max_concurrency", np.uint8(1), "max_concurrency", 1),
    ("retries", np.int64(3), None, None),
    ("connect_timeout", np.float32(5.5), None, None),
    ("read_timeout", np.int64(30), None, None),
    ("read_timeout", 0.25, None, None),
]


@pytest.mark.parametrize(("key", "value", "attribute", "expected"), USABLE_NUMBERS, ids=repr)
def test_numpy_counts_and_timeouts_are_taken_as_numbers(
    s3_server: S3Server, s3_url: str, key: str, value: object, attribute: str | None, expected: int
) -> None:
    with ObjectStore(s3_url, {**s3_server.storage_options(), key: value}) as store:
        store.put_bytes("x", b"1")  # a client that works with it
        if attribute is not None:
            kept = getattr(store, attribute)
            assert kept == expected and type(kept) is int, kept


def _entry_points(url: str, tmp_path: Path) -> dict[str, Callable[[dict[str, Any]], object]]:
    """Each public way in that takes ``storage_options``, on ``url``."""
    return {
        "CheckpointManager": lambda options: distckpt.CheckpointManager(
            url, storage_options=options
        ).close(),
        "load_checkpoint": lambda options: distckpt.load_checkpoint(url, storage_options=options),
        "verify": lambda options: distckpt.verify(url, storage_options=options),
        "export": lambda options: distckpt.export(
            url, tmp_path / "out.pt", storage_options=options
        ),
    }


@pytest.mark.parametrize("entry", ["CheckpointManager", "load_checkpoint", "verify", "export"])
@pytest.mark.parametrize(
    ("key", "value"), [("default_block_size", "16MiB"), ("max_concurrency", 0), ("retries", 2.5)]
)
def test_every_entry_point_raises_the_invalid_argument_itself(
    s3_server: S3Server, s3_url: str, tmp_path: Path, entry: str, key: str, value: object
) -> None:
    """Not a plain ValueError, nor a CheckpointError wrapping one: the documented class."""
    run = _entry_points(s3_url, tmp_path)[entry]
    with pytest.raises(InvalidArgument, match=f"storage_options {key} "):
        run({**s3_server.storage_options(), key: value})
    assert not (tmp_path / "out.pt").exists()


def _open_with_options(rank: int, world_size: int, url: str, options: dict[str, Any]) -> str:
    with pytest.raises(InvalidArgument) as refused:
        distckpt.CheckpointManager(url, storage_options=options, timeout=30)
    return str(refused.value)


def test_a_managers_ranks_all_raise_the_invalid_argument(s3_server: S3Server, s3_url: str) -> None:
    options = {**s3_server.storage_options(), "max_concurrency": "x"}
    refused = values(run_ranks(_open_with_options, 2, s3_url, options, timeout=120))
    assert all("storage_options max_concurrency " in message for message in refused), refused


def test_usable_storage_option_values_are_taken_as_given(s3_server: S3Server, s3_url: str) -> None:
    options = {
        **s3_server.storage_options(),
        "default_block_size": MIN_PART_SIZE,
        "max_concurrency": 1,
        "retries": 1,
        "connect_timeout": 2,
        "read_timeout": 2.5,
        "client_kwargs": None,  # None is an option not given (fsspec's convention)
        "config_kwargs": {"s3": {"addressing_style": "path"}},
    }
    with ObjectStore(s3_url, options) as store:
        assert (store.part_size, store.max_concurrency) == (MIN_PART_SIZE, 1)
        config = store.client.meta.config
        assert (config.connect_timeout, config.read_timeout) == (2.0, 2.5)
        assert config.retries["total_max_attempts"] == 1
        store.put_bytes("x", b"1")
        assert store.get_bytes("x") == b"1"


@pytest.mark.parametrize("key", ["connect_timeout", "read_timeout", "config_kwargs"])
def test_an_option_given_none_is_as_if_not_given_by_a_manager(
    s3_server: S3Server, s3_url: str, key: str
) -> None:
    """fsspec's convention, also for the options the manager's start derives the client of
    its lease's renewals from."""
    options = {**s3_server.storage_options(), key: None}
    distckpt.CheckpointManager(s3_url, storage_options=options).close()


@pytest.mark.parametrize("top_level", [{}, {"read_timeout": 1, "connect_timeout": 1}])
def test_the_one_attempt_client_keeps_the_timeouts_given_in_config_kwargs(
    s3_url: str, top_level: dict[str, Any]
) -> None:
    """Merged last, ``config_kwargs``' timeouts are the user's client's: the client of
    re-GETs, aborts and a failed save's discard waits as long, only without retries."""
    options = {
        "endpoint_url": "http://127.0.0.1:9",
        **top_level,
        "config_kwargs": {"read_timeout": 15, "connect_timeout": 7, "retries": {"max_attempts": 9}},
    }
    with ObjectStore(s3_url, options) as store:
        for config in (store.client.meta.config, store.cleanup_client.meta.config):
            assert (config.read_timeout, config.connect_timeout) == (15, 7)
        assert store.cleanup_client.meta.config.retries["total_max_attempts"] == 1
