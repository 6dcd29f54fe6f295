"""The cache-aware routing sweep: four arms on the same two cores, multi-turn chat at a sweep of
session rates, and the goals of adaptive disaggregation checked against the other three.

    python -m pdserve.bench.cache_sweep [--session-rates 0.5,1.5,3] [--arrival-s 40] [--turns 5]
        [--system-prompt-len 512] [--user-turn-len 64] [--answer-len 64] [--think-time-s 1]
        [--arms mono-least-loaded,mono-cache-aware,pd-always,pd-adaptive] [--repeats 1] [--json PATH] [--plot PATH]

The arms (bench/arms.py): monolithic least-loaded, monolithic cache-aware (prefix scorer),
P/D always (least-loaded), P/D adaptive + cache-aware. The arms never share the machine: a
cluster is started, warmed up (two rounds of short unrelated requests, so the engines have run
and the adaptive decider has its measurements), run, and stopped. ``--order rate`` (the
default) runs every arm at a rate, each on a fresh cluster, before the next rate, and rotates
which arm goes first, so that a machine whose speed drifts within the sweep (this one's does,
by a third in 15 minutes) weighs on every arm alike; ``--order arm`` sweeps one arm's cluster
over every rate, then the next arm's (fewer starts, but the last arm meets the slowest
machine). Each rate runs ``rate x arrival-s`` new sessions (bench/sessions.py:
Poisson session arrivals, each turn after the previous answer and a think time, carrying the
whole conversation); the conversations of a rate are the same in every arm (seed + the rate's
index) and differ between rates, over one system prompt. The router's own counters are read
around each rate: the adaptive decider's choices by way and reason
(``pdserve_disaggregation_total``), the prompt tokens the prefix index found cached per pool
(``pdserve_prefix_tokens_total``), and its fitted inputs after the rate
(``pdserve_decider_input``).

Goodput is counted over the sessions' arrival window (``arrival-s``, the same for every arm
at a rate): requests that met every SLO of the config's ``slo`` section, per second of it. A
run's own duration also holds the drain after the last arrival, which differs between arms by
chance; over the same window, two arms that serve every request within the SLOs tie. (vLLM's
``request_goodput``, over the run's duration, is kept in the JSON too.)

One run of an arm at a rate is one sample of a machine whose speed drifts: the same arm's
goodput moves by a fifth between runs minutes apart here. ``--repeats N`` runs every arm N
times at each rate (fresh clusters, the first arm rotating each time); the table, the plot and
the goals then take each figure's median over the N runs, and the table lists each run's
goodput beside the median.

Goals (the adaptive arm against the other three):
  1. its goodput is at least the best other arm's at every rate;
  2. it is above all of them at one rate or more;
  3. its TTFT p50 at the lowest rate is at most 1.1x monolithic cache-aware's.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time
import urllib.request
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from pdserve.bench.ab import config_slos
from pdserve.bench.arms import ARMS, ArmError, resolve
from pdserve.bench.loadgen import LoadSpec, warm_up
from pdserve.bench.ports import free_port
from pdserve.bench.sessions import run_session_benchmark
from pdserve.bench.workloads import MultiTurnSpec, WorkloadSpec, chat_sessions, generate

ROOT = Path(__file__).resolve().parents[1]
ADAPTIVE, MONO_CACHE = "pd-adaptive", "mono-cache-aware"
TTFT_RATIO_GOAL = 1.1
_SAMPLE = re.compile(r'^(\w+)\{([^}]*)\} (\S+)$')
_ROUTER_SERIES = ("pdserve_disaggregation_total", "pdserve_prefix_tokens_total", "pdserve_decider_input")


# ---------------------------------------------------------------------------------------------
# the router's own counters


def scrape(url: str) -> dict[str, dict[str, float]]:
    """The router's series this sweep reads, as {name: {"label=value,...": value}}."""
    with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return parse_metrics(text)


