"""File-likes that stream one object to or from an :class:`~distckpt.objstore.ObjectStore`.

:class:`ObjectWriter` is what ``torch.save`` writes a shard into (a parallel multipart upload
that is published whole at ``close()`` or never); :class:`ObjectReader` is what ``torch.load``
reads one from (ranged GETs pinned to one version of the object); :func:`copy_in_parts` copies
an object too large for one ``CopyObject`` inside the store.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from distckpt.checksums import crc32, crc32_base64
from distckpt.errors import ObjectStoreError, StoreUnavailable
from distckpt.objstore import ObjectStore

_PARTS_PER_SIZE_STEP = 1000  # part size doubles every 1000 parts: S3 allows 10,000 parts


class ObjectWriter:
    """Streams one object into the store: bytes are buffered into parts that are uploaded in
    parallel (at most ``max_concurrency`` in flight, so memory stays bounded) while ``write``
    goes on; distckpt's CRC-32 and the size are computed as bytes go by, exactly as
    :class:`distckpt.checksums.ChecksumWriter` does, and sent for the store to check as the
    object's full-object CRC-32.

    ``close()`` publishes the object — all at once, as one PUT or by completing the multipart
    upload (with ``if_absent``: only if no object of that name exists, else
    :class:`ObjectExists`). Leaving a ``with`` block by an exception, or :meth:`abort`, discards
    the upload instead, so a failed write never leaves an object behind (a crashed process
    leaves an incomplete multipart upload, which the store's lifecycle rules expire).
    """

    def __init__(self, store: ObjectStore, name: str, *, if_absent: bool) -> None:
        self.name = name
        self.size = 0
        #: the published object's ETag, once closed
        self.etag: str | None = None
        self._store = store
        self._key = store.url.key(name)
        self._if_absent = if_absent
        self._crc = 0
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[Future[dict[str, Any]]] = []
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        #: the first error a :meth:`write` raised: ``torch.save``'s zip writer reports a failed
        #: write as an error of its own ("unexpected pos"), which names neither the store nor
        #: the cause
        self.failure: Exception | None = None

    @property
    def checksum(self) -> str:
        """The CRC-32 of the bytes written so far, as :class:`ChecksumWriter` spells it."""
        return f"{self._crc:08x}"

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._closed:
            raise ValueError(f"write to closed object writer for {self._store.url}/{self.name}")
        view = memoryview(data).cast("B")
        self._crc = crc32(view, self._crc)
        self.size += view.nbytes
        self._buffer += view
        try:
            while len(self._buffer) >= self._next_part_size():
                part_size = self._next_part_size()
                self._upload_part(bytes(self._buffer[:part_size]))
                del self._buffer[:part_size]
        except Exception as exc:
            self.failure = self.failure or exc
            raise
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass  # parts go out when full; close() publishes

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._closed

    def _next_part_size(self) -> int:
        return self._store.part_size * 2 ** (len(self._parts) // _PARTS_PER_SIZE_STEP)

    def _upload_part(self, data: bytes) -> None:
        store = self._store
        if self._upload_id is None:
            response = store.request(
                "create multipart upload",
                self.name,
                store.client.create_multipart_upload,
                Key=self._key,
                ChecksumAlgorithm="CRC32",
                ChecksumType="FULL_OBJECT",
            )
            self._upload_id = str(response["UploadId"])
            self._pool = ThreadPoolExecutor(store.max_concurrency, thread_name_prefix="distckpt-s3")
        # Bound memory: wait for the oldest part before queueing more than max_concurrency.
        in_flight = [part for part in self._parts if not part.done()]
        if len(in_flight) >= store.max_concurrency:
            in_flight[0].result()
        for part in self._parts:
            if part.done() and part.exception() is not None:
                part.result()  # a failed part fails the write now, not at close
        assert self._pool is not None
        number = len(self._parts) + 1
        self._parts.append(self._pool.submit(self._send_part, number, data))

    def _send_part(self, number: int, data: bytes) -> dict[str, Any]:
        store = self._store
        checksum = crc32_base64(crc32(data))  # the store checks each part as it arrives
        response = store.request(
            f"upload part {number}",
            self.name,
            store.client.upload_part,
            Key=self._key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=data,
            ChecksumCRC32=checksum,
        )
        return {
            "PartNumber": number,
            "ETag": response["ETag"],
            "ChecksumCRC32": response.get("ChecksumCRC32", checksum),
        }

    def close(self) -> None:
        """Publish the object (see the class docstring); on failure the upload is aborted."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._upload_id is None:
                self.etag = self._store.put_bytes(
                    self.name, bytes(self._buffer), if_absent=self._if_absent
                )
                return
            if self._buffer:  # the last part, the only one that may be under the minimum
                self._upload_part(bytes(self._buffer))
                self._buffer = bytearray()
            parts = [part.result() for part in self._parts]
            self.etag = self._complete(parts)
        except BaseException:
            self._abort_upload()
            raise
        finally:
            self._shutdown()

    def _complete(self, parts: list[dict[str, Any]]) -> str:
        store = self._store
        kwargs: dict[str, Any] = {"IfNoneMatch": "*"} if self._if_absent else {}
        response = store.request(
            "complete multipart upload",
            self.name,
            store.client.complete_multipart_upload,
            if_absent=self._if_absent,
            Key=self._key,
            UploadId=self._upload_id,
            MultipartUpload={"Parts": parts},
            ChecksumType="FULL_OBJECT",
            ChecksumCRC32=crc32_base64(self._crc),
            **kwargs,
        )
        return str(response["ETag"])

    def abort(self) -> None:
        """Discard what was written; nothing is published."""
        if self._closed:
            return
        self._closed = True
        self._abort_upload()
        self._shutdown()

    def _abort_upload(self) -> None:
        if self._upload_id is None:
            return
        for part in self._parts:
            part.cancel()
        # best effort, one attempt: the store is failing already, or the upload is gone (an
        # upload left is reclaimed by the bucket's lifecycle rule, as a killed process's is)
        with contextlib.suppress(Exception):
            self._store.cleanup_client.abort_multipart_upload(
                Bucket=self._store.bucket, Key=self._key, UploadId=self._upload_id
            )

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ObjectWriter:
        return self

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ObjectReader:
    """A read-only, seekable file-like over one object, for ``torch.load`` and friends.

    Sequential reads stream from one open GET; a seek elsewhere starts a new ranged GET there.
    Every GET is pinned to the ETag seen at open (``If-Match``), so an object replaced while
    it is read raises :class:`PreconditionFailed` rather than returning a mix of two versions,
    and one deleted meanwhile :class:`ObjectNotFound`, as when it was gone at open. A stream
    that breaks mid-read is reopened once at the same offset.
    """

    def __init__(self, store: ObjectStore, name: str) -> None:
        self.name = name
        self._store = store
        info = store.head(name)
        self.size = info.size
        self.etag = info.etag
        self._position = 0
        self._body: Any = None
        self._body_position = 0
        self._closed = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._closed

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._position = base + offset
        return self._position

    def read(self, size: int | None = -1) -> bytes:
        if self._closed:
            raise ValueError(f"read from closed object reader for {self._store.url}/{self.name}")
        remaining = self.size - self._position
        wanted = remaining if size is None or size < 0 else min(size, remaining)
        if wanted <= 0:
            return b""
        chunks: list[bytes] = []
        got = 0
        reopened = False
        while got < wanted:
            if self._body is None or self._body_position != self._position:
                self._reopen()
            try:
                chunk = self._store.read_body(self.name, self._body, wanted - got)
                if not chunk:  # the object is longer than this: the stream broke off
                    raise self._store.error(
                        StoreUnavailable, "read", self.name, f"stream ended at {self._position}"
                    )
            except StoreUnavailable:
                if reopened:
                    raise
                reopened = True  # once per read: a store that keeps failing is reported
                self._drop_body()
                continue
            chunks.append(chunk)
            got += len(chunk)
            self._position += len(chunk)
            self._body_position = self._position
        return b"".join(chunks)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(view.nbytes)
        view[: len(data)] = data
        return len(data)

    def _reopen(self) -> None:
        self._drop_body()
        self._body = self._store.open_get(self.name, self._position, None, self.etag)["Body"]
        self._body_position = self._position

    def _drop_body(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):  # a broken stream may fail to close too
                self._body.close()
            self._body = None

    def close(self) -> None:
        self._drop_body()
        self._closed = True

    def __enter__(self) -> ObjectReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def copy_in_parts(
    store: ObjectStore, source: str, target: str, size: int, *, part_bytes: int
) -> None:
    """Copy ``source`` (``size`` bytes) to ``target`` inside ``store`` as a multipart upload of
    ``UploadPartCopy`` ranges of ``part_bytes``, published whole or not at all: what
    :meth:`ObjectStore.copy <distckpt.objstore.ObjectStore.copy>` does past the limit of one
    ``CopyObject``."""
    copy_source = {"Bucket": store.bucket, "Key": store.url.key(source)}
    key = store.url.key(target)
    upload = store.request(
        "start multipart copy", target, store.client.create_multipart_upload, Key=key
    )
    upload_id = upload["UploadId"]
    try:
        parts = []
        for number, start in enumerate(range(0, size, part_bytes), start=1):
            end = min(start + part_bytes, size) - 1
            response = store.request(
                f"copy part {number}",
                source,
                store.client.upload_part_copy,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                CopySource=copy_source,
                CopySourceRange=f"bytes={start}-{end}",
            )
            parts.append({"PartNumber": number, "ETag": response["CopyPartResult"]["ETag"]})
        store.request(
            "complete multipart copy",
            target,
            store.client.complete_multipart_upload,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )
    except BaseException:
        # Nothing was published: the parts copied so far are dropped (an abort that fails
        # leaves them to the store's lifecycle rules, as a crashed upload does).
        with contextlib.suppress(ObjectStoreError):
            store.request(
                "abort multipart copy",
                target,
                store.client.abort_multipart_upload,
                Key=key,
                UploadId=upload_id,
            )
        raise
