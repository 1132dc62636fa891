"""A small client for S3-protocol object stores (AWS S3, MinIO, Ceph RGW, R2, GCS's S3 interface).

It is the layer an ``s3://`` checkpoint root stands on, and knows nothing of ranks or process
groups. Underneath is botocore (the ``s3`` extra: ``pip install distckpt[s3]``), imported only
when an :class:`ObjectStore` is made, so local roots never need it; ``docs/object-stores.md``
says why botocore and which store features each guarantee rests on:

* :meth:`ObjectStore.put_bytes` with ``if_absent=True`` is an exclusive create
  (``If-None-Match: *``): of several writers racing for one key exactly one succeeds, the others
  get :class:`~distckpt.errors.ObjectExists`. With ``if_match=etag`` it is a compare-and-swap:
  the object is replaced only if it still has that ETag, else
  :class:`~distckpt.errors.PreconditionFailed`.
* :meth:`ObjectStore.open_write` (:mod:`distckpt.objstreams`) streams a large object as a
  parallel multipart upload and computes distckpt's CRC-32 (the value
  :class:`distckpt.checksums.ChecksumWriter` computes) and size as bytes go by. The object appears
  whole when the writer is closed, or never; a writer left by an exception aborts its upload.
* :meth:`ObjectStore.copy` copies an object inside the store (``CopyObject``; past 5 GiB, a
  multipart upload of ``UploadPartCopy`` ranges), its bytes never passing through the client.
* :meth:`ObjectStore.open_read` streams an object back through a seekable file-like pinned to
  the ETag it opened, so a replaced object is noticed instead of read as a mix.
* Transient failures (5xx, throttling, dropped connections) are retried with exponential
  backoff by botocore's "standard" retry mode; what still fails raises a
  :class:`~distckpt.errors.ObjectStoreError` naming the operation, the object and the endpoint.

Keys given to and returned by every method are relative to the prefix of the ``s3://`` URL.
A client must not cross a ``fork()``: make one per process.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import random
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from distckpt.checksums import crc32, crc32_base64, crc32_hex_of_base64
from distckpt.errors import (
    InvalidArgument,
    ObjectExists,
    ObjectNotFound,
    ObjectStoreError,
    PreconditionFailed,
    StoreAccessDenied,
    StoreUnavailable,
)
from distckpt.objclient import make_client
from distckpt.objcodes import DELETE_IF_MATCH, RefusedConditions, classify, refuses_condition
from distckpt.objinfo import ObjectInfo, ObjectPage
from distckpt.objoptions import (
    check_option_names,
    check_option_types,
    int_option,
    one_attempt_options,
)
from distckpt.objurl import S3Url

if TYPE_CHECKING:
    from distckpt.objstreams import ObjectReader, ObjectWriter

MIN_PART_SIZE = 5 << 20  # S3's minimum for every part but the last
DEFAULT_PART_SIZE = 16 << 20
#: The largest object one ``CopyObject`` copies (S3's limit); a larger one is copied in parts.
MAX_COPY_OBJECT_BYTES = 5 << 30
#: The range of a larger object each ``UploadPartCopy`` copies: at most 5 GiB (S3's limit),
#: and 10,000 parts of it reach past S3's largest object (5 TiB).
COPY_PART_BYTES = 1 << 30
DEFAULT_MAX_CONCURRENCY = 4
DEFAULT_ATTEMPTS = 5  # botocore's "standard" mode: 1 try + 4 retries, backoff up to 20 s
_DELETE_BATCH = 1000  # DeleteObjects' limit
_CONFLICT_RETRIES = 4  # 409 ConditionalRequestConflict: a concurrent conditional write
T = TypeVar("T")


class ObjectStore:
    """A client for one ``s3://bucket/prefix`` root.

    ``storage_options`` follows the fsspec/s3fs convention: ``endpoint_url``, ``key``,
    ``secret``, ``token``, ``region``, ``client_kwargs`` (passed to botocore's
    ``create_client``, e.g. ``region_name``), ``config_kwargs`` (to ``botocore.config.Config``),
    ``retries`` (total attempts per request), ``connect_timeout`` / ``read_timeout`` (seconds),
    ``default_block_size`` (multipart part size), ``max_concurrency`` (parts in flight per
    writer). What is not given (or given as None) comes from the standard AWS environment
    variables and config files (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_PROFILE``) or is
    the default. An unknown key, or a value of another type or out of range (the text options
    and the credentials in ``client_kwargs`` a ``str``, ``client_kwargs`` / ``config_kwargs``
    a dict, ``retries`` and ``max_concurrency`` an int (NumPy's too) of at least 1,
    ``default_block_size`` one of at least :data:`MIN_PART_SIZE`, a timeout a positive finite
    number; never a bool, a float count or a numeric string) raises
    :class:`~distckpt.errors.InvalidArgument` naming the key and the value, a credential's
    only by its type (:mod:`distckpt.objoptions`).
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        options = dict(storage_options or {})
        check_option_names(options)
        try:
            import botocore  # noqa: F401  (only to say what is missing)
        except ImportError as exc:
            raise InvalidArgument("s3:// roots need botocore: pip install 'distckpt[s3]'") from exc
        self.url = S3Url.parse(url)
        check_option_types(options)
        self.part_size = int_option(
            options, "default_block_size", DEFAULT_PART_SIZE, MIN_PART_SIZE, "bytes per part"
        )
        self.max_concurrency = int_option(
            options, "max_concurrency", DEFAULT_MAX_CONCURRENCY, 1, "parts in flight per writer"
        )
        self.attempts = int_option(
            options, "retries", DEFAULT_ATTEMPTS, 1, "the total attempts per request"
        )
        self._options = options
        self._cleanup_lock = threading.Lock()
        self._cleanup_client: Any = None
        self._refused_conditions = RefusedConditions()  # shared with one_attempt
        self.client = make_client(self.url, options, self.attempts, self.max_concurrency)
        self.endpoint: str = self.client.meta.endpoint_url

    @property
    def bucket(self) -> str:
        return self.url.bucket

    @property
    def cleanup_client(self) -> Any:
        """A client of this store that tries each request once (made when first needed, once
        however many threads ask at the same time): for the best-effort cleanup of a write
        that failed (its multipart upload's abort), which on a store that stopped answering
        must not take the whole retry budget again, and for what must share one budget of
        :attr:`attempts` (:meth:`get_versioned`'s GETs after the first). Its options are
        :func:`~distckpt.objoptions.one_attempt_options`: ``config_kwargs`` cannot give it
        more attempts."""
        client = self._cleanup_client
        if client is None:
            # Not functools.cached_property: from Python 3.12 on it takes no lock, and threads
            # aborting at once would each make a client, of which close() closes one.
            with self._cleanup_lock:
                if self._cleanup_client is None:
                    self._cleanup_client = make_client(
                        self.url, one_attempt_options(self._options), 1, self.max_concurrency
                    )
                client = self._cleanup_client
        return client

    @property
    def one_attempt(self) -> ObjectStore:
        """This store with :attr:`cleanup_client` as its :attr:`client` (one attempt per
        request): for best-effort cleanup made of several requests (a failed save's discard).
        It shares this store's clients: close this store, not it."""
        quick = copy.copy(self)
        quick.client = self.cleanup_client
        quick.attempts = 1
        return quick

    def close(self) -> None:
        """Release the clients' connections."""
        self.client.close()
        with self._cleanup_lock:
            if self._cleanup_client is not None:
                self._cleanup_client.close()

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- requests ------------------------------------------------------------------------

    def request(
        self,
        operation: str,
        name: str,
        call: Callable[..., T],
        *,
        if_absent: bool = False,
        if_match: str | None = None,
        **kwargs: Any,
    ) -> T:
        """Call ``call`` (a method of :attr:`client`) on this bucket (botocore retries transient
        failures inside) and map what still fails to an :class:`ObjectStoreError`;
        ``operation`` and ``name`` go into its message, ``if_absent`` / ``if_match`` (of a
        conditional write) say what a 412 or 404 means."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            NoCredentialsError,
            ParamValidationError,
        )

        for attempt in range(_CONFLICT_RETRIES + 1):
            try:
                return call(Bucket=self.bucket, **kwargs)
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code == "ConditionalRequestConflict" and attempt < _CONFLICT_RETRIES:
                    # S3's answer to two conditional writes at once: retry; the loser gets its 412
                    time.sleep(random.uniform(0.05, 0.2) * 2**attempt)
                    continue
                raise self._client_error(exc, operation, name, if_absent, if_match) from exc
            except ParamValidationError as exc:
                # refused by the client before sending: a name the store would never accept
                # (a bucket name with a space or a "!"), which no retry changes
                raise InvalidArgument(f"{operation} {self.url}/{name}: {exc}") from exc
            except NoCredentialsError as exc:
                detail = f"{exc} (give storage_options key/secret or the AWS_* variables)"
                raise self.error(StoreAccessDenied, operation, name, detail) from exc
            except (BotoCoreError, OSError) as exc:
                raise self.error(StoreUnavailable, operation, name, exc) from exc
        raise AssertionError("unreachable")

    def error(
        self, kind: type[ObjectStoreError], operation: str, name: str, detail: object
    ) -> ObjectStoreError:
        """An error of ``kind`` naming the operation, the object and the endpoint."""
        return kind(f"{operation} {self.url}/{name} at {self.endpoint} failed: {detail}")

    def _client_error(
        self, exc: Any, operation: str, name: str, if_absent: bool, if_match: str | None
    ) -> ObjectStoreError:
        retried = self.attempts > 1  # "after retries" only if it had more than one try
        kind, detail = classify(exc, if_absent=if_absent, if_match=if_match, retried=retried)
        return self.error(kind, operation, name, detail)

    # -- whole objects -------------------------------------------------------------------

    def put_bytes(
        self, name: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None
    ) -> str:
        """Store ``data`` as one object and return its ETag. ``if_absent``: create only, never
        replace (:class:`ObjectExists` otherwise); ``if_match``: replace only the version with
        that ETag (:class:`PreconditionFailed` otherwise)."""
        if if_absent and if_match is not None:
            raise InvalidArgument("put_bytes: if_absent and if_match exclude each other")
        kwargs: dict[str, Any] = {"ChecksumCRC32": crc32_base64(crc32(data))}
        if if_absent:
            kwargs["IfNoneMatch"] = "*"
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        response = self.request(
            "put",
            name,
            self.client.put_object,
            if_absent=if_absent,
            if_match=if_match,
            Key=self.url.key(name),
            Body=data,
            **kwargs,
        )
        return str(response["ETag"])

    def put_own_bytes(
        self, name: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None
    ) -> str:
        """:meth:`put_bytes` of a conditional write whose ``data`` no other writer sends (it
        names its writer: an attempt token, a lease owner and renewal count). The client
        retries a write whose answer was lost, and the store refuses that retry, since the
        first try already changed the object; so on a refusal the object is read back, and if
        it holds exactly ``data`` the write was this writer's and counts as done: the ETag of
        what is there is returned. So too when every try's answer was lost (the store
        unavailable to the end): the first may have been applied. Any other refusal, or an
        object that does not hold ``data``, is raised as :meth:`put_bytes` raises."""
        try:
            return self.put_bytes(name, data, if_absent=if_absent, if_match=if_match)
        except (ObjectExists, PreconditionFailed, StoreUnavailable) as failed:
            try:
                stored, etag = self.get_versioned(name)
            except ObjectStoreError:  # gone, or the store still unreachable: as it failed
                raise failed from None
            if stored != data:
                raise
            return etag

    def get_bytes(
        self, name: str, *, start: int = 0, end: int | None = None, if_match: str | None = None
    ) -> bytes:
        """The bytes :meth:`get_versioned` returns, without their ETag."""
        return self.get_versioned(name, start=start, end=end, if_match=if_match)[0]

    def get_versioned(
        self, name: str, *, start: int = 0, end: int | None = None, if_match: str | None = None
    ) -> tuple[bytes, str]:
        """The object's bytes ``[start, end)`` (to its end when ``end`` is None) and the ETag
        of their version; with ``if_match``, only from that version (:class:`PreconditionFailed`
        when it was replaced, :class:`ObjectNotFound` when it is gone). botocore's retries end
        once an answer's head arrived: one whose body breaks off (the connection dropped) is
        asked for again after a short jittered pause, through :attr:`cleanup_client` (one
        attempt each), as long as fewer than :attr:`attempts` GETs were sent (botocore's
        retries of the first counted); then :class:`StoreUnavailable`. So one read sends at
        most :attr:`attempts` GETs, as any other request."""
        budget = self.attempts
        client = self.client
        for tried in itertools.count(1):
            try:
                response = self.open_get(name, start, end, if_match, client=client)
            except StoreUnavailable:
                budget -= 1
                if client is self.client or budget <= 0:  # the first: botocore retried it
                    raise
            else:
                budget -= int(response["ResponseMetadata"].get("RetryAttempts", 0)) + 1
                try:
                    return self.read_body(name, response["Body"], -1), str(response["ETag"])
                except StoreUnavailable:
                    if budget <= 0:
                        raise
                finally:
                    response["Body"].close()
            client = self.cleanup_client
            # a pause, as botocore's between its tries, jittered so that ranks reading one
            # object do not ask again all at once
            time.sleep(random.uniform(0.0, min(1.0, 0.1 * 2**tried)))
        raise AssertionError("unreachable")

    def open_get(
        self,
        name: str,
        start: int,
        end: int | None,
        if_match: str | None,
        *,
        client: Any = None,
    ) -> dict[str, Any]:
        """The answer of a GET (see :meth:`get_versioned`) through ``client`` (by default
        :attr:`client`), its streaming ``Body`` unread."""
        kwargs: dict[str, Any] = {"Key": self.url.key(name)}
        if start or end is not None:
            kwargs["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        # Not told to ``request``: for a read, a 404 under ``If-Match`` is the object gone
        # (ObjectNotFound, which readers treat as a missing file), not a lost compare-and-swap.
        get_object = (client or self.client).get_object
        response: dict[str, Any] = self.request("get", name, get_object, **kwargs)
        return response

    def read_body(self, name: str, body: Any, size: int) -> bytes:
        """Up to ``size`` bytes (all, if negative) from the body of an :meth:`open_get` answer."""
        from botocore.exceptions import BotoCoreError

        try:
            return bytes(body.read() if size < 0 else body.read(size))
        except (BotoCoreError, OSError) as exc:  # urllib3's errors are OSErrors too
            raise self.error(StoreUnavailable, "read", name, exc) from exc

    def head(self, name: str) -> ObjectInfo:
        """Size, ETag and (where the store keeps one) CRC-32 of an object
        (:class:`ObjectNotFound` if absent)."""
        response = self.request(
            "head", name, self.client.head_object, Key=self.url.key(name), ChecksumMode="ENABLED"
        )
        composite = response.get("ChecksumType") == "COMPOSITE"
        return ObjectInfo(
            key=name,
            size=int(response["ContentLength"]),
            etag=str(response["ETag"]),
            crc32=None if composite else crc32_hex_of_base64(response.get("ChecksumCRC32")),
        )

    def list(
        self, prefix: str = "", *, page_size: int = 1000, top_level: bool = False
    ) -> Iterator[ObjectInfo]:
        """Every object whose relative key starts with ``prefix``, in key order, fetched a
        page of ``page_size`` at a time. ``top_level``: only those with no ``/`` after
        ``prefix`` (a ``/``-delimited listing, whose cost does not grow with the objects
        under the names it rolls up)."""
        for page in self.list_pages(prefix, page_size=page_size, top_level=top_level):
            yield from page.objects

    def list_pages(
        self, prefix: str = "", *, page_size: int = 1000, top_level: bool = False
    ) -> Iterator[ObjectPage]:
        """The objects of :meth:`list`, a page (one request) at a time: a caller may stop
        before the next page is asked for."""
        delimiter = "/" if top_level else None
        for page in self._list_pages(prefix, page_size=page_size, delimiter=delimiter):
            objects = [
                ObjectInfo(self.url.relative(item["Key"]), int(item["Size"]), item["ETag"])
                for item in page.get("Contents", [])
            ]
            yield ObjectPage(objects, last=not page.get("IsTruncated"))

    def list_dirs(self, prefix: str = "") -> Iterator[str]:
        """The distinct ``<prefix>...X/`` that relative keys starting with ``prefix`` begin
        with, in key order: what a ``/``-delimited listing rolls up, so its cost grows with
        these names (one page per 1000) and not with the objects under them."""
        for page in self._list_pages(prefix, page_size=1000, delimiter="/"):
            for item in page.get("CommonPrefixes", []):
                yield self.url.relative(item["Prefix"])

    def _list_pages(
        self, prefix: str, *, page_size: int, delimiter: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """The pages of a listing of ``prefix`` (``ListObjectsV2`` responses)."""
        kwargs: dict[str, Any] = {"Prefix": self.url.key(prefix), "MaxKeys": page_size}
        if not self.url.prefix and not prefix:
            kwargs.pop("Prefix")
        elif not prefix:
            kwargs["Prefix"] = self.url.prefix + "/"
        if delimiter is not None:
            kwargs["Delimiter"] = delimiter
        while True:
            page = self.request("list", prefix, self.client.list_objects_v2, **kwargs)
            yield page
            if not page.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    def delete(self, names: Iterable[str], *, batch_size: int = _DELETE_BATCH) -> None:
        """Delete objects, up to ``batch_size`` (at most 1000, ``DeleteObjects``' limit) per
        request; names already gone are not an error."""
        batch: list[str] = []
        for name in names:
            batch.append(name)
            if len(batch) == batch_size:
                self._delete_batch(batch)
                batch = []
        if batch:
            self._delete_batch(batch)

    def delete_one(self, name: str, *, if_match: str | None = None) -> None:
        """Delete one object (``DeleteObject``); a name already gone is not an error. ``if_match``:
        only the version with that ETag (else :class:`PreconditionFailed`). On a store that
        refuses If-Match on DELETE (501, or 400 InvalidArgument / NotImplemented; remembered
        for this store and logged once) the ETag is checked by a HEAD just before an
        unconditional DELETE instead, which leaves a version written between the two exposed."""
        key = self.url.key(name)
        if if_match is not None and DELETE_IF_MATCH not in self._refused_conditions:
            try:
                with contextlib.suppress(ObjectNotFound):  # S3's answer to If-Match on a name gone
                    self.request(
                        "delete", name, self.client.delete_object, Key=key, IfMatch=if_match
                    )
                return
            except ObjectStoreError as exc:
                if not refuses_condition(exc):
                    raise
                self._refused_conditions.add(DELETE_IF_MATCH, f"{self.url} at {self.endpoint}", exc)
        if if_match is not None:
            try:
                current = self.head(name).etag
            except ObjectNotFound:
                return
            if current != if_match:
                detail = f"its ETag is {current}, not {if_match} (checked by HEAD)"
                raise self.error(PreconditionFailed, "delete", name, detail)
        with contextlib.suppress(ObjectNotFound):
            self.request("delete", name, self.client.delete_object, Key=key)

    def _delete_batch(self, names: list[str]) -> None:
        body = {"Objects": [{"Key": self.url.key(name)} for name in names], "Quiet": True}
        response = self.request("delete", names[0], self.client.delete_objects, Delete=body)
        errors = response.get("Errors", [])
        if errors:
            first = errors[0]
            detail = f"{len(errors)} of {len(names)} not deleted, first {first.get('Key')}: "
            detail += f"{first.get('Code')} {first.get('Message', '')}"
            raise self.error(ObjectStoreError, "delete", names[0], detail)

    # -- server-side copies ----------------------------------------------------------------

    def copy(self, source: str, target: str, size: int) -> None:
        """Copy the object ``source`` (of ``size`` bytes) to ``target`` inside the store, its
        bytes never passing through this process; ``target`` is replaced if it exists. Up to
        :data:`MAX_COPY_OBJECT_BYTES` one ``CopyObject``; a larger object (which that refuses)
        as a multipart upload of ``UploadPartCopy`` ranges, published whole or not at all."""
        if size > MAX_COPY_OBJECT_BYTES:
            from distckpt.objstreams import copy_in_parts

            copy_in_parts(self, source, target, size, part_bytes=COPY_PART_BYTES)
            return
        copy_source = {"Bucket": self.bucket, "Key": self.url.key(source)}
        key = self.url.key(target)
        self.request("copy", source, self.client.copy_object, Key=key, CopySource=copy_source)

    # -- streams -------------------------------------------------------------------------

    def open_write(self, name: str, *, if_absent: bool = False) -> ObjectWriter:
        """A file-like to stream one object into (:class:`~distckpt.objstreams.ObjectWriter`)."""
        from distckpt.objstreams import ObjectWriter

        return ObjectWriter(self, name, if_absent=if_absent)

    def open_read(self, name: str) -> ObjectReader:
        """A seekable file-like over one object (:class:`~distckpt.objstreams.ObjectReader`)."""
        from distckpt.objstreams import ObjectReader

        return ObjectReader(self, name)
