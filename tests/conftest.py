from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from distckpt import faults
from tests import job_servers, killing
from tests.cli_runner import run_cli_in_a_process
from tests.filesystems import MountFactory
from tests.lease_holders import Holder
from tests.leftover_mounts import sweep_and_warn
from tests.older_version import older_version_process, run_older_version, unpack_older_version
from tests.places import Place
from tests.s3server import S3Server, aws_environment


def pytest_sessionstart(session: pytest.Session) -> None:
    # A session killed outright (its mounts' cleanup is only a ``finally``) leaves them
    # mounted; the next session sweeps them. An xdist worker leaves it to its controller.
    if "PYTEST_XDIST_WORKER" not in os.environ:
        sweep_and_warn()


@pytest.fixture(autouse=True)
def _no_armed_faults() -> Iterator[None]:
    # Faults armed in this process (single-process tests) must not leak into the next test;
    # those armed inside forked ranks die with the rank.
    faults.disarm()
    yield
    faults.disarm()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    # pytest-timeout's timer covers a test's setup as well as its call: the job servers' cold
    # start (over a minute under load) is waited for here, outside it, before a test of a
    # module that runs jobs in them starts.
    module = getattr(item, "module", None)
    names = vars(module).values() if module is not None else ()
    # by identity: a module's other globals (tensors, arrays) need not compare with ==;
    # killing runs jobs, and so do run_older_version and older_version_process (the older
    # version's processes) and run_cli_in_a_process; a module whose traced runs do says so
    # (NEEDS_JOB_SERVERS)
    runs_jobs = (
        job_servers,
        killing,
        run_older_version,
        older_version_process,
        run_cli_in_a_process,
    )
    if getattr(module, "NEEDS_JOB_SERVERS", False) or any(
        value is runner for value in names for runner in runs_jobs
    ):
        # A server that is not ready fails the test at its first job, with the reason.
        with contextlib.suppress(AssertionError):
            job_servers.ready_job_servers()
    yield


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A checkpoint root that does not exist yet, in its own temporary directory."""
    return tmp_path / "ckpt"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may enter and read, for a test that acts as two users (root,
    and ``nobody`` through :func:`tests.other_user.succeeds_as_nobody`); skipped unless this
    process is root. Not under pytest's ``tmp_path``, which is root's alone. The test runs
    under umask 022, and the umask it found is restored after it."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to act as two users")
    # What these tests make must be readable by others as a umask 022 leaves it; a stricter
    # umask of the one running them (027) would deny user nobody what the tests mean to allow.
    previous_umask = os.umask(0o022)
    shared = Path(tempfile.mkdtemp())
    try:
        shared.chmod(0o755)
        yield shared
    finally:
        shutil.rmtree(shared, ignore_errors=True)
        os.umask(previous_umask)


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    """The lease holders a test starts (:func:`tests.lease_holders.start_holder`): each is killed
    when the test ends."""
    started: list[Holder] = []
    yield started
    for holder in started:
        holder.kill()


@pytest.fixture(scope="session")
def mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MountFactory]:
    """Real mounts (loop images, FUSE, tmpfs, read-only), each made at its first use in this
    session and all unmounted at its end, even when tests failed."""
    factory = MountFactory(tmp_path_factory.mktemp("mounts"))
    try:
        yield factory
    finally:
        problems = factory.cleanup()
        if problems:
            warnings.warn("; ".join(problems), stacklevel=1)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3-protocol server (moto) shared by this worker's tests; each test makes its own
    bucket. Tests that kill a server start one of their own."""
    pytest.importorskip("moto.server", reason="the s3 tests need moto[server]")
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def s3_url(s3_server: S3Server) -> str:
    """An ``s3://`` root in a fresh bucket of :func:`s3_server`."""
    return f"s3://{s3_server.create_bucket()}/ckpt"


@pytest.fixture(scope="session")
def older_distckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An older version's package, unpacked (:data:`tests.older_version.OLDER_VERSION_ARCHIVE`)."""
    return unpack_older_version(tmp_path_factory.mktemp("older-distckpt"))


@pytest.fixture(params=["local", "s3"])
def place(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Place:
    """A place of each kind. For ``s3``, the AWS variables of the test server are set for the
    command line, and the working directory is the test's own (an s3:// URL taken for a
    relative path would be created there)."""
    monkeypatch.chdir(tmp_path)
    if request.param == "local":
        return Place(str(tmp_path / "roots"), None)
    server: S3Server = request.getfixturevalue("s3_server")
    for name, value in aws_environment(server).items():
        monkeypatch.setenv(name, value)
    return Place(f"s3://{server.create_bucket()}/roots", server.storage_options())
