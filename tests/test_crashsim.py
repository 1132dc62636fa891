"""Power-loss safety, proven by exploring crash states (``tests/crashsim``; the persistence
model and the long run's results are in ``docs/faults.md``).

The short run here: every workload in both formats, with 1 and 2 ranks, with a fixed seed and
a bounded number of states each (every state of ``fresh_root``; one format or one rank where a
workload does not depend on it), and six mutations (an fsync removed from a copy of the
library) that the explorer must flag. No crash state may show any violation. Each case is
traced and checked once per session, in children forked from the test process (torch is
imported once, not in every traced and checking process); ``-n 2`` runs cases side by side.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import distckpt.formats.dcp  # noqa: F401  imported once here, not in every forked workload
from tests.crashsim import check, explore, model, mutate, trace
from tests.crashsim.syscalls import Op, parse_trace
from tests.crashsim.workloads import WORKLOADS, Case, cases

SEED = 0
#: states checked per case, a seeded sample where there are more (the long run checks more)
MAX_STATES = 20
#: states a mutant may be checked in: all of them in the mutated cases (about a hundred each),
#: so that the one state a removal spoils is never sampled away; they are checked in order
#: until the first that shows a violation the intact library does not
MUTATION_MAX_STATES = 200

# The short run: every workload, both formats, 1 and 2 ranks (restart: 1, see its workload).
CASES: list[Case] = cases()
assert {name for name, _, _ in CASES} == set(WORKLOADS), "a workload has no case in the short run"


def _case(name: str) -> Case:
    """The case the workload-specific tests (and the mutations) look at: one rank, torch."""
    return (name, "torch", 1)


@pytest.fixture(scope="session")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory every xdist worker of this session sees: each case is explored once per
    session, by whichever worker needs it first, and its result read by the others."""
    try:
        trace.ensure_strace()
    except trace.StraceUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the crash explorer needs strace in CI: {exc}")
        pytest.skip(f"the crash explorer needs strace: {exc}")
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # each worker's temp dir sits in the session's
    directory = base / "crashsim-cases"
    directory.mkdir(exist_ok=True)
    return directory


SHM = Path("/dev/shm")


