"""``s3://BUCKET/PREFIX`` URLs: telling one from a directory path, and splitting it into the
bucket and the prefix every object key of a root starts with."""

from __future__ import annotations

from dataclasses import dataclass

from distckpt.errors import InvalidArgument

S3_SCHEME = "s3://"


def is_s3_url(root: object) -> bool:
    """Whether ``root`` names an object-store root (a ``str`` starting with ``s3://``)."""
    return isinstance(root, str) and root.startswith(S3_SCHEME)


@dataclass(frozen=True)
class S3Url:
    """``s3://bucket/prefix`` split; ``prefix`` has no leading or trailing ``/`` ("" for the
    bucket's top)."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> S3Url:
        if not is_s3_url(url):
            raise InvalidArgument(f"not an s3:// URL: {url!r}")
        bucket, _, prefix = url[len(S3_SCHEME) :].partition("/")
        prefix = prefix.strip("/")
        if not bucket or "//" in prefix or any(p in (".", "..") for p in prefix.split("/")):
            raise InvalidArgument(f"an s3:// URL needs a bucket and a plain prefix: {url!r}")
        return cls(bucket, prefix)

    def key(self, name: str) -> str:
        """The full object key of ``name`` (relative to the prefix)."""
        return f"{self.prefix}/{name}" if self.prefix else name

    def relative(self, key: str) -> str:
        """``key`` relative to the prefix (the inverse of :meth:`key`)."""
        return key[len(self.prefix) + 1 :] if self.prefix else key

    def __str__(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
