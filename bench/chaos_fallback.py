"""Benchmark: what a KV-link failure costs the client, against monolithic serving.

    python -m pdserve.bench.chaos_fallback [--requests 120 --rate 4 --kill-at 8 --heal-at 20]

For each P/D transport (gRPC, NIXL) a cluster serves Poisson chat traffic while the admin API
kills every KV link at ``--kill-at`` seconds and heals them at ``--heal-at``. A monolithic
cluster on the same two cores serves the same workload without faults. Prints TTFT p50/p95 of
requests served by P/D, by fallback (all causes, and per cause) and by monolithic serving, the
fallback/monolithic ratio, the time from the link kill to the first token served by fallback,
and how many requests failed (the goal: none).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from pathlib import Path

import numpy as np

from pdserve.bench.loadgen import LoadSpec, open_session, run_load, warm_up
from pdserve.bench.pd_vs_mono import ROOT, make_requests
from pdserve.bench.ports import free_port

ADMIN = {"Authorization": "Bearer pdserve-dev-admin"}
PD_EVERY_REQUEST = ["router.disaggregation=always"]
_CONFIGS = {"grpc": "cpu-pd-grpc.yaml", "nixl": "cpu-pd.yaml", "monolithic": "cpu-monolithic.yaml"}


def _ttfts(results, pred) -> list[float]:
    return [r.ttft * 1000 for r in results if r.success and pred(r)]


def _stats(values: list[float]) -> dict:
    def pct(q: float) -> float:
        return float(np.percentile(values, q)) if values else math.nan

    return {"n": len(values), "p50_ms": pct(50), "p95_ms": pct(95)}


async def _with_chaos(url: str, model: str, requests, rate: float, kill_at: float | None, heal_at: float | None):
    """The load's records, and the link kill's time in their clock (seconds from the load's start)."""
    t0 = time.perf_counter()
    load = asyncio.create_task(run_load(url, "chat", model, requests, LoadSpec(rate), t_origin=t0))
    t_kill = None
    if kill_at is not None:
        async with open_session(timeout_s=30) as c:
            await asyncio.sleep(kill_at)
            t_kill = time.perf_counter() - t0
            async with c.post(url + "/admin/chaos/kill-links", headers=ADMIN) as r:
                r.raise_for_status()
            await asyncio.sleep(heal_at - kill_at)
            async with c.post(url + "/admin/chaos/heal-links", headers=ADMIN) as r:
                r.raise_for_status()
    results, _ = await load
    return results, t_kill


def run_arm(name: str, requests, rate: float, kill_at, heal_at) -> dict:
    from pdserve.bench.cluster_runtime import runtime
    from pdserve.settings.cluster import load_config

    rt = runtime()
    # a P/D arm splits every request: the fallback under link kills is what is measured
    cfg = load_config(ROOT / "configs" / _CONFIGS[name], PD_EVERY_REQUEST if name != "monolithic" else ())
    url = rt.start_cluster(cfg, port=free_port())
    try:
        warm_up(url, "chat", cfg.model.served_name, make_requests(4, 200, 8, seed=99))
        results, t_kill = asyncio.run(_with_chaos(url, cfg.model.served_name, requests, rate, kill_at, heal_at))
    finally:
        rt.stop_cluster()
    out = {"failed": sum(not r.success for r in results), "all": _stats(_ttfts(results, lambda r: True)),
           "by_path": {}, "by_cause": {}}
    for path in ("pd", "fallback", "monolithic"):
        vals = _ttfts(results, lambda r, p=path: r.path == p)
        if vals:
            out["by_path"][path] = _stats(vals)
    for cause in sorted({r.fallback_cause for r in results if r.fallback_cause}):
        out["by_cause"][cause] = _stats(_ttfts(results, lambda r, c=cause: r.fallback_cause == c))
    if t_kill is not None:
        firsts = [r.start_time + r.ttft for r in results
                  if r.success and r.path == "fallback" and r.start_time + r.ttft >= t_kill]
        out["kill_to_first_fallback_token_ms"] = (min(firsts) - t_kill) * 1000 if firsts else None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=120)
    p.add_argument("--rate", type=float, default=4.0)
    p.add_argument("--kill-at", type=float, default=8.0)
    p.add_argument("--heal-at", type=float, default=20.0)
    p.add_argument("--transports", default="grpc,nixl")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    requests = make_requests(args.requests, 200, 64)
    arms = {"monolithic": run_arm("monolithic", requests, args.rate, None, None)}
    mono = arms["monolithic"]["by_path"]["monolithic"]
    print(f"monolithic     : TTFT p50 {mono['p50_ms']:.1f} ms p95 {mono['p95_ms']:.1f} ms, "
          f"failed {arms['monolithic']['failed']}", flush=True)
    for t in args.transports.split(","):
        a = arms[t] = run_arm(t, requests, args.rate, args.kill_at, args.heal_at)
        print(f"{t:<4} under chaos (links killed {args.kill_at:g}-{args.heal_at:g} s): failed {a['failed']}, "
              f"kill -> first fallback token {a['kill_to_first_fallback_token_ms']:.1f} ms", flush=True)
        for path, s in a["by_path"].items():
            print(f"    {path:<9} n={s['n']:3d} TTFT p50 {s['p50_ms']:7.1f} ms p95 {s['p95_ms']:7.1f} ms")
        for cause, s in a["by_cause"].items():
            print(f"      cause {cause:<22} n={s['n']:3d} TTFT p50 {s['p50_ms']:7.1f} ms p95 {s['p95_ms']:7.1f} ms")
        fb = a["by_path"].get("fallback")
        if fb:
            print(f"    fallback / monolithic TTFT: p50 {fb['p50_ms'] / mono['p50_ms']:.2f}x, "
                  f"p95 {fb['p95_ms'] / mono['p95_ms']:.2f}x (goal: within 1.5x)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "arms": arms}, indent=2))
    return 0


if __name__ == "__main__":
    from pdserve.bench import cluster_runtime
    from pdserve.cluster import runtime

    cluster_runtime.use(runtime)  # this script is the program: its entry point is a composition root
    raise SystemExit(main())
