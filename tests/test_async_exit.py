"""An async save still in flight when the interpreter exits: finished (whatever the root and
``writer_threads``), bounded by the timeout when a peer is dead, abandoned on a Ctrl-C without
cutting the rest of the exit short, and never waited for by a forked child.

Each script runs as ``python SCRIPT`` in a job server that imported torch once
(``tests.job_servers``): its exit is an interpreter's own, which is what these tests look at."""

from __future__ import annotations

import json
import os
import signal
import textwrap
from pathlib import Path

import pytest
import torch

import distckpt
from tests import job_servers
from tests.s3server import S3Server

#: A script that saves step 7 async and exits without wait() or close(): argv is the root, its
#: storage options (JSON), writer_threads and whether to drop the manager (collected) first.
_EXIT_WITH_A_SAVE_IN_FLIGHT = textwrap.dedent(
    """
    import gc, json, sys, threading, torch, distckpt
    from distckpt.formats.torch_files import TorchFilesFormat

    root, options, writer_threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    exiting = threading.Event()
    real_write = TorchFilesFormat.write

    def write_once_exiting(self, state, directory, ctx):
        # The write starts only once the interpreter's exit began: a save whose write began
        # before would sometimes finish before the exit shuts anything down. No real workload
        # times a write to exactly that moment, so the format's write is held back until it.
        exiting.wait(60)
        return real_write(self, state, directory, ctx)

    TorchFilesFormat.write = write_once_exiting
    mgr = distckpt.CheckpointManager(
        root, storage_options=options, async_save=True, writer_threads=writer_threads, timeout=60
    )
    mgr.save(7, {"w": torch.ones(1 << 20)})
    # The exit's first moment: hooks registered this way run before every atexit hook, last
    # registered first (so before distckpt's, and concurrent.futures'); nothing public marks it.
    threading._register_atexit(exiting.set)
    if sys.argv[4] == "dropped":
        del mgr
        gc.collect()
    # no wait(), no close(): the interpreter exits with the save in flight
    """
)


@pytest.mark.parametrize("where", ["posix", "posix, writer_threads=2", "posix, dropped", "s3"])
def test_interpreter_exit_with_a_save_in_flight_finishes_it(
    tmp_path: Path, where: str, request: pytest.FixtureRequest
) -> None:
    """README: at interpreter exit a save in flight is finished, also where its write or upload
    uses a thread pool (writer_threads > 1, an s3:// root), which Python shuts down at exit
    before any atexit hook runs, and where the manager was dropped without close()."""
    root, options = str(tmp_path / "root"), None
    if where == "s3":
        server: S3Server = request.getfixturevalue("s3_server")
        root, options = request.getfixturevalue("s3_url"), server.storage_options()
    threads = "2" if "writer_threads=2" in where else "1"
    kept = "dropped" if "dropped" in where else "kept"
    done = job_servers.run_script_preloaded(
        _EXIT_WITH_A_SAVE_IN_FLIGHT, [root, json.dumps(options), threads, kept], tmp_path
    )
    code, output = done.returncode, done.stdout
    assert code == 0, output
    assert "failed" not in output, output
    with distckpt.CheckpointManager(root, storage_options=options, read_only=True) as reader:
        assert reader.steps() == [7]
        assert reader.restore(7).state["w"].equal(torch.ones(1 << 20))
    assert distckpt.verify(root, storage_options=options).ok


