"""Reads of an ``s3://`` root through a store that fails some of them (the real proxy of
tests/s3proxy.py in front of a real moto server): an answer broken off mid-body is asked for
again, a published save's claim delete is retried, an open whose manifest reads fail gives up
once the reads in flight did, and ``verify`` raises a store's failure
instead of reporting a sound checkpoint damaged, as it raises a disk's I/O error."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import distckpt
from distckpt import StoreAccessDenied, StoreUnavailable
from distckpt.layout import MANIFEST_NAME
from distckpt.objstore import ObjectStore
from distckpt.storage.s3_root import DOWNLOAD_CONCURRENCY
from tests.cli_runner import run_cli
from tests.s3proxy import S3Proxy
from tests.s3server import S3Server, point_the_cli_at
from tests.test_s3_requests import _copy_as_steps, _counted, _one_saved_step

pytest.importorskip("botocore")


@pytest.fixture(scope="module")
def saved_root(s3_server: S3Server) -> str:
    """A root holding steps 1 and 2 (``w`` full of the step), which this module's tests only
    read."""
    url = f"s3://{s3_server.create_bucket()}/ckpt"
    with distckpt.CheckpointManager(url, storage_options=s3_server.storage_options()) as mgr:
        for step in (1, 2):
            mgr.save(step, {"w": torch.full((4,), float(step))})
    return url


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[S3Proxy]:
    with S3Proxy(s3_server.port) as proxy:
        yield proxy


@pytest.mark.parametrize("read", ["/last", "/COMMIT", "/manifest.json"])
def test_a_whole_object_read_broken_off_mid_body_is_read_again(
    s3_server: S3Server, saved_root: str, proxy: S3Proxy, read: str
) -> None:
    """The pointer, the commit record and the manifest are each read whole in one GET: the
    client's retries end once its answer's head arrived, so the body breaking off must not
    fail the restore (a rank file's stream is reopened the same way)."""
    cut = proxy.cut("GET", read)
    options = s3_server.storage_options(endpoint_url=proxy.endpoint)
    loaded = distckpt.load_checkpoint(saved_root, storage_options=options)
    assert cut.arrived.is_set()  # the proxy did cut one answer short
    assert loaded.step == 2 and torch.equal(loaded.state["w"], torch.full((4,), 2.0))


def test_a_read_broken_off_every_time_fails_after_the_attempts_given(
    s3_server: S3Server, saved_root: str, proxy: S3Proxy
) -> None:
    proxy.cut("GET", "/last", times=3)
    options = s3_server.storage_options(endpoint_url=proxy.endpoint, retries=3)
    with ObjectStore(saved_root, options) as store:
        with pytest.raises(StoreUnavailable, match="/last"):
            store.get_bytes("last")
        assert store.get_bytes("last") == b"step-00000002\n"  # the fourth answer is whole
    assert sum(path.endswith("/last") for _, path, _ in proxy.log) == 4


def test_a_read_broken_off_and_refused_in_turn_sends_no_more_gets_than_the_attempts(
    s3_server: S3Server, saved_root: str, proxy: S3Proxy
) -> None:
    """Asking again after a cut answer shares the client's budget with botocore's retries:
    not a whole budget for each time the answer broke off."""
    for _ in range(3):
        proxy.cut("GET", "/last")
        proxy.fail("GET", "/last", status=503, times=2)
    options = s3_server.storage_options(endpoint_url=proxy.endpoint, retries=3)
    with ObjectStore(saved_root, options) as store, pytest.raises(StoreUnavailable, match="/last"):
        store.get_bytes("last")
    assert sum(path.endswith("/last") for _, path, _ in proxy.log) == 3, proxy.log


def test_a_successful_saves_claim_is_deleted_despite_one_transient_error(
    s3_server: S3Server, proxy: S3Proxy
) -> None:
    """Only a failed save's discard tries each request once: a save that was published
    retries its claim's delete, which must not be left for gc by a single 503."""
    url = f"s3://{s3_server.create_bucket()}/ckpt"
    options = s3_server.storage_options(endpoint_url=proxy.endpoint)
    with distckpt.CheckpointManager(url, storage_options=options) as manager:
        proxy.fail("POST", "?delete", status=503, times=1)
        manager.save(2, {"w": torch.ones(3)})
        with ObjectStore(url, s3_server.storage_options()) as store:
            assert list(store.list(".writers/")) == []
    assert [status for method, _, status in proxy.log if method == "POST"][:2] == [503, 200]


@pytest.mark.parametrize("what", ["rank-00000.pt", "manifest.json"])
@pytest.mark.parametrize(
    ("status", "error"), [(503, StoreUnavailable), (403, StoreAccessDenied)], ids=["503", "403"]
)
def test_verify_raises_a_failing_stores_error_instead_of_reporting_damage(
    s3_server: S3Server,
    saved_root: str,
    proxy: S3Proxy,
    what: str,
    status: int,
    error: type[Exception],
) -> None:
    """Whether the checkpoint is sound is unknown when the store fails its reads: ``verify``
    raises the store's error (an ``OSError``), of a root and of one checkpoint alike."""
    proxy.fail("GET", what, status=status, times=100)
    options = s3_server.storage_options(endpoint_url=proxy.endpoint, retries=1)
    for path in (saved_root, f"{saved_root}/step-00000002"):
        with pytest.raises(error, match=what):
            distckpt.verify(path, storage_options=options)


def test_verify_reports_a_file_replaced_while_read_as_damage(
    s3_server: S3Server, saved_root: str, proxy: S3Proxy
) -> None:
    """A ``412`` to a read pinned to the ETag the listing gave (``PreconditionFailed``) says
    the file is not the one listed: the store answered, and the answer is about the
    checkpoint."""
    proxy.fail("GET", "step-00000002", "rank-00000.pt", status=412, times=100)
    options = s3_server.storage_options(endpoint_url=proxy.endpoint, retries=1)
    report = distckpt.verify(f"{saved_root}/step-00000002", storage_options=options)
    assert not report.ok and "rank-00000.pt" in str(report), report


def test_distckpt_verify_of_a_store_refusing_reads_is_an_error_not_a_broken_checkpoint(
    s3_server: S3Server,
    saved_root: str,
    proxy: S3Proxy,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    point_the_cli_at(s3_server, monkeypatch, tmp_path, endpoint=proxy.endpoint)
    proxy.fail("GET", "rank-00000.pt", status=403, times=100)  # not retried: a quick test
    result = run_cli("verify", saved_root)
    assert result.returncode == 2, result  # an error, not exit status 1 (a problem found)
    assert "BROKEN" not in result.stdout and "rank-00000.pt" in result.stderr, result


def test_an_open_whose_manifest_reads_fail_raises_once_the_reads_begun_gave_up(
    s3_server: S3Server, s3_url: str, proxy: S3Proxy
) -> None:
    """Every ``GET`` of a manifest is answered 503 (the store failing after the open's
    listing): the pointers' update gives up once the reads in flight (four steps at a time)
    used their attempts, the other steps' reads not begun, nor each step's read again by its
    check (12 steps would cost 12 reads' attempts, twice); the start's search for the newest
    step then reads one manifest, and the open raises :class:`StoreUnavailable`."""
    direct = _one_saved_step(s3_server, s3_url)
    _copy_as_steps(direct, 1, range(2, 13))
    direct.close()
    attempts = 2
    proxy.fail("GET", MANIFEST_NAME, status=503, times=10**6)
    options = s3_server.storage_options(endpoint_url=proxy.endpoint, retries=attempts)
    with pytest.raises(StoreUnavailable):
        distckpt.CheckpointManager(s3_url, storage_options=options)
    sent = _counted(proxy, 0)["GET manifest.json"]
    assert 0 < sent <= (DOWNLOAD_CONCURRENCY + 1) * attempts, sent
