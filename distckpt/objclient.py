"""The botocore client of an ``s3://`` root (:class:`~distckpt.objstore.ObjectStore`), made
from its ``storage_options`` (:mod:`distckpt.objoptions`)."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

from distckpt.errors import InvalidArgument, StoreAccessDenied
from distckpt.objoptions import seconds_option
from distckpt.objurl import S3Url


@functools.cache
def _shared_data_loader(search_path: str | None) -> Any:
    """The botocore data loader every client of this process shares, one per search path.
    Each client has a session of its own, and a new session's loader would parse botocore's
    endpoint and service model files again (a quarter of a second of JSON per client on a
    busy machine); the loader only reads those files and keeps what it read."""
    import botocore.loaders

    return botocore.loaders.create_loader(search_path)


def make_client(url: S3Url, options: Mapping[str, Any], attempts: int, max_concurrency: int) -> Any:
    """The botocore client ``options`` configure. It sends no request yet, so what fails
    here is the configuration: half of the credentials is :class:`StoreAccessDenied` (as
    no credentials at all are at the first request); anything else (an endpoint that is
    not a URL, a bad ``config_kwargs`` value) is :class:`InvalidArgument`."""
    import botocore.session
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, PartialCredentialsError

    connect_timeout = seconds_option(options, "connect_timeout", 10.0)
    read_timeout = seconds_option(options, "read_timeout", 60.0)
    client_kwargs: dict[str, Any] = dict(options.get("client_kwargs") or {})
    for option, argument in (
        ("endpoint_url", "endpoint_url"),
        ("key", "aws_access_key_id"),
        ("secret", "aws_secret_access_key"),
        ("token", "aws_session_token"),
        ("region", "region_name"),
    ):
        if options.get(option) is not None:
            client_kwargs[argument] = options[option]
    try:
        config = Config(
            retries={"mode": "standard", "total_max_attempts": attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max(10, max_concurrency + 2),
            # distckpt sends the CRC-32 it computes anyway; botocore need not compute another
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ).merge(Config(**(options.get("config_kwargs") or {})))
        session = botocore.session.get_session()
        session.register_component(
            "data_loader", _shared_data_loader(session.get_config_variable("data_path"))
        )
        if "region_name" not in client_kwargs and session.get_config_variable("region") is None:
            # botocore reads AWS_DEFAULT_REGION; AWS_REGION is what the other SDKs read. A
            # custom endpoint still needs some region to sign with.
            client_kwargs["region_name"] = os.environ.get("AWS_REGION") or "us-east-1"
        return session.create_client("s3", config=config, **client_kwargs)
    except PartialCredentialsError as exc:
        where = client_kwargs.get("endpoint_url") or "the default endpoint"
        raise StoreAccessDenied(
            f"connect to {url} at {where} failed: {exc} (give storage_options key "
            "and secret together)"
        ) from exc
    except (BotoCoreError, ValueError, TypeError) as exc:
        raise InvalidArgument(f"storage_options for {url} are not usable: {exc}") from exc
