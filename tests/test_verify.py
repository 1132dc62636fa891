"""Verification and hostile input: checksums you can check, corruption found and named, nothing
unsafe loaded.

The table of damaged roots lives in ``tests/hostile_case_table.py``; every case is checked against
``verify``, ``restore("last")`` (with and without ``verify=True``), an explicit restore and an
``export`` of the same checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import stat
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch

import distckpt
from distckpt.errors import CheckpointNotFound, CorruptCheckpoint, UnsafeCheckpoint
from tests.hostile_case_table import CASES, Case, Outcome
from tests.hostile_cases import (
    LINKS,
    MANIFEST,
    MARKER_NAME,
    RANK0,
    STEP1,
    STEP2,
    flip_byte,
    is_intact,
    make_root,
    malicious_pickle,
    saved_state,
    step_dir_symlink,
    truncate_shard,
)

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- helpers


@dataclass
class Damaged:
    case: Case
    root: Path
    mgr: distckpt.CheckpointManager


@pytest.fixture(params=CASES, ids=[case.id for case in CASES])
def damaged(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Damaged]:
    """The case's damage done to a fresh root, with a manager opened *before* the damage (so
    nothing repairs it before the call under test)."""
    case: Case = request.param
    root = make_root(tmp_path / "root")
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        case.damage(root)
        yield Damaged(case, root, mgr)
    assert not (tmp_path / MARKER_NAME).exists(), "the malicious pickle ran"


def distckpt_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "distckpt" and record.levelno >= logging.WARNING
    ]


def check_outcome(
    call: Callable[[], Any], expected: Outcome, caplog: pytest.LogCaptureFixture
) -> None:
    """Run ``call`` (a restore) and assert it does what ``expected`` says."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distckpt"):
        if expected.raises is not None:
            with pytest.raises(Exception) as info:
                call()
            assert type(info.value) is expected.raises, (
                f"expected {expected.raises.__name__}, got {type(info.value).__name__}: "
                f"{info.value}"
            )
            for part in expected.says:
                assert part in str(info.value), f"{part!r} not in the message: {info.value}"
            return
        ckpt = call()
    warnings = distckpt_warnings(caplog)
    assert ckpt is not None
    assert ckpt.step == expected.step, f"loaded step {ckpt.step}; warnings: {warnings}"
    assert is_intact(ckpt.state, ckpt.step) == expected.intact, ckpt.state
    if expected.warning is None:
        assert warnings == [], "expected no warning"
    else:
        assert any(all(part in w for part in expected.warning) for w in warnings), (
            f"no warning contains all of {expected.warning}: {warnings}"
        )


def explicit_target(damaged: Damaged) -> int | Path:
    target = damaged.case.target
    return target if isinstance(target, int) else damaged.root / target


