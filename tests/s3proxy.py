"""An HTTP proxy in front of the test S3 server (tests/s3server.py) that makes a timing exact.

Each request is forwarded as it came. A :class:`Rule` picks requests by method and path (and,
if it says so, by what their body holds: the names of a batched delete) and either holds a
picked request until it is released (``hold``: a slow request, for as long as the test
chooses: released by the test, or once a file another process writes exists), forwards it
and then drops the connection instead of answering (``drop``: a write the store applied whose
answer was lost), forwards it and answers with only the first half of the body its head
announces, then drops the connection (``cut``: an answer broken off mid-body), or answers it
with an error status without forwarding it (``fail``: a store refusing the request,
unapplied). Listings may be answered in short pages (``short_pages``), as any S3 store may.
Real sockets and a real server: the client under test sees exactly what a slow or broken
network shows it.
"""

from __future__ import annotations

import functools
import http.client
import re
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal

from tests.lease_job import wait_for_file

#: how long a held request waits for its release before it goes on anyway (a test that
#: forgot to release it then fails on its assertions, not by hanging)
HOLD_TIMEOUT = 30.0
_HOP_BY_HOP = {"transfer-encoding", "connection", "expect"}


@dataclass
class Rule:
    """Which requests to act on, and how: ``times`` requests whose method is ``method``, whose
    path (the URL path and query) contains every one of ``path_parts`` and whose body contains
    every one of ``body_parts``."""

    method: str
    path_parts: tuple[str, ...]
    action: Literal["hold", "drop", "cut", "fail"]
    times: int = 1
    #: how many matching requests go by untouched before the rule acts
    skip: int = 0
    body_parts: tuple[bytes, ...] = ()
    #: headers a request must carry (any value) to be picked
    headers: tuple[str, ...] = ()
    #: for ``fail``: the status answered
    status: int = 503
    #: set when the first picked request arrives (for ``hold``: it waits from then on)
    arrived: threading.Event = field(default_factory=threading.Event)
    #: when (``time.monotonic()``) each picked request arrived
    arrival_times: list[float] = field(default_factory=list)
    #: set by :meth:`release`; a held request goes on once it is set
    released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self.released.set()

    def release_once_exists(self, path: Path) -> None:
        """Release the rule, from a thread of its own, once ``path`` exists: another process
        (a rank that has an outcome) writes it when the held requests may go on."""

        def release() -> None:
            try:
                wait_for_file(path)
            finally:
                self.release()

        threading.Thread(target=release, name="s3proxy-release", daemon=True).start()

    @contextmanager
    def changed_meanwhile(self, change: Callable[[], None]) -> Iterator[None]:
        """Within the block: once a request this rule holds arrives, ``change`` runs (another
        writer's, from a thread of its own), and then the request goes on. At the block's end
        an error of ``change`` is raised, and so is an ``AssertionError`` if the held request
        never came: either way the race the test meant did not happen."""
        block_ended = threading.Event()
        errors: list[BaseException] = []

        def change_then_release() -> None:
            try:
                deadline = time.monotonic() + HOLD_TIMEOUT
                # a request the block did not send by its end never comes: stop waiting then
                while not self.arrived.wait(0.05):
                    if block_ended.is_set() or time.monotonic() > deadline:
                        raise AssertionError(
                            f"no {self.method} request with {self.path_parts} was held: "
                            "the change it was to wait for never ran"
                        )
                change()
            except BaseException as exc:  # handed to the test's thread, which raises it
                errors.append(exc)
            finally:
                self.release()

        changer = threading.Thread(target=change_then_release, name="s3proxy-change")
        changer.start()
        try:
            yield
        finally:
            block_ended.set()
            changer.join()
            if errors:
                raise errors[0]

    def matches(
        self, method: str, path: str, body: bytes = b"", headers: Collection[str] = ()
    ) -> bool:
        carried = {name.lower() for name in headers}
        return (
            method == self.method
            and all(part in path for part in self.path_parts)
            and all(part in body for part in self.body_parts)
            and all(name.lower() in carried for name in self.headers)
        )


