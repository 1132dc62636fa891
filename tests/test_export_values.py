"""export() of values a "torch" checkpoint holds that one ``torch.save`` file cannot hold as
they are: views of one storage in two dtypes are written apart, a sub-byte dtype is refused
naming its key, and any other failure of ``torch.save`` is an ``InvalidArgument``."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt import export
from distckpt.errors import InvalidArgument, UnsupportedTensors
from distckpt.objstore import MIN_PART_SIZE, ObjectStore
from distckpt.objurl import S3Url
from tests.s3proxy import S3Proxy
from tests.s3server import S3Server


def save(root: Path, state: dict[str, Any]) -> None:
    with distckpt.CheckpointManager(root, fsync=False) as manager:
        manager.save(1, state)


def test_views_of_one_storage_in_two_dtypes_are_exported_apart(tmp_path: Path) -> None:
    base = torch.arange(8, dtype=torch.float32)
    save(tmp_path / "root", {"w": base, "tail": base[4:], "bits": base.view(torch.int32)})
    got = torch.load(export(tmp_path / "root", tmp_path / "out.pt"), weights_only=True)
    assert torch.equal(got["w"], base) and torch.equal(got["tail"], base[4:])
    assert torch.equal(got["bits"], base.view(torch.int32))
    # the first dtype met keeps its views sharing; the other dtype's is a copy of its own
    assert got["tail"].untyped_storage().data_ptr() == got["w"].untyped_storage().data_ptr()
    assert got["bits"].untyped_storage().data_ptr() != got["w"].untyped_storage().data_ptr()


def test_a_sub_byte_tensor_is_refused_naming_it_before_anything_is_written(
    tmp_path: Path,
) -> None:
    packed = torch.arange(4, dtype=torch.uint8).view(torch.uint4)
    save(tmp_path / "root", {"model": {"w": torch.ones(2), "packed": packed}})
    with pytest.raises(UnsupportedTensors, match=r"model\.packed \(torch\.uint4\)") as refused:
        export(tmp_path / "root", tmp_path / "out" / "model.pt")
    assert refused.value.keys == ("model.packed",)
    assert refused.value.kinds == ("torch.Tensor (torch.uint4)",)
    assert not (tmp_path / "out").exists()


class Handle:
    """Saved without a lock and given one when unpickled (as an object reopening a file or a
    socket): what a checkpoint loaded with allow_pickle=True can hold that pickle cannot write
    again."""

    def __init__(self) -> None:
        self.name = "handle"

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()


def test_a_value_torch_save_cannot_write_is_an_invalid_argument(tmp_path: Path) -> None:
    save(tmp_path / "root", {"handle": Handle(), "w": torch.ones(2)})
    out = tmp_path / "out.pt"
    with pytest.raises(InvalidArgument, match=r"torch\.save cannot write .*lock") as refused:
        export(tmp_path / "root", out, allow_pickle=True)
    assert refused.value.path == str(out)
    assert list(tmp_path.glob("*out.pt*")) == []


def test_an_s3_export_torch_save_cannot_write_is_an_invalid_argument_and_no_object(
    tmp_path: Path, s3_server: S3Server, s3_url: str
) -> None:
    save(tmp_path / "root", {"handle": Handle(), "w": torch.ones(2)})
    options = s3_server.storage_options()
    bucket = f"s3://{S3Url.parse(s3_url).bucket}"
    url = f"{bucket}/exports/model.pt"
    with pytest.raises(InvalidArgument, match=r"torch\.save cannot write .*lock") as refused:
        export(tmp_path / "root", url, allow_pickle=True, storage_options=options)
    assert refused.value.path == url
    with ObjectStore(bucket, options) as store:
        assert list(store.list("exports/")) == []


def test_an_s3_export_whose_upload_fails_raises_the_stores_error(
    tmp_path: Path, s3_server: S3Server, s3_url: str
) -> None:
    """The store refusing every part upload (through a real proxy) fails ``torch.save`` with
    its zip writer's own "unexpected pos": the export raises the store's error (an OSError,
    naming the object), not "a value torch.save cannot write", and leaves no object."""
    save(tmp_path / "root", {"w": torch.ones(MIN_PART_SIZE)})  # four parts
    bucket = f"s3://{S3Url.parse(s3_url).bucket}"
    url = f"{bucket}/exports/model.pt"
    with S3Proxy(s3_server.port) as proxy:
        proxy.fail("PUT", "partNumber=", status=403, times=100)
        options = s3_server.storage_options(
            endpoint_url=proxy.endpoint,
            retries=1,
            default_block_size=MIN_PART_SIZE,
            max_concurrency=1,  # the second part waits for the first: its failure is in write
        )
        with pytest.raises(OSError) as failed:
            export(tmp_path / "root", url, storage_options=options)
    assert not isinstance(failed.value, InvalidArgument), failed.value
    assert "exports/model.pt" in str(failed.value), failed.value
    with ObjectStore(bucket, s3_server.storage_options()) as store:
        assert list(store.list("exports/")) == []
