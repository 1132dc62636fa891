"""tests/apt.py: concurrent installs of test tools are serialised, a failed ``apt-get update``
is retried and reported, and counts as done only when it succeeded.

apt-get here is a stand-in script first on PATH, not the real one: the real one would change
this machine's packages and needs the network, and its failures (a held lists lock, a mirror
that does not answer) cannot be caused on demand. The stand-in refuses to run while another
run of it is under way, as apt-get update does with its lists lock.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import apt

REPO = Path(__file__).resolve().parents[1]

FAKE_APT_GET = r"""#!/bin/bash
# called as: apt-get -o OPTION update | install -y --no-install-recommends PACKAGE...
here="$(dirname "$0")/.."
if ! mkdir "$here/running" 2>/dev/null; then
  echo "E: Could not get lock $here/lists/lock. It is held by another apt-get" >&2
  exit 100
fi
trap 'rmdir "$here/running"' EXIT
echo "${*:3}" >> "$here/calls"
sleep 0.3
if [ "$3" = update ] && [ -s "$here/update-failures" ]; then
  left=$(cat "$here/update-failures")
  if [ "$left" -gt 0 ]; then
    echo $((left - 1)) > "$here/update-failures"
    echo "E: Failed to fetch the package lists: Temporary failure resolving the mirror" >&2
    exit 100
  fi
fi
if [ "$3" = install ]; then
  for package in "${@:6}"; do
    printf '#!/bin/sh\n' > "$here/bin/$package" && chmod +x "$here/bin/$package"
  done
fi
"""


@pytest.fixture
def fake_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory whose bin/ (first on PATH) holds the stand-in apt-get; its calls are logged
    to ``calls``, one line each."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(FAKE_APT_GET)
    (bin_dir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(apt, "LOCK_FILE", tmp_path / "apt.lock")
    monkeypatch.setattr(apt, "UPDATE_RETRY_PAUSE_SECONDS", 0.05)
    monkeypatch.setattr(apt, "_updated_in_this_process", False)
    return tmp_path


def _calls(fake: Path) -> list[str]:
    return (fake / "calls").read_text().splitlines()


def test_two_processes_needing_a_tool_at_once_both_get_it(fake_apt: Path) -> None:
    tool = "distckpt-test-tool-a"
    install = (
        "import sys; from pathlib import Path; from tests import apt;"
        f"apt.LOCK_FILE = Path({os.fspath(apt.LOCK_FILE)!r});"
        f"apt.install_missing_tools({{{tool!r}: {tool!r}}})"
    )
    env = {**os.environ, "PYTHONPATH": os.fspath(REPO)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", install], env=env, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    errors = [process.communicate(timeout=60)[1] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], errors
    # the second found the tool installed once it had the lock: apt ran for the first only
    assert _calls(fake_apt) == ["update", f"install -y --no-install-recommends {tool}"]


def test_a_failing_update_is_retried(fake_apt: Path) -> None:
    (fake_apt / "update-failures").write_text(f"{apt.UPDATE_ATTEMPTS - 1}\n")
    apt.install_missing_tools({"distckpt-test-tool-b": "distckpt-test-tool-b"})
    calls = _calls(fake_apt)
    assert calls[: apt.UPDATE_ATTEMPTS] == ["update"] * apt.UPDATE_ATTEMPTS
    assert calls[apt.UPDATE_ATTEMPTS :] == [
        "install -y --no-install-recommends distckpt-test-tool-b"
    ]


def test_the_documented_number_of_update_tries_is_the_number_made() -> None:
    documented = " ".join((REPO / "docs" / "filesystems.md").read_text().split())
    # UPDATE_ATTEMPTS counts every try, the first one too: "tried", not "retried", that often
    assert f"`apt-get update` tried up to {apt.UPDATE_ATTEMPTS} times" in documented


def test_an_update_that_keeps_failing_is_reported_and_tried_again_next_time(
    fake_apt: Path,
) -> None:
    (fake_apt / "update-failures").write_text(f"{apt.UPDATE_ATTEMPTS}\n")
    tools = {"distckpt-test-tool-c": "distckpt-test-tool-c"}
    with pytest.raises(apt.AptFailed) as raised:
        apt.install_missing_tools(tools)
    assert raised.value.command[-1] == "update"
    assert raised.value.returncode == 100
    assert raised.value.attempts == apt.UPDATE_ATTEMPTS
    assert "Temporary failure resolving the mirror" in raised.value.output
    assert "Temporary failure resolving the mirror" in str(raised.value)
    assert _calls(fake_apt) == ["update"] * apt.UPDATE_ATTEMPTS

    apt.install_missing_tools(tools)  # the failed update did not count as done
    assert _calls(fake_apt)[apt.UPDATE_ATTEMPTS :] == [
        "update",
        "install -y --no-install-recommends distckpt-test-tool-c",
    ]


def test_the_test_script_installs_every_test_tool_before_the_suite() -> None:
    """What docs/filesystems.md says: scripts/test.sh installs the tools' packages up front,
    the ones it names among them."""
    commands = [line.strip() for line in (REPO / "scripts" / "test.sh").read_text().splitlines()]
    installing = next(i for i, line in enumerate(commands) if "-m tests.apt" in line)
    running = next(i for i, line in enumerate(commands) if "-m pytest" in line)
    assert installing < running
    documented = (REPO / "docs" / "filesystems.md").read_text().split("\n## ", 1)[0]
    packages = set(apt.every_test_tool().values())
    named = {name for name in packages if f"`{name}`" in documented}
    # e2fsprogs and mount come with every Debian system; every other package is named
    assert packages - named == {"e2fsprogs", "mount"}
