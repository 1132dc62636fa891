"""What the maintenance commands cost on an ``s3://`` root, counted on the wire (tests/s3proxy.py
in front of the moto server), the command line run in this process with the proxy as its
endpoint: ``prune`` checks that its location is a root once, ``delete`` reads its step's
``COMMIT`` twice (before its lease check, and again right before deleting it), and a prune of
no root still exits 2 naming it."""

from __future__ import annotations

import collections
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import distckpt
from distckpt.layout import step_dir_name
from distckpt.objstore import ObjectStore
from tests.cli_runner import run_cli
from tests.s3proxy import S3Proxy
from tests.s3server import S3Server, point_the_cli_at
from tests.test_s3_requests import request_kind

pytest.importorskip("botocore")


@pytest.fixture
def proxy(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[S3Proxy]:
    """A proxy in front of the test server, which the command line reaches through the AWS
    variables; the working directory is the test's own (an s3:// URL taken for a relative path
    would be created there)."""
    with S3Proxy(s3_server.port) as running:
        point_the_cli_at(s3_server, monkeypatch, tmp_path, endpoint=running.endpoint)
        yield running


def _root_of_three_steps(s3_server: S3Server, url: str) -> str:
    with distckpt.CheckpointManager(url, storage_options=s3_server.storage_options()) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": torch.full((4,), float(step))})
    return url


def _run_counted(proxy: S3Proxy, *args: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """The command's outcome and its requests, as ``METHOD URL-path``."""
    mark = len(proxy.log)
    done = run_cli(*args)
    return done, [f"{method} {path}" for method, path, _ in proxy.log[mark:]]


def test_prune_checks_the_root_once(s3_server: S3Server, s3_url: str, proxy: S3Proxy) -> None:
    root = _root_of_three_steps(s3_server, s3_url)
    done, requests = _run_counted(proxy, "prune", root, "--keep-last", "2")
    assert done.returncode == 0, done
    kinds = collections.Counter(request_kind(*request.split(" ", 1)) for request in requests)
    # whether the root is there (a one-key listing) and holds a root (its lease record)
    assert sum("max-keys=1&" in request for request in requests) == 1, requests
    assert kinds["GET .lease"] == 1, kinds


def test_prune_of_a_prefix_holding_nothing_exits_2_naming_the_missing_root(
    s3_url: str, proxy: S3Proxy
) -> None:
    done = run_cli("prune", s3_url, "--keep-last", "1")
    assert done.returncode == 2, done
    assert done.stderr == f"distckpt prune: error: no checkpoint root at {s3_url}\n"


def test_prune_of_a_prefix_holding_no_root_exits_2_saying_it_is_none(
    s3_server: S3Server, s3_url: str, proxy: S3Proxy
) -> None:
    with ObjectStore(s3_url, s3_server.storage_options()) as store:
        store.put_bytes("notes.txt", b"not a checkpoint")
    done = run_cli("prune", s3_url, "--keep-last", "1")
    assert done.returncode == 2, done
    assert done.stderr.startswith(
        f"distckpt prune: error: {s3_url} is not a checkpoint root: it holds no lease record"
    ), done.stderr


def test_delete_reads_its_steps_commit_twice(
    s3_server: S3Server, s3_url: str, proxy: S3Proxy
) -> None:
    """Once before the lease check (the version a removal may delete), once right before the
    delete: a ``COMMIT`` gone or replaced since (a job that took the root meanwhile) keeps the
    set-aside record of the save it names."""
    root = _root_of_three_steps(s3_server, s3_url)
    done, requests = _run_counted(proxy, "delete", root, "2")
    assert done.returncode == 0, done
    commit = f"/{step_dir_name(2)}/COMMIT"
    reads = [request for request in requests if request.startswith("GET") and commit in request]
    assert len(reads) == 2, requests
