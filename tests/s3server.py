"""A real S3-protocol server for tests: moto in server mode, as a subprocess on 127.0.0.1.

With ``auth=True`` moto checks signatures against IAM (after the few unauthenticated calls that
create the test user and its access key), so a wrong secret is refused as a real store would
refuse it. It is off by default because moto (5.2) then also refuses valid signatures of
requests whose query string holds a ``/`` (a listing under a prefix), which real stores accept.
Each server keeps its objects in memory: :meth:`S3Server.kill` loses them and
:meth:`S3Server.restart` comes back empty, on the same port, with a new access key. The port is
reserved for the server from its creation to :meth:`S3Server.stop` (:class:`ReservedPort`), so no
other process takes it before moto binds it, or while the server is down between a kill and a
restart.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from typing import TYPE_CHECKING, Any

from tests.ports import ReservedPort

if TYPE_CHECKING:  # only annotations: the benchmark starts this server without pytest
    from pathlib import Path

    import pytest

_SETUP_CALLS = 3  # create_user, create_access_key, put_user_policy: unauthenticated
_START_TIMEOUT = 30.0
_ALLOW_ALL = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
}
REGION = "us-east-1"


class S3Server:
    """One moto server process; ``endpoint``, ``key`` and ``secret`` are valid while it runs.
    Its port is held until :meth:`stop`."""

    def __init__(self, *, auth: bool = False) -> None:
        self.auth = auth
        self._reservation = ReservedPort()
        self.port = self._reservation.port
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.key = "test-key"
        self.secret = "test-secret"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> S3Server:
        env = dict(os.environ)
        if self.auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(_SETUP_CALLS)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._wait_until_answering()
        if self.auth:
            self._create_credentials()
        return self

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self._proc.returncode} at start")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1):
                    return
            except OSError as exc:
                if time.monotonic() > deadline:
                    message = f"moto server not answering after {_START_TIMEOUT} s"
                    raise TimeoutError(message) from exc
                time.sleep(0.1)

    def _create_credentials(self) -> None:
        import boto3

        iam = boto3.client(
            "iam",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )
        iam.create_user(UserName="distckpt-test")
        access_key = iam.create_access_key(UserName="distckpt-test")["AccessKey"]
        iam.put_user_policy(
            UserName="distckpt-test", PolicyName="all", PolicyDocument=json.dumps(_ALLOW_ALL)
        )
        self.key = access_key["AccessKeyId"]
        self.secret = access_key["SecretAccessKey"]

    def storage_options(self, **extra: Any) -> dict[str, Any]:
        """``storage_options`` for this server (fsspec keys), plus ``extra``."""
        options: dict[str, Any] = {
            "endpoint_url": self.endpoint,
            "key": self.key,
            "secret": self.secret,
            "region": REGION,
        }
        options.update(extra)
        return options

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name by default) and return its name."""
        import boto3

        name = name or f"test-{uuid.uuid4().hex[:16]}"
        boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
        ).create_bucket(Bucket=name)
        return name

    def kill(self) -> None:
        """SIGKILL the server (its objects are lost) and wait for it to be gone."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(10)
        self._proc = None

    def restart(self) -> S3Server:
        """Kill the server if it runs and start a new, empty one on the same port."""
        self.kill()
        return self.start()

    def stop(self) -> None:
        """Kill the server and give its port back."""
        self.kill()
        self._reservation.close()


def aws_environment(server: S3Server) -> dict[str, str]:
    """The standard AWS variables that point a client (the command line's) at ``server``."""
    return {
        "AWS_ENDPOINT_URL": server.endpoint,
        "AWS_ACCESS_KEY_ID": server.key,
        "AWS_SECRET_ACCESS_KEY": server.secret,
        "AWS_REGION": REGION,
    }


def point_the_cli_at(
    server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
    workdir: Path,
    *,
    endpoint: str | None = None,
) -> None:
    """Give this process the AWS variables of ``server`` (its endpoint, or ``endpoint``: a proxy
    in front of it), from which the command line takes its endpoint and credentials as a user's
    shell gives them, and ``workdir`` as its working directory (a command that took an s3:// URL
    for a relative path would create it there, not in the repository)."""
    for name, value in aws_environment(server).items():
        monkeypatch.setenv(name, value)
    if endpoint is not None:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.chdir(workdir)


class FlakyProxy:
    """A TCP proxy in front of a server that answers its first ``failures`` connections with
    ``503 Slow Down`` (what a busy S3 answers) and forwards every later one; with ``cut_after``,
    the first forwarded connection through which more bytes than that come back is cut there (a
    stream broken mid-read). Real sockets for checking how the client copes with such errors."""

    def __init__(self, upstream_port: int, failures: int = 0, cut_after: int | None = None) -> None:
        self.upstream_port = upstream_port
        self.failures = failures
        self.refused = 0
        self.cut_after = cut_after
        self.cuts = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            with self._lock:
                refuse = self.refused < self.failures
                self.refused += refuse
            target = self._refuse if refuse else self._forward
            threading.Thread(target=target, args=(client,), daemon=True).start()

    @staticmethod
    def _refuse(client: socket.socket) -> None:
        with client:
            client.recv(65536)  # the request head (enough for the client to await an answer)
            body = (
                b"<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>"
            )
            client.sendall(
                b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )

    def _forward(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))

        def pipe(source: socket.socket, sink: socket.socket, limit: int | None) -> None:
            passed = 0
            with contextlib.suppress(OSError):
                while data := source.recv(65536):
                    if limit is not None and passed + len(data) > limit and self._cut_now():
                        sink.sendall(data[: limit - passed])
                        break
                    sink.sendall(data)
                    passed += len(data)
            for end in (sink, source):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pipe, args=(upstream, client, self.cut_after), daemon=True).start()
        pipe(client, upstream, None)

    def _cut_now(self) -> bool:
        with self._lock:
            if self.cuts:
                return False
            self.cuts = 1
            return True

    def close(self) -> None:
        self._listener.close()
