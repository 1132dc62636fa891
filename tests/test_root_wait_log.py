"""What a start that waits for a held root logs (``wait_for_root``): one line as it finds the
root held, naming the holder and the longest wait, nothing per poll, and one line once it got
the root; nothing at all when the root is free. On a root directory and an ``s3://`` root,
the holder a second manager of this process (its lease excludes the waiting one as another
job's would)."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import distckpt

STARTUP = 60.0  # seconds a start may take on a loaded machine
HELD = "is held by"
GOT = "after waiting"


def _root_and_options(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> tuple:
    if where == "s3":
        server = request.getfixturevalue("s3_server")
        return request.getfixturevalue("s3_url"), {"storage_options": server.storage_options()}
    return str(tmp_path / "ckpt"), {}


def _messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "distckpt" and text in r.getMessage()
    ]


@pytest.mark.parametrize("where", ["posix", "s3"])
def test_a_start_that_waits_for_a_held_root_says_so_once_and_when_it_got_it(
    where: str, tmp_path: Path, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="distckpt")
    root, options = _root_and_options(where, tmp_path, request)
    holder = distckpt.CheckpointManager(root, **options)
    assert _messages(caplog, HELD) == []  # a free root: no word of waiting
    opened: list[Any] = []

    def wait_for_the_root() -> None:
        try:
            opened.append(distckpt.CheckpointManager(root, wait_for_root=300, **options))
        except BaseException as exc:  # reported by the assertions below
            opened.append(exc)

    waiting = threading.Thread(target=wait_for_the_root)
    try:
        waiting.start()
        deadline = time.monotonic() + STARTUP
        while not _messages(caplog, HELD) and waiting.is_alive():
            assert time.monotonic() < deadline, "no line said that the root is held"
            time.sleep(0.02)
        (said,) = _messages(caplog, HELD)
        assert said.startswith(f"checkpoint root {root} is held by "), said
        assert f", pid {os.getpid()}" in said, said  # the holder's describe()
        assert "waiting up to 300 s for it to end" in said, said
        assert opened == [] and waiting.is_alive(), opened  # waiting, neither refused nor in
        # Polls go on until the holder lets go: each would have said it again here.
        for _ in range(3):
            time.sleep(0.6)  # longer than a poll of either store
        assert len(_messages(caplog, HELD)) == 1, _messages(caplog, HELD)
    finally:
        holder.close()
        waiting.join(STARTUP)
    assert not waiting.is_alive()
    (manager,) = opened
    assert isinstance(manager, distckpt.CheckpointManager), manager
    manager.close()
    (got,) = _messages(caplog, GOT)
    assert got.startswith(f"got checkpoint root {root} after waiting "), got
    assert len(_messages(caplog, HELD)) == 1
