"""Steps on real gloo ranks: when the staging dir is made durable, retention and deletion, the
step rules (overwrite, invalid steps, an empty root) and step dirs of other widths."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt import fsutil
from distckpt.layout import step_dir_name
from distckpt.manifest import Manifest
from distckpt.storage import open_store
from distckpt.storage import posix as posix_store
from tests.core_ranks import JOB_TIMEOUT, TIMEOUT, _err, _staging_entries, _weights
from tests.filesystems import immutable
from tests.ranks import run_ranks, values

# --------------------------------------------------------------------------- retention, delete


def test_the_staging_dir_is_made_durable_in_the_write_phase_not_when_opened(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening the staging area (rank 0's part of the proposal, which the caller waits for)
    fsyncs nothing for the new dir: only the commit's rename needs its creation durable, so
    rank 0 makes it so at the start of its write phase, before the agreement and the commit."""
    # A spy, not a mock: every fsync still happens; it only records which dirs were fsynced.
    fsynced: list[Path] = []

    def recording_fsync_dir(path: str | os.PathLike[str]) -> None:
        fsynced.append(Path(path))
        real_fsync_dir(path)

    real_fsync_dir = fsutil.fsync_dir
    monkeypatch.setattr(fsutil, "fsync_dir", recording_fsync_dir)  # the commit's rename_dir
    monkeypatch.setattr(posix_store, "fsync_dir", recording_fsync_dir)
    store = open_store(root)
    staging_root = root / ".staging"
    staging_root.mkdir(parents=True)  # once per root, durably (not what this test is about)
    area = store.begin_staging(1, "token")
    try:
        assert Path(area.location).parent == staging_root
        assert fsynced == []
        store.make_staging_durable(area)
        assert fsynced == [staging_root]
    finally:
        store.discard_staging(area)

    # And in a save: the staging root is fsynced before the commit (whose first fsync is the
    # manifest's, of the staging dir itself).
    fsynced.clear()
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        mgr.save(2, {"w": _weights(2, 0)})
    committing = next(i for i, path in enumerate(fsynced) if path.parent == staging_root)
    assert staging_root in fsynced[:committing]


def _keep_last_two(rank: int, world_size: int, root: str) -> list[tuple[list[int], str, bool]]:
    seen = []
    with distckpt.CheckpointManager(root, keep_last=2, timeout=TIMEOUT) as mgr:
        for step in range(1, 6):
            mgr.save(step, {"w": _weights(step, rank)})
            link = os.readlink(Path(root) / "last")
            seen.append((mgr.steps(), link, (Path(root) / link).is_dir()))
    return seen


def test_keep_last_removes_older_dirs_never_the_target_of_last(root: Path) -> None:
    out = values(run_ranks(_keep_last_two, 2, str(root), timeout=JOB_TIMEOUT))
    expected = [
        ([1], "step-00000001", True),
        ([1, 2], "step-00000002", True),
        ([2, 3], "step-00000003", True),
        ([3, 4], "step-00000004", True),
        ([4, 5], "step-00000005", True),
    ]
    # Every rank returns only after rank 0's commit (and its retention) is done.
    assert out == [expected, expected]
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000004", "step-00000005"]
    assert not any((root / ".trash").iterdir())


