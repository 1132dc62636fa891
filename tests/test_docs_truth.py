"""What README.md, the install script and the public docstrings say, held against the code: the
API table's signatures, the rank file's header, the ``OSError`` the plain-process functions pass
through, the space margin, the CPU build of torch the install asks for, the linter's pin, and the
collective costs and failures the manager's docstrings name, and the tests the filesystem matrix's
table in docs/filesystems.md names."""

from __future__ import annotations

import ast
import contextlib
import errno
import importlib.util
import inspect
import io
import json
import os
import re
import shlex
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import pytest
import torch

import distckpt
from distckpt import checksums, events
from tests.filesystems import skip_or_fail
from tests.ranks import run_ranks, values

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
INSTALL_SCRIPT = REPO / "scripts" / "install.sh"
PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


# ------------------------------------------------------------------ install script


def _default_torch_version() -> str:
    """The torch version the install script installs unless told another."""
    found = re.search(
        r'TORCH_VERSION="\$\{DISTCKPT_TORCH_VERSION:-([0-9.]+)\}"', INSTALL_SCRIPT.read_text()
    )
    assert found is not None, "the version must stay overridable by DISTCKPT_TORCH_VERSION"
    return found.group(1)


def _pip_installs(script: Path) -> list[list[str]]:
    """The arguments after ``pip install`` of each pip command in ``script``, continuation
    lines joined (the words as the shell splits them, variables left unexpanded)."""
    text = script.read_text().replace("\\\n", " ")
    commands: list[list[str]] = []
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
        for i in range(len(words) - 1):
            if words[i : i + 2] == ["pip", "install"]:
                arguments: list[str] = []
                for word in words[i + 2 :]:
                    if word and all(char in lexer.punctuation_chars for char in word):
                        break  # the end of the command: ; && || | and the like
                    arguments.append(word)
                commands.append(arguments)
    return commands


def test_install_script_asks_for_the_cpu_build_of_torch_by_name_then_from_its_cpu_index() -> None:
    # No network here, and the script must not run (it re-points the editable install): its
    # commands are read instead. What matters is that no torch install can reach PyPI's
    # default, which on Linux x86-64 is the CUDA build.
    text = INSTALL_SCRIPT.read_text()
    default = _default_torch_version()
    torch_installs = [
        words for words in _pip_installs(INSTALL_SCRIPT) if any("torch==" in w for w in words)
    ]
    assert torch_installs == [
        ["--quiet", "torch==${TORCH_VERSION}+cpu"],
        ["--quiet", "--index-url", PYTORCH_CPU_INDEX, "torch==${TORCH_VERSION}"],
    ]
    # The fallback runs when the install of the CPU build by name fails, whatever the cause.
    assert 'if ! "$PYTHON" -m pip install --quiet "torch==${TORCH_VERSION}+cpu"; then' in text
    # The README's quick start names the version the script installs by default.
    readme_words = " ".join(README.split())  # the sentence wherever its lines break
    assert f"`torch=={default}+cpu`, and if that install fails," in readme_words
    assert f"`torch=={default}` from PyTorch's CPU index" in README
    assert f"`{PYTORCH_CPU_INDEX}`" in README


