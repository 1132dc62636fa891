"""A crash-state explorer: proves what a power loss can leave of a checkpoint root.

Killing a process (every other crash test) leaves the page cache behind, so it cannot tell a
missing or misordered fsync from a correct one. This package does what ALICE (OSDI 2014) and
CrashMonkey (OSDI 2018) do for file systems, on distckpt's own workloads:

* :mod:`.trace` runs a workload under ``strace -f -y`` and keeps the file-system system calls;
* :mod:`.syscalls` parses that trace into operations on paths under the workload's base dir;
* :mod:`.model` turns them into operations on inodes and, under the persistence model that
  ``docs/faults.md`` states, generates the states a power loss could leave, replaying each
  into a fresh directory;
* :mod:`.check` opens each state with the public API in a fresh process and reports every
  broken promise;
* :mod:`.workloads` are the jobs traced; :mod:`.explore` ties the steps together and
  :mod:`.mutate` removes the library's fsyncs one at a time to prove the explorer notices.
"""
