"""The distckpt command line, run as a user would: `python -m distckpt ...` in a subprocess."""

from __future__ import annotations

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
from distckpt import resolve
from distckpt.cli import main
from distckpt.manifest import MANIFEST_CHECKSUM_KEY
from tests.cli_runner import run_cli as run


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    with distckpt.CheckpointManager(path, monitor="loss", fsync=False) as mgr:
        for step, loss in ((10, 3.0), (20, 1.0), (30, 2.0)):
            mgr.save(
                step, {"w": torch.full((4,), float(step))}, epoch=step // 10, metrics={"loss": loss}
            )
    return path


def ls_lines(root: str) -> list[str]:
    """The lines of ``distckpt ls`` of a root saved as the ``root`` fixture saves it, after
    checking the table's steps and links."""
    out = run("ls", root)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["STEP", "EPOCH", "METRICS"]
    row20 = next(line for line in lines if line.startswith("20 "))
    row30 = next(line for line in lines if line.startswith("30 "))
    assert "loss=1" in row20 and row20.rstrip().endswith("best")
    assert row30.rstrip().endswith("last")
    return lines


def test_ls_shows_steps_links_and_leftovers(root: Path) -> None:
    (root / ".staging" / "step-00000040.deadbeef").mkdir(parents=True)
    lines = ls_lines(str(root))
    assert any("leftover staging" in line and "dead writer" in line for line in lines)


def test_ls_json(root: Path) -> None:
    data = json.loads(run("ls", str(root), "--json").stdout)
    assert [c["step"] for c in data["checkpoints"]] == [10, 20, 30]
    assert data["links"] == {"last": "step-00000030", "best": "step-00000020"}
    assert data["checkpoints"][1]["links"] == ["best"]


def strict_json(text: str) -> Any:
    """``text`` parsed as strict JSON: NaN and Infinity, which Python writes by default but
    JSON has not, are refused."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_every_json_output_is_strict_json_with_non_finite_metrics(tmp_path: Path) -> None:
    """Metrics that are NaN or infinite are written as the manifest writes them ("nan",
    "inf"), so any JSON parser reads every command's --json output."""
    root = tmp_path / "root"
    with distckpt.CheckpointManager(root, monitor="loss", fsync=False) as mgr:
        for step, loss in ((10, 3.0), (20, float("nan")), (30, 2.0), (40, float("inf"))):
            mgr.save(step, {"w": torch.zeros(4)}, metrics={"loss": loss})
    listed = strict_json(run("ls", str(root), "--json").stdout)
    assert [c["metrics"]["loss"] for c in listed["checkpoints"]] == [3.0, "nan", 2.0, "inf"]
    assert strict_json(run("info", str(root / "step-00000020"), "--json").stdout)["metrics"] == {
        "loss": "nan"
    }
    commands = [
        ("info", str(root), "--json"),
        ("verify", str(root), "--json"),
        ("lease", str(root), "--json"),
        ("export", str(root), str(tmp_path / "out.pt"), "--json"),
        ("gc", str(root), "--json"),
        ("prune", str(root), "--keep-last", "3", "--json"),
    ]
    for args in commands:
        out = run(*args)
        assert out.returncode == 0, out
        strict_json(out.stdout)


def test_info_shows_non_finite_metadata_another_writer_left(root: Path) -> None:
    """A manifest without its own checksum (an older version's, another tool's) may hold NaN
    or infinities in its metadata, which reading it accepts: ``info`` spells them as the
    manifest spells such metrics, in its text and in strict JSON."""
    manifest = root / "step-00000030" / "manifest.json"
    data = json.loads(manifest.read_text())
    del data[MANIFEST_CHECKSUM_KEY]
    data["metadata"] = {"lr": float("nan"), "seen": [float("inf"), 1.5], "at": {"x": -1e999}}
    manifest.write_text(json.dumps(data))  # Python's default: NaN and Infinity, not JSON
    spelled = {"lr": "nan", "seen": ["inf", 1.5], "at": {"x": "-inf"}}
    listed = run("info", str(root), "--json")
    assert listed.returncode == 0, listed.stderr
    assert strict_json(listed.stdout)["metadata"] == spelled
    shown = run("info", str(root))
    assert shown.returncode == 0, shown.stderr
    assert f"metadata    {json.dumps(spelled, sort_keys=True)}\n" in shown.stdout