def parse_metrics(text: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {name: {} for name in _ROUTER_SERIES}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) in out:
            labels = ",".join(f"{k}={v}" for k, v in re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            out[m.group(1)][labels] = float(m.group(3))
    return out


def deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What each counter gained (labels first seen after count from 0); zero gains left out."""
    return {k: v - before.get(k, 0.0) for k, v in sorted(after.items()) if v - before.get(k, 0.0)}


# ---------------------------------------------------------------------------------------------
# one arm


_DROPPED = {"ttfts", "itls", "latencies", "start_times", "errors", "http_statuses", "request_paths",
            "request_tenants", "cached_tokens", "request_sessions", "request_turns", "input_lens", "output_lens"}


def figures(run: dict[str, Any], window_s: float) -> dict[str, Any]:
    """A run's scalar figures (the per-request lists left out), with goodput over the window."""
    out = {k: v for k, v in run.items() if k not in _DROPPED}
    out["arrival_window_s"] = window_s
    out["goodput"] = (run.get("good_requests") or 0) / window_s
    return out


def sweep_arm(name: str, rates: list[float], spec: MultiTurnSpec, arrival_s: float, tokenizer,
              timeout_s: float, progress: bool, first_index: int = 0) -> dict[str, Any]:
    """One cluster of arm ``name``: started, warmed up, run at each of ``rates`` (the sweep's rates
    from index ``first_index``, which seeds their conversations), stopped."""
    from pdserve.bench.cluster_runtime import runtime

    arm = resolve(name)
    slos = config_slos(arm.cfg)
    model = arm.cfg.model.served_name
    rt = runtime()
    t0 = time.perf_counter()
    print(f"cache_sweep: starting {name} ({arm.label}) from {arm.config_path}", flush=True)
    url = rt.start_cluster(arm.cfg, port=free_port())
    result: dict[str, Any] = {"name": name, "label": arm.label, "config_path": arm.config_path,
                              "overrides": arm.overrides, "slos_ms": slos, "runs": []}
    try:
        result["start_s"] = time.perf_counter() - t0
        warm = generate(WorkloadSpec(kind="fixed", num_prompts=8, seed=7919, input_len=64, output_len=8), tokenizer)
        for _ in range(2):
            warm_up(url, "chat", model, warm, timeout_s=timeout_s)
        for i, rate in enumerate(rates, start=first_index):
            n = max(2, round(rate * arrival_s))
            sessions = chat_sessions(replace(spec, num_sessions=n, seed=spec.seed + i), tokenizer)
            before = scrape(url)
            t_run = time.perf_counter()
            run = run_session_benchmark(url, model, sessions, LoadSpec(rate), seed=spec.seed + i,
                                        percentiles=(50, 95, 99), slos_ms=slos, timeout_s=timeout_s,
                                        progress=progress)
            after = scrape(url)
            row = figures(run, n / rate)
            row["wall_s"] = time.perf_counter() - t_run
            row["router"] = {"disaggregation": deltas(before["pdserve_disaggregation_total"],
                                                      after["pdserve_disaggregation_total"]),
                             "prefix_tokens": deltas(before["pdserve_prefix_tokens_total"],
                                                     after["pdserve_prefix_tokens_total"]),
                             "decider_input": after["pdserve_decider_input"]}
            result["runs"].append(row)
            print(f"  {name} {rate:g} sessions/s: {_line(row)}", flush=True)
    finally:
        rt.stop_cluster()
    result["wall_s"] = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------------------------------------
# goals, table, plot


_MEDIAN_KEYS = ("goodput", "p50_ttft_ms", "p95_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p95_tpot_ms", "p99_tpot_ms",
                "slo_attainment", "prefix_cache_hit_rate", "request_goodput")
_SUMMED_KEYS = ("completed", "num_prompts", "good_requests")


def merge_rate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One arm's runs at one rate (``--repeats``) as one row: the median of each figure over the
    runs, the requests and paths summed, each run's goodput kept in ``goodputs``."""
    out = dict(runs[0])
    for key in _MEDIAN_KEYS:
        vals = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.median(vals) if vals else None
    for key in _SUMMED_KEYS:
        out[key] = sum(r.get(key) or 0 for r in runs)
    paths: dict[str, int] = {}
    ways: dict[str, float] = {}
    for r in runs:
        for k, v in r.get("paths", {}).items():
            paths[k] = paths.get(k, 0) + v
        for k, v in r.get("router", {}).get("disaggregation", {}).items():
            ways[k] = ways.get(k, 0.0) + v
    out["paths"] = paths
    if "router" in out:
        out["router"] = dict(out["router"], disaggregation=ways)
    out["goodputs"] = [r["goodput"] for r in runs]
    out["repeats"] = len(runs)
    return out


def merged(arms: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each arm with one row per rate (``merge_rate`` over its repeats), rates ascending."""
    out = {}
    for name, arm in arms.items():
        rates = sorted({r["session_rate"] for r in arm["runs"]})
        out[name] = dict(arm, runs=[merge_rate([r for r in arm["runs"] if r["session_rate"] == rate])
                                    for rate in rates])
    return out


def goal_checks(arms: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The three goals as {goal, met, detail}, over the rates every arm has run (a sweep saved
    part way has run some of a rate's arms), on the medians over repeats; a goal whose arms did
    not run is left out."""
    if ADAPTIVE not in arms:
        return []
    arms = merged(arms)
    others = [a for a in arms if a != ADAPTIVE]
    ad = {r["session_rate"]: r for r in arms[ADAPTIVE]["runs"]}
    rates = sorted(r for r in ad if all(any(x["session_rate"] == r for x in arms[a]["runs"]) for a in others))
    if not rates:
        return []
    checks = []
    if others:
        per_rate = []
        for rate in rates:
            best = max(others, key=lambda a: _at(arms[a], rate)["goodput"])
            per_rate.append((rate, ad[rate]["goodput"], best, _at(arms[best], rate)["goodput"]))
        detail = "; ".join(f"{rate:g}/s: {g:.2f} vs {b} {bg:.2f}" for rate, g, b, bg in per_rate)
        if any(r["repeats"] > 1 for r in ad.values()):
            detail = "medians over repeats; " + detail
        checks.append({"goal": "adaptive goodput >= the best other arm's at every rate",
                       "met": all(g >= bg for _, g, _, bg in per_rate), "detail": detail})
        checks.append({"goal": "adaptive goodput above every other arm's at one rate or more",
                       "met": any(g > bg for _, g, _, bg in per_rate), "detail": detail})
    if MONO_CACHE in arms:
        low = rates[0]
        a, m = ad[low]["p50_ttft_ms"], _at(arms[MONO_CACHE], low)["p50_ttft_ms"]
        met = a is not None and m is not None and a <= TTFT_RATIO_GOAL * m
        ratio = f"{a / m:.2f}x" if a and m else "-"
        checks.append({"goal": f"adaptive TTFT p50 at the lowest rate <= {TTFT_RATIO_GOAL}x monolithic cache-aware",
                       "met": met, "detail": f"{low:g}/s: {_ms(a)} vs {_ms(m)} ms ({ratio})"})
    return checks


def _at(arm: dict[str, Any], rate: float) -> dict[str, Any]:
    return next(r for r in arm["runs"] if r["session_rate"] == rate)


def _ms(v: Optional[float], spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1%}"


def _line(r: dict[str, Any]) -> str:
    return (f"TTFT p50/p95 {_ms(r['p50_ttft_ms'])}/{_ms(r['p95_ttft_ms'])} ms, TPOT p50/p95 "
            f"{_ms(r['p50_tpot_ms'], '.2f')}/{_ms(r['p95_tpot_ms'], '.2f')} ms, goodput {r['goodput']:.2f} req/s "
            f"({r['good_requests']}/{r['num_prompts']} within SLOs), hits {_pct(r['prefix_cache_hit_rate'])}, "
            f"paths {r['paths']}")


def table(arms: dict[str, dict[str, Any]]) -> list[str]:
    """One row per rate and arm; with repeats, each figure the median over them (goodput's runs
    listed beside it) and the requests and paths summed."""
    arms = merged(arms)
    rows = ["| sessions/s (offered req/s) | arm | completed/sent | TTFT p50 | TTFT p95 | TPOT p50 | TPOT p95 | "
            "goodput (req/s) | SLO met | prefix cache hits | paths |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    rates = sorted({r["session_rate"] for a in arms.values() for r in a["runs"]})
    for rate in rates:
        for arm in arms.values():
            r = next((x for x in arm["runs"] if x["session_rate"] == rate), None)
            if r is None:
                continue
            paths = ", ".join(f"{k} {v}" for k, v in r["paths"].items()) or "-"
            rows.append(f"| {rate:g} ({r['request_rate']:g}) | {arm['label']} | {r['completed']}/{r['num_prompts']} | "
                        f"{_ms(r['p50_ttft_ms'])} | {_ms(r['p95_ttft_ms'])} | {_ms(r['p50_tpot_ms'], '.2f')} | "
                        f"{_ms(r['p95_tpot_ms'], '.2f')} | {_goodput(r)} | {_pct(r['slo_attainment'])} | "
                        f"{_pct(r['prefix_cache_hit_rate'])} | {paths} |")
    return rows


def _goodput(r: dict[str, Any]) -> str:
    if r.get("repeats", 1) == 1:
        return f"{r['goodput']:.2f}"
    return f"{r['goodput']:.2f} ({', '.join(f'{g:.2f}' for g in r['goodputs'])})"


def decisions(arms: dict[str, dict[str, Any]]) -> list[str]:
    """The adaptive decider's choices per rate, by way and reason (summed over repeats)."""
    if ADAPTIVE not in arms:
        return []
    lines = []
    for r in merged(arms)[ADAPTIVE]["runs"]:
        d = r["router"]["disaggregation"]
        shown = ", ".join(f"{_way_reason(k)}: {v:g}" for k, v in d.items())
        lines.append(f"  {r['session_rate']:g} sessions/s: {shown or '-'}")
    return lines


def _way_reason(labels: str) -> str:
    """``"reason=cheapest,way=decode_local"`` -> ``"decode_local cheapest"``."""
    d = dict(kv.split("=", 1) for kv in labels.split(",") if "=" in kv)
    return f"{d.get('way', '?')} {d.get('reason', '?')}"


def plot(arms: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    from pdserve.bench.plots import plot_sweep_panels

    plot_sweep_panels([(a["label"], a["runs"]) for a in merged(arms).values()], path, goodput_key="goodput", title=title)


# ---------------------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not vals or any(not (v > 0 and math.isfinite(v)) for v in vals):
        raise argparse.ArgumentTypeError(f"rates must be positive numbers, got {text!r}")
    return sorted(vals)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--session-rates", type=_floats, default=[0.5, 1.5, 3.0], help="sessions per second")
    p.add_argument("--arrival-s", type=float, default=40.0,
                   help="seconds of session arrivals per rate (sessions = rate x this)")
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--system-prompt-len", type=int, default=512)
    p.add_argument("--user-turn-len", type=int, default=64)
    p.add_argument("--answer-len", type=int, default=64)
    p.add_argument("--think-time-s", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--timeout-s", type=float, default=120.0, help="per request")
    p.add_argument("--json", default=None, help="default bench/results/cache_sweep-<date>.json")
    p.add_argument("--plot", default=None, help="default: the JSON's path with .png")
    p.add_argument("--order", choices=("arm", "rate"), default="rate",
                   help="rate (default): at each rate every arm in turn, a fresh cluster each, the first arm "
                        "rotating from rate to rate, so a machine whose speed drifts during the sweep weighs on "
                        "every arm alike; arm: each arm's cluster swept over every rate, then the next arm")
    p.add_argument("--repeats", type=int, default=1,
                   help="with --order rate: run every arm this many times at each rate, the first arm rotating "
                        "each time; the table and the goals take each figure's median over the runs")
    p.add_argument("--disable-tqdm", action="store_true")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.repeats > 1 and args.order != "rate":
        p.error("--repeats needs --order rate (each repeat on fresh clusters)")
    names = [a.strip() for a in args.arms.split(",") if a.strip()]
    try:
        for name in names:
            resolve(name)
    except ArmError as e:
        p.error(str(e))
    if not names or len(set(names)) != len(names):
        p.error("--arms must name each arm once")

    from pdserve.bench.bench_cli import load_tokenizer

    spec = MultiTurnSpec(turns=args.turns, system_prompt_len=args.system_prompt_len, user_turn_len=args.user_turn_len,
                         answer_len=args.answer_len, think_time_s=args.think_time_s, seed=args.seed)
    tokenizer = load_tokenizer(resolve(names[0]).cfg.model.path, "", None)
    now = datetime.now()
    out = Path(args.json) if args.json else ROOT / "bench" / "results" / f"cache_sweep-{now:%Y-%m-%d-%H%M}.json"
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    workload = (f"multi-turn: sessions of {spec.turns} turns, a shared {spec.system_prompt_len}-token system prompt, "
                f"{spec.user_turn_len}-token user turns, {spec.answer_len}-token answers, think time exponential "
                f"with mean {spec.think_time_s:g} s, Poisson session arrivals for {args.arrival_s:g} s per rate")
    print(f"cache_sweep: {workload}; session rates {args.session_rates} /s; arms {', '.join(names)}", flush=True)
    t0 = time.perf_counter()
    arms: dict[str, dict[str, Any]] = {}

    def save() -> None:  # after every arm, so a failed start later keeps what ran
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"date": now.isoformat(timespec="seconds"), "workload": workload,
                                   "session_rates": args.session_rates, "arrival_s": args.arrival_s,
                                   "args": vars(args), "goals": goal_checks(arms),
                                   "total_s": time.perf_counter() - t0, "arms": arms}, indent=2, allow_nan=False))

    if args.order == "arm":
        for name in names:
            arms[name] = sweep_arm(name, args.session_rates, spec, args.arrival_s, tokenizer, args.timeout_s,
                                   not args.disable_tqdm)
            save()
    else:
        for i, rate in enumerate(args.session_rates):
            for k in range(args.repeats):
                first = (i + k) % len(names)  # each rate, and each repeat of it, starts with the next arm
                for name in names[first:] + names[:first]:
                    one = sweep_arm(name, [rate], spec, args.arrival_s, tokenizer, args.timeout_s,
                                    not args.disable_tqdm, first_index=i)
                    for row in one["runs"]:
                        row["repeat"] = k
                    if name in arms:
                        arms[name]["runs"] += one["runs"]
                        arms[name]["wall_s"] += one["wall_s"]
                    else:
                        arms[name] = one
                    save()
        arms = {name: arms[name] for name in names}
    total_s = time.perf_counter() - t0
    checks = goal_checks(arms)

    print("\n" + "\n".join(table(arms)))
    if decisions(arms):
        print("\nadaptive decider's choices (way reason: requests):")
        print("\n".join(decisions(arms)))
    print("\ngoals:")
    for c in checks:
        print(f"  {'MET' if c['met'] else 'MISSED':<6} {c['goal']}: {c['detail']}")
    print(f"\nwhole sweep {total_s / 60:.1f} min (" + ", ".join(f"{a} {r['wall_s'] / 60:.1f}" for a, r in arms.items())
          + " min)")
    save()
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(arms, png, f"cache sweep: multi-turn chat on 2 CPU cores, {now:%Y-%m-%d}")
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    from pdserve.bench import cluster_runtime
    from pdserve.cluster import runtime

    cluster_runtime.use(runtime)  # this script is the program: its entry point is a composition root
    raise SystemExit(main())
