"""The router-capacity bench's figures: CPU accounting of the router, stubs and clients; where
the closed-loop and open-loop sweeps saturate and what limits the router there; the printed
table and summary."""
from __future__ import annotations

import argparse
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Optional

from pdserve.bench.stub_engine import STUB_NAME

# ---------------------------------------------------------------------------------------------
# CPU accounting (driver side)


def _thread_name(pid: int, tid: int) -> str:
    try:
        return Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    except OSError:
        return "?"


class CpuProbe:
    """CPU seconds of the router process (and its busiest threads), the stubs, the clients and
    the machine, between two snapshots."""

    def __init__(self, router_pids: list[int], stub_pids: dict[str, list[int]], client_pids: list[int]) -> None:
        import psutil

        self.psutil = psutil
        self.router_pids = router_pids
        self.stub_pids = stub_pids
        self.client_pids = client_pids
        self.ncores = psutil.cpu_count(logical=True) or os.cpu_count() or 1

    def _proc_time(self, pid: int) -> Optional[float]:
        try:
            t = self.psutil.Process(pid).cpu_times()
            return t.user + t.system
        except Exception:  # noqa: BLE001 - gone
            return None

    def snapshot(self) -> dict[str, Any]:
        threads: dict[int, float] = {}
        if len(self.router_pids) == 1:
            try:
                threads = {th.id: th.user_time + th.system_time
                           for th in self.psutil.Process(self.router_pids[0]).threads()}
            except Exception:  # noqa: BLE001
                threads = {}
        return {
            "t": time.monotonic(),
            "router": {pid: self._proc_time(pid) for pid in self.router_pids},
            "threads": threads,
            "stubs": {pool: {pid: self._proc_time(pid) for pid in pids} for pool, pids in self.stub_pids.items()},
            "clients": {pid: self._proc_time(pid) for pid in self.client_pids},
            "system": self.psutil.cpu_times(percpu=True),
        }

    def delta(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        wall = max(1e-9, b["t"] - a["t"])

        def pct(x: Optional[float], y: Optional[float]) -> Optional[float]:
            return None if x is None or y is None else 100.0 * (y - x) / wall

        def pcts(da: dict[int, Optional[float]], db: dict[int, Optional[float]]) -> list[float]:
            return [v for v in (pct(da.get(p), db.get(p)) for p in db) if v is not None]

        router = pcts(a["router"], b["router"])
        stubs = {pool: pcts(a["stubs"][pool], b["stubs"][pool]) for pool in b["stubs"]}
        clients = pcts(a["clients"], b["clients"])
        top = sorted(((pct(a["threads"].get(tid), t) or 0.0, tid) for tid, t in b["threads"].items()),
                     reverse=True)[:3]
        rpid = self.router_pids[0] if len(self.router_pids) == 1 else None
        busy = []
        for x, y in zip(a["system"], b["system"]):
            tot = sum(y) - sum(x)
            idle = (y.idle - x.idle) + (getattr(y, "iowait", 0.0) - getattr(x, "iowait", 0.0))
            busy.append(max(0.0, (tot - idle) / tot) if tot > 0 else 0.0)
        stub_all = [v for vs in stubs.values() for v in vs]
        machine_cores = sum(busy)
        known = (sum(router) + sum(stub_all) + sum(clients)) / 100.0
        return {
            "router_pct": sum(router) if router else None,
            "router_threads_pct": [{"thread": _thread_name(rpid, tid) if rpid else "?", "pct": round(v, 1)}
                                   for v, tid in top],
            "stubs_pct": {pool: round(sum(vs), 1) for pool, vs in stubs.items()},
            "stubs_total_pct": sum(stub_all),
            "stub_max_pct": max(stub_all) if stub_all else None,
            "clients_pct": sum(clients),
            "client_max_pct": max(clients) if clients else None,
            "machine_busy_cores": machine_cores,
            "machine_busy_pct": 100.0 * machine_cores / max(1, len(busy)),
            "busiest_core_pct": 100.0 * max(busy) if busy else None,
            "other_busy_cores": max(0.0, machine_cores - known),  # Ray's own processes and anything else
            "ncores": len(busy),
        }


# ---------------------------------------------------------------------------------------------
# saturation


def _healthy(level: dict[str, Any], ttft_limit_ms: float, max_error_rate: float) -> bool:
    return (level.get("completed", 0) > 0 and level.get("ttft_p99_ms") is not None
            and level["ttft_p99_ms"] <= ttft_limit_ms and level["error_rate"] <= max_error_rate)


def analyze_closed_loop(levels: list[dict[str, Any]], *, growth: float = 0.10, ttft_factor: float = 10.0,
                        max_error_rate: float = 0.01) -> dict[str, Any]:
    """Where the closed-loop sweep saturates.

    The knee is the level after which req/s stops growing by more than ``growth``, or after
    which p99 TTFT exceeds ``ttft_factor`` x its value at the lowest level (or errors exceed
    ``max_error_rate``). The capacity is the highest req/s of any level still within those
    latency and error bounds; the concurrent streams figure is the most streams held within them.
    """
    valid = [lv for lv in levels if lv.get("completed", 0) > 0 and lv.get("ttft_p99_ms") is not None]
    if not valid:
        return {"saturated": None, "reason": "no level completed any request"}
    base = valid[0]["ttft_p99_ms"]
    limit = ttft_factor * base
    knee_i: Optional[int] = None
    reason = None
    for i in range(1, len(valid)):
        prev, cur = valid[i - 1], valid[i]
        if cur["error_rate"] > max_error_rate:
            knee_i, reason = i - 1, (f"errors: {cur['error_rate']:.1%} of requests failed at {cur['label']} "
                                     f"(bound {max_error_rate:.0%})")
        elif cur["ttft_p99_ms"] > limit:
            knee_i, reason = i - 1, (f"p99 TTFT {cur['ttft_p99_ms']:.1f} ms at {cur['label']} is over "
                                     f"{ttft_factor:g}x the low-load {base:.1f} ms")
        elif cur["rps"] < prev["rps"] * (1 + growth):
            knee_i, reason = i - 1, (f"req/s grew only {cur['rps'] / prev['rps'] - 1:+.1%} from {prev['label']} to "
                                     f"{cur['label']} (needs > +{growth:.0%})")
        if knee_i is not None:
            break
    sustained = [lv for lv in valid if _healthy(lv, limit, max_error_rate)] or [valid[0]]
    best = max(sustained, key=lambda lv: lv["rps"])
    streams = max(sustained, key=lambda lv: lv["streams_mean"])
    out = {
        "low_load_ttft_p99_ms": base,
        "ttft_p99_limit_ms": limit,
        "saturated": knee_i is not None,
        "knee_level": valid[knee_i]["label"] if knee_i is not None else None,
        "knee_rps": valid[knee_i]["rps"] if knee_i is not None else None,
        "reason": reason or f"req/s still grew by > {growth:.0%} at every level: not saturated within the sweep",
        "capacity_rps": best["rps"],
        "capacity_tokens_per_s": best["tokens_per_s"],
        "capacity_level": best["label"],
        "max_streams_within_bounds": streams["streams_mean"],
        "max_streams_level": streams["label"],
        "judged_level": (valid[knee_i + 1] if knee_i is not None and knee_i + 1 < len(valid) else valid[-1])["label"],
    }
    return out


def analyze_open_loop(levels: list[dict[str, Any]], *, ttft_limit_ms: Optional[float], keep_up: float = 0.95,
                      max_error_rate: float = 0.01) -> dict[str, Any]:
    """The highest offered rate the router kept up with (completed >= keep_up x offered) within bounds."""
    ok = [lv for lv in levels if lv.get("completed", 0) > 0 and lv["rps"] >= keep_up * lv["offered_rps"]
          and _healthy(lv, math.inf if ttft_limit_ms is None else ttft_limit_ms, max_error_rate)]
    if not ok:
        return {"sustained_rate_rps": None, "sustained_level": None}
    best = max(ok, key=lambda lv: lv["offered_rps"])
    return {"sustained_rate_rps": best["offered_rps"], "achieved_rps": best["rps"], "sustained_level": best["label"]}


def limiting_resource(level: dict[str, Any], *, busy: float = 85.0) -> dict[str, str]:
    """What held the router back at a saturated level, from its CPU figures."""
    cpu = level.get("cpu") or {}
    router = cpu.get("router_pct")
    n = cpu.get("ncores") or 1
    if cpu.get("client_max_pct") is not None and cpu["client_max_pct"] >= busy:
        return {"resource": "load client",
                "detail": (f"a client process used {cpu['client_max_pct']:.0f}% of a core: the client, not the router, "
                           "may be the limit here; run with more --clients")}
    if router is not None and router >= busy:
        return {"resource": "router replica CPU",
                "detail": (f"the router process used {router:.0f}% of a core: one Python interpreter, so its event "
                           "loops and the GIL top out near 100%; more router work per request lowers capacity")}
    if cpu.get("machine_busy_pct") is not None and cpu["machine_busy_pct"] >= 90.0:
        return {"resource": "machine CPU",
                "detail": (f"{cpu['machine_busy_cores']:.1f} of {n} cores busy (router {router or 0:.0f}%, stubs "
                           f"{cpu.get('stubs_total_pct', 0):.0f}%, clients {cpu.get('clients_pct', 0):.0f}%, Ray and "
                           f"others {100 * cpu.get('other_busy_cores', 0):.0f}%): the router cannot get more CPU on "
                           "this machine; its CPU cost per request (below) is the portable figure")}
    if cpu.get("stub_max_pct") is not None and cpu["stub_max_pct"] >= busy:
        return {"resource": "stub engine replica",
                "detail": (f"a stub replica used {cpu['stub_max_pct']:.0f}% of a core: run with more "
                           "--stub-replicas")}
    if router is None:
        return {"resource": "unknown", "detail": "the router process was not found, so its CPU is unknown"}
    return {"resource": "none saturated (latency-bound)",
            "detail": (f"router {router:.0f}%, machine {cpu.get('machine_busy_pct', 0):.0f}%: no CPU was full; the "
                       "limit is round-trip latency through HTTP and Ray at this concurrency")}


# ---------------------------------------------------------------------------------------------
# the table and the summary


def _f(v: Optional[float], spec: str = "8.1f") -> str:
    """``v`` formatted with ``spec``, or a dash as wide."""
    if v is not None:
        return format(v, spec)
    width = re.match(r"\d*", spec).group()
    return "-".rjust(int(width)) if width else "-"


TABLE_HEADER = (f"{'level':>12} {'req/s':>8} {'tok/s':>9} {'streams':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
                f"{'ITL p50':>8} {'ITL p99':>8} {'router':>7} {'rtr ms':>7} {'stubs':>6} {'client':>7} {'machine':>8} "
                f"{'err':>5}")
TABLE_UNITS = (f"{'':>12} {'':>8} {'':>9} {'(mean)':>8} {'ms':>9} {'ms':>9} {'ms':>8} {'ms':>8} {'CPU %':>7} "
               f"{'CPU/req':>7} {'CPU %':>6} {'CPU %':>7} {'CPU %':>8} {'':>5}")


def table_row(lv: dict[str, Any]) -> str:
    cpu = lv.get("cpu") or {}
    ms_req = lv.get("router_cpu_ms_per_req")
    return (f"{lv['label']:>12} {lv['rps']:8.1f} {lv['tokens_per_s']:9.0f} {lv['streams_mean']:8.1f} "
            f"{_f(lv.get('ttft_p50_ms'), '9.2f')} {_f(lv.get('ttft_p99_ms'), '9.2f')} "
            f"{_f(lv.get('itl_p50_ms'), '8.2f')} {_f(lv.get('itl_p99_ms'), '8.2f')} "
            f"{_f(cpu.get('router_pct'), '7.0f')} {_f(ms_req, '7.2f')} {_f(cpu.get('stubs_total_pct'), '6.0f')} "
            f"{_f(cpu.get('clients_pct'), '7.0f')} {_f(cpu.get('machine_busy_pct'), '8.0f')} "
            f"{lv['error_rate'] * 100:4.1f}%")


def print_summary(report: dict[str, Any], args: argparse.Namespace) -> None:
    closed = report["analysis"]["closed_loop"]
    opened = report["analysis"]["open_loop"]
    print(f"\nsummary (engines are {STUB_NAME} STUBS: these are the router's limits, not serving figures)")
    levels = {lv["label"]: lv for lv in report["closed_loop"]}
    cmp: dict[str, Any] = {"goal_ratio": args.goal_ratio}
    if closed.get("capacity_rps") is not None:
        print(f"  low-load p99 TTFT {closed['low_load_ttft_p99_ms']:.2f} ms; latency bound "
              f"{args.ttft_factor:g}x = {closed['ttft_p99_limit_ms']:.2f} ms")
        if closed["saturated"]:
            print(f"  saturates after {closed['knee_level']} ({closed['knee_rps']:.1f} req/s): {closed['reason']}")
        else:
            print(f"  not saturated within the sweep ({closed['reason']}); the capacity below is a lower bound")
        print(f"  router capacity: {closed['capacity_rps']:.1f} req/s, {closed['capacity_tokens_per_s']:.0f} tokens/s "
              f"(at {closed['capacity_level']}, within the latency and error bounds)")
        print(f"  concurrent streams within bounds: {closed['max_streams_within_bounds']:.0f} "
              f"(at {closed['max_streams_level']})")
        judged = levels.get(closed["judged_level"])
        if judged is not None:
            lim = limiting_resource(judged)
            closed["limiting_resource"] = lim
            print(f"  limiting resource at {judged['label']}: {lim['resource']}: {lim['detail']}")
            cpu = judged.get("cpu") or {}
            if cpu.get("router_threads_pct"):
                tops = ", ".join(f"{t['thread']} {t['pct']:.0f}%" for t in cpu["router_threads_pct"])
                print(f"  router's busiest threads there: {tops}")
            ms_req = judged.get("router_cpu_ms_per_req")
            if ms_req:
                per_core = 1000.0 / ms_req
                closed["router_cpu_ms_per_req"] = ms_req
                closed["router_rps_per_dedicated_core"] = per_core
                print(f"  router CPU cost: {ms_req:.2f} ms per request ({judged['router_cpu_us_per_token']:.0f} us per "
                      f"token); a router with one core to itself would top out near {per_core:.0f} req/s "
                      "(extrapolated: 1000 / ms per request)")
    if opened.get("sustained_rate_rps") is not None:
        print(f"  open loop: kept up with {opened['sustained_rate_rps']:g} req/s offered "
              f"({opened['achieved_rps']:.1f} completed) within the bounds")
    elif report["open_loop"]:
        print("  open loop: no offered rate was kept up with within the bounds")

    cap = closed.get("capacity_rps")
    print(f"\ncomparison with the engine pools (goal: router capacity >= {args.goal_ratio:g}x engine capacity)")
    if args.engine_capacity_rps:
        ratio = cap / args.engine_capacity_rps if cap else None
        cmp.update(engine_capacity_rps=args.engine_capacity_rps, router_capacity_rps=cap, ratio=ratio,
                   goal_met=bool(ratio is not None and ratio >= args.goal_ratio))
        print(f"  router capacity (stub engines, measured here): {_f(cap, '.1f')} req/s")
        print(f"  engine-pool capacity (--engine-capacity-rps):  {args.engine_capacity_rps:g} req/s")
        if ratio is not None:
            print(f"  ratio: {ratio:.1f}x  -> goal {'MET' if cmp['goal_met'] else 'NOT MET'}")
        if closed.get("router_rps_per_dedicated_core"):
            r2 = closed["router_rps_per_dedicated_core"] / args.engine_capacity_rps
            cmp["ratio_dedicated_core_extrapolated"] = r2
            print(f"  (extrapolated, router on a dedicated core: {r2:.1f}x)")
    else:
        print("  engine-pool capacity not given: pass --engine-capacity-rps (the real pools' measured req/s for the "
              "same request shape) to get the ratio")
    if args.engine_capacity_streams and closed.get("max_streams_within_bounds") is not None:
        sr = closed["max_streams_within_bounds"] / args.engine_capacity_streams
        cmp.update(engine_capacity_streams=args.engine_capacity_streams, streams_ratio=sr)
        print(f"  concurrent streams: router {closed['max_streams_within_bounds']:.0f} vs engines "
              f"{args.engine_capacity_streams:g} -> {sr:.1f}x")
    report["comparison"] = cmp
