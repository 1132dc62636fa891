"""distckpt.objstore against a real S3-protocol server (moto in server mode, tests/s3server.py)."""

from __future__ import annotations

import io
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import distckpt
from distckpt import CheckpointError, InvalidArgument
from distckpt.checksums import ChecksumWriter, crc32
from distckpt.errors import (
    ObjectExists,
    ObjectNotFound,
    ObjectStoreError,
    PreconditionFailed,
    StoreAccessDenied,
    StoreUnavailable,
)
from distckpt.objstore import MIN_PART_SIZE, ObjectStore
from distckpt.objurl import S3Url, is_s3_url
from tests.ports import ReservedPort
from tests.ranks import run_ranks, values
from tests.s3proxy import S3Proxy
from tests.s3server import FlakyProxy, S3Server

pytest.importorskip("botocore")

FAST_FAILING = {"retries": 2, "connect_timeout": 2, "read_timeout": 5}


def test_s3_urls_parse_into_bucket_and_prefix() -> None:
    assert S3Url.parse("s3://bucket/runs/exp1/") == S3Url("bucket", "runs/exp1")
    assert S3Url.parse("s3://bucket") == S3Url("bucket", "")
    assert S3Url.parse("s3://bucket/a").key("step-1/x") == "a/step-1/x"
    assert S3Url.parse("s3://bucket").relative("x") == "x"
    assert str(S3Url("bucket", "a/b")) == "s3://bucket/a/b"
    assert is_s3_url("s3://b/p") and not is_s3_url("runs/s3:") and not is_s3_url(Path("s3:"))
    for bad in ("s3://", "s3:///p", "s3://b/a//c", "s3://b/../c", "runs/x"):
        with pytest.raises(InvalidArgument):
            S3Url.parse(bad)


def test_unknown_storage_option_is_refused(s3_url: str) -> None:
    with pytest.raises(InvalidArgument, match="endpoint"):
        ObjectStore(s3_url, {"endpoint": "http://typo"})


def _race_to_commit(rank: int, world_size: int, url: str, options: dict, rounds: int) -> list:
    import torch.distributed as dist

    won = []
    with ObjectStore(url, options) as store:
        for round_ in range(rounds):
            dist.barrier()  # all ranks put the same commit object at once
            try:
                store.put_bytes(f"step-{round_}/COMMIT", f"rank {rank}".encode(), if_absent=True)
                won.append(round_)
            except ObjectExists:
                pass
    return won


def test_conditional_create_is_exclusive_across_processes(s3_server: S3Server, s3_url: str) -> None:
    rounds = 8
    wins = values(run_ranks(_race_to_commit, 2, s3_url, s3_server.storage_options(), rounds))
    assert sorted(wins[0] + wins[1]) == list(range(rounds)), wins
    with ObjectStore(s3_url, s3_server.storage_options()) as store:
        for round_ in range(rounds):
            winner = 0 if round_ in wins[0] else 1
            assert store.get_bytes(f"step-{round_}/COMMIT") == f"rank {winner}".encode()


def test_pointer_compare_and_swap_refuses_a_stale_etag(s3_server: S3Server, s3_url: str) -> None:
    with ObjectStore(s3_url, s3_server.storage_options()) as store:
        first = store.put_bytes("last", b"step-1\n", if_absent=True)
        second = store.put_bytes("last", b"step-2\n", if_match=first)
        with pytest.raises(PreconditionFailed, match="last"):
            store.put_bytes("last", b"step-3\n", if_match=first)  # a writer that read step-1
        assert store.get_bytes("last") == b"step-2\n"
        assert store.head("last").etag == second
        store.delete(["last"])
        with pytest.raises(PreconditionFailed):
            store.put_bytes("last", b"step-4\n", if_match=second)  # gone: also stale
        with pytest.raises(InvalidArgument):
            store.put_bytes("last", b"x", if_absent=True, if_match=second)