class S3Proxy:
    """The proxy (a context manager: closed on exit); ``endpoint`` is its URL (give it as
    ``endpoint_url``). Rules are added with :meth:`hold`, :meth:`drop`, :meth:`fail` and
    :meth:`cut`; ``log`` lists every request answered as ``(method, path, status)``."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.rules: list[Rule] = []
        #: (keys a page at most, path parts) of the listings answered in short pages
        self._page_sizes: list[tuple[int, tuple[str, ...]]] = []
        self.log: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()
        #: notified when a request was answered by the server (see :meth:`wait_for`)
        self._answered = threading.Condition(self._lock)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # The headers and the body go out in two writes: with Nagle's algorithm the body
            # waits for the client's delayed ACK of the headers, 40 ms on each request.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: object) -> None:
                return  # quiet: the test reads ``log``

            def handle_any(self) -> None:
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        # polled often: close() waits for the next poll (half a second by default)
        serve = functools.partial(self._server.serve_forever, poll_interval=0.05)
        threading.Thread(target=serve, daemon=True).start()

    def hold(
        self,
        method: str,
        *path_parts: str,
        times: int = 1,
        skip: int = 0,
        body_parts: tuple[bytes, ...] = (),
    ) -> Rule:
        """Hold ``times`` matching requests, after ``skip`` others, until the rule is
        released."""
        return self._add(Rule(method, path_parts, "hold", times, skip, body_parts=body_parts))

    def drop(self, method: str, *path_parts: str, times: int = 1, skip: int = 0) -> Rule:
        """Forward ``times`` matching requests, after ``skip`` others, then drop their
        answers."""
        return self._add(Rule(method, path_parts, "drop", times, skip))

    def cut(self, method: str, *path_parts: str, times: int = 1, skip: int = 0) -> Rule:
        """Forward ``times`` matching requests, after ``skip`` others, then answer each with
        the whole body's ``Content-Length`` but only the first half of the body, and drop the
        connection."""
        return self._add(Rule(method, path_parts, "cut", times, skip))

    def fail(
        self,
        method: str,
        *path_parts: str,
        status: int = 503,
        body_parts: tuple[bytes, ...] = (),
        headers: tuple[str, ...] = (),
        times: int = 1,
        skip: int = 0,
    ) -> Rule:
        """Answer ``times`` matching requests (those carrying every one of ``headers``), after
        ``skip`` others, with ``status`` (an S3 error document), without forwarding them: the
        store never sees them."""
        rule = Rule(method, path_parts, "fail", times, skip, body_parts, headers, status=status)
        return self._add(rule)

    def short_pages(self, keys: int, *path_parts: str) -> None:
        """Answer every listing (``GET`` with ``list-type=2``) whose path holds all of
        ``path_parts`` in pages of at most ``keys`` keys: S3 answers "up to MaxKeys" keys a
        page, so a client must work with any page size, and pages of one key make a change
        between two pages of a listing as exact as a held request. (The rewritten query no
        longer matches the request's signature: not for a server started with ``auth=True``.)"""
        with self._lock:
            self._page_sizes.append((keys, path_parts))

    def _paged(self, method: str, path: str) -> str:
        """``path`` with the page size of :meth:`short_pages` if one applies to it."""
        if method != "GET" or "list-type=2" not in path:
            return path
        with self._lock:
            sizes = [keys for keys, parts in self._page_sizes if all(p in path for p in parts)]
        if not sizes:
            return path
        paged, count = re.subn(r"max-keys=\d+", f"max-keys={min(sizes)}", path)
        return paged if count else f"{path}&max-keys={min(sizes)}"

    def wait_for(self, method: str, *path_parts: str, timeout: float) -> bool:
        """Wait until a request matching ``method`` and ``path_parts`` has been answered by
        the server; whether one was within ``timeout`` seconds."""
        rule = Rule(method, path_parts, "hold")
        with self._answered:
            return self._answered.wait_for(
                lambda: any(rule.matches(m, path) for m, path, _ in self.log), timeout
            )

    def _add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def _pick(self, method: str, path: str, body: bytes, headers: Collection[str]) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.times > 0 and rule.matches(method, path, body, headers):
                    if rule.skip > 0:
                        rule.skip -= 1
                        continue
                    rule.times -= 1
                    rule.arrival_times.append(time.monotonic())
                    return rule
        return None

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_BY_HOP}
        handler.path = self._paged(handler.command, handler.path)
        rule = self._pick(handler.command, handler.path, body, handler.headers.keys())
        if rule is not None:
            rule.arrived.set()
            if rule.action == "hold":
                rule.released.wait(HOLD_TIMEOUT)
            elif rule.action == "fail":
                self._refuse(handler, rule.status)
                return
        upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=60)
        try:
            upstream.request(handler.command, handler.path, body=body, headers=headers)
            answer = upstream.getresponse()
            data = answer.read()
        finally:
            upstream.close()
        with self._answered:
            self.log.append((handler.command, handler.path, answer.status))
            self._answered.notify_all()
        header_length = str(len(data))  # what the answer announces, also when it is cut
        if rule is not None and rule.action == "drop":
            handler.close_connection = True
            handler.connection.close()
            return
        if rule is not None and rule.action == "cut":
            data = data[: len(data) // 2]
            handler.close_connection = True
        handler.send_response(answer.status)
        for name, value in answer.getheaders():
            # HEAD keeps the server's Content-Length (of the object); others get the body's
            if name.lower() in _HOP_BY_HOP or (
                name.lower() == "content-length" and handler.command != "HEAD"
            ):
                continue
            handler.send_header(name, value)
        if handler.command != "HEAD":
            handler.send_header("Content-Length", header_length)
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)

    def _refuse(self, handler: BaseHTTPRequestHandler, status: int) -> None:
        """Answer ``status`` with the error document an S3 store sends."""
        codes = {503: "ServiceUnavailable", 403: "AccessDenied", 501: "NotImplemented"}
        codes[400] = "InvalidArgument"
        code = codes.get(status, "InternalError")
        data = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            f"<Error><Code>{code}</Code><Message>refused by the test proxy</Message></Error>"
        ).encode()
        with self._answered:
            self.log.append((handler.command, handler.path, status))
            self._answered.notify_all()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/xml")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def __enter__(self) -> S3Proxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop; held requests are released so that nothing waits on a closed proxy."""
        with self._lock:
            for rule in self.rules:
                rule.release()
        self._server.shutdown()
        self._server.server_close()
