"""What an S3 store's error answers mean to :class:`~distckpt.objstore.ObjectStore`: which
:class:`~distckpt.errors.ObjectStoreError` each becomes, and which say the store does not
implement a request (or one of its headers) rather than that the request failed."""

from __future__ import annotations

import logging
import threading
from typing import Any

from distckpt import errors

_ACCESS_DENIED_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
}
DELETE_IF_MATCH = "If-Match on DELETE"
logger = logging.getLogger("distckpt")
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NotFound", "404", "NoSuchUpload"}
_NOT_IMPLEMENTED = (
    "the store does not implement this request (an s3:// root needs conditional writes, "
    "If-None-Match and If-Match on PUT, and CRC-32 checksums; If-Match on DELETE is used "
    "where the store takes it: docs/object-stores.md)"
)


def error_code(exc: Any) -> tuple[str, int]:
    """The S3 error code and HTTP status of a botocore ``ClientError``."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def classify(
    exc: Any, *, if_absent: bool, if_match: str | None, retried: bool
) -> tuple[type[errors.ObjectStoreError], str]:
    """The kind of error a ``ClientError`` is and the detail to report; ``if_absent`` /
    ``if_match`` (of a conditional write) say what a 412 or 404 means, ``retried`` whether
    botocore retried the request before giving up."""
    code, status = error_code(exc)
    detail = f"{code or status}: {exc.response.get('Error', {}).get('Message', '')}".rstrip(": ")
    if status == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict"):
        if if_absent:
            return errors.ObjectExists, f"it already exists ({detail})"
        return errors.PreconditionFailed, detail
    if code in _NOT_FOUND_CODES or status == 404:
        if if_match is not None and code != "NoSuchBucket":
            return errors.PreconditionFailed, f"it is gone ({detail})"
        return errors.ObjectNotFound, detail
    if code in _ACCESS_DENIED_CODES or status in (401, 403):
        return errors.StoreAccessDenied, detail
    if status == 501 or code == "NotImplemented":  # not retried: no store that is down
        return errors.ObjectStoreError, f"{detail}: {_NOT_IMPLEMENTED}"
    if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError"):
        return errors.StoreUnavailable, detail + (" (after retries)" if retried else "")
    return errors.ObjectStoreError, detail


def refuses_condition(error: BaseException) -> bool:
    """Whether ``error`` (raised by a conditional request) says the store does not take the
    condition (501, or 400 InvalidArgument / NotImplemented), not that the request failed."""
    from botocore.exceptions import ClientError

    cause = error.__cause__
    if not isinstance(cause, ClientError):
        return False
    code, status = error_code(cause)
    return (
        status == 501 or code == "NotImplemented" or (status == 400 and code == "InvalidArgument")
    )


class RefusedConditions:
    """The request conditions one store answered it does not take (see
    :func:`refuses_condition`), each logged once at WARNING when first refused."""

    def __init__(self) -> None:
        self._refused: set[str] = set()
        self._lock = threading.Lock()

    def __contains__(self, condition: object) -> bool:
        return condition in self._refused

    def add(self, condition: str, store: str, refusal: BaseException) -> None:
        with self._lock:
            first = condition not in self._refused
            self._refused.add(condition)
        if first:
            logger.warning(
                "%s refuses %s (%s): checked by a HEAD before the request instead, which "
                "leaves a change between the two unseen",
                store,
                condition,
                refusal.__cause__ or refusal,
            )