def load_generator() -> ModuleType:
    path = REPO / "scripts" / "gen_verification_table.py"
    spec = importlib.util.spec_from_file_location("gen_verification_table", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------- the table


def test_verify_names_the_damage(damaged: Damaged) -> None:
    report = distckpt.verify(damaged.root)
    expected = damaged.case.verify
    by_name = {checkpoint.path.name: checkpoint for checkpoint in report.checkpoints}
    assert set(by_name) == {STEP1, STEP2}, report
    for name, checkpoint in by_name.items():
        if name in expected:
            assert not checkpoint.ok, f"{name} passed verify:\n{report}"
            assert any(all(part in p for part in expected[name]) for p in checkpoint.problems), (
                f"no problem of {name} contains all of {expected[name]}:\n{report}"
            )
        else:
            assert checkpoint.ok, f"{name} should pass:\n{report}"
    problems = list(report.problems)
    if LINKS in expected:
        assert any(all(part in p for part in expected[LINKS]) for p in problems), (
            f"no root problem contains all of {expected[LINKS]}:\n{report}"
        )
    else:
        # `last` still names step 2 (nothing repaired it): saying so is right, not required.
        stale_last = f"{damaged.root / 'last'} names a damaged checkpoint: {damaged.root / STEP2}"
        unexpected = [p for p in problems if not (STEP2 in expected and p.startswith(stale_last))]
        assert unexpected == [], report
    assert report.ok == (not expected)
    json.dumps(report.to_dict())


def test_restore_last(damaged: Damaged, caplog: pytest.LogCaptureFixture) -> None:
    check_outcome(lambda: damaged.mgr.restore("last"), damaged.case.last, caplog)


def test_restore_last_verified(damaged: Damaged, caplog: pytest.LogCaptureFixture) -> None:
    check_outcome(
        lambda: damaged.mgr.restore("last", verify=True), damaged.case.last_checked, caplog
    )


def test_restore_explicit(damaged: Damaged, caplog: pytest.LogCaptureFixture) -> None:
    target = explicit_target(damaged)
    check_outcome(lambda: damaged.mgr.restore(target), damaged.case.explicit, caplog)


def test_restore_explicit_verified(damaged: Damaged, caplog: pytest.LogCaptureFixture) -> None:
    target = explicit_target(damaged)
    check_outcome(
        lambda: damaged.mgr.restore(target, verify=True), damaged.case.explicit_checked, caplog
    )


def test_export_explicit(
    damaged: Damaged, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """``export`` (checksums checked by default) does what the explicit restore with
    ``verify=True`` does, writing the state it loads, and writes nothing when it raises."""
    out = tmp_path / "exported.pt"

    def exported() -> SimpleNamespace:
        distckpt.export(damaged.root / damaged.case.export_target, out, fsync=False)
        state = torch.load(out, weights_only=True)
        return SimpleNamespace(step=state["step"], state=state)

    check_outcome(exported, damaged.case.explicit_checked, caplog)
    assert out.exists() == (damaged.case.explicit_checked.raises is None)


def test_a_restarted_job_gets_the_same_checkpoint(damaged: Damaged) -> None:
    """A manager opened on the damaged root (the restarted job) loads what restore("last",
    verify=True) loads, or raises the same error; opening it never runs a pickle. It sets
    step 2 aside exactly when the case says so."""
    expected = damaged.case.last_checked
    damaged.mgr.close()  # the job that saved has ended (it held the root's lease until now)

    def restart() -> Any:
        with distckpt.CheckpointManager(damaged.root, fsync=False) as mgr:
            return mgr.restore("last", verify=True)

    if expected.raises is not None:
        with pytest.raises(expected.raises):
            restart()
    else:
        ckpt = restart()
        assert ckpt is not None and ckpt.step == expected.step
        assert is_intact(ckpt.state, ckpt.step) == expected.intact
    set_aside = distckpt.verify(damaged.root).set_aside
    if damaged.case.set_aside:
        (where,) = set_aside
        assert where.name.startswith(f"damaged-{STEP2}-")
        assert not (damaged.root / STEP2).exists()
    else:
        assert set_aside == ()
        assert os.path.lexists(damaged.root / STEP2)


def test_the_docs_table_matches_the_cases() -> None:
    generator = load_generator()
    doc = (REPO / "docs" / "verification.md").read_text(encoding="utf-8")
    assert generator.extract_table(doc) == generator.render_table(CASES), (
        "docs/verification.md is out of date: run python scripts/gen_verification_table.py --write"
    )


# ---------------------------------------------------------------------------- specifics


@pytest.fixture
def saved_root(tmp_path: Path) -> Path:
    return make_root(tmp_path / "root")


def test_verify_of_an_intact_root(saved_root: Path) -> None:
    report = distckpt.verify(saved_root)
    assert report.ok, report
    assert [c.step for c in report.checkpoints] == [1, 2]
    assert all(c.size_bytes == (c.path / RANK0).stat().st_size for c in report.checkpoints)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is True
    assert [c["step"] for c in data["checkpoints"]] == [1, 2]


def test_verify_a_step_dir_and_the_last_link(saved_root: Path) -> None:
    flip_byte(saved_root)
    one = distckpt.verify(saved_root / STEP2)
    assert [c.path.name for c in one.checkpoints] == [STEP2]
    assert not one.ok
    assert f"{STEP2}/{RANK0}: checksum mismatch" in one.checkpoints[0].problems[0]
    assert distckpt.verify(saved_root / STEP1).ok
    # `last` still names step 2: verify follows it and reports that checkpoint's problem.
    via_link = distckpt.verify(saved_root / "last")
    assert not via_link.ok
    assert [c.path.name for c in via_link.checkpoints] == [STEP2]
    assert f"{STEP2}/{RANK0}: checksum mismatch" in via_link.checkpoints[0].problems[0]
    json.dumps(via_link.to_dict())
    json.dumps(one.to_dict())
    assert "BROKEN" in str(one)


@pytest.mark.parametrize("link", ["symlink", "pointer"])
def test_verify_last_of_an_intact_root(tmp_path: Path, link: str) -> None:
    root = make_root(tmp_path / "root", link=link)
    assert (root / "last").is_symlink() == (link == "symlink")
    report = distckpt.verify(root / "last")
    assert report.ok, report
    assert [c.path.name for c in report.checkpoints] == [STEP2]
    assert distckpt.verify(root).ok


def test_verify_last_naming_a_truncated_checkpoint(saved_root: Path) -> None:
    truncate_shard(saved_root)
    report = distckpt.verify(saved_root / "last")
    assert not report.ok
    assert any(f"{STEP2}/{RANK0}" in p and "truncated" in p for p in report.problems), report
    json.dumps(report.to_dict())


def test_verify_of_nothing_raises(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFound):
        distckpt.verify(tmp_path / "no-such-root")
    with pytest.raises(CheckpointNotFound):
        distckpt.verify(tmp_path / "no-such-root" / STEP2)


def test_checksums_false_checks_sizes_only(tmp_path: Path) -> None:
    flipped = make_root(tmp_path / "flipped")
    flip_byte(flipped)
    assert distckpt.verify(flipped, checksums=False).ok
    assert not distckpt.verify(flipped).ok
    truncated = make_root(tmp_path / "truncated")
    truncate_shard(truncated)
    report = distckpt.verify(truncated, checksums=False)
    assert not report.ok
    assert any("truncated" in p for p in report.checkpoints[1].problems), report


def test_progress_counts_every_byte_read(saved_root: Path) -> None:
    seen: list[int] = []
    report = distckpt.verify(saved_root, progress=seen.append)
    assert sum(seen) == sum(c.size_bytes for c in report.checkpoints)
    seen.clear()
    distckpt.verify(saved_root, checksums=False, progress=seen.append)
    assert sum(seen) == 0


def test_restore_verified_falls_back_past_a_flipped_byte(
    saved_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    flip_byte(saved_root)
    with distckpt.CheckpointManager(saved_root, fsync=False) as mgr:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="distckpt"):
            ckpt = mgr.restore("last", verify=True)
    assert ckpt is not None and ckpt.step == 1 and is_intact(ckpt.state, 1)
    warnings = distckpt_warnings(caplog)
    assert any(f"{STEP2}/{RANK0}" in w and "checksum mismatch" in w for w in warnings), warnings


def test_load_checkpoint_verify_raises_on_the_corrupt_step(saved_root: Path) -> None:
    flip_byte(saved_root)
    with pytest.raises(CorruptCheckpoint, match="checksum mismatch"):
        distckpt.load_checkpoint(saved_root / STEP2, verify=True)
    # without verify, only sizes are checked: the altered value loads (recorded honestly)
    ckpt = distckpt.load_checkpoint(saved_root / STEP2)
    assert ckpt.step == 2 and not is_intact(ckpt.state, 2)
    # the root resolves to its newest checkpoint that passes
    assert distckpt.load_checkpoint(saved_root, verify=True).step == 1


def test_symlinked_step_is_not_a_committed_step(saved_root: Path) -> None:
    step_dir_symlink(saved_root)
    with distckpt.CheckpointManager(saved_root, fsync=False) as mgr:
        assert mgr.steps() == [1]
        with pytest.raises(CheckpointNotFound, match="committed steps: 1"):
            mgr.restore(2)
    with pytest.raises(UnsafeCheckpoint, match="symlink"):
        distckpt.load_checkpoint(saved_root / STEP2)


class Plain:
    """A user class: not on torch's weights-only allow-list until the user adds it."""


def test_refused_type_is_named_as_add_safe_globals_takes_it(tmp_path: Path) -> None:
    import torch

    with distckpt.CheckpointManager(tmp_path, fsync=False) as mgr:
        mgr.save(1, {"obj": Plain(), "w": torch.ones(2)})
    with pytest.raises(UnsafeCheckpoint) as info:
        distckpt.load_checkpoint(tmp_path)
    message = str(info.value)
    assert f"{__name__}.Plain" in message, message
    assert f"add_safe_globals([{__name__}.Plain])" in message, message
    assert "allow_pickle=True" in message
    assert "\x1b" not in message  # torch's terminal escape codes are dropped
    # The type named is the one to allow: then it loads without allow_pickle.
    with torch.serialization.safe_globals([Plain]):
        assert isinstance(distckpt.load_checkpoint(tmp_path).state["obj"], Plain)


def test_malicious_pickle_is_refused_everywhere(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    malicious_pickle(root)
    marker = tmp_path / MARKER_NAME
    with pytest.raises(UnsafeCheckpoint) as info:
        distckpt.load_checkpoint(root / STEP2)
    assert "allow_pickle=True" in str(info.value)
    assert "torch.serialization.add_safe_globals" in str(info.value)
    with pytest.raises(UnsafeCheckpoint):
        distckpt.load_checkpoint(root, verify=True, mmap=True)
    assert distckpt.verify(root).ok
    assert not marker.exists()
    # The payload is live: the opt-in (only for trusted checkpoints) does run it.
    distckpt.load_checkpoint(root / STEP2, allow_pickle=True)
    assert marker.exists()


# ---------------------------------------------------------------------------- checksums


def test_checksums_are_crc32_computed_while_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest's checksum is zlib's crc32 of the file's bytes, and saving never reads a
    file back to compute it."""

    def no_second_read(*args: object, **kwargs: object) -> str:
        raise AssertionError("a file was read back to checksum it")

    monkeypatch.setattr("distckpt.checksums.file_checksum", no_second_read)
    monkeypatch.setattr("distckpt.manifest.file_checksum", no_second_read)
    root = tmp_path / "root"
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        mgr.save(1, saved_state(1), files={"notes.txt": b"hello\n"})
    monkeypatch.undo()
    manifest = json.loads((root / STEP1 / MANIFEST).read_text())
    assert manifest["checksum_algorithm"] == "crc32"
    assert set(manifest["files"]) == {RANK0, "notes.txt"}
    for name, record in manifest["files"].items():
        data = (root / STEP1 / name).read_bytes()
        assert record["size"] == len(data)
        assert record["checksum"] == f"{zlib.crc32(data):08x}"
    assert distckpt.verify(root).ok


# ---------------------------------------------------------------------------- permissions


def _group_other_bits(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode) & 0o077


def test_files_created_by_a_save_obey_a_private_umask(tmp_path: Path) -> None:
    root = tmp_path / "root"
    old = os.umask(0o077)
    try:
        with distckpt.CheckpointManager(root, fsync=False, link="pointer") as mgr:
            mgr.save(1, saved_state(1))
    finally:
        os.umask(old)
    created = {
        "root": root,
        "step dir": root / STEP1,
        "rank file": root / STEP1 / RANK0,
        "manifest": root / STEP1 / MANIFEST,
        "lock": root / ".lock",
        "last pointer file": root / "last",
    }
    assert (root / "last").is_file() and not (root / "last").is_symlink()
    loose = {
        name: oct(stat.S_IMODE(os.lstat(path).st_mode))
        for name, path in created.items()
        if _group_other_bits(path)
    }
    assert loose == {}, f"group/other permission bits under umask 0o077: {loose}"


def test_lock_file_is_not_world_writable(tmp_path: Path) -> None:
    root = tmp_path / "root"
    old = os.umask(0o022)
    try:
        with distckpt.CheckpointManager(root, fsync=False) as mgr:
            mgr.save(1, saved_state(1))
    finally:
        os.umask(old)
    for path in (root / ".lock", root / STEP1 / RANK0, root / STEP1 / MANIFEST):
        assert not stat.S_IMODE(path.stat().st_mode) & stat.S_IWOTH, path


def test_verify_of_a_root_leaves_out_a_checkpoint_deleted_while_it_checks(tmp_path: Path) -> None:
    """A checkpoint another process's retention deletes after verify listed the root, before
    verify checked it, is no damage: verify leaves it out instead of reporting it BROKEN."""
    root = tmp_path / "root"
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        for step in (1, 2):
            mgr.save(step, {"w": torch.full((64,), float(step))})
    deleted: list[int] = []

    def delete_step_two_while_step_one_is_read(read_bytes: int) -> None:
        # verify reports each read of step 1's files here, after it listed both steps.
        if not deleted:
            with distckpt.CheckpointManager(root, fsync=False) as job:
                job.delete(2)
            deleted.append(2)

    report = distckpt.verify(root, progress=delete_step_two_while_step_one_is_read)
    assert deleted == [2]
    assert report.ok, str(report)
    assert [c.step for c in report.checkpoints] == [1]


def test_verify_of_a_root_whose_only_checkpoint_is_replaced_while_it_checks(
    tmp_path: Path,
) -> None:
    """A live job keeping one checkpoint commits the next and deletes the one verify is
    checking: verify checks the new one instead of reporting the root empty or damaged."""
    root = tmp_path / "root"
    # "dcp": two files (.metadata, then the data file), so the step goes between their checks.
    with distckpt.CheckpointManager(root, format="dcp", fsync=False) as mgr:
        mgr.save(1, {"w": torch.full((64,), 1.0)})
    replaced: list[int] = []

    def replace_step_one_while_it_is_read(read_bytes: int) -> None:
        # verify reports each read of the files of the step it checks here.
        if not replaced:
            replaced.append(2)
            with distckpt.CheckpointManager(root, format="dcp", keep_last=1, fsync=False) as job:
                job.save(2, {"w": torch.full((64,), 2.0)})

    report = distckpt.verify(root, progress=replace_step_one_while_it_is_read)
    assert replaced == [2] and not (root / "step-00000001").exists()
    assert report.ok, str(report)
    assert [c.step for c in report.checkpoints] == [2]
