"""Checking crash states with the public API, in a fresh process:
``python -m tests.crashsim.check SPEC.json`` prints one JSON list of violations per state.

For each state (a directory holding the replayed base dir):

* before anything opens it, ``verify(root)`` must pass: no partial ``step-*`` dir, and no
  ``last`` / ``best`` link naming something that is not a committed checkpoint;
* a new ``CheckpointManager(root)`` opens (repairing what it may);
* the checkpoint ``restore("last")`` loads (``load_checkpoint`` of each rank's part when the
  job had several ranks, as restoring needs the same world size) is complete, its step at least
  the newest step whose save had returned, and holds exactly the tensors saved at that step;
  it is never a step damaged on purpose (``damaged-N``), whose save had returned: a restore
  sets that one aside, and until then only it may fail ``verify``;
* ``verify(root)`` passes after the manager opened; no step whose save returned is missing
  (unless an operation that may remove it had begun);
* nothing a crash left behind survives the start: once the manager is closed (the start's
  removals run in rank 0's background, and ``close()`` waits for them), ``.staging`` and
  ``.trash`` are empty, with no ``.probe-*`` file and no ``.last.*.tmp`` / ``.best.*.tmp`` link
  under construction; a lease record under construction is gone after the first cleanup once
  it is 60 s old (:func:`_collect_aged_lease_records`);
* an ``export`` that returned (``exported-N``) left its file whole, with step N's state.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# The violation kinds, in the order a state is checked.
RAW_PARTIAL = "partial checkpoint visible"
RAW_DANGLING = "link names no committed checkpoint"
OPEN_FAILED = "manager does not open"
STEP_LOST = "a returned save is lost"
WRONG_STATE = "restore returns the wrong state"
BROKEN_AFTER_OPEN = "verify fails after the manager opened"
LEFTOVER = "leftover survives the start"
EXPORT_LOST = "a returned export is lost"


@dataclass(frozen=True)
class Expectation:
    """What the markers recorded before the crash promise."""

    returned: tuple[int, ...]
    deleting: tuple[int, ...]
    overwriting: tuple[int, ...]
    shrinks: bool
    #: steps whose save returned, damaged on purpose since: a restore sets them aside, and
    #: never restores one
    damaged: tuple[int, ...] = ()
    #: steps whose ``export`` to the workload's exported file returned
    exported: tuple[int, ...] = ()

    @classmethod
    def from_markers(cls, markers: list[str]) -> Expectation:
        found: dict[str, list[int]] = {
            "saved": [],
            "deleting": [],
            "overwriting": [],
            "damaged": [],
            "exported": [],
        }
        shrinks = False
        for marker in markers:
            what = marker.split("-", 1)[1]
            if what == "shrink":
                shrinks = True
            else:
                kind, step = what.rsplit("-", 1)
                found[kind].append(int(step))
                if kind == "saved" and int(step) in found["overwriting"]:
                    found["overwriting"].remove(int(step))  # the overwrite returned: durable
        return cls(
            tuple(found["saved"]),
            tuple(found["deleting"]),
            tuple(found["overwriting"]),
            shrinks,
            tuple(found["damaged"]),
            tuple(found["exported"]),
        )

    def _may_vanish(self, overwrite_window: bool) -> set[int]:
        # A step being deleted may go, and a damaged one (set aside); one being overwritten
        # only where the documented two-rename window exists.
        vanishing = set(self.deleting) | set(self.damaged)
        return vanishing | (set(self.overwriting) if overwrite_window else set())

    def floor(self, overwrite_window: bool) -> int | None:
        """The step ``restore("last")`` may not go below."""
        vanishing = self._may_vanish(overwrite_window)
        stable = [s for s in self.returned if s not in vanishing]
        return max(stable) if stable else None

    def required(self, overwrite_window: bool) -> set[int]:
        """Steps that must be there: with retention at work, only the floor."""
        floor = self.floor(overwrite_window)
        if self.shrinks:
            return {floor} if floor is not None else set()
        return set(self.returned) - self._may_vanish(overwrite_window)


def _tensor_ok(loaded: Any, step: int, rank: int, fmt: str) -> bool:
    from tests.crashsim.workloads import state_for

    return any(
        torch.equal(loaded["w"], state_for(step, rank, fmt, version)["w"]) for version in (0, 1)
    )


def check_state(spec: dict[str, Any]) -> list[tuple[str, str]]:
    """The violations of one state: (kind, detail) pairs."""
    import distckpt
    from tests.crashsim.workloads import state_for

    root = Path(spec["dir"]) / spec["root"]
    expected = Expectation.from_markers(spec["markers"])
    window = spec["overwrite_window"]
    floor = expected.floor(window)
    fmt, world = spec["format"], spec["world"]
    found: list[tuple[str, str]] = _exports_lost(Path(spec["dir"]), expected, fmt)
    if not root.is_dir():
        if floor is not None:
            found.append((STEP_LOST, f"the root is gone but step {floor} had returned"))
        return found
    raw = distckpt.verify(root, checksums=True)
    for report in raw.checkpoints:
        # a step damaged on purpose is damaged until a restore sets it aside
        if not report.ok and report.step not in expected.damaged:
            found.append((RAW_PARTIAL, f"{report.path.name}: {'; '.join(report.problems)}"))
    for problem in raw.problems:
        found.append((RAW_DANGLING, problem))
    try:
        mgr = distckpt.CheckpointManager(root, format=fmt)
    except Exception as exc:
        found.append((OPEN_FAILED, f"{type(exc).__name__}: {exc}"))
        return found
    with mgr:
        latest = mgr.latest_step()
        steps = set(mgr.steps())
        if floor is not None and (latest is None or latest < floor):
            found.append((STEP_LOST, f"latest step {latest} but step {floor} had returned"))
        missing = expected.required(window) - steps
        if missing:
            found.append((STEP_LOST, f"returned steps {sorted(missing)} are missing"))
        if latest is not None:
            try:
                for rank in range(world):
                    template = state_for(0, rank, fmt)
                    if world == 1:
                        loaded = mgr.restore("last", state=template)
                    else:
                        loaded = distckpt.load_checkpoint(root, rank=rank, state=template)
                    if loaded.step in expected.damaged:
                        found.append(
                            (WRONG_STATE, f"rank {rank}: restored the damaged step {loaded.step}")
                        )
                    elif loaded.step != latest or not _tensor_ok(
                        loaded.state, loaded.step, rank, fmt
                    ):
                        found.append(
                            (WRONG_STATE, f"rank {rank}: step {loaded.step}, latest {latest}")
                        )
            except Exception as exc:
                found.append((WRONG_STATE, f"{type(exc).__name__}: {exc}"))
        after = distckpt.verify(root, checksums=True)
        if not after.ok:
            problems = [*after.problems, *(p for c in after.checkpoints for p in c.problems)]
            found.append((BROKEN_AFTER_OPEN, "; ".join(problems)))
    # Everything but the lease records under construction must be gone after the start alone,
    # so it is listed before the cleanup that removes those (which removes the rest too).
    left = [p.name for p in root.iterdir() if _is_leftover(p.name) and not _is_lease_record(p)]
    for sub in (".staging", ".trash"):
        if (root / sub).is_dir():
            left += [f"{sub}/{p.name}" for p in (root / sub).iterdir()]
    left += _aged_lease_records_left(root)
    if left:
        found.append((LEFTOVER, ", ".join(sorted(left))))
    return found


def _exports_lost(base: Path, expected: Expectation, fmt: str) -> list[tuple[str, str]]:
    """An export that returned (with ``fsync=True``) must be whole, where it was written."""
    from tests.crashsim.workloads import exported_file

    lost = []
    for step in expected.exported:
        out = exported_file(base, step)
        if not out.is_file():
            lost.append((EXPORT_LOST, f"{out.relative_to(base)} is gone"))
            continue
        try:
            whole = _tensor_ok(torch.load(out, weights_only=True), step, 0, fmt)
        except Exception as exc:  # a file cut short fails to load in many ways
            lost.append((EXPORT_LOST, f"{out.relative_to(base)} does not load: {exc}"))
            continue
        if not whole:
            lost.append((EXPORT_LOST, f"{out.relative_to(base)} holds another state"))
    return lost


def _is_lease_record(path: Path) -> bool:
    return path.name.startswith("..lease.json.")


def _aged_lease_records_left(root: Path) -> list[str]:
    """A lease record under construction (``..lease.json.*.tmp``) goes by its age alone, never
    at once (``distckpt/lock.py`` says why: a job claiming the lease where the cleanup's locks
    do not reach may be writing it): one a crash left is removed by the first cleanup once it
    is older than ``PROBE_GRACE_SECONDS``. A state is checked at once, so such a file is made
    that old here and ``distckpt gc``'s cleanup run; returns those it left."""
    from distckpt.lock import PROBE_GRACE_SECONDS
    from distckpt.storage import open_store

    aged = [p for p in root.iterdir() if _is_lease_record(p)]
    if not aged:
        return []
    long_ago = time.time() - PROBE_GRACE_SECONDS - 1
    for path in aged:
        os.utime(path, (long_ago, long_ago))
    open_store(root).collect_leftovers()
    return [p.name for p in aged if p.exists()]


