"""The distckpt command line on an ``s3://`` root of a real S3-protocol server (moto), with the
endpoint and credentials in the standard AWS environment variables, as a user would run it:
the same commands, output and exit statuses as on a local root (tests/test_cli.py,
test_cli_gc.py and test_cli_delete.py)."""

from __future__ import annotations

import datetime
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
import distckpt.storage.s3_upkeep as upkeep
from distckpt.cli import main
from distckpt.layout import step_dir_name
from distckpt.lease import this_process_host
from distckpt.objstore import ObjectStore
from distckpt.objurl import S3Url
from tests.hostile_cases import reseal_manifest
from tests.s3server import S3Server, aws_environment, point_the_cli_at
from tests.test_cli import ls_lines, run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def aws_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The AWS variables of the test server in this process's environment, and a working
    directory of the test's own (a command that took an s3:// URL for a relative path would
    create it there, not in the repository)."""
    point_the_cli_at(s3_server, monkeypatch, tmp_path)


def make_root(url: str, server: S3Server) -> str:
    """An s3:// root at ``url`` with steps 10, 20 (the best loss) and 30 (the last)."""
    with distckpt.CheckpointManager(
        url, storage_options=server.storage_options(), monitor="loss"
    ) as mgr:
        for step, loss in ((10, 3.0), (20, 1.0), (30, 2.0)):
            state = {"w": torch.full((4,), float(step))}
            mgr.save(step, state, epoch=step // 10, metrics={"loss": loss})
    return url


@pytest.fixture
def root(s3_server: S3Server, s3_url: str, aws_env: None) -> str:
    """A root of :func:`make_root` in a bucket of the test's own, for a test that changes it or
    writes beside it."""
    return make_root(s3_url, s3_server)


@pytest.fixture(scope="module")
def shared_root(s3_server: S3Server) -> str:
    """One root of :func:`make_root` for this module's tests that only read it (its three
    saves cost seconds each time). A test that changed it by mistake fails its own check that
    the steps are all there, and the tests after it would fail too."""
    return make_root(f"s3://{s3_server.create_bucket()}/ckpt", s3_server)


@pytest.fixture
def read_root(shared_root: str, aws_env: None) -> str:
    """:func:`shared_root`, with the AWS variables of :func:`aws_env` set."""
    return shared_root


#: Every command that reads or changes a root or a checkpoint in it, with its arguments.
COMMANDS_ON_A_LOCATION = [
    ("info",),
    ("verify",),
    ("ls",),
    ("prune", "--keep-last", "1"),
    ("gc",),
    ("lease",),
    ("delete", "10"),
]


def raw_store(url: str, server: S3Server) -> ObjectStore:
    """The root's objects as the store holds them, past distckpt's checkpoint layer."""
    return ObjectStore(url, server.storage_options())


def test_ls_shows_steps_and_links(read_root: str) -> None:
    ls_lines(read_root)
    data = json.loads(run("ls", read_root, "--json").stdout)
    assert [c["step"] for c in data["checkpoints"]] == [10, 20, 30]
    assert data["links"] == {"last": step_dir_name(30), "best": step_dir_name(20)}


def test_info_of_a_link_and_of_the_root(read_root: str) -> None:
    out = run("info", f"{read_root}/best")
    assert out.returncode == 0, out.stderr
    assert "step        20" in out.stdout and "rank-00000.pt" in out.stdout
    data = json.loads(run("info", read_root, "--json").stdout)
    assert data["step"] == 30 and data["path"].endswith(step_dir_name(30))


def test_verify_finds_a_corrupted_object(root: str, s3_server: S3Server) -> None:
    assert run("verify", root).returncode == 0
    store = raw_store(root, s3_server)
    (shard,) = [
        info.key
        for info in store.list(step_dir_name(20) + "/")
        if info.key.endswith("rank-00000.pt")
    ]
    data = bytearray(store.get_bytes(shard))
    data[-30] ^= 0xFF  # same size: only the checksum can tell
    store.put_bytes(shard, bytes(data))
    out = run("verify", root)
    assert out.returncode == 1, out
    assert f"BROKEN {step_dir_name(20)}" in out.stdout and "checksum mismatch" in out.stdout
    assert run("verify", root, "--no-checksums").returncode == 0
    report = json.loads(run("verify", root, "--json").stdout)
    assert report["ok"] is False
    assert [c["ok"] for c in report["checkpoints"]] == [True, False, True]


def test_prune_uses_the_managers_rules(root: str, s3_server: S3Server) -> None:
    out = run(
        "prune", root, "--keep-last", "1", "--keep-best", "1", "--monitor", "loss", "--mode", "min"
    )
    assert out.returncode == 0, out.stderr
    with distckpt.CheckpointManager(root, read_only=True) as mgr:  # from the environment too
        assert mgr.steps() == [20, 30]
    remaining = {info.key.split("/")[0] for info in raw_store(root, s3_server).list()}
    assert step_dir_name(10) not in remaining  # its objects are gone, not only its commit


def test_prune_never_removes_the_checkpoint_best_named_before_it(
    s3_server: S3Server, s3_url: str, aws_env: None
) -> None:
    """As on a local root: a prune ranking the other way moves ``best``, but the checkpoint
    it named before (the job's best) stays; --monitor without --mode is refused."""
    with distckpt.CheckpointManager(
        s3_url, storage_options=s3_server.storage_options(), monitor="acc", mode="max"
    ) as mgr:
        for step, acc in ((10, 0.50), (20, 0.91), (30, 0.70), (40, 0.72), (50, 0.60)):
            mgr.save(step, {"w": torch.zeros(4)}, metrics={"acc": acc})
    out = run("prune", s3_url, "--keep-last", "2", "--monitor", "acc")
    assert out.returncode == 2 and "needs --mode" in out.stderr, out
    out = run("prune", s3_url, "--keep-last", "2", "--monitor", "acc", "--mode", "min")
    assert out.returncode == 0, out.stderr
    with distckpt.CheckpointManager(s3_url, read_only=True) as mgr:
        assert mgr.steps() == [10, 20, 40, 50]


def test_delete_removes_a_steps_commit_and_objects_and_moves_the_pointers(
    root: str, s3_server: S3Server
) -> None:
    out = run("delete", root, "30")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "deleted step 30\nkept steps:   10, 20\n"
    out = run("delete", root, "20", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"deleted": 20, "kept": [10]}
    remaining = {info.key.split("/")[0] for info in raw_store(root, s3_server).list()}
    assert not remaining & {step_dir_name(20), step_dir_name(30)}  # every object, not the commit
    # best named step 20; without the job's monitor it is removed, not moved
    assert json.loads(run("ls", root, "--json").stdout)["links"] == {
        "last": step_dir_name(10),
        "best": None,
    }
    out = run("delete", root, "20")
    assert out.returncode == 2, out
    assert out.stderr.startswith("distckpt delete: error: no checkpoint for step 20 in "), out


#: Manifest edits that make a checkpoint this version cannot judge (it may be whole), as
#: tests/hostile_cases.py makes them on a local root, and how a job is refused over it: a save
#: of a lower step, or, for a newer format version, the start already (docs/verification.md).
#: Its fourth case, a symlinked rank file, has no object-store equivalent: an object is no link.
UNJUDGED_MANIFESTS: dict[str, tuple[dict[str, object], type[Exception], str]] = {
    "newer-format-version": ({"format_version": 999}, distckpt.UnsupportedVersion, "upgrade"),
    "unknown-format": ({"format": "pickle-jar"}, distckpt.InvalidStep, "could not be judged"),
    "unknown-checksum-algorithm": (
        {"checksum_algorithm": "md4"},
        distckpt.InvalidStep,
        "could not be judged",
    ),
}


@pytest.mark.parametrize("case", sorted(UNJUDGED_MANIFESTS))
def test_delete_removes_a_checkpoint_this_version_cannot_judge(
    root: str, s3_server: S3Server, case: str
) -> None:
    """The s3:// case of docs/verification.md's advice: a newest checkpoint this version cannot
    judge is deleted with ``distckpt delete ROOT STEP``, and a job saves past it."""
    edit, refusal, says = UNJUDGED_MANIFESTS[case]
    store = raw_store(root, s3_server)
    attempt = json.loads(store.get_bytes(f"{step_dir_name(30)}/COMMIT"))["attempt"]
    manifest = f"{step_dir_name(30)}/{attempt}/manifest.json"
    data = json.loads(store.get_bytes(manifest))
    data.update(edit)
    store.put_bytes(manifest, json.dumps(reseal_manifest(data)).encode())
    with pytest.raises(refusal, match=says) as refused, distckpt.CheckpointManager(root) as mgr:
        mgr.save(25, {"w": torch.zeros(4)})
    if refusal is distckpt.InvalidStep:  # the command it names is the one run next
        assert f"(distckpt delete {root} 30)" in str(refused.value), refused.value
    out = run("delete", root, "30")
    assert out.returncode == 0, out.stderr
    assert [info.key for info in store.list(step_dir_name(30) + "/")] == []
    assert json.loads(run("ls", root, "--json").stdout)["links"]["last"] == step_dir_name(20)
    with distckpt.CheckpointManager(root) as mgr:
        assert mgr.save(25, {"w": torch.zeros(4)}) is not None
        assert mgr.steps() == [10, 20, 25]


def test_delete_next_to_a_live_job_never_moves_last_back_past_its_commit(
    root: str, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job commits step 40 (and points ``last`` at it) after ``delete`` listed the commits
    and before it moves the pointers: ``last`` stays on 40, not on the 30 that delete saw as
    newest. The job's commit is made at the pointer swap's fault point, the one place a test
    can put it in that window every time (two processes would hit it only by chance)."""
    real_hit = upkeep.faults.hit
    with distckpt.CheckpointManager(
        root, storage_options=s3_server.storage_options(), monitor="loss"
    ) as job:
        armed = [True]

        def commit_in_the_window(point: str, rank: int) -> None:
            if point == "during_link_swap" and armed[0]:
                armed[0] = False
                job.save(40, {"w": torch.zeros(4)}, metrics={"loss": 9.0})
            real_hit(point, rank)

        monkeypatch.setattr(upkeep.faults, "hit", commit_in_the_window)
        assert main(["delete", root, "20"], out=io.StringIO()) == 0
        assert not armed[0]
        links = json.loads(run("ls", root, "--json").stdout)["links"]
        assert links == {"last": step_dir_name(40), "best": None}, links  # best named 20
        assert distckpt.load_checkpoint(f"{root}/last").step == 40
        job.save(50, {"w": torch.zeros(4)}, metrics={"loss": 5.0})  # repoints best: its monitor
    links = json.loads(run("ls", root, "--json").stdout)["links"]
    assert links == {"last": step_dir_name(50), "best": step_dir_name(30)}, links


def test_gc_removes_the_leftovers_of_a_dead_writer(root: str, s3_server: S3Server) -> None:
    """An uncommitted step prefix (objects without a commit object) left by a writer that is
    gone, with no job holding the root: ``gc`` removes it and leaves the committed steps."""
    store = raw_store(root, s3_server)
    leftover = f"{step_dir_name(40)}/deadbeef/rank-00000.pt"
    store.put_bytes(leftover, b"half of a checkpoint")
    out = run("gc", root, "--json")
    assert out.returncode == 0, out
    assert [info.key for info in store.list(step_dir_name(40) + "/")] == []
    assert json.loads(run("ls", root, "--json").stdout)["checkpoints"][-1]["step"] == 30


def test_export_then_load_in_a_plain_process(read_root: str, tmp_path: Path) -> None:
    out_file = tmp_path / "model.pt"
    out = run("export", f"{read_root}/best", str(out_file))
    assert out.returncode == 0, out.stderr
    state = torch.load(out_file, weights_only=True)
    assert torch.equal(state["w"], torch.full((4,), 20.0))


def test_export_to_an_s3_url_uploads_what_a_local_export_writes(
    read_root: str, s3_server: S3Server, tmp_path: Path
) -> None:
    """The object, not a local file under ``./s3:`` (the working directory is the test's)."""
    bucket = S3Url.parse(read_root).bucket
    url = f"s3://{bucket}/exports/model.pt"
    out = run("export", f"{read_root}/best", url, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"out": url}
    assert run("export", f"{read_root}/best", str(tmp_path / "model.pt")).returncode == 0
    local = torch.load(tmp_path / "model.pt", weights_only=True)
    data = raw_store(f"s3://{bucket}", s3_server).get_bytes("exports/model.pt")
    uploaded = torch.load(io.BytesIO(data), weights_only=True)
    assert uploaded.keys() == local.keys() and torch.equal(uploaded["w"], local["w"])
    assert not (tmp_path / "s3:").exists()
    out = run("export", f"{read_root}/best", f"s3://{bucket}/exports/")
    assert out.returncode == 2 and "names no object" in out.stderr, out


@pytest.mark.parametrize(
    "name", ["last", "best", ".lease", f"{step_dir_name(10)}/model.pt", f"{step_dir_name(40)}"]
)
def test_export_refuses_to_write_over_a_roots_own_names(
    root: str, s3_server: S3Server, name: str
) -> None:
    """An object under a name of the root's layout (a pointer, the lease, a step's prefix) would
    replace or join the root's own: refused before anything is written, the root unchanged."""
    store = raw_store(root, s3_server)
    before = {info.key: info.etag for info in store.list()}
    with pytest.raises(distckpt.InvalidArgument, match="checkpoint root"):
        distckpt.export(f"{root}/{step_dir_name(10)}", f"{root}/{name}")
    out = run("export", f"{root}/{step_dir_name(10)}", f"{root}/{name}")
    assert out.returncode == 2 and "checkpoint root" in out.stderr, out
    assert {info.key: info.etag for info in store.list()} == before
    assert json.loads(run("ls", root, "--json").stdout)["links"]["last"] == step_dir_name(30)
    # beside the root, and under a prefix named as a pointer that holds no root, it writes
    bucket = S3Url.parse(root).bucket
    for beside in (f"{root}-exports/{name}", f"s3://{bucket}/models/last"):
        assert distckpt.export(f"{root}/{step_dir_name(10)}", beside) == beside


@pytest.mark.parametrize("args", COMMANDS_ON_A_LOCATION, ids=lambda value: value[0])
def test_a_prefix_holding_nothing_is_a_missing_root(
    s3_server: S3Server, s3_url: str, aws_env: None, args: tuple[str, ...]
) -> None:
    """A prefix holding nothing (a typo) is what a missing local root dir is: bad input (status
    2, naming it) for every command, and nothing is made there by mistake."""
    out = run(args[0], s3_url, *args[1:])
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith(f"distckpt {args[0]}: error: no "), out.stderr
    assert s3_url in out.stderr
    assert list(raw_store(s3_url, s3_server).list()) == []


@pytest.mark.parametrize("args", COMMANDS_ON_A_LOCATION, ids=lambda value: value[0])
def test_a_missing_bucket_is_named_as_one_not_as_a_missing_root(
    s3_server: S3Server, aws_env: None, args: tuple[str, ...]
) -> None:
    """Every command says the store's own ``NoSuchBucket``: a prefix of a bucket that is
    there but empty is a missing root, a bucket that is not there is not."""
    url = "s3://no-such-bucket-here/t1"
    out = run(args[0], url, *args[1:])
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr
    assert "NoSuchBucket" in out.stderr, out.stderr
    assert "no checkpoint root" not in out.stderr, out.stderr


@pytest.mark.parametrize(
    ("args", "status"),
    [
        (("info",), 2),
        (("verify",), 2),
        (("ls",), 0),
        (("prune", "--keep-last", "1"), 0),
        (("gc",), 0),
    ],
    ids=lambda value: value[0] if isinstance(value, tuple) else str(value),
)
def test_a_root_before_its_first_save_is_an_empty_local_root(
    s3_server: S3Server, s3_url: str, aws_env: None, args: tuple[str, ...], status: int
) -> None:
    """A root a job opened but never committed to holds the job's lease, as a local root dir
    made by a manager holds no checkpoint: ``info`` and ``verify`` find no checkpoint there
    (status 2, saying so); ``ls``, ``prune`` and ``gc`` find nothing to show or remove."""
    distckpt.CheckpointManager(s3_url, storage_options=s3_server.storage_options()).close()
    out = run(args[0], s3_url, *args[1:])
    assert out.returncode == status, out
    assert "Traceback" not in out.stderr
    if status == 2:
        assert out.stderr.startswith(f"distckpt {args[0]}: error: no "), out.stderr
        assert s3_url in out.stderr
    keys = [info.key for info in raw_store(s3_url, s3_server).list()]
    assert not [key for key in keys if key.startswith("step-")], keys


def test_prune_and_gc_of_a_checkpoint_are_refused(read_root: str, s3_server: S3Server) -> None:
    for args in (
        ("gc", f"{read_root}/{step_dir_name(30)}"),
        ("prune", f"{read_root}/{step_dir_name(30)}", "--keep-last", "1"),
    ):
        out = run(*args)
        assert out.returncode == 2, out
        assert "not a checkpoint root" in out.stderr, out.stderr
    with distckpt.CheckpointManager(read_root, read_only=True) as mgr:
        assert mgr.steps() == [10, 20, 30]


@pytest.mark.parametrize(
    "command", [("prune", "--keep-last", "1"), ("gc",), ("ls",), ("lease",), ("delete", "20")]
)
@pytest.mark.parametrize("name", ["last", "best"])
def test_a_command_on_a_root_refuses_a_link(
    read_root: str, s3_server: S3Server, command: tuple[str, ...], name: str
) -> None:
    """A root's ``last``/``best`` pointer given where a root is wanted is refused as the link
    it is, naming its root, and nothing is removed."""
    out = run(command[0], f"{read_root}/{name}", *command[1:])
    assert out.returncode == 2, out
    assert f"is the {name} link, not a checkpoint root: give its root, {read_root}" in out.stderr
    with distckpt.CheckpointManager(read_root, read_only=True) as mgr:
        assert mgr.steps() == [10, 20, 30]


@pytest.mark.parametrize("name", ["last", "best"])
def test_a_root_at_a_prefix_named_last_or_best_is_a_root(
    s3_server: S3Server, s3_url: str, aws_env: None, name: str
) -> None:
    """``s3://BUCKET/ckpt/best`` is a root of its own when the root above it (here: none)
    has no pointer of that name naming a checkpoint."""
    url = f"{s3_url}/{name}"
    with distckpt.CheckpointManager(url, storage_options=s3_server.storage_options()) as mgr:
        mgr.save(10, {"w": torch.zeros(2)})
    for command in (("ls",), ("prune", "--keep-last", "1"), ("gc",), ("lease",)):
        out = run(command[0], url, *command[1:])
        assert out.returncode == 0, out
    assert "step        10" in run("info", url).stdout


def test_python_dash_m_with_the_aws_environment(read_root: str, s3_server: S3Server) -> None:
    """The real entry point, in a fresh process that finds the store through the AWS
    variables alone."""
    env = {**os.environ, **aws_environment(s3_server)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-m", "distckpt", "verify", f"{read_root}/last"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert f"ok     {step_dir_name(30)}" in out.stdout


def _lease_record(url: str) -> dict[str, Any]:
    """What ``distckpt lease --json`` shows of the lease of the root at ``url``."""
    out = run("lease", "--json", url)
    assert out.returncode == 0, out
    lease: dict[str, Any] = json.loads(out.stdout)["lease"]
    return lease


def test_lease_shows_the_holders_job_start_and_generation(
    s3_server: S3Server, s3_url: str, aws_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease object keeps its holder's job id, start time and generation, as a root
    directory's lease record does: ``lease --json`` and ``ls --json`` show them alike, and the
    text says ``job J on host H, pid P, since T (generation G)``."""
    # The job id comes from the launcher's environment; this test is the launcher here.
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with distckpt.CheckpointManager(s3_url, storage_options=s3_server.storage_options()):
        held = _lease_record(s3_url)
        listed = run("ls", "--json", s3_url)
        assert listed.returncode == 0, listed
        assert json.loads(listed.stdout)["lease"] == held
        assert (held["host"], held["pid"]) == (this_process_host(), os.getpid())
        assert (held["job_id"], held["generation"], held["released_utc"]) == ("4242", 1, None)
        started = datetime.datetime.fromisoformat(held["started_utc"])
        assert started.utcoffset() == datetime.timedelta(0)
        for command in ("lease", "ls"):
            shown = run(command, s3_url).stdout
            assert (
                f"lease: job 4242 on host {this_process_host()}, pid {os.getpid()}, "
                f"since {held['started_utc']} (generation 1) ("
            ) in shown


def test_lease_shows_an_older_versions_lease_object_as_before(
    s3_server: S3Server, s3_url: str, aws_env: None
) -> None:
    """A lease object of an older version keeps its holder's host and pid only: the job id,
    start time and generation are null, and the holder is not said to have no job id."""
    older_record = {"owner": "older", "host": "node-b", "pid": 7, "duration": 30.0}
    with ObjectStore(s3_url, s3_server.storage_options()) as store:
        store.put_bytes(".lease", json.dumps(older_record).encode())
    held = _lease_record(s3_url)
    assert (held["host"], held["pid"]) == ("node-b", 7)
    assert held["job_id"] is None and held["started_utc"] is None
    assert held["generation"] is None and held["released_utc"] is None
    shown = run("lease", s3_url).stdout
    assert "lease: a job on host node-b, pid 7 (" in shown
    assert "without a job id" not in shown and "generation" not in shown