def test_info_resolves_links_and_relative_paths(root: Path) -> None:
    out = run("info", "root/best", cwd=root.parent)
    assert out.returncode == 0, out.stderr
    assert "step        20" in out.stdout and "rank-00000.pt" in out.stdout
    data = json.loads(run("info", str(root), "--json").stdout)
    assert data["step"] == 30 and data["path"].endswith("step-00000030")


def test_verify_exit_status(root: Path) -> None:
    assert run("verify", str(root)).returncode == 0
    shard = root / "step-00000020" / "rank-00000.pt"
    data = bytearray(shard.read_bytes())
    data[-30] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = run("verify", str(root))
    assert out.returncode == 1
    assert "BROKEN step-00000020" in out.stdout and "checksum mismatch" in out.stdout
    assert run("verify", str(root), "--no-checksums").returncode == 0
    report = json.loads(run("verify", str(root), "--json").stdout)
    assert report["ok"] is False
    assert [c["ok"] for c in report["checkpoints"]] == [True, False, True]


def test_prune_uses_the_managers_rules(root: Path) -> None:
    out = run(
        "prune",
        str(root),
        "--keep-last",
        "1",
        "--keep-best",
        "1",
        "--monitor",
        "loss",
        "--mode",
        "min",
    )
    assert out.returncode == 0, out.stderr
    assert distckpt.CheckpointManager(root).steps() == [20, 30]
    # Without --monitor the best link is not maintained, but its target stays protected.
    out = run("prune", str(root), "--keep-last", "1", "--json")
    assert json.loads(out.stdout) == {"removed": [], "kept": [20, 30]}


def _job_ranked_by_accuracy(root: Path) -> None:
    """A job that keeps its best by the highest accuracy: step 20 is its best."""
    with distckpt.CheckpointManager(root, monitor="acc", mode="max", fsync=False) as mgr:
        for step, acc in ((10, 0.50), (20, 0.91), (30, 0.70), (40, 0.72), (50, 0.60)):
            mgr.save(step, {"w": torch.zeros(4)}, metrics={"acc": acc})


def test_prune_with_monitor_needs_the_jobs_mode(tmp_path: Path) -> None:
    """The root does not record the job's mode: a default guess ("min") would rank an
    accuracy upside down and remove the job's best, so --monitor without --mode is refused."""
    root = tmp_path / "root"
    _job_ranked_by_accuracy(root)
    out = run("prune", str(root), "--keep-last", "2", "--monitor", "acc")
    assert out.returncode == 2, out
    assert out.stderr.startswith("distckpt prune: error: --monitor acc needs --mode"), out.stderr
    out = run("prune", str(root), "--keep-last", "2", "--mode", "max")
    assert out.returncode == 2 and "--mode needs --monitor" in out.stderr, out
    assert distckpt.CheckpointManager(root, read_only=True).steps() == [10, 20, 30, 40, 50]
    out = run("prune", str(root), "--keep-last", "2", "--monitor", "acc", "--mode", "max")
    assert out.returncode == 0, out.stderr
    assert distckpt.CheckpointManager(root, read_only=True).steps() == [20, 40, 50]
    assert os.readlink(root / "best") == "step-00000020"


def test_prune_never_removes_the_checkpoint_best_named_before_it(tmp_path: Path) -> None:
    """A prune whose monitor/mode disagree with the job's moves the best link, but the
    checkpoint it named before (the job's best) stays."""
    root = tmp_path / "root"
    _job_ranked_by_accuracy(root)
    out = run("prune", str(root), "--keep-last", "2", "--monitor", "acc", "--mode", "min")
    assert out.returncode == 0, out.stderr
    assert distckpt.CheckpointManager(root, read_only=True).steps() == [10, 20, 40, 50]
    assert os.readlink(root / "best") == "step-00000010"  # this prune's best, kept too


