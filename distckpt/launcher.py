"""What the launcher that started this worker (torchrun, or any that sets ``WORLD_SIZE``) tells
distckpt: whether it is still the worker's parent (an orphaned worker refuses to commit: see
:mod:`distckpt.lease`, "Orphans"), and whether the worker is one of several ranks."""

from __future__ import annotations

import os

import torch.distributed as dist

from distckpt.errors import CoordinationError, LauncherGone


def check_process_group(*, read_only: bool) -> None:
    """Refuse a writing manager made before ``init_process_group()`` in a process whose
    environment says it is one of ``WORLD_SIZE`` > 1 ranks: alone it would take the root's
    lease as a job of one (its own job's other ranks then find the root in use) and never join
    the collectives its peers run. A ``read_only`` manager runs as one process of one rank (it
    takes no lease and writes nothing): it restores a one-rank or ``"dcp"`` checkpoint."""
    world_size = os.environ.get("WORLD_SIZE", "")
    if read_only or not world_size.isdigit() or int(world_size) <= 1:
        return
    if dist.is_available() and dist.is_initialized():
        return
    rank = os.environ.get("RANK", "")
    raise CoordinationError(
        f"WORLD_SIZE={world_size} in the environment says this process is one of "
        f"{world_size} ranks (RANK={rank or 'unset'}), but torch.distributed is not "
        "initialised: call torch.distributed.init_process_group() before creating the "
        "CheckpointManager (only a read_only=True manager runs without a process group there; "
        "a process meant to run alone can set WORLD_SIZE=1)",
        rank=int(rank) if rank.isdigit() else None,
    )


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
