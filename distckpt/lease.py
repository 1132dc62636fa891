"""The root's writer lease: one live writing job per root, and fencing of a job that lost it.

A job that writes a root holds its lease for as long as its manager is open: rank 0 holds an
``flock`` on ``root/.lease`` (the kernel drops it when the process dies) and has written a
record, ``root/.lease.json``, naming the holder: host (the hostname), the machine's boot id,
pid, job id (``TORCHELASTIC_RUN_ID``, else ``SLURM_JOB_ID``), start time (UTC), a random token
and a *generation*, one more than the previous holder's. Nothing here uses
``torch.distributed``; the manager decides which rank calls what.

* **Exclusion.** :meth:`RootLease.acquire` of a root whose lock is held raises
  :class:`~distckpt.RootInUse` naming the holder, or waits up to ``wait`` seconds for it to end.
* **A dead holder blocks nobody.** Its lock died with it; the next :meth:`RootLease.acquire`
  succeeds at once with the next generation. No manual step.
* **Fencing.** :meth:`RootLease.check_current`, called by the committer under the commit lock,
  raises :class:`~distckpt.LeaseLost` when the record no longer names this lease (an operator
  broke it, and another job acquired it). A fenced job cannot commit, retain or relink; the
  record is the arbiter even where two processes could hold a lock at once (below).
* **Orphans.** torchrun (2.13) starts every worker in a session of its own, so a worker
  outlives an agent killed with SIGKILL and keeps saving. As long as the orphans' rank 0 lives,
  the job keeps its lease and a requeued job is refused, loudly, instead of interleaving its
  steps. :class:`~distckpt.launcher.LauncherWatch` lets such a worker notice that its launcher
  is gone and refuse to commit on its own (:class:`~distckpt.LauncherGone`).
* **Readers never need the lease**; :func:`read_holder` only probes the lock (a try-lock held for
  an instant), to tell a live holder from a dead one.

Limits, per filesystem (the lock is the same kind as :mod:`distckpt.lock`'s):

* local filesystems, NFS with a lock manager, Lustre ``-o flock``, GPFS: exclusive across
  machines. On NFS a dead *machine*'s lock lingers until the server's lease ends (about 90 s):
  the requeued job then waits (``wait``) or is refused until then.
* NFS mounted ``nolock`` / ``local_lock=flock|all`` and Lustre ``-o localflock``: locks are kept
  by each machine alone, so the lease cannot be exclusive across machines. distckpt detects these
  mounts (``/proc/self/mountinfo``) and then refuses a root whose record names a holder on
  another machine that has not released it, since it cannot tell whether that holder is alive
  (another machine: another hostname, or this hostname with another boot id, such as a pod
  recreated on another node: :meth:`LeaseHolder.on_this_machine`);
  an operator who knows it is dead runs ``distckpt lease ROOT --break``. Two jobs starting on two
  machines within the same instant can both pass that check: the record is written once by each,
  read back, and the loser of that race is fenced at its first commit; commits themselves are
  only serialised per machine there, so run one writer job per root on such mounts.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import filelock

from distckpt.errors import (
    LeaseLost,
    RootInUse,
)
from distckpt.fsutil import atomic_write_bytes
from distckpt.layout import RootLayout
from distckpt.lease_tokens import HeldCallback, holder_phrase, let_go, took
from distckpt.lock import (
    PROBE_GRACE,
    _flock,
    _unsupported,
    lock_is_held,
    locks_local_to_machine,
)

logger = logging.getLogger("distckpt")

_RETRY_INTERVAL = 0.5
#: A job that found the lease lock held reads the record for up to this long more while it
#: names no live holder: a holder takes the lock, then writes its record (milliseconds; longer
#: on a loaded machine), and the refusal must name it, not a previous holder or nobody. Short:
#: a start's try runs inside a collective's timeout (``Coordinator.decide_within``).
RECORD_WRITE_GRACE = 0.5
JOB_ID_VARIABLES = ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID")


def now_utc() -> str:
    """Now, in UTC, to the second (ISO 8601): the times a lease record keeps."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def this_host() -> str:
    """The name this machine is recorded under in a lease."""
    return socket.gethostname()