def test_prune_by_another_metric_moves_best_until_the_job_points_it_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """README: --monitor must be the job's own metric, as --mode its own mode (the help says
    so): a prune by another metric moves best to that metric's best, keeps the checkpoint best
    named before, and the job's next start points best back."""
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--monitor MONITOR metric for --keep-best and the best link: the job's own" in help_text
    assert "is best: the job's own, which the root does not record" in help_text
    root = tmp_path / "root"
    by_loss = ("prune", str(root), "--keep-last", "1", "--monitor", "loss", "--mode", "min")
    with distckpt.CheckpointManager(root, monitor="acc", mode="max", fsync=False) as mgr:
        for step, acc, loss in ((10, 0.50, 1.0), (20, 0.91, 2.0), (30, 0.70, 0.5), (40, 0.72, 3.0)):
            mgr.save(step, {"w": torch.zeros(4)}, metrics={"acc": acc, "loss": loss})
        assert os.readlink(root / "best") == "step-00000020"
        out = run(*by_loss)  # next to the live job
        assert out.returncode == 0, out.stderr
        assert os.readlink(root / "best") == "step-00000030"  # the best by loss
        assert mgr.steps() == [20, 30, 40]  # the one best named before is kept
        mgr.save(50, {"w": torch.zeros(4)}, metrics={"acc": 0.6, "loss": 9.0})
        assert os.readlink(root / "best") == "step-00000020"  # the job's save points it back
    assert run(*by_loss).returncode == 0
    assert os.readlink(root / "best") == "step-00000030"
    with distckpt.CheckpointManager(root, monitor="acc", mode="max", fsync=False):
        assert os.readlink(root / "best") == "step-00000020"  # and so does its start


def test_export_then_load_in_a_plain_process(root: Path, tmp_path: Path) -> None:
    out_file = tmp_path / "model.pt"
    out = run("export", str(root / "best"), str(out_file))
    assert out.returncode == 0, out.stderr
    state = torch.load(out_file, weights_only=True)
    assert torch.equal(state["w"], torch.full((4,), 20.0))


@pytest.mark.parametrize("users_link", [False, True], ids=["plain", "with-last-link"])
@pytest.mark.parametrize(
    "args",
    [("ls",), ("lease",), ("gc",), ("prune", "--keep-last", "1"), ("delete", "10")],
    ids=lambda value: value[0],
)
def test_a_command_on_a_root_refuses_a_directory_of_roots(
    root: Path, args: tuple[str, ...], users_link: bool
) -> None:
    """The directory holding a root (``runs/`` for ``runs/exp1``) is no root, even holding a
    user's own ``last`` link to the root (a root's links name its step dirs): refused as bad
    input naming it, and nothing is made (no lock file) or removed (the link) there."""
    parent = root.parent
    if users_link:
        (parent / "last").symlink_to(root.name, target_is_directory=True)
    before = sorted(parent.iterdir())
    out = run(args[0], str(parent), *args[1:])
    assert out.returncode == 2, out
    assert f"{parent} is not a checkpoint root" in out.stderr, out.stderr
    assert sorted(parent.iterdir()) == before


@pytest.mark.parametrize("command", ["ls", "gc"])
def test_a_command_on_a_root_refuses_an_empty_directory(tmp_path: Path, command: str) -> None:
    """An empty directory is no root either: exit 2, not an empty listing, and no lock file."""
    out = run(command, str(tmp_path))
    assert out.returncode == 2, out
    assert f"{tmp_path} is not a checkpoint root" in out.stderr, out.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("target", "refused_name"),
    [
        ("root/last/model.pt", "last"),  # through the link, into the newest step dir
        ("root/step-00000030/rank-00000.pt", "step-00000030"),  # over a committed rank file
        ("root/step-00000010/extra.pt", "step-00000010"),
        ("root/.staging/x.pt", ".staging"),
        ("root/.trash/x.pt", ".trash"),
        ("root/last", "last"),
        ("root/.lock", ".lock"),
        ("root/.lease.json", ".lease.json"),
        # A link outside the root to one of its step dirs: only its resolved path is inside.
        ("alias/model.pt", "step-00000030"),
    ],
)
def test_export_inside_the_roots_own_layout_is_refused(
    root: Path, tmp_path: Path, target: str, refused_name: str
) -> None:
    """As an ``s3://`` output under a root's own name is: a file in a step dir fails its
    verify and goes with it at retention, a replaced rank file loses the checkpoint."""
    (tmp_path / "alias").symlink_to(root / "step-00000030", target_is_directory=True)
    before = {path: path.read_bytes() for path in root.rglob("*") if path.is_file()}
    out = run("export", str(root), str(tmp_path / target))
    assert out.returncode == 2, out
    assert "inside the checkpoint root" in out.stderr and repr(refused_name) in out.stderr
    assert {path: path.read_bytes() for path in root.rglob("*") if path.is_file()} == before
    assert run("verify", str(root)).returncode == 0
    # Beside the layout, in the root, is not in it: nothing distckpt reads or removes, a name
    # starting like a set-aside checkpoint's but not one included.
    for beside in ("model.pt", "damaged-notes.pt"):
        assert run("export", str(root), str(root / beside)).returncode == 0