def test_multipart_stream_computes_fsutil_checksum(
    s3_server: S3Server, s3_url: str, tmp_path: Path
) -> None:
    data = os.urandom(20 << 20)
    chunks = [data[i : i + 777_777] for i in range(0, len(data), 777_777)]
    options = s3_server.storage_options(default_block_size=MIN_PART_SIZE, max_concurrency=3)
    with ObjectStore(s3_url, options) as store:
        with store.open_write("step-1/rank-00000.pt", if_absent=True) as writer:
            for chunk in chunks:
                writer.write(chunk)
            assert writer.tell() == len(data)
        with ChecksumWriter(tmp_path / "local", fsync=False) as local:
            for chunk in chunks:
                local.write(chunk)
        assert writer.checksum == local.checksum == f"{crc32(data):08x}"
        assert writer.etag is not None and writer.etag.endswith('-4"')  # 4 parts of 5 MiB
        info = store.head("step-1/rank-00000.pt")
        assert (info.size, info.etag) == (len(data), writer.etag)
        assert info.crc32 == writer.checksum  # the store's own full-object CRC-32
        assert store.get_bytes("step-1/rank-00000.pt") == data
        assert store.get_bytes("step-1/rank-00000.pt", start=5, end=9) == data[5:9]
        # the exclusive create holds for multipart uploads too
        with (
            pytest.raises(ObjectExists),
            store.open_write("step-1/rank-00000.pt", if_absent=True) as again,
        ):
            again.write(data[: 6 << 20])


def test_torch_save_and_load_stream_through_the_store(s3_server: S3Server, s3_url: str) -> None:
    state = {"w": torch.randn(1_500_000), "step": 7, "nested": [torch.arange(10)]}
    options = s3_server.storage_options(default_block_size=MIN_PART_SIZE)
    with ObjectStore(s3_url, options) as store:
        with store.open_write("step-7/rank-00000.pt") as writer:
            torch.save(state, writer)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        assert writer.size == len(buffer.getvalue())
        assert writer.checksum == f"{crc32(buffer.getvalue()):08x}"
        with store.open_read("step-7/rank-00000.pt") as reader:
            loaded = torch.load(reader, weights_only=True)
            reader.seek(-4, os.SEEK_END)
            assert reader.read() == buffer.getvalue()[-4:]
        assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 7
        assert torch.equal(loaded["nested"][0], state["nested"][0])


def test_reader_notices_a_replaced_object(s3_server: S3Server, s3_url: str) -> None:
    with ObjectStore(s3_url, s3_server.storage_options()) as store:
        store.put_bytes("x", b"old contents")
        with store.open_read("x") as reader:
            store.put_bytes("x", b"new contents")
            with pytest.raises(PreconditionFailed):
                reader.read()


def test_a_failed_write_publishes_nothing(s3_server: S3Server, s3_url: str) -> None:
    options = s3_server.storage_options(default_block_size=MIN_PART_SIZE)
    with ObjectStore(s3_url, options) as store:
        # one PUT; a multipart upload with one part sent. More parts would only take longer:
        # the abort goes out before the parts in flight are answered, the store then refuses
        # each late part (moto answers 500, which the client tries 4 times more), and the
        # writer waits for those uploads as it shuts down.
        for size in (100, MIN_PART_SIZE + 1):
            with pytest.raises(RuntimeError), store.open_write(f"half-{size}") as writer:
                writer.write(os.urandom(size))
                raise RuntimeError("the serializer failed")
            with pytest.raises(ObjectNotFound):
                store.head(f"half-{size}")
        assert list(store.list()) == []


def test_list_paginates_and_delete_removes_batches(s3_server: S3Server, s3_url: str) -> None:
    with ObjectStore(s3_url, s3_server.storage_options()) as store:
        names = [f"step-{i // 5}/rank-{i % 5:05d}.pt" for i in range(40)]
        for name in names:
            store.put_bytes(name, name.encode())
        store.put_bytes("last", b"step-7\n")
        outside = ObjectStore(s3_url + "-other", s3_server.storage_options())
        outside.put_bytes("step-0/keep", b"not under the root's prefix")
        listed = list(store.list("step-", page_size=7))
        assert [info.key for info in listed] == sorted(names)
        assert all(info.size == len(info.key) for info in listed)
        assert [info.key for info in store.list("step-3/", page_size=2)] == names[15:20]
        store.delete([*names, "never-existed"])
        assert [info.key for info in store.list()] == ["last"]
        assert [info.key for info in outside.list()] == ["step-0/keep"]
        outside.close()


