"""Helpers of the vLLM suite: finding vLLM's engine processes and where their threads may run."""
from __future__ import annotations

import os

import psutil

ENGINE_TITLES = ("VLLM::EngineCore", "VLLM::Worker")   # the titles vLLM gives its engine core and worker
SPAWNED = "from multiprocessing.spawn import spawn_main"   # a spawned child's command line, before any title


def title(process: psutil.Process) -> str:
    """The process's title (Ray and vLLM rewrite argv: "ray::ServeReplica:...", "VLLM::Worker")."""
    return " ".join(process.cmdline()).strip()


def is_engine(process: psutil.Process) -> bool:
    """Whether `process` is one of vLLM's engine processes (its engine core or model worker): vLLM
    titles them, and on CPU it always starts them with multiprocessing's spawn. The title cannot be
    relied on: setproctitle gives up, silently, in a process whose first environment entry was
    rewritten before setproctitle was imported, and vLLM's imports (cv2, vllm.env_override) rewrite
    LD_LIBRARY_PATH, so an engine whose environment lists LD_LIBRARY_PATH first keeps its spawn
    command line for good (seen under Serve replicas: both processes, for the whole run)."""
    name = title(process)
    return name.startswith(ENGINE_TITLES) or SPAWNED in name


def engine_processes(root: psutil.Process | None = None) -> list[psutil.Process]:
    """The live vLLM engine processes under `root` (default: this process). A local Ray started by
    this process is under it too (GCS, raylet, workers), and so are the engines its workers start;
    other sessions' on the same machine are not."""
    found = []
    for process in (root or psutil.Process()).children(recursive=True):
        try:
            if is_engine(process):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def ray_ancestry(process: psutil.Process) -> tuple[str | None, int]:
    """(the title of the nearest Ray worker above `process`, how many levels up it is: 1 for a
    child), or (None, 0) if there is none."""
    for depth, parent in enumerate(process.parents(), start=1):
        try:
            if title(parent).startswith("ray::"):
                return title(parent), depth
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return None, 0
    return None, 0


def thread_cpus(process: psutil.Process) -> set[frozenset[int]]:
    """The distinct CPU sets the process's threads may run on (OpenMP binding pins each thread)."""
    found = set()
    for thread in process.threads():
        try:
            found.add(frozenset(os.sched_getaffinity(thread.id)))
        except OSError:            # the thread ended meanwhile
            continue
    return found