def _is_leftover(name: str) -> bool:
    return name.startswith(".probe-") or (name.startswith(".") and name.endswith(".tmp"))


def check_all(
    specs: list[dict[str, Any]], until_kind_outside: Collection[str] | None = None
) -> list[list[tuple[str, str]]]:
    """:func:`check_state` of each state, in a process that opened none of them before. With
    ``until_kind_outside``, only until a state shows a violation of a kind not among those:
    the states after it are not checked (a mutation check needs one such state, and checking
    a state costs a manager's start, a restore and two ``verify``)."""
    # The manager warns about every repair it makes; put back after, for a caller in-process
    # (a test), whose later log checks would find nothing.
    disabled_before = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    results: list[list[tuple[str, str]]] = []
    try:
        for spec in specs:
            try:
                results.append(check_state(spec))
            except Exception as exc:  # a crash of the checker is a finding too, not an abort
                results.append([(OPEN_FAILED, f"checker raised {type(exc).__name__}: {exc}")])
            if until_kind_outside is not None and {kind for kind, _ in results[-1]} - set(
                until_kind_outside
            ):
                break
    finally:
        logging.disable(disabled_before)
    return results


def main(spec_file: str) -> None:
    torch.set_num_threads(1)
    print(json.dumps(check_all(json.loads(Path(spec_file).read_text()))))


if __name__ == "__main__":
    main(sys.argv[1])