def test_missing_object_is_object_not_found(s3_server: S3Server, s3_url: str) -> None:
    with ObjectStore(s3_url, s3_server.storage_options()) as store:
        with pytest.raises(ObjectNotFound, match="nothing-here") as raised:
            store.get_bytes("nothing-here")
        assert isinstance(raised.value, FileNotFoundError)
        assert isinstance(raised.value, CheckpointError)


def test_server_killed_mid_upload_fails_fast_and_clearly() -> None:
    server = S3Server().start()
    try:
        url = f"s3://{server.create_bucket()}/ckpt"
        options = server.storage_options(default_block_size=MIN_PART_SIZE, **FAST_FAILING)
        store = ObjectStore(url, options)
        writer = store.open_write("step-1/rank-00000.pt")
        writer.write(os.urandom(6 << 20))  # the first part is on its way
        server.kill()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=rf"127\.0\.0\.1:{server.port}") as raised:
            writer.write(os.urandom(6 << 20))
            writer.close()
        assert time.monotonic() - started < 30
        assert "step-1/rank-00000.pt" in str(raised.value)
        assert isinstance(raised.value, ConnectionError)
        writer.abort()  # what a caller does with a failed writer; the store is gone anyway
        store.close()

        # the port stays the server's while it is down: no other process can take it
        with socket.socket() as other, pytest.raises(OSError, match="in use"):
            other.bind(("127.0.0.1", server.port))
        server.restart()  # an empty store again, on the same endpoint
        url = f"s3://{server.create_bucket()}/ckpt"
        with ObjectStore(url, server.storage_options()) as again:
            again.put_bytes("x", b"1")
            assert again.get_bytes("x") == b"1"
    finally:
        server.stop()


@pytest.mark.parametrize(
    "config_kwargs",
    [{}, {"retries": {"mode": "standard", "total_max_attempts": 3}}],
    ids=["retries", "retries-in-config_kwargs"],
)
def test_a_failed_multipart_upload_is_aborted_in_one_attempt(
    s3_server: S3Server, s3_url: str, config_kwargs: dict[str, object]
) -> None:
    """The abort after a part failed all its attempts is best effort: on a store that keeps
    failing it must not take the whole retry budget again (the upload left is reclaimed by
    the bucket's lifecycle rule), however the retries were given."""
    with S3Proxy(s3_server.port) as proxy:
        proxy.fail("PUT", "partNumber=", times=100)
        proxy.fail("DELETE", "uploadId=", times=100)
        options = s3_server.storage_options(
            endpoint_url=proxy.endpoint,
            retries=2,
            default_block_size=MIN_PART_SIZE,
            config_kwargs=config_kwargs,
        )
        with (
            ObjectStore(s3_url, options) as store,
            pytest.raises(StoreUnavailable),
            store.open_write("never") as writer,
        ):
            writer.write(bytes(MIN_PART_SIZE + 1))
        aborts = [path for method, path, _ in proxy.log if method == "DELETE"]
        assert len(aborts) == 1, proxy.log