@pytest.mark.parametrize(
    "args",
    [
        ("info", "does-not-exist"),
        ("ls", "does-not-exist"),
        ("verify", "does-not-exist"),
        ("prune", "does-not-exist", "--keep-last", "1"),
        ("gc", "does-not-exist"),
        ("export", "does-not-exist", "out.pt"),
        ("lease", "does-not-exist"),
        ("delete", "does-not-exist", "1"),
    ],
)
def test_bad_input_is_a_clear_error_with_status_2(tmp_path: Path, args: tuple[str, ...]) -> None:
    out = run(*args, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.startswith(f"distckpt {args[0]}: error:")
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "does-not-exist").exists()  # nothing is created by mistake


@pytest.mark.parametrize(
    "command", [("prune", "--keep-last", "1"), ("gc",), ("ls",), ("lease",), ("delete", "20")]
)
@pytest.mark.parametrize("path", ["last", "step-00000020"])
def test_a_command_on_a_root_refuses_a_checkpoint_or_link(
    root: Path, command: tuple[str, ...], path: str
) -> None:
    """A checkpoint or a link given where a root is wanted is bad input: nothing is removed,
    and no file (the root's lock) is created inside a checkpoint, which would then fail
    verify."""
    out = run(command[0], str(root / path), *command[1:])
    assert out.returncode == 2, out
    assert f"not a checkpoint root: give its root, {root}" in out.stderr, out.stderr
    assert distckpt.CheckpointManager(root, read_only=True).steps() == [10, 20, 30]
    assert run("verify", str(root)).returncode == 0


@pytest.mark.parametrize("name", ["last", "best"])
@pytest.mark.parametrize("how", ["symlink", "dir"])
def test_a_root_reached_through_a_path_named_last_or_best_is_a_root(
    root: Path, tmp_path: Path, name: str, how: str
) -> None:
    """A path named like a link is a root when no ``last``/``best`` pointer of its parent
    names a checkpoint there: a user's own link to a run (``ln -s exp42 runs/best``) or a
    root dir of that name."""
    runs = tmp_path / "runs"
    runs.mkdir()
    path = runs / name
    if how == "symlink":
        path.symlink_to(os.path.relpath(root, runs))
    else:
        root.rename(path)
    for command in (("ls",), ("prune", "--keep-last", "3"), ("gc",), ("lease",)):
        out = run(command[0], str(path), *command[1:])
        assert out.returncode == 0, out
    assert "step        30" in run("info", str(path)).stdout
    assert distckpt.CheckpointManager(path, read_only=True).steps() == [10, 20, 30]


def test_a_plain_file_given_for_a_root_is_named_a_file(tmp_path: Path) -> None:
    """A file where a root or checkpoint is wanted is there: "no root at" would send the user
    looking for a typo, so every command says it is a file (status 2, nothing created)."""
    plain = tmp_path / "notes.txt"
    plain.write_text("not a checkpoint")
    for args in (
        ("ls",),
        ("info",),
        ("verify",),
        ("gc",),
        ("lease",),
        ("prune", "--keep-last", "1"),
        ("delete", "1"),
        ("export", str(tmp_path / "out.pt")),
    ):
        out = run(args[0], str(plain), *args[1:])
        assert out.returncode == 2, out
        assert f"{plain} is a file, not a checkpoint or checkpoint root" in out.stderr, out
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    with pytest.raises(distckpt.CheckpointNotFound, match="is a file, not a checkpoint"):
        distckpt.load_checkpoint(plain)