def _pid_namespace() -> int | None:
    """The inode of this process's PID namespace; None where ``/proc`` does not say."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _boot_id() -> str | None:
    """This machine's boot id (new at every boot); None where ``/proc`` does not say."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def this_process_host() -> str:
    """Where a pid of this process means this process: ``<hostname>/pidns:<inode>/boot:<id>``
    (the boot id's first 8 characters), or the plain hostname where ``/proc`` does not say.

    A container with the host's network shares its hostname but may have its own PID
    namespace, where the same pid names another process or none; a reboot reuses pids too.
    Both are folded into the host string of the s3 store's records, whose writers are judged
    by their pid. A POSIX lease record keeps the plain hostname and a boot id of its own
    (:attr:`LeaseHolder.boot_id`): its holder is judged by its ``flock``, which is kept per
    kernel, so a PID namespace changes nothing there."""
    namespace, boot = _pid_namespace(), _boot_id()
    if namespace is None or boot is None:
        return this_host()
    return f"{this_host()}/pidns:{namespace}/boot:{boot[:8]}"


def process_gone(pid: int) -> bool:
    """Whether no process ``pid`` runs on this machine (one of another user's still runs)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def is_this_process_host(host: str) -> bool:
    """Whether a record's ``host`` is where this process runs, so that what this machine sees
    of its writer (its pid, its lock) may be trusted: exactly :func:`this_process_host`. A
    plain hostname (hostnames have no "/": an older version's record, or one written where
    ``/proc`` does not say) is judged by the hostname alone, as that version did. Any other is
    another machine, PID namespace or boot, even under the same hostname (a pod recreated on
    another node), whose writer cannot be judged from here."""
    if "/" not in host:
        return host == this_host()
    return host == this_process_host()


def local_process_gone(host: str, pid: int) -> bool:
    """Whether ``pid`` on ``host`` certainly no longer runs: only decidable on this machine, in
    this PID namespace and boot (:func:`is_this_process_host`)."""
    return is_this_process_host(host) and process_gone(pid)


def job_id_from_environment() -> str | None:
    """``TORCHELASTIC_RUN_ID`` (torchrun's rendezvous id), else ``SLURM_JOB_ID``, else None."""
    for variable in JOB_ID_VARIABLES:
        value = os.environ.get(variable)
        if value:
            return value
    return None


@dataclass(frozen=True)
class LeaseHolder:
    """One lease record: who holds (or last held) a root's lease. ``alive`` is not stored: it is
    what :func:`read_holder` found out (True: the lock is held; False: it is free, so the holder
    is dead; None: cannot be told from this machine)."""

    host: str
    pid: int
    job_id: str | None
    #: None, as ``job_id`` and ``generation`` are, where the record does not say: the lease
    #: object of an ``s3://`` root written by an older version holds its holder's host and pid
    #: only (and one of this version's may hold a malformed one, read as none)
    started_utc: str | None
    generation: int | None
    token: str
    released_utc: str | None = None
    broken_utc: str | None = None
    #: the holder machine's boot id (:func:`_boot_id`), None where ``/proc`` did not say or
    #: in an older version's record. A key of its own, not folded into ``host``: older
    #: versions ignore keys they do not know and compare ``host`` with their hostname.
    boot_id: str | None = None
    alive: bool | None = None

    @property
    def held(self) -> bool:
        """Whether the record still claims the root (not released, not broken)."""
        return self.released_utc is None and self.broken_utc is None

    def on_this_machine(self) -> bool:
        """Whether the holder ran on this machine (its hostname, and its boot id where the
        record has one), so that this machine's lock tells whether it lives. ``flock`` is kept
        per kernel, so a holder in another PID namespace (a container) of this machine is
        on it too; the pid is not compared, only shown."""
        if self.host != this_host():
            return False
        return self.boot_id is None or self.boot_id == _boot_id()

    def describe(self) -> str:
        """``job J on host H, pid P, since T (generation G)``, leaving out what the record does
        not say: ``a job on host H, pid P`` where it keeps no more (an older version's
        ``s3://`` lease object), ``a job without a job id`` where only the job id is missing,
        no ``(generation G)`` without one (a malformed one in a lease object counts as none).
        """
        if self.job_id:
            job = f"job {self.job_id}"
        elif self.started_utc is None and self.generation is None:
            job = "a job"  # a record that keeps no job id, time nor generation
        else:
            job = "a job without a job id"
        since = f", since {self.started_utc}" if self.started_utc is not None else ""
        generation = f" (generation {self.generation})" if self.generation is not None else ""
        return f"{job} on host {self.host}, pid {self.pid}{since}{generation}"

    def to_json(self) -> bytes:
        record = asdict(self)
        del record["alive"]
        return json.dumps(record, indent=1).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> LeaseHolder:
        record = json.loads(data)
        if not isinstance(record, dict):
            # valid JSON that names nobody (null, a list): as unreadable as garbage
            raise ValueError(f"a lease record is a JSON object, not {type(record).__name__}")
        names = {f.name for f in fields(cls)} - {"alive"}
        holder = cls(**{k: v for k, v in record.items() if k in names})
        if not isinstance(holder.generation, int) or not isinstance(holder.pid, int):
            raise ValueError("generation and pid must be integers")
        return holder


def _lock_path(root: Path) -> Path:
    return RootLayout(root).lease_lock_path


def _record_path(root: Path) -> Path:
    return RootLayout(root).lease_record_path


def _read_record(root: Path, *, quiet: bool = False) -> LeaseHolder | None:
    """The record, or None when there is none. An unreadable record is logged (unless
    ``quiet``: read again, it was logged already) and ignored: it names nobody, so it fences
    whoever held it and blocks nobody."""
    try:
        return LeaseHolder.from_json(_record_path(root).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        if not quiet:
            logger.warning("ignoring the unreadable lease record %s: %s", _record_path(root), exc)
        return None


def _try_lock(path: Path, timeout: float) -> filelock.BaseFileLock | None:
    """The lease lock taken within ``timeout`` seconds, or None if another process holds it.

    The lock returned is on the file named ``path`` now: ``lease --break`` moves aside a lock
    file a dead machine's lock lingers on (:func:`break_lease`), and a lock taken on the file
    moved aside, opened just before, would exclude nobody; it is dropped and taken again."""
    deadline = time.monotonic() + timeout
    locked_files: list[os.stat_result] = []  # each file locked, the last one last
    while True:
        lock = _flock(
            path,
            max(deadline - time.monotonic(), 0.0),
            on_acquired=lambda fd: locked_files.append(os.fstat(fd)),
        )
        try:
            lock.acquire()
        except filelock.Timeout:
            return None
        except (OSError, NotImplementedError) as exc:
            raise _unsupported(path, exc) from exc
        if _names_file(path, locked_files[-1]):
            return lock
        lock.release()


def _names_file(path: Path, file: os.stat_result) -> bool:
    """Whether ``path`` names ``file`` (it was not moved aside, replaced or removed)."""
    try:
        return os.path.samestat(os.stat(path), file)
    except FileNotFoundError:
        return False


def _in_use(
    root: Path, holder: LeaseHolder | None, why: str = "", *, waited: float = 0.0, advice: str = ""
) -> RootInUse:
    who = holder_phrase(holder)
    return RootInUse(f"root {root} is in use by {who}{why}", holder, waited=waited, advice=advice)


def _holder_of_the_held_lock(
    root: Path,
) -> tuple[LeaseHolder | None, filelock.BaseFileLock | None]:
    """After the lease lock was found held: its holder's record, read again for up to
    :data:`RECORD_WRITE_GRACE` seconds while it claims the root for no live holder (none, one
    released or broken, or one naming a process gone from this machine), as it does between
    a new holder taking the lock and writing its record; then whatever is there (a
    ``lease --break`` holding the lock writes no record). The lock is tried between reads:
    when it comes free meanwhile it is returned, taken, with the record read last."""
    deadline = time.monotonic() + RECORD_WRITE_GRACE
    record = _read_record(root)
    while not _claims_for_a_live_holder(record) and time.monotonic() < deadline:
        time.sleep(0.02)
        lock = _try_lock(_lock_path(root), 0)
        if lock is not None:
            return _read_record(root, quiet=True), lock
        record = _read_record(root, quiet=True)
    return record, None


def _claims_for_a_live_holder(record: LeaseHolder | None) -> bool:
    """Whether ``record`` claims the root for a process that may be alive (one on this machine
    is looked up by its pid; one in another PID namespace of it may be taken for gone, which
    costs a refusal :data:`RECORD_WRITE_GRACE` seconds, nothing more)."""
    if record is None or not record.held:
        return False
    return not (record.on_this_machine() and process_gone(record.pid))


def _unknowable_elsewhere(root: Path, holder: LeaseHolder | None) -> bool:
    """Whether the record names a holder on another machine whose liveness this machine's lock
    cannot show (locks local to each machine)."""
    return (
        holder is not None
        and holder.held
        and not holder.on_this_machine()
        and locks_local_to_machine(root)
    )


def holder_beyond_judgement(root: str | os.PathLike[str]) -> LeaseHolder | None:
    """The holder the root's lease record names when this machine cannot tell whether it lives
    (it has not released the root, it is on another machine or boot, and locks on the root's
    filesystem are local to each machine), else None. Its lock files, the lease's and its
    staging dirs' writer locks, are free as seen from here even while it writes: a cleanup
    must not take them for a dead writer's."""
    root_path = RootLayout.at(root).root
    holder = _read_record(root_path)
    return holder if _unknowable_elsewhere(root_path, holder) else None


class RootLease:
    """The lease of one root, held from :meth:`acquire` to :meth:`release` (also a context
    manager). Thread-safe to :meth:`check_current` from any thread."""

    def __init__(self, root: Path, lock: filelock.BaseFileLock, holder: LeaseHolder) -> None:
        self.root = root
        self.holder = holder
        self._lock: filelock.BaseFileLock | None = lock
        #: the process that took the lease: in its forked children, release leaves it alone
        self._owner_pid = os.getpid()

    @classmethod
    def acquire(
        cls, root: str | os.PathLike[str], *, wait: float = 0.0, on_held: HeldCallback = None
    ) -> RootLease:
        """Take the lease of an existing directory ``root``: at once, or within ``wait`` seconds
        for a live holder to end (``on_held`` called once with the holder's record, None if
        unreadable, as the wait begins). Raises :class:`~distckpt.RootInUse` naming the holder."""
        root_path = RootLayout.at(root).root
        deadline = time.monotonic() + max(wait, 0.0)
        while True:
            now = time.monotonic()
            until = max(deadline, now + PROBE_GRACE)  # a probe's instant must not count as held
            if on_held is not None and deadline > now:
                # A probe's instant first, then the wait is said as it begins; the rest after
                # it: as long in all. A record naming no live holder (released, or not yet
                # rewritten by a new holder) names nobody.
                lock = _try_lock(_lock_path(root_path), PROBE_GRACE)
                if lock is None:
                    record = _read_record(root_path, quiet=True)
                    on_held(record if _claims_for_a_live_holder(record) else None)
                    on_held = None
                    lock = _try_lock(_lock_path(root_path), max(until - time.monotonic(), 0.0))
            else:
                lock = _try_lock(_lock_path(root_path), until - now)
            if lock is None:
                holder, lock = _holder_of_the_held_lock(root_path)
                if lock is None:
                    raise _in_use(root_path, holder, waited=wait)
            previous = _read_record(root_path)
            if not _unknowable_elsewhere(root_path, previous):
                return cls._claim(root_path, lock, previous)
            lock.release()
            if deadline - time.monotonic() <= 0:
                raise _in_use(
                    root_path,
                    previous,
                    waited=wait,
                    advice="; locks on this filesystem are local to each machine, so whether "
                    "that holder is alive cannot be told from here. If it is dead, run "
                    f"'distckpt lease {root_path} --break'",
                )
            if on_held is not None:  # its lock is free here, but that proves nothing
                on_held(previous)
                on_held = None
            time.sleep(min(_RETRY_INTERVAL, max(deadline - time.monotonic(), 0)))

    @classmethod
    def _claim(
        cls, root: Path, lock: filelock.BaseFileLock, previous: LeaseHolder | None
    ) -> RootLease:
        if previous is not None and previous.held:
            logger.info("taking over the lease of %s from dead %s", root, previous.describe())
        holder = LeaseHolder(
            host=this_host(),  # what older versions compare with their hostname
            boot_id=_boot_id(),
            pid=os.getpid(),
            job_id=job_id_from_environment(),
            started_utc=now_utc(),
            generation=(previous.generation if previous is not None else 0) + 1,
            token=uuid.uuid4().hex,
        )
        try:
            atomic_write_bytes(_record_path(root), holder.to_json(), fsync=True)
            written = _read_record(root)
        except BaseException:
            lock.release()
            raise
        if written is None or written.token != holder.token:
            # Only where locks are local to each machine: a job on another one wrote at once.
            lock.release()
            raise _in_use(root, written, " (it claimed the root at the same moment)")
        took(holder.token)
        return cls(root, lock, holder)

    @property
    def generation(self) -> int:
        # A root directory's record always has one: from_json refuses a record without.
        assert self.holder.generation is not None
        return self.holder.generation

    @property
    def held(self) -> bool:
        """Whether :meth:`release` has not been called yet."""
        return self._lock is not None

    def check_current(self) -> None:
        """Raise :class:`~distckpt.LeaseLost` unless this lease is still the root's current one.
        The committer calls it under the commit lock before it publishes, retains or relinks."""
        if self._lock is None:
            raise LeaseLost(f"the lease of {self.root} was released: this manager is closed")
        current = _read_record(self.root)
        if current is not None and current.token == self.holder.token and current.held:
            return
        if current is None:
            now = "no readable lease record is there any more"
        elif current.token == self.holder.token:
            now = f"an operator broke it at {current.broken_utc}"
        else:
            now = f"it is now held by {current.describe()}"
        raise LeaseLost(
            f"this job lost its lease of {self.root} (generation {self.generation}): {now}. "
            "It may not commit any more; nothing of this save becomes visible"
        )

    def release(self) -> None:
        """Mark the record released (if it is still ours) and drop the lock. Idempotent. In a
        forked child of the holder it only forgets the lease: the lease is the parent's."""
        lock, self._lock = self._lock, None
        let_go(self.holder.token)
        if lock is None or self._owner_pid != os.getpid():
            return
        try:
            current = _read_record(self.root)
            if current is not None and current.token == self.holder.token and current.held:
                released = replace(self.holder, released_utc=now_utc())
                atomic_write_bytes(_record_path(self.root), released.to_json(), fsync=True)
        except OSError as exc:  # the lock still goes; the next holder takes over a stale record
            logger.warning("could not mark the lease of %s released: %s", self.root, exc)
        finally:
            lock.release()

    def __enter__(self) -> RootLease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def read_holder(root: str | os.PathLike[str]) -> LeaseHolder | None:
    """The root's current lease holder, with ``alive`` filled in, or None when nobody holds it
    (no record, or released or broken). Takes no lease; probes the lock for an instant."""
    root_path = RootLayout.at(root).root
    holder = _read_record(root_path)
    if holder is None or not holder.held:
        return None
    if _unknowable_elsewhere(root_path, holder):
        return replace(holder, alive=None)
    return replace(holder, alive=lock_is_held(_lock_path(root_path)))
