"""tests/filesystems.py's ``not_mountable_reason``: /dev/fuse is asked for only by the mounts
that go through FUSE. Run in a mount namespace of its own whose /dev has no fuse device (a
tmpfs moved over /dev there; this machine's /dev is untouched)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: sh script: a /dev of only null, zero, random and urandom over /dev, then run "$@"
WITHOUT_DEV_FUSE = """set -e
new=$(mktemp -d)
mount -t tmpfs tmpfs "$new"
for name in null zero urandom random; do
  touch "$new/$name"
  mount --bind "/dev/$name" "$new/$name"
done
mount --move "$new" /dev
exec "$@"
"""

REASONS = """
from pathlib import Path
from tests.filesystems import not_mountable_reason
assert not Path("/dev/fuse").exists()
print(not_mountable_reason(("mkfs.ext4",)))
print(not_mountable_reason(("bindfs",)))
"""


def test_only_fuse_mounts_need_dev_fuse() -> None:
    if os.geteuid() != 0:
        pytest.skip("a mount namespace of its own needs root")
    in_a_namespace = ["unshare", "--mount", "--propagation", "private"]
    done = subprocess.run(
        [*in_a_namespace, "sh", "-c", WITHOUT_DEV_FUSE, "sh", sys.executable, "-c", REASONS],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.fspath(REPO)},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    ext4, bindfs = done.stdout.splitlines()
    assert ext4 == "None"
    assert "/dev/fuse" in bindfs
