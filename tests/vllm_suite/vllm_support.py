"""Helpers of the vLLM suite: finding vLLM's engine processes and where their threads may run."""
from __future__ import annotations

import os

import psutil

ENGINE_TITLES = ("VLLM::EngineCore", "VLLM::Worker")   # the titles vLLM gives its engine core and worker


def title(process: psutil.Process) -> str:
    """The process's title (Ray and vLLM rewrite argv: "ray::ServeReplica:...", "VLLM::Worker")."""
    return " ".join(process.cmdline()).strip()


def engine_processes(root: psutil.Process | None = None) -> list[psutil.Process]:
    """The live vLLM engine processes under `root` (default: this process). A local Ray started by
    this process is under it too (GCS, raylet, workers), and so are the engines its workers start;
    other sessions' on the same machine are not."""
    found = []
    for process in (root or psutil.Process()).children(recursive=True):
        try:
            if title(process).startswith(ENGINE_TITLES):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


SPAWNED = "from multiprocessing.spawn import spawn_main"   # a spawned child before it sets its title


def ray_host(process: psutil.Process) -> str | None:
    """The title of the nearest Ray worker above `process` ("ray::..."), None if there is none."""
    return ray_ancestry(process)[0]


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
