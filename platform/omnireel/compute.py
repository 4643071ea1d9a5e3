"""The compute thread: the one thread of a replica process that runs its model work, at the priority
the work needs.

Ray starts every worker process at nice 15 (`RAY_worker_niceness`), below the node's own services.
A stage replica's process also runs Serve's event loops and metrics pushes, and every other replica
on the node (the idle ones too) does the same, all at 15. At equal priority that chatter takes the
CPU from a denoising step or a decode mid-way, and an OpenMP region's threads wait at each barrier
for whichever of them was preempted. So a replica runs all of its torch work on one thread:

    compute = ComputeThread(threads=2, niceness=0)   # warm-up and every call on that one thread
    compute.run(fn, *args)                           # from synchronous code (a constructor)
    await compute.call(fn, *args)                    # from the replica's event loop

- one thread, so one OpenMP team per process (a second thread running torch would start a second
  team, and libgomp throttles its spin-waits once a process has more OpenMP threads than cores);
- calls run one at a time, in arrival order: concurrent model calls in one process only contend;
- its nice value is `niceness` (the OpenMP threads it starts inherit it; Ray's and Serve's threads
  keep 15). Going below the process's own value needs CAP_SYS_NICE (root, or the capability in the
  container); without it the thread logs once and stays where Ray put it;
- it and the threads it starts (OpenMP's, the tokenizer's, the video encoder's) are named
  `omnireel-compute` (what `top -H` and /proc/<pid>/task/*/comm show).
"""
from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
THREAD_NAME = "omnireel-compute"   # the kernel keeps 15 bytes of it
PR_SET_NAME = 15                   # prctl(2)


def compute_threads() -> dict[int, int]:
    """This process's compute threads (and the threads they started) by name: thread id -> nice value."""
    threads = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            if (task / "comm").read_text().strip() == THREAD_NAME[:15]:
                threads[int(task.name)] = os.getpriority(os.PRIO_PROCESS, int(task.name))
        except (FileNotFoundError, ProcessLookupError):   # the thread ended meanwhile
            pass
    return threads


def set_thread_niceness(niceness: int | None) -> None:
    """Sets the calling thread's nice value (Linux: per thread) where allowed."""
    tid = threading.get_native_id()
    if niceness is not None and os.getpriority(os.PRIO_PROCESS, tid) != niceness:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, niceness)
        except PermissionError:
            logger.warning("compute thread: nice %d needs CAP_SYS_NICE; it stays at %d", niceness,
                           os.getpriority(os.PRIO_PROCESS, tid))


def enter_compute(threads: int | None, niceness: int | None) -> None:
    """Makes the calling thread a compute thread: its OS name, torch thread count and nice value
    (before it starts any OpenMP thread, which then inherits the name and the nice value)."""
    if os.uname().sysname == "Linux":
        ctypes.CDLL(None).prctl(PR_SET_NAME, THREAD_NAME.encode(), 0, 0, 0)
    set_thread_niceness(niceness)
    if threads:
        torch.set_num_threads(threads)


class ComputeThread:
    """A single worker thread that runs a process's model work (see the module docstring)."""

    def __init__(self, threads: int | None = None, niceness: int | None = None):
        self.threads = threads          # torch threads it set (None: the process's)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=THREAD_NAME, initializer=enter_compute,
                                            initargs=(threads, niceness))
        self.native_id, self.niceness = self.run(
            lambda: (threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))

    def run(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on the compute thread; blocks the caller until it returns."""
        return self._executor.submit(fn, *args, **kwargs).result()

    def submit(self, fn, *args, **kwargs) -> Future:
        """fn(*args, **kwargs) queued on the compute thread; returns at once (a concurrent Future)."""
        return self._executor.submit(fn, *args, **kwargs)

    async def call(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on the compute thread, awaited. Cancelling the await does not stop a
        call that has started (a long stage takes a should_stop hook for that)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
