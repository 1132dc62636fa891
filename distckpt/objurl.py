"""``s3://BUCKET/PREFIX`` URLs: telling one from a directory path, and splitting it into the
bucket and the prefix every object key of a root starts with."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from distckpt.errors import InvalidArgument

S3_SCHEME = "s3://"
#: what starts a URL (RFC 3986's scheme, then ``://``): never the start of a local path
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
#: what starts the string of a path made from a URL (its ``//`` normalised to ``/``)
_PATH_OF_A_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):/")


def is_s3_url(root: object) -> bool:
    """Whether ``root`` names an object-store root (a ``str`` starting with ``s3://``, the
    scheme in any case)."""
    return isinstance(root, str) and root[: len(S3_SCHEME)].lower() == S3_SCHEME


def checked_root(root: str | os.PathLike[str]) -> str | os.PathLike[str]:
    """``root`` as the stores take it, or :class:`~distckpt.errors.InvalidArgument`.

    An ``s3://`` URL whose scheme is in another case (``S3://``) is spelled ``s3://``. A string
    that starts or ends with whitespace (a pasted URL), or one that starts as a URL of another
    scheme (``s3a://``, ``gs://``, ``file://``), is refused: taken for a local path, it would
    quietly save into a local directory of that odd name. Any other string (a ``:`` not
    followed by ``//`` included) is a local path, as given. So is a path-like object, unless
    its string starts with a URL scheme and ``:/`` (``Path("s3://b/x")`` reads ``s3:/b/x``,
    its ``//`` made one ``/``): that is a URL given as a path, and refused (give it as a
    ``str``)."""
    if not isinstance(root, str):
        spelled = os.fspath(root)
        scheme = _PATH_OF_A_URL.match(spelled)
        if scheme is not None:
            raise InvalidArgument(
                f"checkpoint root {spelled!r} is a path made from a URL ({scheme.group(1)}://"
                "): give an s3:// root as a str, not a Path (which turns '//' into '/')",
                path=spelled,
            )
        return root
    if root != root.strip():
        raise InvalidArgument(
            f"checkpoint root {root!r} starts or ends with whitespace: give it without",
            path=root,
        )
    scheme = _URL_SCHEME.match(root)
    if scheme is None:
        return root
    if scheme.group(1).lower() != "s3":
        raise InvalidArgument(
            f"checkpoint root {root!r} is a URL of another scheme ({scheme.group(1)}://): "
            "only s3:// URLs and local paths are checkpoint roots",
            path=root,
        )
    return S3_SCHEME + root[scheme.end() :]


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
        url = str(checked_root(url))
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
