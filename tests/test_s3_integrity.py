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
from distckpt.manifest import FileRecord
from distckpt.objstore import ObjectStore
from distckpt.storage import open_store
from tests.s3proxy import S3Proxy
from tests.s3server import S3Server
from tests.test_s3_failures import _with_step_2_deleted_between_head_and_get
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
    shard = _rank_file_of_step_2(s3_url, options)
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


def test_a_checkpoint_replaced_while_it_is_read_is_read_again_as_replaced(
    s3_server: S3Server, s3_url: str
) -> None:
    """ "a reader sees the old checkpoint or the new one": a save that an overwrite replaced
    while a restore read it (its objects gone under the reader) has vanished, not turned
    damaged; the restore reads the step again, the save ``COMMIT`` names now."""

    def restore_last(options: dict[str, Any]) -> distckpt.Checkpoint | None:
        with distckpt.CheckpointManager(s3_url, storage_options=options, read_only=True) as mgr:
            return mgr.restore("last", state={"w": torch.zeros(4), "step": 0})

    restored, _ = _with_step_2_deleted_between_head_and_get(
        s3_server, s3_url, restore_last, replaced=True
    )
    assert restored is not None and restored.step == 2
    assert torch.equal(restored.state["w"], _state(2)["w"])


def test_an_object_replaced_by_one_of_another_size_before_its_download_is_refused(
    s3_server: S3Server, s3_url: str
) -> None:
    """A rank file replaced after the read's size check (its listing) and before its download
    by a valid file of another size (another save's) is refused as ``CorruptCheckpoint``, not
    loaded: the download's size is compared with the manifest too."""
    direct = s3_server.storage_options()
    other_root = f"{s3_url}-other"
    with distckpt.CheckpointManager(other_root, storage_options=direct) as other:
        other.save(2, {"w": torch.arange(64.0), "step": 2})
    with ObjectStore(other_root, direct) as store:
        replacement = store.get_bytes(_rank_file_of_step_2(other_root, direct))
    with distckpt.CheckpointManager(s3_url, storage_options=direct) as manager:
        manager.save(2, _state(2))
    with S3Proxy(s3_server.port) as proxy:

        def replace() -> None:
            name = _rank_file_of_step_2(s3_url, direct)
            with ObjectStore(s3_url, direct) as store:
                store.put_bytes(name, replacement)

        held = proxy.hold("HEAD", "step-00000002/", "rank-00000.pt")
        with held.changed_meanwhile(replace), pytest.raises(distckpt.CorruptCheckpoint):
            distckpt.load_checkpoint(
                f"{s3_url}/step-00000002",
                storage_options=s3_server.storage_options(endpoint_url=proxy.endpoint),
            )


def _rank_file_of_step_2(url: str, options: dict[str, Any]) -> str:
    """The name of rank 0's file of step 2's save."""
    (name,) = [
        name
        for name in _objects(url, options)
        if name.startswith("step-00000002/") and name.endswith("/rank-00000.pt")
    ]
    return name