def _delete_steps(rank: int, world_size: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": _weights(step, rank)})
        # Only rank 0 looks at the disk: delete returns on the others once rank 0 decided,
        # and rank 0 may already be running the next delete while they look.
        mgr.delete(2)
        if rank == 0:
            out["after middle"] = (mgr.steps(), os.readlink(Path(root) / "last"))
        mgr.delete(3)
        if rank == 0:
            link = os.readlink(Path(root) / "last")
            out["after newest"] = (mgr.steps(), link, mgr.latest_step())
        try:
            mgr.delete(7)
        except Exception as exc:
            out["missing"] = _err(exc)
        template = {"w": torch.zeros(3)}
        out["restored"] = (mgr.restore(state=template).step, template["w"].tolist())
    return out


def test_a_commit_parses_only_manifests_it_has_not_parsed_before(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit points the links and applies retention from every committed checkpoint's
    manifest: parsing each one again at every save made a save cost more with every step kept
    (1 s a save with 5,000 kept). Each is parsed once; one whose bytes change (an overwrite
    with another metric) is parsed again, and ``best`` follows it."""
    # A spy, not a mock: every parse still happens. How many manifests a commit parses shows
    # nowhere else, and a timing would be too noisy to tell.
    parsed: list[str] = []
    real_from_json = Manifest.from_json.__func__  # type: ignore[attr-defined]

    def counting_from_json(cls: type[Manifest], raw: bytes, *, source: str) -> Manifest:
        parsed.append(Path(source).parent.name)
        return real_from_json(cls, raw, source=source)

    monkeypatch.setattr(Manifest, "from_json", classmethod(counting_from_json))
    with distckpt.CheckpointManager(root, monitor="loss", timeout=TIMEOUT) as mgr:
        for step in range(8):
            mgr.save(step, {"w": torch.zeros(1)}, metrics={"loss": float(step)})
        parsed.clear()
        mgr.save(8, {"w": torch.zeros(1)}, metrics={"loss": 8.0})
        assert parsed == ["step-00000008"], parsed
        assert fsutil.read_link(root / "best") == "step-00000000"
        mgr.save(8, {"w": torch.ones(1)}, metrics={"loss": -1.0}, overwrite=True)
        assert fsutil.read_link(root / "best") == "step-00000008"
        assert mgr.restore("best").metrics == {"loss": -1.0}


def _rewritten_in_place(checkpoint_dir: Path, change: str) -> None:
    """Rewrite ``checkpoint_dir``'s manifest to bytes of the same size and modification time,
    as a memo judging by ``stat`` would not notice: a valid manifest whose metric improved
    (``better``), or one byte of it damaged (``damaged``)."""
    path = checkpoint_dir / "manifest.json"
    raw = path.read_bytes()
    if change == "better":
        manifest = Manifest.from_json(raw, source=os.fspath(path))
        new = dataclasses.replace(manifest, metrics={"loss": 0.5}).to_json()
    else:
        new = raw.replace(b'"step"', b'"Step"', 1)
    assert len(new) == len(raw) and new != raw
    status = path.stat()
    path.write_bytes(new)
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))


@pytest.mark.parametrize(
    ("step", "change", "best", "last"),
    [
        (2, "better", "step-00000002", "step-00000003"),  # a valid rewrite is seen
        (0, "damaged", "step-00000001", "step-00000003"),  # damage after parsing is seen
        (3, "damaged", "step-00000000", "step-00000002"),  # also in the newest one
    ],
)
def test_a_manifest_rewritten_after_it_was_parsed_is_parsed_again(
    root: Path, step: int, change: str, best: str, last: str
) -> None:
    """The links and retention remember each manifest they parsed, but a manifest rewritten
    since, to the same size and modification time, is read as it is now: a better metric
    moves ``best`` to it, damage moves ``best`` and ``last`` off it."""
    with distckpt.CheckpointManager(root, monitor="loss", timeout=TIMEOUT) as mgr:
        for saved in range(4):
            mgr.save(saved, {"w": torch.zeros(1)}, metrics={"loss": float(saved + 1)})
        _rewritten_in_place(root / f"step-{step:08d}", change)
        mgr.prune()
        assert (fsutil.read_link(root / "best"), fsutil.read_link(root / "last")) == (best, last)


def test_delete_moves_last_and_missing_step_is_not_found(root: Path) -> None:
    out = values(run_ranks(_delete_steps, 2, str(root), timeout=JOB_TIMEOUT))
    assert out[0]["after middle"] == ([1, 3], "step-00000003")
    assert out[0]["after newest"] == ([1], "step-00000001", 1)
    for rank, rank_out in enumerate(out):
        name, message, _, is_file_not_found = rank_out["missing"]
        assert name == "CheckpointNotFound"
        assert is_file_not_found
        assert message == f"no checkpoint for step 7 in {root}; committed steps: 1"
        assert rank_out["restored"] == (1, [10.0 + rank] * 3)
    assert issubclass(distckpt.CheckpointNotFound, FileNotFoundError)


def test_a_start_whose_monitor_ranks_no_checkpoint_removes_best_and_its_protection(
    root: Path,
) -> None:
    """A job restarted with another metric: ``best`` (the old metric's best) is removed at its
    start, so neither ``restore("best")`` nor retention takes it for the best any more."""
    with distckpt.CheckpointManager(root, monitor="acc", mode="max", fsync=False) as mgr:
        for step, acc in ((1, 0.9), (2, 0.1), (3, 0.2)):
            mgr.save(step, {"w": torch.zeros(1)}, metrics={"acc": acc})
    assert fsutil.read_link(root / "best") == "step-00000001"
    with distckpt.CheckpointManager(root, monitor="loss", keep_last=1, fsync=False) as mgr:
        assert not (root / "best").exists() and mgr.best_step() is None
        with pytest.raises(distckpt.CheckpointNotFound):
            mgr.restore("best")
        mgr.save(4, {"w": torch.zeros(1)}, metrics={"acc": 0.3})
        assert mgr.steps() == [4]  # the old metric's best is no longer kept for being best


def test_retention_keeps_the_target_best_names_where_no_monitor_ranks_it(root: Path) -> None:
    """A manager without ``monitor`` leaves ``best`` as it is, and retention keeps what it
    names (the target of ``last``/``best`` is never removed), though no rule of its own
    would."""
    with distckpt.CheckpointManager(root, monitor="acc", mode="max", fsync=False) as mgr:
        for step, acc in ((1, 0.9), (2, 0.1)):
            mgr.save(step, {"w": torch.zeros(1)}, metrics={"acc": acc})
    with distckpt.CheckpointManager(root, keep_last=1, fsync=False) as mgr:
        mgr.save(3, {"w": torch.zeros(1)}, metrics={"acc": 0.2})
        assert mgr.steps() == [1, 3]
    assert fsutil.read_link(root / "best") == "step-00000001"
    assert distckpt.verify(root).ok


@contextlib.contextmanager
def _unrenamable(step_dir: Path) -> Iterator[None]:
    """Make ``step_dir`` impossible to rename into the trash for the block. Root renames
    whatever the modes say, so for root the dir itself is made immutable; anyone else finds its
    parent read-only (the trash made beforehand, so that the rename is what fails)."""
    if os.geteuid() == 0:
        with immutable(step_dir):
            yield
        return
    (step_dir.parent / ".trash").mkdir(exist_ok=True)
    mode = step_dir.parent.stat().st_mode
    step_dir.parent.chmod(0o555)
    try:
        yield
    finally:
        step_dir.parent.chmod(mode)


def _fail_to_delete(
    mgr: distckpt.CheckpointManager,
    root: Path,
    step: int,
    unrenamable: Callable[[Path], contextlib.AbstractContextManager[object]],
) -> None:
    """Save steps 1 and 2 in ``root``, then delete ``step`` while ``unrenamable`` keeps its
    dir from being renamed into the trash: the delete fails naming the ``PermissionError``, and
    both steps stay."""
    mgr.save(1, {"w": torch.zeros(1)})
    mgr.save(2, {"w": torch.ones(1)})
    failing = pytest.raises(distckpt.CheckpointError, match=f"step {step} failed: PermissionError")
    with unrenamable(root / step_dir_name(step)), failing:
        mgr.delete(step)
    assert mgr.steps() == [1, 2]


def test_a_delete_that_cannot_move_the_step_into_the_trash_fails_and_keeps_it(
    root: Path,
) -> None:
    """A delete whose rename into the trash fails (an immutable dir or a read-only root here; an
    I/O error elsewhere) fails naming that error: a checkpoint still there is never reported
    deleted."""
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        _fail_to_delete(mgr, root, 1, _unrenamable)


def test_a_failed_delete_of_the_newest_step_leaves_restore_last_on_it(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A delete moves the links off a step before its rename into the trash; where that rename
    fails, ``last`` names the older step while the newest is still there: ``restore("last")``
    takes the newest, warning that the link says otherwise, and the next start repairs it."""
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        _fail_to_delete(mgr, root, 2, immutable)
        with caplog.at_level(logging.WARNING, logger="distckpt"):
            assert mgr.restore("last").step == 2
        assert "last names step-00000001 but the newest committed checkpoint is step-00000002" in (
            caplog.text
        )
    with distckpt.CheckpointManager(root, fsync=False):
        assert fsutil.read_link(root / "last") == "step-00000002"


# --------------------------------------------------------------------------- step rules


def _overwrite(rank: int, world_size: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        mgr.save(1, {"w": _weights(1, rank)})
        out["overwrite"] = mgr.save(1, {"w": _weights(7, rank)}, overwrite=True).step
        try:
            mgr.save(1, {"w": _weights(8, rank)})
        except Exception as exc:
            out["again"] = _err(exc)
        template = {"w": torch.zeros(3)}
        mgr.restore(1, state=template)
        out["restored"] = template["w"].tolist()
        out["steps"] = mgr.steps()
    return out


def test_overwrite_replaces_and_without_it_the_step_exists(root: Path) -> None:
    out = values(run_ranks(_overwrite, 2, str(root), timeout=JOB_TIMEOUT))
    for rank, rank_out in enumerate(out):
        assert rank_out["overwrite"] == 1
        assert rank_out["again"][0] == "CheckpointExists"
        assert "overwrite=True" in rank_out["again"][1]
        assert rank_out["restored"] == [70.0 + rank] * 3
        assert rank_out["steps"] == [1]
    assert not (root / ".trash").exists() or not any((root / ".trash").iterdir())


def _bad_steps(rank: int, world_size: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        mgr.save(5, {"w": _weights(5, rank)})
        for label, step in {
            "lower": 3,
            "negative": -1,
            "float": 6.0,
            "str": "6",
            "bool": True,
            "none": None,
            "different per rank": 10 + rank,
        }.items():
            try:
                mgr.save(step, {"w": _weights(0, rank)})  # type: ignore[arg-type]
                out[label] = None
            except Exception as exc:
                out[label] = _err(exc)
        out["steps"] = mgr.steps()
        out["next"] = mgr.save(6, {"w": _weights(6, rank)}).step
    return out


def test_overwrite_of_a_step_not_committed_yet_saves_it(root: Path) -> None:
    """``overwrite=True`` replaces a committed step, and saves one not committed yet as a plain
    save does (a loop may pass it at every save)."""
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        assert mgr.save(1, {"w": torch.ones(1)}, overwrite=True).step == 1
        assert mgr.save(2, {"w": torch.ones(1)}, overwrite=True).step == 2
        assert mgr.steps() == [1, 2] and mgr.restore("last").step == 2
    assert distckpt.verify(root).ok


def test_invalid_steps_raise_invalid_step_on_every_rank(root: Path) -> None:
    out = values(run_ranks(_bad_steps, 2, str(root), timeout=JOB_TIMEOUT))
    for rank_out in out:
        for label in ("lower", "negative", "float", "str", "bool", "none", "different per rank"):
            assert rank_out[label] is not None, f"save of a {label} step did not raise"
            assert rank_out[label][0] == "InvalidStep", (label, rank_out[label])
        assert "delete" in rank_out["lower"][1]
        assert rank_out["steps"] == [5]
        assert rank_out["next"] == 6
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000005", "step-00000006"]
    assert _staging_entries(root) == []


def _restore_empty(rank: int, world_size: int, root: str) -> tuple[Any, Any, Any]:
    with distckpt.CheckpointManager(root, timeout=TIMEOUT) as mgr:
        quiet = mgr.restore(missing_ok=True)
        quiet_best = mgr.restore("best", missing_ok=True)
        try:
            mgr.restore()
            loud = None
        except Exception as exc:
            loud = _err(exc)
    return quiet, quiet_best, loud


def test_missing_ok_on_an_empty_root(root: Path) -> None:
    out = values(run_ranks(_restore_empty, 2, str(root), timeout=JOB_TIMEOUT))
    for quiet, quiet_best, loud in out:
        assert quiet is None
        assert quiet_best is None
        assert loud is not None
        assert loud[0] == "CheckpointNotFound"
        assert loud[3]  # a FileNotFoundError too


# --------------------------------------------------------------------------- step dir widths


def test_overwrite_replaces_a_step_dir_of_another_width_where_it_is(root: Path) -> None:
    """Any width parses (README, On disk): ``step-5`` is step 5, so ``overwrite=True`` replaces
    it in place rather than adding ``step-00000005`` beside it, and a delete then leaves no
    old copy behind to come back."""
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        mgr.save(5, {"w": torch.full((3,), 5.0)})
    (root / "step-00000005").rename(root / "step-5")
    (root / "last").unlink()
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        assert mgr.steps() == [5]
        saved = mgr.save(5, {"w": torch.full((3,), 50.0)}, overwrite=True)
        assert saved.path == root / "step-5"
        assert sorted(p.name for p in root.glob("step-*")) == ["step-5"]
        assert mgr.steps() == [5]
        assert torch.equal(mgr.restore(5).state["w"], torch.full((3,), 50.0))
        mgr.delete(5)
        assert mgr.steps() == []
        assert mgr.restore(missing_ok=True) is None


def test_two_dirs_of_one_step_list_it_once_and_the_canonical_name_wins(root: Path) -> None:
    """A root holding ``step-00000005`` and ``step-5`` (copied in by hand) lists step 5 once,
    and reads and replaces the dir named as distckpt names it; the other one is step 5 again
    once that is deleted."""
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        mgr.save(5, {"w": torch.full((3,), 5.0)})
    import shutil

    shutil.copytree(root / "step-00000005", root / "step-5")
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        assert mgr.steps() == [5]
        mgr.save(5, {"w": torch.full((3,), 50.0)}, overwrite=True)
        assert torch.equal(mgr.restore(5).state["w"], torch.full((3,), 50.0))
        assert sorted(p.name for p in root.glob("step-*")) == ["step-00000005", "step-5"]
        mgr.delete(5)
        assert mgr.steps() == [5]
        assert torch.equal(mgr.restore(5).state["w"], torch.full((3,), 5.0))
