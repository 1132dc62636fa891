"""The jobs the explorer traces, each in two phases: ``setup`` (untraced; what it leaves is the
durable starting state) and ``traced``. Run as
``python -m tests.crashsim.workloads NAME PHASE BASE MARKERS WORLD FORMAT``.

Rank 0 marks each moment the checker needs by creating a file in MARKERS: ``saved-N`` once
``save`` of step N returned (committed and durable, the promise checked), ``deleting-N`` /
``overwriting-N`` when a delete or an overwrite of step N begins, ``shrink`` when retention may
remove any older step, ``damaged-N`` once step N (whose save returned) was damaged on purpose,
``exported-N`` once ``export`` of step N to :func:`exported_file` returned.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT_NAME = "root"


def tensor_for(step: int, rank: int, version: int = 0) -> torch.Tensor:
    """What rank ``rank`` saves at ``step`` (``version`` 1 for an overwrite)."""
    return torch.arange(6, dtype=torch.float32) + 100 * step + 10 * rank + 1000 * version


def state_for(step: int, rank: int, fmt: str, version: int = 0) -> dict[str, Any]:
    # DCP stores a plain tensor once, as if every rank held the same one.
    return {"w": tensor_for(step, 0 if fmt == "dcp" else rank, version), "step": step}


@dataclass(frozen=True)
class Context:
    base: Path
    markers: Path
    rank: int
    world: int
    format: str

    @property
    def root(self) -> Path:
        return self.base / ROOT_NAME

    def mark(self, what: str) -> None:
        if self.rank == 0:
            count = len(os.listdir(self.markers))
            (self.markers / f"{count:04d}-{what}").touch(exist_ok=False)

    def manager(self, **options: Any) -> Any:
        import distckpt

        return distckpt.CheckpointManager(
            options.pop("root", self.root), format=self.format, timeout=30, **options
        )

    def save(self, mgr: Any, step: int, *, version: int = 0, **options: Any) -> None:
        loss = {1: 0.9, 2: 0.5, 3: 0.7, 4: 0.6}.get(step, 1.0)
        mgr.save(
            step,
            state_for(step, self.rank, self.format, version),
            metrics={"loss": loss},
            **options,
        )
        if not mgr.save_in_flight:
            self.mark(f"saved-{step}")


RETAIN = {"keep_last": 2, "monitor": "loss"}


def _saves(ctx: Context, steps: tuple[int, ...], **options: Any) -> None:
    with ctx.manager(**options) as mgr:
        for step in steps:
            ctx.save(mgr, step)


def retention_traced(ctx: Context) -> None:
    ctx.mark("shrink")
    _saves(ctx, (3, 4), **RETAIN)


def delete_traced(ctx: Context) -> None:
    """Deletes an older step (no link moves; the trash is created, with an fsync of the root),
    the newest (``last`` moves back, the trash already there: only the link swap's own fsync
    makes the swap durable before the trash move), and the only one left (``last`` removed)."""
    with ctx.manager() as mgr:
        for step in (1, 3, 2):
            ctx.mark(f"deleting-{step}")
            mgr.delete(step)


def prune_traced(ctx: Context) -> None:
    ctx.mark("shrink")
    with ctx.manager(keep_last=1) as mgr:
        mgr.prune()


def overwrite_traced(ctx: Context) -> None:
    with ctx.manager() as mgr:
        ctx.mark("overwriting-2")
        ctx.save(mgr, 2, version=1, overwrite=True)


def overwrite_fallback_traced(ctx: Context) -> None:
    from distckpt import fsutil

    # The fallback runs where renameat2(RENAME_EXCHANGE) is refused (NFS, other systems); this
    # machine's local filesystems all accept it, so the one switch that selects it is turned.
    fsutil._RENAMEAT2 = None
    overwrite_traced(ctx)


def async_traced(ctx: Context) -> None:
    with ctx.manager(async_save=True, **RETAIN) as mgr:
        ctx.save(mgr, 2)
        mgr.wait()
        ctx.mark("saved-2")


def restart_setup(ctx: Context) -> None:
    """Steps 1 and 2, then two jobs killed mid-save: one after committing step 3 but before
    its link swap (a stale ``last``, a writer lock file), one while writing step 4."""
    _saves(ctx, (1, 2), **RETAIN)
    if ctx.world > 1:
        return  # the killed saves below need one process (see ``multi_rank``)
    from distckpt import faults

    for point, step in (("during_link_swap", 3), ("after_shard_write", 4)):
        child = os.fork()
        if child == 0:
            faults.arm(point, "kill", rank=0)
            with ctx.manager(**RETAIN) as mgr:
                mgr.save(step, state_for(step, 0, ctx.format), metrics={"loss": 0.1})
            os._exit(0)
        _, status = os.waitpid(child, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def restart_traced(ctx: Context) -> None:
    with ctx.manager(**RETAIN) as mgr:
        mgr.gc()


POINTER = {**RETAIN, "link": "pointer"}


def pointer_traced(ctx: Context) -> None:
    """``last``/``best`` as pointer files (written and fsynced like data), through retention
    and a delete that moves ``last`` back."""
    ctx.mark("shrink")
    with ctx.manager(**POINTER) as mgr:
        for step in (3, 4):
            ctx.save(mgr, step)
        ctx.mark("deleting-4")
        mgr.delete(4)


def killed_swap_setup(ctx: Context) -> None:
    """Steps 2 and 3, then step 2 deleted: ``last`` names step 3, and the trash exists."""
    with ctx.manager() as mgr:
        for step in (2, 3):
            ctx.save(mgr, step)
        ctx.mark("deleting-2")
        mgr.delete(2)


def _kill_at_the_next_link_fsync() -> None:
    """From the next ``during_link_swap`` point on, the next directory fsync (a link swap's or
    a link removal's own) SIGKILLs this process instead of fsyncing."""
    from distckpt import faults, fsutil

    real_hit = faults.hit

    def kill_at_the_links_fsync(point: str, rank: int) -> None:
        real_hit(point, rank)
        if point == "during_link_swap":
            fsutil.fsync_dir = lambda path: os.kill(os.getpid(), signal.SIGKILL)

    # Replaced in the forked child only, which dies here: the window between unlinking a link
    # and the fsync after it is a few instructions wide, and no signal sent from outside lands
    # in it on cue; the kill itself is a real SIGKILL. (The store calls it through the module.)
    faults.hit = kill_at_the_links_fsync


def _killed_in(job: Callable[[], None]) -> None:
    """Run ``job`` in a forked child, which must die of SIGKILL."""
    child = os.fork()
    if child == 0:
        job()
        os._exit(0)
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def killed_swap_traced(ctx: Context) -> None:
    """A job killed in the link swap of its save of step 4, after renaming ``last`` onto step
    4 and before the fsync that makes it durable; then ``distckpt prune --keep-last 1``. The
    prune takes no lease (a manager's start writes the lease record, fsyncing the root), so
    the one fsync of the root between that rename and the trash move of step 3, which the
    durable ``last`` still names, is the prune's own, on finding ``last`` at its target."""
    from distckpt.cli import main as cli

    def save_killed_in_the_swap() -> None:
        with ctx.manager() as mgr:
            _kill_at_the_next_link_fsync()  # once open: a start passes the point too
            mgr.save(4, state_for(4, 0, ctx.format))

    _killed_in(save_killed_in_the_swap)
    # Step 4 was committed durably (the commit's own fsync of the root came before the kill):
    # from here on it may not be lost, and retention may remove step 3.
    ctx.mark("saved-4")
    ctx.mark("shrink")
    assert cli(["prune", os.fspath(ctx.root), "--keep-last", "1"]) == 0


def set_aside_setup(ctx: Context) -> None:
    """Steps 1 and 2, then step 2's largest file cut to half its size (damage a restore is
    sure of): a committed checkpoint that is damaged, which ``last`` names."""
    _saves(ctx, (1, 2))
    if ctx.rank == 0:
        step_dir = ctx.root / "step-00000002"
        largest = max(
            (path for path in step_dir.iterdir() if path.is_file()), key=lambda p: p.stat().st_size
        )
        os.truncate(largest, largest.stat().st_size // 2)
        ctx.mark("damaged-2")


def set_aside_traced(ctx: Context) -> None:
    """A writing manager's ``restore("last")`` sets the damaged step 2 aside (links moved off
    it, then renamed to ``damaged-step-2-*``) and restores step 1; then it saves step 3."""
    with ctx.manager() as mgr:
        restored = mgr.restore("last", state=state_for(0, ctx.rank, ctx.format))
        assert restored is not None and restored.step == 1, restored
        ctx.save(mgr, 3)


def killed_remove_setup(ctx: Context) -> None:
    """Steps 2 and 3, then step 2 deleted: ``last`` names step 3, and the trash exists."""
    killed_swap_setup(ctx)


def killed_remove_traced(ctx: Context) -> None:
    """``distckpt delete ROOT 3`` (the only step left, so ``last`` is removed) killed after
    unlinking ``last`` and before the fsync that makes it durable; then the same command
    again. The second one finds ``last`` gone: the one fsync of the root between that unlink
    and the trash move of step 3 is its own, on finding the link already absent."""
    from distckpt.cli import main as cli

    quiet = io.StringIO()  # what the command prints is not the point
    ctx.mark("deleting-3")
    command = ["delete", os.fspath(ctx.root), "3"]

    def delete_killed_in_the_removal() -> None:
        _kill_at_the_next_link_fsync()
        cli(command, quiet)

    _killed_in(delete_killed_in_the_removal)
    assert not os.path.lexists(ctx.root / "last")
    # Not asserted to succeed: with the removal's fsync taken out (the mutation check), the
    # first delete dies at a later fsync, the step already in the trash, and this one refuses.
    cli(command, quiet)


def fresh_root_traced(ctx: Context) -> None:
    """A root the manager creates itself, with missing parents, in a directory made by the
    job's own ``os.makedirs`` (or left by a job killed between creating it and fsyncing its
    parent), whose name is not durable: the manager creates ``child`` and the root in
    ``parent`` and saves step 1."""
    os.makedirs(ctx.base / "parent", exist_ok=True)
    with ctx.manager(root=ctx.base / "parent" / "child" / ROOT_NAME) as mgr:
        ctx.save(mgr, 1)


def exported_file(base: Path, step: int) -> Path:
    """Where the ``export`` workload writes step ``step``: in a directory the export makes,
    in one the job made just before."""
    return base / "exports" / "new" / f"step-{step}.pt"


def export_traced(ctx: Context) -> None:
    """``export(root, out_file, fsync=True)`` of step 1 into a directory that does not exist,
    in one the job's own ``os.makedirs`` made, whose name is not durable."""
    import distckpt

    os.makedirs(ctx.base / "exports", exist_ok=True)
    distckpt.export(ctx.root, exported_file(ctx.base, 1), fsync=True)
    ctx.mark("exported-1")


FORMATS = ("torch", "dcp")


@dataclass(frozen=True)
class Workload:
    name: str
    setup: Callable[[Context], None] | None
    traced: Callable[[Context], None]
    #: the root, relative to the base dir
    root: str = ROOT_NAME
    #: the two-rename overwrite leaves no step-N between its renames (documented)
    overwrite_window: bool = False
    #: whether a run with several ranks differs from one rank's (``restart`` kills saves of
    #: one process in its setup, so its 2-rank variant would only repeat ``retention``'s)
    multi_rank: bool = True
    #: the formats it runs in: one for a workload that never reads or writes a checkpoint's
    #: files in its own format (a delete of a whole dir, an export's one file)
    formats: tuple[str, ...] = FORMATS
    #: states the short run checks at least (all of them up to this many): where the one
    #: state a missing fsync spoils must not be sampled away
    min_states: int = 0


WORKLOADS = {
    w.name: w
    for w in (
        Workload("retention", lambda ctx: _saves(ctx, (1, 2), **RETAIN), retention_traced),
        Workload("delete", lambda ctx: _saves(ctx, (1, 2, 3)), delete_traced),
        Workload("prune", lambda ctx: _saves(ctx, (1, 2, 3)), prune_traced),
        Workload("overwrite", lambda ctx: _saves(ctx, (1, 2)), overwrite_traced),
        Workload(
            "overwrite_fallback",
            lambda ctx: _saves(ctx, (1, 2)),
            overwrite_fallback_traced,
            overwrite_window=True,
        ),
        Workload("async", lambda ctx: _saves(ctx, (1,), **RETAIN), async_traced),
        Workload("restart", restart_setup, restart_traced, multi_rank=False),
        Workload("killed_swap", killed_swap_setup, killed_swap_traced, multi_rank=False),
        Workload(
            "killed_remove",
            killed_remove_setup,
            killed_remove_traced,
            multi_rank=False,
            formats=("torch",),
        ),
        # Every state: one of about fifty loses the step where the ancestors are not fsynced.
        Workload(
            "fresh_root", None, fresh_root_traced, root=f"parent/child/{ROOT_NAME}", min_states=200
        ),
        # one rank, one format: about directories outside the root, which neither the ranks
        # nor the formats touch differently
        Workload(
            "export",
            lambda ctx: _saves(ctx, (1,)),
            export_traced,
            multi_rank=False,
            formats=("torch",),
        ),
        # one rank: the checker restores a several-rank job's parts with load_checkpoint, which
        # does not set a damaged checkpoint aside
        Workload("set_aside", set_aside_setup, set_aside_traced, multi_rank=False),
        Workload("pointer", lambda ctx: _saves(ctx, (1, 2), **POINTER), pointer_traced),
    )
}


WORLDS = (1, 2)

#: one exploration: (workload, format, world size)
Case = tuple[str, str, int]


def cases(
    names: Sequence[str] = tuple(WORKLOADS),
    formats: Sequence[str] = FORMATS,
    worlds: Sequence[int] = WORLDS,
) -> list[Case]:
    """Every (workload, format, world size) asked for; a workload whose setup needs one
    process (``restart``: the killed saves) runs with 1 rank only, and one that does not
    depend on the format in its own formats only."""
    return [
        (name, fmt, world)
        for name in names
        for fmt in formats
        for world in worlds
        if (world == 1 or WORKLOADS[name].multi_rank) and fmt in WORKLOADS[name].formats
    ]


def _run_rank(
    rank: int, world: int, name: str, phase: str, paths: tuple[str, str], fmt: str
) -> None:
    ctx = Context(Path(paths[0]), Path(paths[1]), rank, world, fmt)
    workload = WORKLOADS[name]
    step = workload.setup if phase == "setup" else workload.traced
    if step is not None:
        step(ctx)


def run_phase(name: str, phase: str, base: str, markers: str, world: int, fmt: str) -> None:
    """Run one phase of a workload on its ranks (world 1: one process with no process group,
    as a single-process job does); raises if a rank failed."""
    from tests.ranks import run_ranks, values

    values(
        run_ranks(
            _run_rank, 0 if world == 1 else world, name, phase, (base, markers), fmt, timeout=120
        )
    )


def main(argv: list[str]) -> None:
    name, phase, base, markers, world, fmt = argv
    run_phase(name, phase, base, markers, int(world), fmt)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