#: One rank of a two-rank job (argv: rank, init file, root) whose async save is in flight when
#: it exits; rank 1 dies inside its write, so rank 0's save waits for a peer that never answers.
_EXIT_WITH_A_DEAD_PEER = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist, distckpt
    from distckpt.formats.torch_files import TorchFilesFormat

    rank, init, root = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    real_write = TorchFilesFormat.write

    def write_unless_dead(self, state, directory, ctx):
        if rank == 1:
            os._exit(0)  # a peer lost mid-save (no exit hooks: it is gone)
        return real_write(self, state, directory, ctx)

    TorchFilesFormat.write = write_unless_dead
    dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=2)
    mgr = distckpt.CheckpointManager(root, async_save=True, timeout=5)
    mgr.save(1, {"w": torch.ones(4)})
    # no wait(), no close(): rank 0 exits with the save in flight
    """
)


def test_an_exit_with_a_save_waiting_for_a_dead_peer_ends(tmp_path: Path) -> None:
    """README: the save finished at exit is bounded by the timeout: with its peer dead, rank
    0's exit waits for it at most about ``timeout`` (5 s here; less where the peer's closed
    connection tells it sooner), logs its failure, and ends."""
    init, root = str(tmp_path / "init"), str(tmp_path / "root")
    script = tmp_path / "rank.py"
    script.write_text(_EXIT_WITH_A_DEAD_PEER)
    ranks = [
        job_servers.start_preloaded(
            [str(script), str(rank), init, root], tmp_path / f"rank{rank}.log"
        )
        for rank in (0, 1)
    ]
    try:
        ranks[0].wait(120)  # far beyond 5 s, even on a loaded machine
    finally:
        for rank in ranks:
            if rank.poll() is None:
                os.killpg(rank.pid, signal.SIGKILL)
            rank.join()
    logged = (tmp_path / "rank0.log").read_text()
    assert "the checkpoint save in flight at exit failed" in logged, logged
    assert distckpt.CheckpointManager(root, read_only=True).steps() == []


#: A script whose async save is in flight at exit and whose user presses Ctrl-C while the exit
#: waits for it (argv: the root, and a file its own non-daemon thread writes a while later).
_CTRL_C_AT_EXIT = textwrap.dedent(
    """
    import os, signal, sys, threading, time, torch, distckpt
    from distckpt.formats.torch_files import TorchFilesFormat

    root, written_late = sys.argv[1], sys.argv[2]
    exiting = threading.Event()

    def write_interrupted(self, state, directory, ctx):
        # Held until the exit waits for it, as a slow write would be; then the user's Ctrl-C
        # comes (no real workload can time one into that wait), and the write fails.
        exiting.wait(60)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
        raise OSError("the write gave up")

    TorchFilesFormat.write = write_interrupted
    mgr = distckpt.CheckpointManager(root, async_save=True, timeout=60)
    mgr.save(1, {"w": torch.ones(4)})

    def the_programs_own_work():
        time.sleep(3)
        with open(written_late, "w") as out:
            out.write("done")

    threading.Thread(target=the_programs_own_work).start()  # non-daemon: joined at exit
    threading._register_atexit(exiting.set)  # runs first at exit: see the test above
    """
)


def test_ctrl_c_while_the_exit_waits_for_a_save_leaves_the_rest_of_the_exit_alone(
    tmp_path: Path,
) -> None:
    """A Ctrl-C during the exit's wait for a save in flight abandons that save (logged), and
    the interpreter's exit goes on: the program's own non-daemon threads are still joined
    (an exception out of the exit hook would cut the shutdown short and kill them)."""
    written_late = tmp_path / "written-late"
    output = job_servers.run_script_preloaded(
        _CTRL_C_AT_EXIT, [str(tmp_path / "root"), str(written_late)], tmp_path
    ).stdout
    assert "the checkpoint save in flight at exit was abandoned" in output, output
    assert written_late.read_text() == "done", output


def test_a_forked_child_that_exits_with_a_save_in_flight_does_not_wait_for_it(
    tmp_path: Path,
) -> None:
    """A plain os.fork() child (a data loader's worker, a helper process) inherits the exit
    hook of a save in flight, but not the thread running it: it exits at once, and the parent
    still finishes the save."""
    released = tmp_path / "child-exited"
    script = textwrap.dedent(
        f"""
        import os, sys, time, torch, distckpt
        from distckpt import faults
        real_hit = faults.hit

        def held_write(point, rank):
            if point == "after_shard_write":
                # The save stays in flight until the parent saw the child exit: a child that
                # waited for it would never exit.
                while not os.path.exists({str(released)!r}):
                    time.sleep(0.01)
            real_hit(point, rank)

        # The fault points can raise or kill but not delay, and no disk here is reliably slow
        # for exactly one write: the hook holds the write back instead.
        faults.hit = held_write
        mgr = distckpt.CheckpointManager({str(tmp_path / "root")!r}, async_save=True)
        mgr.save(7, {{"w": torch.ones(16)}})
        assert mgr.save_in_flight
        pid = os.fork()
        if pid == 0:
            sys.exit(0)  # a normal exit: the exit hooks run in the child
        deadline = time.monotonic() + 20  # far beyond a child's exit, even on a loaded machine
        exited = False
        while not exited and time.monotonic() < deadline:
            exited = os.waitpid(pid, os.WNOHANG) != (0, 0)
            time.sleep(0.01)
        open({str(released)!r}, "w").close()  # the save goes on only now
        if not exited:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        print("exited" if exited else "waited")
        mgr.close()
        """
    )
    done = job_servers.run_script_preloaded(script, [], tmp_path, timeout=60)
    code, output = done.returncode, done.stdout
    assert code == 0, output
    # the child did not wait for the held write
    assert output.splitlines()[-1] == "exited", output
    assert distckpt.CheckpointManager(tmp_path / "root").steps() == [7]
