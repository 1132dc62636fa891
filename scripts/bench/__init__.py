"""Benchmark distckpt against raw ``torch.save`` and DCP, on the same state, ranks and disk.

Every contender runs in one job per (world size, MiB per rank): the ranks are processes started
by ``tests/ranks.py`` (``spawn`` by default; not daemonic, so that DCP's process-based
``async_save`` can start its checkpoint processes, which end with the job) and joined by a gloo
group on 127.0.0.1 (a free port), each with one torch thread. Each round writes into a fresh
directory that is deleted afterwards; the order of the save contenders rotates from round to
round; every time is the slowest rank's, and the tables show medians over the rounds. Ratios
between two contenders are medians of the per-round ratios (paired measurements of the same
run). Everything fsyncs: distckpt with ``fsync=True``, raw ``torch.save`` followed by
``os.fsync``, DCP with ``sync_files=True``. Caches are not dropped; each contender's output is
deleted before the next one starts. Where a distckpt save spends its time comes from the phase
events the library emits (``distckpt.events``), not from patching it.

    python scripts/bench                                         # 1,2,4 ranks x 64,512 MiB
    python scripts/bench --world-sizes 2 --mib 512 --rounds 3 --json bench.json
    python scripts/bench --contenders raw_torch_save,distckpt_sync_torch --mib 64
    python scripts/bench --contenders train --world-sizes 2 --mib 512   # training slowdown

Modules: ``contenders`` (what is measured, and the state), ``training`` (the training step of
the ``train`` contender), ``timing`` (the ranks' timing collectives), ``jobs`` (the main job),
``coordination`` (the coordination-overhead job, at each of ``--coord-ranks``), ``small`` (the
many-small-tensors job), ``runner`` (starting a job's ranks), ``plot`` (``--plot``),
``phases`` (phase events into a table), ``summary`` (medians, ratios, targets), ``render`` (text
and markdown), ``cli`` (flags, main).
See docs/benchmark.md for what each contender measures and a run on a small machine.
"""
