"""tests/apt.py: concurrent installs of test tools are serialised, a failed ``apt-get update``
is retried and reported, and counts as done only when it succeeded; apt inside a test keeps
within its time (another process's apt run held too long, a slow update, a slow install) and
says why it stopped, like any failure of apt: an update is stopped, an install left to finish.

apt-get here is a stand-in script first on PATH, not the real one: the real one would change
this machine's packages and needs the network, and its failures (a held lists lock, a mirror
that does not answer) cannot be caused on demand. The stand-in refuses to run while another
run of it is under way, as apt-get update does with its lists lock.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import FileLock

from tests import apt
from tests.filesystems import tool_missing_reason
from tests.processes import live_group_members
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[1]

FAKE_APT_GET = r"""#!/bin/bash
# called as: apt-get -o OPTION update | install -y --no-install-recommends PACKAGE...
# logs each call to calls and its pid to update.pid or install.pid; sleeps as many more seconds
# as update-seconds or install-seconds say, where they exist
here="$(dirname "$0")/.."
if ! mkdir "$here/running" 2>/dev/null; then
  echo "E: Could not get lock $here/lists/lock. It is held by another apt-get" >&2
  exit 100
fi
trap 'rmdir "$here/running"' EXIT
echo "${*:3}" >> "$here/calls"
echo $$ > "$here/$3.pid"
sleep 0.3
if [ -s "$here/$3-seconds" ]; then
  sleep "$(cat "$here/$3-seconds")"
fi
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
    # A stand-in apt-get, not the real one: the real one would change this machine's packages
    # and needs the network, and it cannot be made to fail or hang on demand. The lock file is
    # the test's own (a real apt run elsewhere is not held up), the pauses short (seconds, not
    # minutes), and the per-process "updated" flag reset so each test starts as a process does.
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(apt, "LOCK_FILE", tmp_path / "apt.lock")
    monkeypatch.setattr(apt, "UPDATE_RETRY_PAUSE_SECONDS", 0.05)
    monkeypatch.setattr(apt, "STOP_GRACE_SECONDS", 0.5)
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


#: How much longer than its budget apt may take in the tests below: Python's and bash's own
#: work on a loaded machine (the budget already holds the time to stop apt)
BUDGET_SLACK_SECONDS = 2.0


def test_a_lock_held_for_all_the_time_apt_has_is_a_reason_like_a_failure_of_apt(
    fake_apt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a budget of seconds, so that running out of it takes seconds (60 s in a real test)
    monkeypatch.setattr(apt, "IN_TEST_BUDGET_SECONDS", 1.0)
    tool = "distckpt-test-tool-d"
    started = time.monotonic()
    with FileLock(apt.LOCK_FILE):  # another process's apt run, for longer than the budget
        reason = tool_missing_reason(tool, tool)
    assert time.monotonic() - started < 1.0 + BUDGET_SLACK_SECONDS
    assert reason is not None and reason.startswith(f"could not install {tool}: "), reason
    assert "was not done within the 1 s given to apt" in reason
    assert "another process's apt run held the lock all that time" in reason
    assert "scripts/test.sh installs the test tools before the suite" in reason
    assert not (fake_apt / "calls").exists()  # apt did not run


def test_an_update_out_of_time_is_stopped_and_reported(
    fake_apt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a budget of seconds, so that running out of it takes seconds (60 s in a real test)
    monkeypatch.setattr(apt, "IN_TEST_BUDGET_SECONDS", 2.0)
    (fake_apt / "update-seconds").write_text("600\n")
    started = time.monotonic()
    with pytest.raises(apt.AptOutOfTime) as raised:
        apt.install_missing_tools({"distckpt-test-tool-e": "distckpt-test-tool-e"})
    assert time.monotonic() - started < 2.0 + BUDGET_SLACK_SECONDS
    assert raised.value.command[-1] == "update"
    assert raised.value.returncode == -signal.SIGTERM
    assert "it was stopped" in str(raised.value)
    assert _calls(fake_apt) == ["update"]  # no install without the package lists
    # stopped with everything it started (a sleep, here; apt's download methods)
    update = int((fake_apt / "update.pid").read_text())
    wait_until(lambda: not live_group_members(update), "the update's processes ended", 10)
    assert not apt._updated_in_this_process


def test_an_install_out_of_time_is_reported_and_left_to_finish(
    fake_apt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a budget of seconds, so that running out of it takes seconds (60 s in a real test)
    monkeypatch.setattr(apt, "IN_TEST_BUDGET_SECONDS", 2.0)
    (fake_apt / "install-seconds").write_text("3\n")
    tool = "distckpt-test-tool-f"
    started = time.monotonic()
    reason = tool_missing_reason(tool, tool)
    assert time.monotonic() - started < 2.0 + BUDGET_SLACK_SECONDS
    assert reason is not None and reason.startswith(f"could not install {tool}: "), reason
    install = int((fake_apt / "install.pid").read_text())
    assert f"it still runs, as pid {install}, and is left to finish" in reason
    assert shutil.which(tool) is None
    # not stopped midway: it finishes after the test gave up on it
    wait_until(lambda: shutil.which(tool) is not None, "the install finished", 30)


def test_apt_in_a_test_takes_at_most_half_the_per_test_timeout() -> None:
    """What tests/apt.py and docs/filesystems.md say: pytest-timeout never ends a test inside
    apt (it would kill apt and lose the reason), unless the test had already used half its time
    before it needed a tool."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    pytest_options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]
    per_test_timeout = pytest_options["ini_options"]["timeout"]
    assert per_test_timeout >= 2 * apt.IN_TEST_BUDGET_SECONDS
    documented = " ".join((REPO / "docs" / "filesystems.md").read_text().split())
    assert f"all within {apt.IN_TEST_BUDGET_SECONDS:g} s, half the per-test timeout" in documented
    assert f"gives apt up to {apt.UP_FRONT_BUDGET_SECONDS / 60:g} minutes" in documented
    assert apt.STOP_GRACE_SECONDS < apt.IN_TEST_BUDGET_SECONDS


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
