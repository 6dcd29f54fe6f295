"""The idle-cost benchmark's accounting (bench/idle_cost.py), on real processes of this machine."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from pdserve.bench.idle_cost import cpu_seconds, role, role_of, usage
from pdserve.bench.vllm_server import descendants


def test_roles_from_command_lines():
    assert role("ray::ServeReplica:pdserve:decode") == "decode replica"
    assert role("ray::ServeController") == role("ray::ServeController.listen_for_change") == "ServeController"
    assert role("VLLM::Worker") == "other"  # by its title alone, nothing
    assert role("/x/ray/core/src/ray/gcs/gcs_server --port 1") == "ray gcs_server"


def test_processes_below_an_engine_replica_are_its_engine_whatever_their_title():
    procs = {10: (1.0, "ray::ServeReplica:pdserve:decode", 1), 11: (2.0, "python -c spawn_main", 10),
             12: (3.0, "VLLM::Worker", 11), 13: (4.0, "ray::ServeReplica:pdserve:router", 1)}
    assert [role_of(pid, procs) for pid in (10, 11, 12, 13)] == [
        "decode replica", "decode engine", "decode engine", "router replica"]


def test_a_busy_child_counts_and_an_idle_one_does_not():
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 5: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        time.sleep(0.5)
        pids = descendants(os.getpid())
        assert {busy.pid, idle.pid} <= set(pids)
        t0, before = time.monotonic(), cpu_seconds(pids)
        time.sleep(1.0)
        t1, after = time.monotonic(), cpu_seconds(pids)
        per_pid = {pid: (after[pid][0] - before[pid][0]) / (t1 - t0) for pid in (busy.pid, idle.pid)}
        assert per_pid[busy.pid] > 0.2 and per_pid[idle.pid] < 0.05, per_pid
        assert usage(before, after, t1 - t0)["other"] >= per_pid[busy.pid]
    finally:
        busy.kill()
        idle.kill()
        busy.wait()
        idle.wait()