def _remove_dead_processes_scratch() -> None:
    """Remove the scratch directories of test processes that are gone: a killed run never
    removed its own, and a tmpfs keeps it in memory until reboot."""
    for directory in SHM.glob("crashsim-*-*"):
        pid = directory.name.split("-")[1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(directory, ignore_errors=True)
        except PermissionError:
            continue  # another user's live process


@pytest.fixture(scope="session")
def scratch() -> Iterator[Path | None]:
    """Where this process's explorations trace their workload and check its crash states: a
    directory of the tmpfs ``/dev/shm`` where it has room, removed at the end; else None (in
    the case's directory). What a crash keeps is the model's to say, not the disk's: the
    filesystem changes only timing (a disk's fsyncs are slow), and with it which interleaving a
    2-rank trace records. Named after this process, so that a later session removes it if this
    one is killed before it can."""
    if not SHM.is_dir() or shutil.disk_usage(SHM).free < explore.SCRATCH_MIN_FREE_BYTES:
        yield None
        return
    _remove_dead_processes_scratch()
    directory = Path(tempfile.mkdtemp(prefix=f"crashsim-{os.getpid()}-", dir=SHM))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        yield


def work_dir(shared: Path, case: Case) -> Path:
    """Where ``case`` was set up (its ``initial`` state, reused by a mutation)."""
    return shared / "-".join(map(str, case))


def explored(shared: Path, case: Case, scratch: Path | None) -> explore.Result:
    """``case``'s result, traced and checked once per session whatever the worker (in
    ``scratch``: see its fixture)."""
    work = work_dir(shared, case)
    cached = work.with_suffix(".json")
    with _exclusive(work.with_suffix(".lock")):
        if not cached.exists():
            name, fmt, world = case
            work.mkdir()
            explore.setup(name, work, world=world, fmt=fmt, forked=True)
            states = max(MAX_STATES, WORKLOADS[name].min_states)
            result = explore.explore(
                name,
                work,
                world=world,
                fmt=fmt,
                seed=SEED,
                max_states=states,
                forked=True,
                scratch=scratch,
            )
            cached.write_text(result.to_json())
    return explore.Result.from_json(cached.read_text())


def _ids(case: Case) -> str:
    return "-".join(map(str, case))


def _examples(result: explore.Result, kinds: set[str]) -> str:
    found = [v for v in result.violations if v.kind in kinds][:3]
    return "\n".join(f"{v.kind}: {v.detail}\n  in the state {v.state}" for v in found)


def _assert_none(result: explore.Result, *kinds: str) -> None:
    """No crash state of ``result`` shows a violation of these kinds."""
    shown = set(result.kinds()) & set(kinds)
    assert not shown, f"{result.summary()}\n{_examples(result, shown)}"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_no_crash_state_breaks_a_promise(shared: Path, scratch: Path | None, case: Case) -> None:
    result = explored(shared, case, scratch)
    assert result.states_checked > 0 and result.operations > 0, result.summary()
    assert not result.violations, f"{result.summary()}\n{_examples(result, set(result.kinds()))}"


def test_retention_never_shows_a_half_deleted_step(shared: Path, scratch: Path | None) -> None:
    # The trash (and the rename into it) is durable before the contents are deleted.
    _assert_none(
        explored(shared, _case("retention"), scratch), check.RAW_PARTIAL, check.BROKEN_AFTER_OPEN
    )


@pytest.mark.parametrize("name", ["retention", "restart"])
def test_crash_leftovers_are_collected_at_start(
    shared: Path, scratch: Path | None, name: str
) -> None:
    # Probes and links under construction are made under the root lock: whatever of them a
    # start finds, holding the lock, is a dead process's.
    _assert_none(explored(shared, _case(name), scratch), check.LEFTOVER)


@pytest.mark.parametrize("name", ["delete", "overwrite_fallback", "pointer", "killed_remove"])
def test_last_never_dangles_durably(shared: Path, scratch: Path | None, name: str) -> None:
    # The links move off a checkpoint, durably, before it is moved into the trash.
    _assert_none(explored(shared, _case(name), scratch), check.RAW_DANGLING)


def test_a_root_the_manager_creates_survives_power_loss(shared: Path, scratch: Path | None) -> None:
    # The root and its missing parents are created each with an fsync of its parent, and an
    # open fsyncs the parent of each ancestor, whoever created it (the job's own makedirs).
    _assert_none(explored(shared, _case("fresh_root"), scratch), check.STEP_LOST)


def test_an_export_into_new_directories_survives_power_loss(
    shared: Path, scratch: Path | None
) -> None:
    # The directories export creates for its file are each made durable with it.
    _assert_none(explored(shared, _case("export"), scratch), check.EXPORT_LOST)


def _flagged(
    shared: Path, scratch: Path | None, tmp_path: Path, name: str, site: mutate.FsyncSite
) -> bool:
    """Whether the explorer flags ``site``'s removal on ``name``'s case."""
    case = _case(name)
    outcome = mutate.run_mutation(
        site,
        {name: explored(shared, case, scratch)},
        {name: work_dir(shared, case)},
        tmp_path / "mutant",
        seed=SEED,
        max_states=MUTATION_MAX_STATES,
        forked=True,
        until_flagged=True,
        explore_in=scratch,
    )
    return outcome.flagged


#: fsyncs whose removal the short run must flag: (workload, function, a part of the call)
MUTATIONS = [
    ("retention", "close", "fsync_file"),  # a shard's data
    # Unmasked in ``delete``: when the newest step goes, the swap of ``last`` back to the one
    # before is followed by the trash move, with no other fsync of the root in between.
    ("delete", "swap_link", "fsync_dir"),
    # Unmasked in ``killed_swap``: a prune finds ``last`` already at its target, renamed by a
    # job killed before its fsync, and moves the step the durable ``last`` names to the trash.
    ("killed_swap", "_swap", "fsync_dir"),
    # Unmasked in ``killed_remove``: a delete finds ``last`` already removed, by a delete killed
    # before its fsync, and moves the step the durable ``last`` names to the trash.
    ("killed_remove", "_remove_link_if_stale", "fsync_dir"),
    # Unmasked in ``fresh_root`` and ``export``: nothing else fsyncs the dir holding the
    # directory the job made itself (fsync_ancestors' walk).
    ("fresh_root", "_fsync_names_up_to_the_mount_point", "fsync_dir"),
    ("export", "_fsync_names_up_to_the_mount_point", "fsync_dir"),
]


@pytest.fixture(scope="module")
def fsync_sites() -> list[mutate.FsyncSite]:
    """The package's fsync calls, found once for every mutation: finding them parses every
    module of the package, a second or so each time on a loaded machine."""
    return mutate.fsync_sites()


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("name", "function", "call"), MUTATIONS)
def test_removing_an_fsync_is_flagged(
    shared: Path,
    scratch: Path | None,
    tmp_path: Path,
    fsync_sites: list[mutate.FsyncSite],
    name: str,
    function: str,
    call: str,
) -> None:
    site = next(s for s in fsync_sites if s.function == function and call in s.text)
    assert _flagged(shared, scratch, tmp_path, name, site), f"removing {site.label} went unnoticed"


