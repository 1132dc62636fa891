"""The distckpt command line on an ``s3://`` root while another writer changes it: a request of
the command held by the proxy (tests/s3proxy.py) while the other writer's change is made, so
the race happens every time. The command line's other ``s3://`` cases are in
tests/test_s3_cli.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import distckpt
from distckpt.objstore import ObjectStore
from tests.cli_runner import run_cli
from tests.s3proxy import S3Proxy
from tests.s3server import S3Server, point_the_cli_at

pytest.importorskip("botocore")

COMMIT = "step-00000001/COMMIT"


def test_prune_whose_commit_another_writer_replaced_exits_2_leaving_the_step_committed(
    s3_server: S3Server, s3_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """docs/object-stores.md: a removal whose step's ``COMMIT`` another writer replaced after
    it was read leaves that ``COMMIT`` and raises ``ConcurrentCommit``. ``distckpt prune``,
    which holds no lease, says so with exit status 2 naming the step still committed, and
    removes nothing of it: the step is still committed, and loads."""
    direct = s3_server.storage_options()
    with distckpt.CheckpointManager(s3_url, storage_options=direct) as job:
        job.save(1, {"w": torch.zeros(4)})
        job.save(2, {"w": torch.ones(4)})
    with ObjectStore(s3_url, direct) as store, S3Proxy(s3_server.port) as proxy:
        # the same save, in other bytes: another version (ETag) of the same COMMIT
        other = json.dumps(json.loads(store.get_bytes(COMMIT)), indent=1).encode()
        objects_before = sorted(info.key for info in store.list("step-00000001/"))
        # the command line takes its endpoint from the AWS variables only: here the proxy's
        point_the_cli_at(s3_server, monkeypatch, tmp_path, endpoint=proxy.endpoint)
        # another writer's change, straight to the store
        with proxy.hold("DELETE", COMMIT).changed_meanwhile(lambda: store.put_bytes(COMMIT, other)):
            out = run_cli("prune", s3_url, "--keep-last", "1")
        assert out.returncode == 2, out
        assert out.stderr.startswith("distckpt prune: error: step 1's COMMIT was replaced"), out
        assert "step 1 is still committed" in out.stderr and "Traceback" not in out.stderr
        assert store.get_bytes(COMMIT) == other
        assert sorted(info.key for info in store.list("step-00000001/")) == objects_before
    assert distckpt.load_checkpoint(f"{s3_url}/step-00000001", storage_options=direct).step == 1
