"""Benchmark: what an idle cluster costs, in CPU, process by process.

    python -m pdserve.bench.idle_cost [--config configs/cpu-pd.yaml] [--settle-s 30] [--window-s 30]

Starts the config's cluster on a local Ray instance, sends it nothing, waits ``--settle-s`` (past
the start-up work), then reads every process's CPU time from /proc over ``--window-s`` and
prints each process below this one (Ray's, the replicas', the engines') as a percentage of one
core, grouped by role, and the total. What an idle cluster spends is taken from the engines'
cores and from whatever shares the hosts with it.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Optional

from pdserve.bench.vllm_server import descendants

ROOT = Path(__file__).resolve().parents[1]


def cpu_seconds(pids: list[int]) -> dict[int, tuple[float, str, int]]:
    """(user + system CPU seconds, command line, parent pid) of each live process of ``pids``."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        out[pid] = ((int(fields[11]) + int(fields[12])) / tick, cmd, int(fields[1]))
    return out


def role(cmd: str) -> str:
    """A process's role, from its command line (Ray names its actors' processes ``ray::<actor>``)."""
    if cmd.startswith("ray::ServeReplica:"):
        return cmd.split()[0].rsplit(":", 1)[1] + " replica"
    if cmd.startswith("ray::"):  # an actor's process, titled with the method it runs, if any
        return cmd.split()[0][len("ray::"):].split(".")[0]
    for name in ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py"):
        if name in cmd:
            return "ray " + name
    return "other"


def role_of(pid: int, procs: dict[int, tuple[float, str, int]]) -> str:
    """A process's role; a process below an engine replica's is that pool's engine, whatever its
    title says (vLLM's engine children do not always carry theirs)."""
    parent = procs[pid][2]
    while parent in procs:
        if procs[parent][1].startswith("ray::ServeReplica:"):
            return role(procs[parent][1]).replace(" replica", " engine")
        parent = procs[parent][2]
    return role(procs[pid][1])


def usage(before: dict[int, tuple[float, str, int]], after: dict[int, tuple[float, str, int]],
          seconds: float) -> dict[str, float]:
    """CPU per role over the window, as a fraction of one core (processes alive at both ends)."""
    groups: dict[str, float] = {}
    for pid, (cpu, _, _) in after.items():
        if pid in before:
            name = role_of(pid, after)
            groups[name] = groups.get(name, 0.0) + max(0.0, cpu - before[pid][0]) / seconds
    return groups


def main(argv: Optional[list[str]] = None) -> int:
    from pdserve.bench.cluster_runtime import runtime
    from pdserve.bench.ports import free_port
    from pdserve.settings.cluster import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "cpu-pd.yaml"))
    p.add_argument("--settle-s", type=float, default=30.0)
    p.add_argument("--window-s", type=float, default=30.0)
    args = p.parse_args(argv)
    if args.settle_s < 0 or args.window_s <= 0:
        p.error("--settle-s must be >= 0 and --window-s > 0")
    rt = runtime()
    rt.start_cluster(load_config(args.config), port=free_port())
    try:
        time.sleep(args.settle_s)
        t0, before = time.monotonic(), cpu_seconds(descendants(os.getpid()))
        time.sleep(args.window_s)
        t1, after = time.monotonic(), cpu_seconds(descendants(os.getpid()))
    finally:
        rt.stop_cluster()
    groups = usage(before, after, t1 - t0)
    print(f"\nidle {Path(args.config).name}: CPU over {t1 - t0:.0f} s, % of one core")
    for name, share in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<28}{100 * share:6.1f} %")
    print(f"  {'total':<28}{100 * sum(groups.values()):6.1f} %")
    return 0


if __name__ == "__main__":
    from pdserve.bench import cluster_runtime
    from pdserve.cluster import runtime as _runtime

    cluster_runtime.use(_runtime)  # this script is the program: its entry point is a composition root
    raise SystemExit(main())