def test_verify_of_a_path_holding_no_checkpoint_exits_2(tmp_path: Path) -> None:
    """An empty dir (a typo'd root, a root before its first save) verifies nothing: saying
    "ok" would hide the mistake, so it is an error."""
    empty = tmp_path / "empty"
    empty.mkdir()
    out = run("verify", str(empty))
    assert out.returncode == 2, out
    assert out.stderr.startswith("distckpt verify: error: no checkpoint in"), out.stderr
    assert str(empty) in out.stderr
    for args in (("info", str(empty)), ("export", str(empty), str(tmp_path / "out.pt"))):
        out = run(*args)
        assert out.returncode == 2 and str(empty) in out.stderr, out


def test_prune_without_a_rule_is_refused(root: Path) -> None:
    out = run("prune", str(root))
    assert out.returncode == 2 and "--keep-last" in out.stderr
    assert distckpt.CheckpointManager(root).steps() == [10, 20, 30]
    # --keep-unranked alone removes nothing either: it only keeps.
    out = run("prune", str(root), "--monitor", "loss", "--mode", "min", "--keep-unranked")
    assert out.returncode == 2 and "--keep-every-n-seconds" in out.stderr


def test_prune_keep_every_n_seconds_and_keep_unranked(root: Path) -> None:
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        mgr.save(40, {"w": torch.zeros(1)})  # saved without the monitored metric
    # Saved moments apart: the time history keeps the oldest only; 40 is the newest.
    out = run("prune", str(root), "--keep-every-n-seconds", "3600", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"removed": [30], "kept": [10, 20, 40]}
    out = run(
        "prune",
        str(root),
        "--keep-last",
        "1",
        "--monitor",
        "loss",
        "--mode",
        "min",
        "--keep-unranked",
    )
    assert out.returncode == 0, out.stderr
    assert distckpt.CheckpointManager(root).steps() == [20, 40]  # best, and newest + unranked


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2


def test_python_dash_m_runs_the_real_entry_point(root: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "distckpt", "verify", str(root / "last")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "ok     step-00000030" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "distckpt", "info", str(root / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_console_script_is_installed() -> None:
    scripts = Path(sys.executable).parent
    assert (scripts / "distckpt").exists() or any(
        (Path(p) / "distckpt").exists() for p in os.environ.get("PATH", "").split(os.pathsep)
    )


def test_verify_shows_a_progress_bar_on_a_terminal_for_large_checkpoints() -> None:
    from distckpt.cli_output import PROGRESS_MIN_BYTES, Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    progress = Progress(PROGRESS_MIN_BYTES * 2, screen)
    for _ in range(4):
        progress(PROGRESS_MIN_BYTES // 2)
    progress.finish()
    assert "verifying [" in screen.getvalue() and "100%" in screen.getvalue()
    quiet = Terminal()
    small = Progress(1024, quiet)  # small checkpoints: no bar
    small(1024)
    small.finish()
    piped = io.StringIO()  # not a terminal (a log file, a pipe): no bar
    Progress(PROGRESS_MIN_BYTES * 2, piped)(PROGRESS_MIN_BYTES * 2)
    assert quiet.getvalue() == "" and piped.getvalue() == ""


def test_ls_counts_as_damaged_only_listed_steps_still_there_that_fail(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Next to a live job, ls lists the root once: a step committed while it checks the listed
    ones is not in its listing, a step deleted meanwhile (retention) is not damaged, and a
    damaged step still there is."""
    (rank_file,) = root.glob("step-00000010/rank-*")
    rank_file.write_bytes(rank_file.read_bytes()[:-1])  # step 10 damaged: a file cut short
    real_check = resolve.check
    live_job_ran: list[bool] = []

    def check_while_a_job_saves_and_prunes(source: Any, **kwargs: Any) -> Any:
        # No hook exists between ls's listing and its checks: this runs the real check and,
        # before the first one, what a live job with retention does (a real save and delete).
        if not live_job_ran:
            live_job_ran.append(True)
            with distckpt.CheckpointManager(root, fsync=False) as job:
                job.save(40, {"w": torch.full((4,), 40.0)}, epoch=4, metrics={"loss": 0.5})
                job.delete(30)
        return real_check(source, **kwargs)

    monkeypatch.setattr(resolve, "check", check_while_a_job_saves_and_prunes)
    data = json.loads(run("ls", str(root), "--json").stdout)
    assert live_job_ran
    assert data["damaged_steps"] == [10]
    assert [c["step"] for c in data["checkpoints"]] == [20]