def test_threads_asking_at_once_share_one_cleanup_client(s3_url: str) -> None:
    """Writers aborting at once each ask for the cleanup client: one is made, and close()
    closes it. (Python 3.11's functools.cached_property locked too; 3.12's does not.)"""
    store = ObjectStore(s3_url, {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"})
    barrier = threading.Barrier(8)

    def ask() -> int:
        barrier.wait()
        return id(store.cleanup_client)

    with store, ThreadPoolExecutor(8) as pool:
        assert len(set(pool.map(lambda _: ask(), range(8)))) == 1


def test_a_request_the_store_does_not_implement_is_named_so_and_not_retried(
    s3_server: S3Server, s3_url: str
) -> None:
    """A store without conditional writes answers 501: not a store that is down."""
    with S3Proxy(s3_server.port) as proxy:
        proxy.fail("PUT", "/COMMIT", status=501, times=100)
        options = s3_server.storage_options(endpoint_url=proxy.endpoint, retries=3)
        refusal = pytest.raises(ObjectStoreError, match="does not implement")
        with ObjectStore(s3_url, options) as store, refusal as refused:
            store.put_bytes("COMMIT", b"1", if_absent=True)
        assert not isinstance(refused.value, StoreUnavailable)
        # botocore never retried a 501 (this held before too): the message and the class above
        # are what tell it from a store that is down
        assert len(proxy.log) == 1, proxy.log


def test_transient_errors_are_retried_then_reported(s3_server: S3Server, s3_url: str) -> None:
    proxy = FlakyProxy(s3_server.port, failures=2)
    try:
        options = s3_server.storage_options(endpoint_url=proxy.endpoint, retries=4)
        with ObjectStore(s3_url, options) as store:
            store.put_bytes("through-retries", b"1")  # two 503s, then through
            assert proxy.refused == 2
            assert store.get_bytes("through-retries") == b"1"
        proxy.failures = proxy.refused + 10
        options = s3_server.storage_options(endpoint_url=proxy.endpoint, retries=3)
        refused = pytest.raises(StoreUnavailable, match=r"SlowDown.*after retries")
        with ObjectStore(s3_url, options) as store, refused:
            store.put_bytes("never", b"1")
        assert proxy.refused == 2 + 3  # three attempts, all refused
        options = s3_server.storage_options(endpoint_url=proxy.endpoint, retries=1)
        with ObjectStore(s3_url, options) as store, pytest.raises(StoreUnavailable) as once:
            store.put_bytes("never", b"1")
        assert "SlowDown" in str(once.value) and "retries" not in str(once.value)
    finally:
        proxy.close()


def test_a_stream_broken_mid_read_is_resumed(s3_server: S3Server, s3_url: str) -> None:
    data = os.urandom(1 << 20)
    with ObjectStore(s3_url, s3_server.storage_options()) as store:
        store.put_bytes("shard", data)
    proxy = FlakyProxy(s3_server.port, cut_after=200_000)
    try:
        options = s3_server.storage_options(endpoint_url=proxy.endpoint)
        with ObjectStore(s3_url, options) as store, store.open_read("shard") as reader:
            assert reader.read() == data
        assert proxy.cuts == 1
    finally:
        proxy.close()


def test_list_and_delete_past_a_page_and_a_batch(s3_server: S3Server, s3_url: str) -> None:
    # Pages and batches of 10 take the same paths as the defaults' 1000 (the store's limits)
    # at a fortieth of the puts: three pages, three delete batches, the last one partial.
    names = [f"step-1/part-{i:05d}" for i in range(25)]
    with ObjectStore(s3_url, s3_server.storage_options()) as store:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda name: store.put_bytes(name, b""), names))
        assert [info.key for info in store.list("step-1/", page_size=10)] == names
        store.delete((info.key for info in store.list(page_size=10)), batch_size=10)
        assert list(store.list()) == []


def test_unreachable_endpoint_fails_fast() -> None:
    with ReservedPort() as closed:  # nothing listens there, and no other process can
        options = {"endpoint_url": f"http://127.0.0.1:{closed.port}", "key": "k", "secret": "s"}
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="unreachable"):
            ObjectStore("s3://bucket/unreachable", {**options, **FAST_FAILING}).head("x")
        assert time.monotonic() - started < 30


def test_refused_credentials_are_a_clear_error() -> None:
    server = S3Server(auth=True).start()
    try:
        url = f"s3://{server.create_bucket()}/ckpt"
        with ObjectStore(url, server.storage_options()) as store:
            store.put_bytes("x", b"1", if_absent=True)
        for wrong in ({"secret": "wrong"}, {"key": "AKIANOSUCHKEY"}):
            store = ObjectStore(url, {**server.storage_options(), **wrong})
            started = time.monotonic()
            with pytest.raises(StoreAccessDenied, match=server.endpoint) as raised:
                store.get_bytes("x")
            assert time.monotonic() - started < 10  # refusals are not retried
            assert isinstance(raised.value, PermissionError)
            store.close()
    finally:
        server.stop()