def test_the_explorations_run_in_a_tmpfs_where_there_is_one_with_room(
    scratch: Path | None, tmp_path: Path
) -> None:
    """Where ``/dev/shm`` has room, an exploration traces and checks in it, not in its work
    directory, and leaves nothing there."""
    if scratch is None:
        assert not SHM.is_dir() or shutil.disk_usage(SHM).free < explore.SCRATCH_MIN_FREE_BYTES
        return
    kind = subprocess.run(["stat", "-f", "-c", "%T", scratch], capture_output=True, text=True)
    assert scratch.parent == SHM and kind.stdout.strip() == "tmpfs", kind
    used = Path(tempfile.mkdtemp(dir=scratch))
    changed_before = used.stat().st_mtime_ns
    explore.setup("fresh_root", tmp_path, world=1, fmt="torch", forked=True)
    result = explore.explore(
        "fresh_root",
        tmp_path,
        world=1,
        fmt="torch",
        seed=SEED,
        max_states=1,
        forked=True,
        scratch=used,
    )
    assert result.states_checked == 1 and not result.violations, result.summary()
    # an entry was made and removed in it (its mtime moved), and none was in the work dir
    assert used.stat().st_mtime_ns != changed_before and list(used.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["initial"]


def test_a_scratch_directory_of_a_process_that_is_gone_is_removed() -> None:
    """A session removes the scratch of a killed one (a pid no process has), not a live one's."""
    if not SHM.is_dir():
        pytest.skip("no /dev/shm")
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid names no process (until reused, unlikely this soon)
    dead = Path(tempfile.mkdtemp(prefix=f"crashsim-{gone.pid}-", dir=SHM))
    alive = Path(tempfile.mkdtemp(prefix=f"crashsim-{os.getpid()}-", dir=SHM))
    try:
        _remove_dead_processes_scratch()
        assert not dead.exists() and alive.is_dir()
    finally:
        shutil.rmtree(dead, ignore_errors=True)
        shutil.rmtree(alive, ignore_errors=True)


def test_a_mutation_check_stops_at_the_first_state_showing_a_new_kind(tmp_path: Path) -> None:
    # Two states whose root is gone after step 1's save had returned: each shows STEP_LOST.
    gone = {"dir": os.fspath(tmp_path), "root": "root", "markers": ["0000-saved-1"]}
    spec = {**gone, "format": "torch", "world": 1, "overwrite_window": False}
    assert [[kind for kind, _ in found] for found in check.check_all([spec, spec])] == [
        [check.STEP_LOST]
    ] * 2
    assert len(check.check_all([spec, spec], until_kind_outside=[check.STEP_LOST])) == 2
    assert len(check.check_all([spec, spec], until_kind_outside=[check.LEFTOVER])) == 1


def test_a_lost_rename_keeps_later_changes_to_the_renamed_dir(tmp_path: Path) -> None:
    # The model works on inodes: a rename into the trash that is not durable, followed by
    # deleting the dir's contents, leaves the dir under its old name with files missing.
    base = tmp_path / "base"
    (base / "step-1").mkdir(parents=True)
    (base / "step-1" / "a").write_bytes(b"a")
    (base / "step-1" / "b").write_bytes(b"b")
    initial = model.Tree.from_disk(base)
    moved = base / ".trash" / "step-1.x"
    ops = [
        Op("mkdir", str(base / ".trash")),
        Op("rename", str(base / "step-1"), str(moved)),
        Op("fsync", str(base)),
        Op("unlink", str(moved / "a")),
    ]
    steps = model.lower(ops, initial, base)
    assert model.pending_entries(steps, len(steps)) == [1, 3]  # the source's fsync is not enough
    tree = model.replay(initial, steps, model.CrashState(len(steps), "lost", (1,)))
    tree.materialize(tmp_path / "state")
    assert sorted(os.listdir(tmp_path / "state" / "step-1")) == ["b"]


def test_the_parser_follows_offsets_and_resumed_calls(tmp_path: Path) -> None:
    def hexed(text: str) -> str:
        return "".join(f"\\x{b:02x}" for b in text.encode())

    path = str(tmp_path / "f")
    fd = f"3<{hexed(path)}>"
    lines = [
        f'7 openat(AT_FDCWD<{hexed(str(tmp_path))}>, "{hexed("f")}", O_WRONLY|O_CREAT|O_EXCL'
        f", 0666) = {fd}",
        f'7 write({fd}, "{hexed("abc")}", 3 <unfinished ...>',
        "8 close(4) = 0",
        "7 <... write resumed>) = 3",
        f"7 lseek({fd}, 1, SEEK_SET) = 1",
        f'7 write({fd}, "{hexed("Z")}", 1) = 1',
        f"7 fsync({fd}) = 0",
    ]
    ops = parse_trace("\n".join(lines), base=tmp_path, markers=tmp_path / "m", cwd=tmp_path)
    assert [(op.kind, op.offset, op.data) for op in ops] == [
        ("open", 0, b""),
        ("write", 0, b"abc"),
        ("write", 1, b"Z"),
        ("fsync", 0, b""),
    ]


def test_a_direct_write_and_its_ftruncate_are_as_volatile_as_any_until_the_fsync(
    tmp_path: Path,
) -> None:
    """An async save's rank file is opened with O_DIRECT, written in whole pages (the tail
    padded with zeros) and cut back with ftruncate before its fsync: the explorer reads the
    open as any creation and the ftruncate as a truncation, and the model loses the bytes (and
    the cut) in a power loss before the fsync, as it does a buffered file's."""

    def hexed(text: str) -> str:
        return "".join(f"\\x{b:02x}" for b in text.encode())

    base = tmp_path / "base"
    base.mkdir()
    fd = f"3<{hexed(str(base / 'rank.pt'))}>"
    padded = "abc" + "\0" * 4093
    lines = [
        f'7 openat(AT_FDCWD<{hexed(str(base))}>, "{hexed("rank.pt")}", '
        f"O_WRONLY|O_CREAT|O_EXCL|O_DIRECT|O_CLOEXEC, 0666) = {fd}",
        f'7 write({fd}, "{hexed(padded)}", 4096) = 4096',
        f"7 ftruncate({fd}, 3) = 0",
        f"7 fsync({fd}) = 0",
    ]
    ops = parse_trace("\n".join(lines), base=base, markers=tmp_path / "m", cwd=tmp_path)
    assert [(op.kind, op.size, len(op.data)) for op in ops] == [
        ("open", 0, 0),
        ("write", 0, 4096),
        ("truncate", 3, 0),
        ("fsync", 0, 0),
    ]
    initial = model.Tree.from_disk(base)
    steps = model.lower(ops, initial, base)

    def rank_file_after(prefix: int, data: str) -> bytes:
        tree = model.replay(initial, steps, model.CrashState(prefix, data))
        tree.materialize(tmp_path / f"state-{prefix}-{data}")
        return (tmp_path / f"state-{prefix}-{data}" / "rank.pt").read_bytes()

    assert rank_file_after(3, "lost") == b""  # written and cut, not yet fsynced: lost
    assert rank_file_after(3, "kept") == b"abc"  # a process kill keeps the page cache's view
    assert rank_file_after(2, "kept") == padded.encode()  # before the cut: padding and all
    assert rank_file_after(4, "lost") == b"abc"  # fsynced: durable, its true size
