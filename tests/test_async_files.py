"""An async save's extra files given as paths hold their content as of the save() call, even
when the file changes or goes away before the background thread writes the checkpoint."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import pytest
import torch

import distckpt
from tests.test_coord import TIMEOUT


@contextlib.contextmanager
def _extra_files_held(
    manager_made: Callable[[], distckpt.CheckpointManager],
) -> Iterator[tuple[distckpt.CheckpointManager, threading.Event]]:
    """A manager from ``manager_made`` whose background thread, at each save, stops as it is
    about to store the extra files until the event yielded is set (then cleared for the next
    save). A trace hook holds it at that exact call, which no real delay can do without
    timing."""
    go_on = threading.Event()

    def hold(frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and frame.f_code.co_name == "write_extra_files":
            assert go_on.wait(TIMEOUT), "the test never let the save go on"
            go_on.clear()

    # Every thread started meanwhile is traced (the background one starts at the first save);
    # only that one stores extra files.
    threading.settrace(hold)
    manager = manager_made()
    try:
        yield manager, go_on
    finally:
        threading.settrace(None)
        go_on.set()
        manager.close()


@pytest.mark.parametrize("afterwards", ["changed", "deleted"])
def test_an_async_save_stores_an_extra_file_as_it_was_at_save(
    tmp_path: Path, afterwards: str
) -> None:
    """The config file is changed, or deleted, right after save() returned, before the
    background thread stores it: the checkpoint holds the content save() was given, and the
    save succeeds."""
    config = tmp_path / "config.json"
    root = tmp_path / "root"
    with _extra_files_held(
        lambda: distckpt.CheckpointManager(root, timeout=TIMEOUT, async_save=True, fsync=False)
    ) as (manager, go_on):
        for step, content in ((1, b'{"lr": 0.1}'), (2, b'{"lr": 0.2}')):
            config.write_bytes(content)
            manager.save(step, {"w": torch.ones(4)}, files={"config.json": config})
            if afterwards == "changed":
                config.write_bytes(b'{"lr": 999}')
            else:
                os.unlink(config)
            go_on.set()
            committed = manager.wait()
            assert committed is not None
            assert (committed.path / "config.json").read_bytes() == content
