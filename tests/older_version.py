"""An older distckpt, run next to this one: its package as a fixture, and a way to run code in
a process that imports it, for the tests of what an older version does with what this one
writes (a set-aside save, a manifest recording its own checksum)."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path
from typing import Any

from tests import job_servers
from tests.cli_runner import DISTCKPT_COMMAND_LINE

#: The package of the last version before a save could be set aside (commit e3b8cf7, version
#: 0.2.0): its writing manager's start (and gc) takes any ``step-N/<attempt>/`` that no
#: ``COMMIT`` names for a dead writer's save and deletes it, and its manifests record no
#: checksum of their own. Kept as a fixture, not read from the repository's history, which a
#: shallow clone lacks.
OLDER_VERSION_ARCHIVE = Path(__file__).parent / "fixtures/older-version/distckpt-e3b8cf7.tar.xz"


def unpack_older_version(target: Path) -> Path:
    """The older version's package (:data:`OLDER_VERSION_ARCHIVE`), unpacked in ``target``."""
    with tarfile.open(OLDER_VERSION_ARCHIVE) as tar:
        tar.extractall(target, filter="data")
    return target


def run_older_version(older: Path, code: str, *arguments: Any) -> str:
    """Run ``code`` in a process of its own that imports the older version unpacked at
    ``older``, ``sys.argv[1]`` holding ``arguments`` as a JSON list; its output. Fails the
    test when the process fails, or when it imported another distckpt."""
    done = older_version_process(older, code, *arguments)
    assert done.returncode == 0, done.stderr
    return done.stdout


def older_version_process(
    older: Path, code: str, *arguments: Any
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as :func:`run_older_version` does; its exit status, its output (``stdout``)
    and its stderr, whatever the status. Fails the test when it imported another distckpt, or
    when it still runs after ``job_servers.PRELOADED_TIMEOUT``: below pytest's timeout of a
    test, so that the run fails itself, with its output.

    The process is a job server's child (``tests.job_servers``), which has imported torch but
    no distckpt: ``code`` runs as a script in ``older``, whose directory comes first on its
    ``sys.path``, so that its ``import distckpt`` imports the older version."""
    preamble = "import distckpt, sys\nprint(distckpt.__file__, flush=True)\n"
    done = job_servers.run_script_preloaded(
        preamble + code,
        [json.dumps(list(arguments))],
        older,
        stderr_apart=True,
        extra_env={"PYTHONPATH": str(older)},
        cwd=older,
    )
    imported, _, output = done.stdout.partition("\n")
    # That version, not this one; a failed import shows why in stderr.
    assert imported.startswith(str(older)), (done.returncode, done.stdout, done.stderr)
    return subprocess.CompletedProcess(done.args, done.returncode, output, done.stderr)


#: Code for :func:`older_version_process`: the older version's command line, given the JSON
#: list of its arguments, as ``python -m distckpt ARGS...`` runs it (run in the older package's
#: directory, the distckpt first on its ``sys.path`` is the older one).
OLDER_COMMAND_LINE = DISTCKPT_COMMAND_LINE