def test_a_package_source_here_offers_the_cpu_build_of_torch_by_the_name_the_script_asks(
    tmp_path: Path,
) -> None:
    """pip, configured as on this machine, resolves ``torch==V+cpu`` (V: the script's default)
    to a CPU build: the name the install script asks for first is one a package source has.
    Only resolved (``--dry-run``): nothing is installed."""
    wanted = f"torch=={_default_torch_version()}+cpu"
    report = tmp_path / "report.json"
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed"]
    # a short wait per request and one retry: a source that does not answer is not waited for
    pip += ["--quiet", "--timeout", "15", "--retries", "1", "--report", os.fspath(report), wanted]
    done = subprocess.run(pip, capture_output=True, text=True, timeout=120, check=False)
    # how pip says "not offered": no such version, or none that the constraints pip is
    # configured with (a pip.conf's constraint file) allow
    not_offered = ("No matching distribution found", "ResolutionImpossible")
    if done.returncode != 0 and any(words in done.stderr for words in not_offered):
        skip_or_fail(f"no package source here offers {wanted}: {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, done.stderr
    resolved = [
        (entry["metadata"]["name"], entry["metadata"]["version"])
        for entry in json.loads(report.read_text())["install"]
    ]
    assert resolved == [("torch", wanted.removeprefix("torch=="))]


@pytest.mark.parametrize("script", ["launch/demo.sh", "scripts/test.sh"])
def test_the_quick_start_commands_install_through_the_install_script(script: str) -> None:
    commands = [line.strip() for line in (REPO / script).read_text().splitlines()]
    assert "bash scripts/install.sh" in commands
    assert not [words for words in _pip_installs(REPO / script) if "torch" in " ".join(words)]


def test_the_linter_the_tests_install_is_pinned_and_is_the_one_here() -> None:
    """pyproject.toml pins ruff exactly (scripts/test.sh lints before any test runs, and a
    release with new default rules would fail unchanged code), to the version installed."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = [spec for spec in extra["optional-dependencies"]["test"] if spec.startswith("ruff")]
    assert len(pins) == 1 and re.fullmatch(r"ruff==[0-9.]+", pins[0]), pins
    installed = subprocess.run(
        [sys.executable, "-m", "ruff", "--version"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert installed == ["ruff", pins[0].removeprefix("ruff==")]


# ------------------------------------------------------------------ the API table


def _api_calls() -> list[str]:
    """Every call written out in the first column of the README's API table, such as
    ``distckpt.verify(path, *, checksums=True, ...)``."""
    section = README.split("### API", 1)[1].lstrip("\n").split("\n\n", 1)[0]
    calls: list[str] = []
    for row in section.splitlines():
        if row.startswith("| `"):
            first_cell = row.split(" | ", 1)[0]
            calls += [code for code in re.findall(r"`([^`]+)`", first_cell) if "(" in code]
    return calls


def _callable_named(name: str) -> Callable[..., Any]:
    if name.startswith("mgr."):
        return getattr(distckpt.CheckpointManager, name.removeprefix("mgr."))
    return getattr(distckpt, name.removeprefix("distckpt."))


def _documented_parameters(params: str) -> list[tuple[str, str, Any]]:
    """``params`` as written in the README: each one's name, kind and default (or
    ``inspect.Parameter.empty``), read by parsing them as a function's parameters."""
    function = ast.parse(f"def documented({params}): pass").body[0]
    assert isinstance(function, ast.FunctionDef)
    arguments = function.args
    positional = arguments.args
    defaults = [inspect.Parameter.empty] * (len(positional) - len(arguments.defaults))
    defaults += [ast.literal_eval(node) for node in arguments.defaults]
    found = [
        (arg.arg, "POSITIONAL_OR_KEYWORD", default) for arg, default in zip(positional, defaults)
    ]
    if arguments.vararg is not None:
        found.append((arguments.vararg.arg, "VAR_POSITIONAL", inspect.Parameter.empty))
    for arg, node in zip(arguments.kwonlyargs, arguments.kw_defaults):
        default = inspect.Parameter.empty if node is None else ast.literal_eval(node)
        found.append((arg.arg, "KEYWORD_ONLY", default))
    return found


def test_the_api_table_is_found_and_its_calls_read() -> None:
    names = [call.split("(", 1)[0] for call in _api_calls()]
    assert {"CheckpointManager", "mgr.save", "distckpt.verify", "distckpt.export"} <= set(names)


@pytest.mark.parametrize("call", _api_calls(), ids=lambda call: call.split("(", 1)[0])
def test_the_api_table_gives_each_call_its_real_parameters(call: str) -> None:
    name, params = call.split("(", 1)
    signature = inspect.signature(_callable_named(name))
    real = [
        (p.name, p.kind.name, p.default) for p in signature.parameters.values() if p.name != "self"
    ]
    assert _documented_parameters(params.removesuffix(")")) == real