def test_no_credentials_anywhere_is_access_denied(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _clear_aws_environment(monkeypatch, tmp_path)
    options = {"endpoint_url": s3_server.endpoint}
    with pytest.raises(StoreAccessDenied, match="credentials"):
        ObjectStore("s3://bucket/x", options).head("x")


def _clear_aws_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup


def test_configuration_from_aws_environment_variables(
    s3_server: S3Server, s3_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _clear_aws_environment(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    with ObjectStore(s3_url) as store:
        assert store.endpoint == s3_server.endpoint
        assert store.client.meta.region_name == "eu-west-1"
        store.put_bytes("from-env", b"1")
        assert [info.key for info in store.list()] == ["from-env"]


def test_reader_of_an_object_deleted_after_open_finds_it_gone(
    s3_server: S3Server, s3_url: str
) -> None:
    # gone, not replaced: the same error as when it was gone at open, so that a reader of a
    # checkpoint deleted meanwhile sees a missing file (and resolves again), not a lost race
    with ObjectStore(s3_url, s3_server.storage_options()) as store:
        store.put_bytes("x", b"contents")
        with store.open_read("x") as reader:
            store.delete(["x"])
            with pytest.raises(ObjectNotFound, match="x"):
                reader.read()


@pytest.mark.parametrize(
    ("url", "options", "error"),
    [
        ("s3://{bucket}/ckpt", {"secret": None}, StoreAccessDenied),  # a key without its secret
        ("s3://{bucket}/ckpt", {"endpoint_url": "minio:9000"}, InvalidArgument),  # no scheme
        ("s3://{bucket}/ckpt", {"retries": 0}, InvalidArgument),
        ("s3://bad!bucket/ckpt", {}, InvalidArgument),
        ("s3://my bucket/ckpt", {}, InvalidArgument),
    ],
    ids=["key-without-secret", "endpoint-not-a-url", "no-attempts", "bucket-!", "bucket-space"],
)
def test_a_configuration_error_raises_its_documented_class(
    s3_server: S3Server, url: str, options: dict[str, object], error: type[Exception]
) -> None:
    # from the store itself and through a manager (whose start reports it unchanged)
    url = url.format(bucket=s3_server.create_bucket())
    storage_options = {**s3_server.storage_options(), **options}
    with pytest.raises(error), ObjectStore(url, storage_options) as store:
        next(iter(store.list()), None)
    with pytest.raises(error), distckpt.CheckpointManager(url, storage_options=storage_options):
        pass


#: Values of each option the client cannot use: of another type (a bool, a float count, a
#: string, numeric or not) or out of range.
@pytest.mark.parametrize("in_parts", [False, True], ids=["copy-object", "upload-part-copy"])
def test_copy_makes_the_same_object_inside_the_store(
    s3_server: S3Server, s3_url: str, monkeypatch: pytest.MonkeyPatch, in_parts: bool
) -> None:
    if in_parts:
        # The limits lowered so that a small object takes the path of one over 5 GiB: parts
        # of S3's smallest size, the last one shorter.
        monkeypatch.setattr("distckpt.objstore.MAX_COPY_OBJECT_BYTES", MIN_PART_SIZE)
        monkeypatch.setattr("distckpt.objstore.COPY_PART_BYTES", MIN_PART_SIZE)
    data = os.urandom(2 * MIN_PART_SIZE + 12345)
    with ObjectStore(s3_url, s3_server.storage_options()) as store:
        store.put_bytes("a/source", data)
        store.put_bytes("b/target", b"replaced")
        store.copy("a/source", "b/target", len(data))
        assert store.get_bytes("b/target") == data
        assert store.get_bytes("a/source") == data
        with pytest.raises(ObjectNotFound):
            store.copy("a/missing", "b/other", 10)


def test_the_clients_of_a_process_share_botocores_data_loader(
    s3_server: S3Server, s3_url: str
) -> None:
    """Each store's client has a session of its own, but not a loader of its own: a new loader
    parses botocore's endpoint and service model files again for every client. (The client
    keeps its loader in a private attribute; nothing public shows which loader it used.)"""
    with (
        ObjectStore(s3_url, s3_server.storage_options()) as first,
        ObjectStore(s3_url, s3_server.storage_options()) as second,
    ):
        assert first.client._loader is second.client._loader
        first.put_bytes("shared-loader", b"x")
        assert second.get_bytes("shared-loader") == b"x"
