"""Whether the launcher that started this worker (the torchrun agent) is still its parent: an
orphaned worker refuses to commit (see :mod:`distckpt.lease`, "Orphans")."""

from __future__ import annotations

import os

from distckpt.errors import LauncherGone


class LauncherWatch:
    """Notices that the process that started this one (the torchrun agent, ``srun``'s step
    daemon) is gone, by its parent pid changing: an orphan is re-parented to init or to a
    subreaper. Reliable for torchrun workers (their parent is the agent) and any launcher that
    is the worker's parent; a process started from a shell that later exits is re-parented the
    same way, so enable it only under a launcher (:meth:`for_this_process`)."""

    def __init__(self, parent_pid: int | None = None) -> None:
        self.parent_pid = os.getppid() if parent_pid is None else parent_pid

    @classmethod
    def for_this_process(cls) -> LauncherWatch | None:
        """A watch when this process was started by torchrun (``TORCHELASTIC_RUN_ID`` is set),
        else None."""
        return cls() if os.environ.get("TORCHELASTIC_RUN_ID") else None

    def launcher_gone(self) -> bool:
        return os.getppid() != self.parent_pid

    def check(self) -> None:
        """Raise :class:`~distckpt.LauncherGone` if the launcher is gone."""
        if self.launcher_gone():
            raise LauncherGone(
                f"the launcher of pid {os.getpid()} (parent pid {self.parent_pid}) is gone; this "
                "process is an orphan (torchrun starts workers in sessions of their own, so they "
                "outlive a killed agent) and refuses to commit. Stop it; the requeued job resumes "
                "from the last checkpoint"
            )