# ------------------------------------------------------------------ the rank file


def test_a_rank_file_starts_with_the_32_byte_header_the_readme_describes(root: Path) -> None:
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        mgr.save(1, {"w": torch.arange(10, dtype=torch.float32), "note": "plain"})
    data = (root / "step-00000001" / "rank-00000.pt").read_bytes()
    # As README.md's "On disk" puts it, read without the library's own struct.
    magic, version, reserved, index_bytes, skeleton_bytes = struct.unpack("<8sIIQQ", data[:32])
    assert struct.calcsize("<8sIIQQ") == 32
    assert (magic, version, reserved) == (b"DCKPTRAW", 2, 0)
    index = json.loads(data[32 : 32 + index_bytes])
    skeleton = io.BytesIO(data[32 + index_bytes : 32 + index_bytes + skeleton_bytes])
    state, _placeholders = torch.load(skeleton, weights_only=True)
    assert state["note"] == "plain"
    ((offset, nbytes),) = index["storages"]
    assert nbytes == 40
    head_end = 32 + index_bytes + skeleton_bytes
    data_start = -(-head_end // 4096) * 4096  # the data starts on a 4 KiB boundary
    raw = data[data_start + offset : data_start + offset + nbytes]
    assert torch.frombuffer(bytearray(raw), dtype=torch.float32).tolist() == list(range(10))


# ------------------------------------------------------------------ errors


def test_export_raises_the_os_error_of_its_output_file_naming_it(
    root: Path, tmp_path: Path
) -> None:
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        mgr.save(1, {"w": torch.ones(4)})
    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_text("")
    out = not_a_directory / "exported.pt"  # its directory cannot be created
    with pytest.raises(OSError) as info:
        distckpt.export(root, out)
    assert not isinstance(info.value, distckpt.CheckpointError)
    assert info.value.errno in (errno.EEXIST, errno.ENOTDIR)
    assert os.fspath(not_a_directory) in str(info.value)


def _disk_read_error(*args: object, **kwargs: object) -> Any:
    raise OSError(errno.EIO, os.strerror(errno.EIO))


def test_the_plain_process_functions_raise_a_disk_read_error_as_it_is_and_a_manager_wraps_it(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No disk here fails a read on demand (a full disk is real in test_filesystems_space.py, an I/O
    # error is not), so it is injected where the readers touch the disk: the rank file's
    # reads, and the checksum's open.
    with distckpt.CheckpointManager(root, fsync=False) as mgr:
        mgr.save(1, {"w": torch.ones(1000)})
        monkeypatch.setattr(os, "preadv", _disk_read_error)
        monkeypatch.setattr(checksums, "open", _disk_read_error, raising=False)
        with pytest.raises(distckpt.CheckpointError, match=os.strerror(errno.EIO)):
            mgr.restore("last")
    plain_process_calls: list[Callable[[], object]] = [
        lambda: distckpt.load_checkpoint(root),
        lambda: distckpt.verify(root),
        lambda: distckpt.export(root, tmp_path / "exported.pt"),
    ]
    for call in plain_process_calls:
        with pytest.raises(OSError) as info:
            call()
        assert not isinstance(info.value, distckpt.CheckpointError)
        assert info.value.errno == errno.EIO


# ------------------------------------------------------------------ manager docstrings


def _collectives_of_should_save(
    rank: int, world_size: int, root: str, schedule: dict[str, Any]
) -> dict[str, int]:
    seen: list[str] = []
    with distckpt.CheckpointManager(root, timeout=30, **schedule) as mgr:
        remove = events.add_listener(lambda event: seen.append(event.phase))
        try:
            mgr.should_save(1)
        finally:
            remove()
    return dict(Counter(name for name in seen if name.startswith("collective.")))


@pytest.mark.parametrize(
    ("world_size", "schedule", "collectives"),
    [
        (2, {"every_n_steps": 5}, {}),  # every rank decides alone
        (2, {"every_seconds": 3600.0}, {"collective.all_gather": 1}),
        (3, {"every_seconds": 3600.0}, {"collective.gather": 1, "collective.broadcast": 1}),
        (1, {"every_seconds": 3600.0}, {}),
    ],
)
def test_should_save_votes_with_a_time_schedule_only(
    tmp_path: Path, world_size: int, schedule: dict[str, Any], collectives: dict[str, int]
) -> None:
    out = values(run_ranks(_collectives_of_should_save, world_size, str(tmp_path), schedule))
    assert out == [collectives] * world_size


def test_the_milestone_rule_is_said_alike_everywhere_and_holds() -> None:
    """README, the CLI's help, the manager's docstring and ``kept_as_milestones`` say the
    milestones are the first checkpoint at or after each multiple from K on, plus step 0, and
    the README's upgrade note that saves missing the multiples now keep one per multiple."""
    from distckpt.cli import build_parser
    from distckpt.policy import kept_as_milestones

    prune_help = io.StringIO()
    with contextlib.redirect_stdout(prune_help), pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "--help"])
    said = {
        "README": README,
        "prune --help": prune_help.getvalue(),
        "CheckpointManager": distckpt.CheckpointManager.__doc__ or "",
        "kept_as_milestones": kept_as_milestones.__doc__ or "",
    }
    for where, text in said.items():
        words = " ".join(text.replace("``", "").split())
        assert re.search(
            r"for each multiple of (K|N|every_n_steps) from \1 on, the first", words
        ), where
        assert "plus step 0" in words, where
    assert kept_as_milestones([500, 999], 1000) == set()  # no multiple from K on reached
    assert 0 in kept_as_milestones([0, 500], 1000)
    every_3_steps = range(0, 3004, 3)
    exact_multiples = {step for step in every_3_steps if step % 1000 == 0}
    assert exact_multiples == {0, 3000}
    assert kept_as_milestones(every_3_steps, 1000) == {0, 1002, 2001, 3000}  # keeps more
    assert "keeps one checkpoint per multiple crossed, so it keeps more checkpoints" in " ".join(
        README.split()
    )
    assert "`prune --mode` without `--monitor` exits 2" in " ".join(README.split())


def _args_entries(doc: str) -> list[str]:
    """The parameter names an ``Args:`` section lists at its first indentation (``a, b: ...``
    names two); the prose lines between entries (no ``name:`` start) name none."""
    section = doc.split("Args:", 1)[1]
    section = re.split(r"\n\s*(?:Returns|Raises|Yields|Example|Note)s?:", section)[0]
    lines = [line for line in section.splitlines() if line.strip()]
    indent = len(lines[0]) - len(lines[0].lstrip())
    names = []
    for line in lines:
        if len(line) - len(line.lstrip()) != indent:
            continue
        match = re.match(r"\s*(\w+(?:, \w+)*):", line)
        if match:
            names += match.group(1).split(", ")
    return names


def _documented_callables() -> dict[str, tuple[Callable[..., Any], str]]:
    """Each public function of distckpt and method of CheckpointManager whose docstring has an
    ``Args:`` section, and the manager's class docstring for its constructor."""
    found: dict[str, tuple[Callable[..., Any], str]] = {}
    manager = distckpt.CheckpointManager
    found["CheckpointManager"] = (manager.__init__, manager.__doc__ or "")
    candidates = [(name, getattr(distckpt, name)) for name in distckpt.__all__]
    candidates += [(f"mgr.{name}", member) for name, member in vars(manager).items()]
    for name, member in candidates:
        doc = inspect.getdoc(member) or ""
        if inspect.isfunction(member) and not name.startswith("mgr._") and "Args:" in doc:
            found[name] = (member, doc)
    return found


@pytest.mark.parametrize("name", sorted(_documented_callables()))
def test_an_args_section_names_every_parameter_and_no_other(name: str) -> None:
    function, doc = _documented_callables()[name]
    parameters = [
        p.name
        for p in inspect.signature(function).parameters.values()
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    assert sorted(_args_entries(doc)) == sorted(parameters)


def test_monitor_and_mode_do_what_the_managers_docstring_says(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with distckpt.CheckpointManager(root, monitor="acc", mode="max", fsync=False) as mgr:
        for step, acc in ((1, 0.5), (2, 0.9), (3, 0.7), (4, 0.9), (5, float("nan")), (6, None)):
            mgr.save(step, {"w": torch.zeros(2)}, metrics={} if acc is None else {"acc": acc})
        assert mgr.best_step() == 2  # the highest; ties to the earlier step; NaN, none: unranked
    assert os.readlink(root / "best") == "step-00000002"
    with distckpt.CheckpointManager(root, fsync=False) as mgr:  # no monitor: ranks nothing
        mgr.save(7, {"w": torch.zeros(2)}, metrics={"acc": 1.0})
        assert os.readlink(root / "best") == "step-00000002"  # left where it is
        mgr.delete(2)
        assert not (root / "best").exists()  # removed once it names no checkpoint
    for refused in ({"keep_best": 1}, {"keep_unranked": True}, {"monitor": ""}):
        with pytest.raises(distckpt.InvalidArgument):
            distckpt.CheckpointManager(root, fsync=False, **refused)
    with pytest.raises(distckpt.InvalidArgument, match="mode"):
        distckpt.CheckpointManager(root, monitor="acc", mode="highest", fsync=False)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the "Use" loop


def _epoch_setters(source: str) -> set[str]:
    """The ``set_epoch`` calls at the start of each epoch of the ``for epoch in ...`` loop in
    ``source``, as written (``sampler.set_epoch(epoch)``)."""
    found: set[str] = set()
    for loop in ast.walk(ast.parse(source)):
        if isinstance(loop, ast.For) and ast.unparse(loop.target) == "epoch":
            found |= {
                ast.unparse(statement)
                for statement in loop.body
                if isinstance(statement, ast.Expr)
                and isinstance(statement.value, ast.Call)
                and isinstance(statement.value.func, ast.Attribute)
                and statement.value.func.attr == "set_epoch"
            }
    return found


def test_the_use_loop_sets_each_epoch_as_the_resume_test_job_does() -> None:
    """The README says ``tests/test_resume.py`` runs its "Use" loop: the job it runs
    (``tests/ddp_job.py``) tells the sampler and the dataset each epoch, as the loop does."""
    use_section = README.split("## Use", 1)[1]
    use_loop = use_section.split("```python\n", 1)[1].split("```", 1)[0]
    job = (REPO / "tests" / "ddp_job.py").read_text()
    assert _epoch_setters(use_loop) == _epoch_setters(job)
    assert {"sampler.set_epoch(epoch)", "dataset.set_epoch(epoch)"} <= _epoch_setters(use_loop)


# ------------------------------------------------------------------ the filesystem matrix


def _filesystem_table_script() -> ModuleType:
    """scripts/gen_filesystem_table.py as a module (a script, not a package: loaded by path)."""
    path = REPO / "scripts" / "gen_filesystem_table.py"
    spec = importlib.util.spec_from_file_location("gen_filesystem_table", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _test_functions(path: Path) -> set[str]:
    """The names of the module-level ``test_*`` functions of the test file ``path`` (read, not
    run: the matrix needs root and mounts)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.name
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.name.startswith("test_")
    }


def test_the_filesystem_table_names_every_test_of_the_matrix_and_no_other() -> None:
    """docs/filesystems.md's generated table shows each test of the files the script runs, as a
    column or as a row, and no test those files no longer have."""
    script = _filesystem_table_script()
    defined = set().union(*(_test_functions(REPO / name) for name in script.TESTS))
    shown = script.tests_in_doc()
    rerun = "run python scripts/gen_filesystem_table.py --write"
    assert not defined - shown, f"docs/filesystems.md lacks {sorted(defined - shown)}: {rerun}"
    assert not shown - defined, f"docs/filesystems.md names gone tests {sorted(shown - defined)}"
