"""The integrity checks of an ``s3://`` root (docs/object-stores.md, "Integrity"): what a
save uploads is compared with the format's record, and what a read finds is compared with the
manifest, sizes from a listing on every read. Checksums of a corrupted object of the same size
are in ``tests/test_s3_store.py`` and ``tests/test_s3_cli.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt.checksums import crc32
from distckpt.layout import rank_file_name, step_dir_name
from distckpt.manifest import FileRecord
from distckpt.objstore import ObjectStore
from distckpt.storage import open_store
from tests.s3proxy import S3Proxy
from tests.s3server import S3Server
from tests.test_s3_store import _objects, _state

pytest.importorskip("botocore")


def test_a_spool_file_unlike_its_record_is_refused_at_its_upload(
    s3_server: S3Server, s3_url: str, tmp_path: Path
) -> None:
    """ "every uploaded file's CRC-32 is ... compared with the format's record": a file the
    spool did not follow, whose bytes are not those the format recorded, fails the save."""
    store = open_store(s3_url, storage_options=s3_server.storage_options())
    try:
        location = store.begin_staging(1, "attempt").location
        written = b"the bytes the format wrote"
        (tmp_path / "rank-00000.pt").write_bytes(written[::-1])  # same size, other bytes
        record = FileRecord(size=len(written), checksum=f"{crc32(written):08x}", rank=0)
        with pytest.raises(distckpt.CheckpointError, match="changed while it was uploaded"):
            store.publish_shard(location, tmp_path, {"rank-00000.pt": record})
    finally:
        store.close()


def test_a_rank_file_of_another_size_is_refused_at_its_download_and_found_by_its_listing(
    s3_server: S3Server, s3_url: str
) -> None:
    """A rank file replaced after the read's size check (its listing) and before its download
    by a valid file of another size (another save's) is refused as ``CorruptCheckpoint``, not
    loaded: the download's size is compared with the manifest too. Left there, the object
    longer than its manifest says is found by "sizes are checked from a listing on every
    read", without reading checksums, and ``"last"`` loads the step before it."""
    direct = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=direct) as manager:
        manager.save(1, {"w": torch.arange(64.0), "step": 1})  # a longer rank file
        manager.save(2, _state(2))
    longer = _rank_file_of_step(1, s3_url, direct)
    shard = _rank_file_of_step(2, s3_url, direct)
    with S3Proxy(s3_server.port) as proxy:

        def replace() -> None:
            with ObjectStore(s3_url, direct) as store:
                store.put_bytes(shard, store.get_bytes(longer))

        held = proxy.hold("HEAD", "step-00000002/", "rank-00000.pt")
        with held.changed_meanwhile(replace), pytest.raises(distckpt.CorruptCheckpoint):
            distckpt.load_checkpoint(
                f"{s3_url}/step-00000002",
                storage_options=s3_server.storage_options(endpoint_url=proxy.endpoint),
            )
    report = distckpt.verify(s3_url, storage_options=direct, checksums=False)
    assert [c.ok for c in report.checkpoints] == [True, False]
    assert shard in str(report), str(report)
    assert distckpt.load_checkpoint(f"{s3_url}/last", storage_options=direct).step == 1


def _rank_file_of_step(step: int, url: str, options: dict[str, Any]) -> str:
    """The name of rank 0's file of ``step``'s save."""
    (name,) = [
        name
        for name in _objects(url, options)
        if name.startswith(f"{step_dir_name(step)}/") and name.endswith(f"/{rank_file_name(0)}")
    ]
    return name
