"""The ``storage_options`` of an ``s3://`` root (fsspec/s3fs keys): which keys mean something,
and what each value must be. A value of another type or out of range is refused with
:class:`~distckpt.errors.InvalidArgument` naming the key and the value, or, for a credential,
only the value's type.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from distckpt.arguments import as_count, as_seconds
from distckpt.errors import InvalidArgument

#: The fsspec/s3fs storage_options keys that mean something here.
OPTION_KEYS = {
    "endpoint_url",
    "key",
    "secret",
    "token",
    "region",
    "client_kwargs",
    "config_kwargs",
    "retries",
    "connect_timeout",
    "read_timeout",
    "default_block_size",
    "max_concurrency",
}

#: The botocore config keys that bound a request's time (its attempts, its timeouts): a client
#: made to give up sooner than the user's (:func:`one_attempt_options`) must not have them
#: undone by the user's ``config_kwargs``, which are merged last.
TIMING_CONFIG_KEYS = ("retries", "connect_timeout", "read_timeout")

#: The options whose value is text, and those whose value is a mapping of keyword arguments.
_TEXT_OPTIONS = ("endpoint_url", "key", "secret", "token", "region")
_MAPPING_OPTIONS = ("client_kwargs", "config_kwargs")
#: Words in an option's name (``secret``, ``client_kwargs``' ``aws_session_token``) that make
#: its value a credential: a message names its type, never the value (logs keep messages).
#: ``client_kwargs`` too: given as something else than a dict, it may hold them all the same.
_CREDENTIAL_WORDS = ("key", "secret", "token", "password", "credential", "client_kwargs")


def check_option_names(options: Mapping[str, Any]) -> None:
    """Refuse an unknown key, so a typo does not silently fall back to a default."""
    unknown = sorted(set(options) - OPTION_KEYS)
    if unknown:
        raise InvalidArgument(f"unknown storage_options {unknown}; known: {sorted(OPTION_KEYS)}")


def _may_be_credential(name: str) -> bool:
    return any(word in name.lower() for word in _CREDENTIAL_WORDS)


def shown(name: str, value: object) -> str:
    """``value`` as a message about option ``name`` shows it: a credential only by its type."""
    if _may_be_credential(name):
        return f"a {type(value).__name__} (not shown: it may be a credential)"
    return repr(value)


def check_option_types(options: Mapping[str, Any]) -> None:
    """Refuse a text or mapping option of another type, and a credential in ``client_kwargs``
    that is not text (None is an option not given, as in fsspec): botocore would fail on it
    later, at a request, with a less clear message."""
    texts = [(f"storage_options {key}", options.get(key)) for key in _TEXT_OPTIONS]
    for key in _MAPPING_OPTIONS:
        value = options.get(key)
        if value is not None and not isinstance(value, Mapping):
            raise InvalidArgument(f"storage_options {key} must be a dict, not {shown(key, value)}")
    for name, value in dict(options.get("client_kwargs") or {}).items():
        if _may_be_credential(str(name)):
            texts.append((f"storage_options client_kwargs {name}", value))
    for name, value in texts:
        if value is not None and not isinstance(value, str):
            raise InvalidArgument(f"{name} must be a str, not {shown(name, value)}")


def int_option(
    options: Mapping[str, Any], key: str, default: int, minimum: int, meaning: str
) -> int:
    """The count ``options[key]`` (:func:`~distckpt.arguments.as_count`; ``default`` when
    not given or None), at least ``minimum``."""
    value = options.get(key)
    if value is None:
        return default
    count = as_count(value, minimum)
    if count is None:
        raise InvalidArgument(
            f"storage_options {key} is {meaning}: an int of at least {minimum}, not {value!r}"
        )
    return count


def seconds_option(options: Mapping[str, Any], key: str, default: float) -> float:
    """The timeout ``options[key]`` (:func:`~distckpt.arguments.as_seconds`; ``default``
    when not given or None)."""
    value = options.get(key)
    if value is None:
        return default
    seconds = as_seconds(value)
    if seconds is None:
        raise InvalidArgument(
            f"storage_options {key} is seconds: a positive, finite number, not {value!r}"
        )
    return seconds


def one_attempt_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` for a client that tries each request once: ``retries`` 1, and ``config_kwargs``
    without :data:`TIMING_CONFIG_KEYS`. Its ``retries`` is dropped; a ``connect_timeout`` /
    ``read_timeout`` given there is moved to the top-level option it overrides (merged last, it
    wins over that option in the user's client too), so this client waits as long per request."""
    given = dict(options.get("config_kwargs") or {})
    given.pop("retries", None)
    timeouts = {key: given.pop(key) for key in TIMING_CONFIG_KEYS if key in given}
    return {**options, **timeouts, "config_kwargs": given, "retries": 1}
