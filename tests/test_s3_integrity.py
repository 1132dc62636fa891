"""The integrity checks of an ``s3://`` root (docs/object-stores.md, "Integrity"): what a
save uploads is compared with the format's record, and what a read finds is compared with the
manifest, sizes from a listing on every read. Checksums of a corrupted object of the same size
are in ``tests/test_s3_store.py`` and ``tests/test_s3_cli.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

import distckpt
from distckpt.checksums import crc32
from distckpt.manifest import FileRecord
from distckpt.objstore import ObjectStore
from distckpt.storage import open_store
from tests.s3server import S3Server
from tests.test_s3_store import _objects, _state

pytest.importorskip("botocore")


def test_an_object_grown_in_the_store_fails_the_size_check_and_last_falls_back(
    s3_server: S3Server, s3_url: str
) -> None:
    """ "sizes are checked from a listing on every read": an object longer than its manifest
    says is found without reading checksums, and ``"last"`` loads the step before it."""
    options = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=options) as manager:
        manager.save(1, _state(1))
        manager.save(2, _state(2))
    (shard,) = [
        name
        for name in _objects(s3_url, options)
        if name.startswith("step-00000002/") and name.endswith("/rank-00000.pt")
    ]
    with ObjectStore(s3_url, options) as store:
        store.put_bytes(shard, store.get_bytes(shard) + b"appended")
    report = distckpt.verify(s3_url, storage_options=options, checksums=False)
    assert [c.ok for c in report.checkpoints] == [True, False]
    assert shard in str(report), str(report)
    loaded = distckpt.load_checkpoint(f"{s3_url}/last", storage_options=options)
    assert loaded.step == 1


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
