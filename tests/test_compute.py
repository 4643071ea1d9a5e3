"""The compute thread (compute.py): one named thread runs every call, with its own torch thread
count and nice value, and the OpenMP threads it starts inherit both name and nice value."""
from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from omnireel.compute import ComputeThread, compute_threads

ROOT = Path(__file__).resolve().parents[1]


def test_every_call_runs_on_one_named_thread_at_its_own_nice_value():
    caller_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    compute = ComputeThread(threads=2, niceness=min(caller_nice + 3, 19))
    try:
        def matmul():
            x = torch.randn(512, 512)
            return threading.get_native_id(), torch.get_num_threads(), float((x @ x).sum())
        seen = {compute.run(matmul)[0] for _ in range(3)}
        seen |= {asyncio.run(compute.call(matmul))[0] for _ in range(2)}
        assert seen == {compute.native_id} and compute.native_id != threading.get_native_id()
        assert compute.run(matmul)[1] == 2
        assert compute.niceness == min(caller_nice + 3, 19)
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == caller_nice   # the caller's is untouched
        named = compute_threads()
        assert compute.native_id in named
        assert set(named.values()) == {compute.niceness}   # its OpenMP thread inherited both
        assert len(named) >= 2
    finally:
        compute.shutdown()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="drops CAP_SYS_NICE with setpriv (util-linux), which needs root")
def test_without_cap_sys_nice_the_thread_logs_and_keeps_its_nice_value():
    script = textwrap.dedent("""
        import logging, os
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        os.nice(5)
        from omnireel.compute import ComputeThread
        compute = ComputeThread(threads=1, niceness=0)
        print("niceness", compute.niceness, compute.run(lambda: 6 * 7))
    """)
    proc = subprocess.run(["setpriv", "--bounding-set=-sys_nice", sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert f"niceness {min(base + 5, 19)} 42" in proc.stdout
    assert "nice 0 needs CAP_SYS_NICE" in proc.stderr
