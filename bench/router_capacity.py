"""Router capacity: how many streamed chat requests per second, and how many concurrent streams,
ONE router replica sustains before its own overhead (not the engines) sets the limit.

The engine pools are replaced by ``InstantStubEngine`` (bench/stub_engine.py), a STUB that
runs no model and answers at once with vLLM-format SSE chunks. The router is the real one
(router/app.py's RouterServer, unchanged, deployed with the same options as cluster/builder.py
gives it), so every cost it has in production is in the figures: HTTP via uvicorn, request
checks and chat-template tokenizing, admission, replica selection, the Ray handle calls, the
load polls, parsing every chunk for mid-stream resume, metrics. The P/D mode runs both legs
(prefill json leg, then the decode stream with its KV report) through stub prefill and decode
pools. The load clients (bench/capacity_load.py, sending bench/loadgen.py's requests) run in
separate processes and count token events in raw bytes rather than parse each chunk, so that
they are not the bottleneck; their CPU is reported to prove it.

It sweeps closed-loop concurrency (each level: warm-up, then a fixed measurement window),
then open-loop Poisson rates (by default fractions of the closed-loop capacity), and prints
per level: requests/s completed, tokens/s streamed, concurrent streams, TTFT and ITL p50/p99
as the client sees them, and the CPU of the router replica process, the stubs, the clients
and the whole machine. Then where it saturates, the limiting resource, and the router's
capacity against the engine pools' own (``--engine-capacity-rps``, measured on real engines)
with the goal "at least 10x".

    python -m pdserve.bench.router_capacity --engine-capacity-rps 4.0 --json-out router_capacity.json
    python -m pdserve.bench.router_capacity --mode pd --engine-capacity-rps 4.0 --json-out rc-pd.json

It starts its own local Ray instance (``ray.init(address="local")``) unless given
``--ray-address``, and a router on ``--port`` (default 8471). It needs the machine to itself:
anything else running takes CPU from the router and lowers the figures (it warns when the
machine is busy before it starts).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional

from pdserve.bench.capacity_analysis import (TABLE_HEADER, TABLE_UNITS, CpuProbe, analyze_closed_loop,
                                             analyze_open_loop, print_summary, table_row)
from pdserve.bench.capacity_load import ClientPool, request_payloads, summarize_level
from pdserve.bench.stub_engine import STUB_LABEL, InstantStubReplica, StubSettings

DEFAULT_CONCURRENCY = (1, 8, 32, 64, 128, 256)
DEFAULT_RATE_FRACTIONS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.2)
GOAL_RATIO = 10.0
APP_NAME = "router-capacity-stub"


# ============================================================================================
# the stub cluster


def stub_cluster_config(mode: str = "monolithic", *, port: int = 8471, host: str = "127.0.0.1",
                        stub_replicas: int = 2, stub_max_ongoing: int = 10_000,
                        admission_max_inflight: int = 1_000_000, name: str = "router-capacity",
                        token_stream: str = "direct"):
    """A ClusterConfig that validates like a real one, for stub pools.

    device "cpu" requires a core set per replica, disjoint across pools: the stubs get labels
    "0", "1", ... to satisfy the validator, and pin nothing (InstantStubEngine never reads
    them). Admission's concurrency cap is lifted (its code still runs on every request), so
    the queueing it would add at the default cap (decode replicas x max_num_seqs) does not
    pass for router overhead; the stubs accept far more ongoing calls than the sweep sends.
    """
    from pdserve.settings.cluster import ClusterConfig

    def pool(first_core: int) -> dict[str, Any]:
        return {"replicas": stub_replicas, "cpu_cores": [str(first_core + i) for i in range(stub_replicas)],
                "max_ongoing_requests": stub_max_ongoing}

    data: dict[str, Any] = {
        "name": name, "mode": mode, "device": "cpu",
        "model": {"path": "builtin:tiny", "served_name": "tiny", "load_format": "dummy"},
        "router": {"host": host, "port": port, "token_stream": token_stream},
        "admission": {"max_inflight": admission_max_inflight},
    }
    if mode == "monolithic":
        data["monolithic"] = pool(0)
    elif mode == "pd":
        data["prefill"] = pool(0)
        data["decode"] = pool(stub_replicas)
    else:
        raise ValueError(f"mode must be 'monolithic' or 'pd', not {mode!r}")
    return ClusterConfig.model_validate(data)


def build_stub_app(cfg, settings: StubSettings = StubSettings()):
    """The router app (RouterServer, unchanged) bound to InstantStubEngine pools."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from pdserve.router.app import RouterServer
    from pdserve.router.targeting import TargetedRequestRouter

    config_dict = cfg.model_dump(mode="json")
    engines = {}
    for name, pool in cfg.pools().items():
        engines[name] = serve.deployment(
            InstantStubReplica,
            name=name,  # the pool names: the router's POOL_VIEWS and pool-size polls key on them
            num_replicas=pool.replicas,
            max_ongoing_requests=pool.max_ongoing_requests,
            ray_actor_options={"num_cpus": 0},
            request_router_config=RequestRouterConfig(request_router_class=TargetedRequestRouter),
            health_check_period_s=10,
            health_check_timeout_s=30,
            graceful_shutdown_timeout_s=5,
        ).bind(name, settings.to_dict())
    from pdserve.bench.cluster_runtime import runtime

    return serve.deployment(RouterServer, **runtime().router_deployment_options(cfg)).bind(config_dict, **engines)


def _getpid(_actor) -> int:
    return os.getpid()


def find_replica_pids(app: str, deployment: str) -> list[int]:
    """Pids of the Ray Serve replica processes of ``app``/``deployment``: asked of the replica
    actors themselves (named ``SERVE_REPLICA::<app>#<deployment>#<id>`` in namespace "serve"),
    or else found by process title (``ray::ServeReplica:<app>:<deployment>``)."""
    try:
        import ray

        prefix = f"SERVE_REPLICA::{app}#{deployment}#"
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a.get("namespace") == "serve" and a["name"].startswith(prefix)]
        pids = [ray.get(ray.get_actor(n, namespace="serve").__ray_call__.remote(_getpid), timeout=10) for n in names]
        if pids:
            return sorted(pids)
    except Exception:  # noqa: BLE001 - fall back to process titles
        pass
    return find_replica_pids_by_title(app, deployment)


def find_replica_pids_by_title(app: str, deployment: str) -> list[int]:
    import psutil

    pattern = re.compile(re.escape(f"ServeReplica:{app}:{deployment}") + r"(?![\w-])")
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info.get("cmdline") or [])
        except Exception:  # noqa: BLE001 - processes come and go
            continue
        if pattern.search(cmd):
            out.append(p.info["pid"])
    return sorted(out)


# ============================================================================================
# the driver


def _levels_arg(text: str, kind=int) -> list:
    return [kind(x) for x in text.split(",") if x.strip()] if text else []


def _run_one_level(clients: ClientPool, probe: Optional[CpuProbe], label: str, kind: str, value: float,
                   args: argparse.Namespace) -> dict[str, Any]:
    n = len(clients.procs)
    t_start = time.perf_counter() + 0.5  # the clients' clock (loadgen.send_request's)
    ws = t_start + args.warmup
    we = ws + args.duration
    cmds = []
    for i in range(n):
        cmd = {"kind": kind, "t_start": t_start, "warmup_s": args.warmup, "duration_s": args.duration,
               "drain_s": args.drain, "read_timeout_s": args.read_timeout, "seed": args.seed * 1000 + i,
               "slot_offset": i * 7919, "max_inflight": args.max_inflight_per_client}
        if kind == "closed":
            cmd["concurrency"] = int(value) // n + (1 if i < int(value) % n else 0)
        else:
            cmd["concurrency"] = 0
            cmd["rate"] = value / n
        cmds.append(cmd)
    # the clients start at t_start; the CPU window is the measurement window
    clients.submit(cmds)
    time.sleep(max(0.0, ws - time.perf_counter()))
    a = probe.snapshot() if probe else None
    time.sleep(max(0.0, we - time.perf_counter()))
    b = probe.snapshot() if probe else None
    lv = summarize_level(clients.collect(args.drain + 120), args.warmup, args.warmup + args.duration)
    lv.update(label=label, kind=kind)
    if kind == "closed":
        lv["concurrency"] = int(value)
    else:
        lv["offered_rps"] = float(value)
    lv["cpu"] = probe.delta(a, b) if probe else None
    rp = (lv["cpu"] or {}).get("router_pct")
    lv["router_cpu_ms_per_req"] = (rp / 100 * lv["window_s"] / lv["completed"] * 1000
                                   if rp is not None and lv["completed"] else None)
    lv["router_cpu_us_per_token"] = (rp / 100 * lv["window_s"] / (lv["tokens_per_s"] * lv["window_s"]) * 1e6
                                     if rp is not None and lv["tokens_per_s"] else None)
    return lv


def _start_ray(address: Optional[str], num_cpus: int) -> None:
    import ray

    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    else:
        from pdserve.lab.ray_internals import use_in_this_process

        use_in_this_process()  # as a pdserve cluster's own Ray: workers at nice 0
        # "local": a Ray instance of our own even when another one runs on this machine
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)


def _machine_busy_before(seconds: float = 1.0) -> float:
    import psutil

    return psutil.cpu_percent(interval=seconds)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("monolithic", "pd"), default="monolithic",
                   help="monolithic: one stub pool; pd: stub prefill + decode pools (both P/D legs)")
    p.add_argument("--concurrency", default=",".join(map(str, DEFAULT_CONCURRENCY)),
                   help="closed-loop levels (streams kept open), comma-separated; empty to skip")
    p.add_argument("--rates", default="auto",
                   help="open-loop Poisson rates in req/s, comma-separated; 'auto': "
                        f"{', '.join(map(str, DEFAULT_RATE_FRACTIONS))} x the closed-loop capacity; empty to skip")
    p.add_argument("--duration", type=float, default=10.0, help="measurement window per level, s")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured load before each window, s")
    p.add_argument("--drain", type=float, default=30.0, help="wait for in-flight requests after a window, s")
    p.add_argument("--read-timeout", type=float, default=60.0, help="client socket read timeout, s")
    p.add_argument("--output-tokens", type=int, default=64, help="tokens streamed per request")
    p.add_argument("--input-words", type=int, default=200,
                   help="prompt words (~256 tokens with the tiny tokenizer, which the router runs on every request)")
    p.add_argument("--clients", type=int, default=1, help="load-client processes")
    p.add_argument("--max-inflight-per-client", type=int, default=4096, help="open loop: arrivals past this are "
                   "dropped (counted)")
    p.add_argument("--stub-replicas", type=int, default=2, help="InstantStubEngine replicas per pool")
    p.add_argument("--token-stream", choices=("direct", "ray"), default="direct",
                   help="router.token_stream: items over a direct connection per call, or Ray streaming calls")
    p.add_argument("--tokens-per-message", type=int, default=1,
                   help="token chunks per Ray message from the stub (a real engine at low load: 1)")
    p.add_argument("--stub-itl-ms", type=float, default=0.0,
                   help="pause between a stub stream's messages (0: instant); e.g. an engine's TPOT, to hold many "
                        "slow streams open")
    p.add_argument("--admission-max-inflight", type=int, default=1_000_000,
                   help="admission concurrency cap (lifted by default so only overhead is measured)")
    p.add_argument("--engine-capacity-rps", type=float, default=None,
                   help="the engine pools' own measured capacity (req/s, same request shape) to compare against")
    p.add_argument("--engine-capacity-streams", type=float, default=None,
                   help="optional: the engine pools' concurrent-stream capacity, for the same comparison")
    p.add_argument("--goal-ratio", type=float, default=GOAL_RATIO)
    p.add_argument("--growth", type=float, default=0.10, help="saturation: req/s growing less than this")
    p.add_argument("--ttft-factor", type=float, default=10.0,
                   help="saturation: p99 TTFT over this many times its lowest-level value")
    p.add_argument("--max-error-rate", type=float, default=0.01)
    p.add_argument("--port", type=int, default=8471)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a local one")
    p.add_argument("--ray-num-cpus", type=int, default=4)
    p.add_argument("--app-name", default=APP_NAME)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None, help="write every figure here (JSON)")
    args = p.parse_args(argv)
    concurrency = _levels_arg(args.concurrency, int)
    if args.rates.strip() == "auto":
        rates: Optional[list[float]] = None
    else:
        rates = _levels_arg(args.rates, float)
    if not concurrency and rates is None:
        p.error("--rates auto needs the closed-loop sweep (--concurrency); give explicit rates")
    if args.clients < 1 or args.stub_replicas < 1:
        p.error("--clients and --stub-replicas must be at least 1")

    settings = StubSettings(tokens_per_message=args.tokens_per_message, message_interval_s=args.stub_itl_ms / 1000,
                            default_max_tokens=args.output_tokens)
    cfg = stub_cluster_config(args.mode, port=args.port, host=args.host, stub_replicas=args.stub_replicas,
                              admission_max_inflight=args.admission_max_inflight, token_stream=args.token_stream)
    url = f"http://{args.host}:{args.port}"
    ncores = os.cpu_count() or 1
    busy_before = _machine_busy_before()
    print("router capacity benchmark: ONE router replica (RouterServer, unchanged) in front of STUB engines",
          flush=True)
    print(f"  engines: {STUB_LABEL}", flush=True)
    print(f"  mode {args.mode}; token stream {args.token_stream}; {args.stub_replicas} stub replica(s) per pool; "
          f"{args.tokens_per_message} token(s) per message; stub ITL {args.stub_itl_ms:g} ms", flush=True)
    print(f"  requests: streamed chat, ~{args.input_words} prompt words, {args.output_tokens} output tokens, usage on",
          flush=True)
    print(f"  machine: {ncores} cores, {busy_before:.0f}% busy before start; {args.clients} client process(es); "
          f"levels {args.warmup:g} s warm-up + {args.duration:g} s measured", flush=True)
    if busy_before > 15:
        print(f"  WARNING: the machine was {busy_before:.0f}% busy before the benchmark started: other work takes "
              "CPU from the router and lowers every figure below", flush=True)

    from ray import serve

    from pdserve.bench.cluster_runtime import runtime

    wait_ready = runtime().wait_ready

    report: dict[str, Any] = {
        "benchmark": "router_capacity", "stub_engine": STUB_LABEL, "stub_settings": settings.to_dict(),
        "args": vars(args), "machine": {"cores": ncores, "busy_pct_before": busy_before},
        "config": cfg.model_dump(mode="json"), "closed_loop": [], "open_loop": [],
    }
    clients: Optional[ClientPool] = None
    t_begin = time.monotonic()
    _start_ray(args.ray_address, args.ray_num_cpus)
    try:
        serve.start(http_options={"location": "NoServer"})
        serve.run(build_stub_app(cfg, settings), name=args.app_name, route_prefix=None, blocking=False)
        wait_ready(url, timeout_s=300)
        router_pids: list[int] = []
        deadline = time.monotonic() + 30
        while not router_pids and time.monotonic() < deadline:
            router_pids = find_replica_pids(args.app_name, "router")
            if not router_pids:
                time.sleep(0.5)
        stub_pids = {pool: find_replica_pids(args.app_name, pool) for pool in cfg.pools()}
        if len(router_pids) != 1:
            print(f"  WARNING: found {len(router_pids)} router processes ({router_pids}) for "
                  f"ServeReplica:{args.app_name}:router: router CPU figures are "
                  f"{'missing' if not router_pids else 'summed'}", flush=True)
        print(f"  router up at {url}: router pid {router_pids}, stub pids {stub_pids}", flush=True)

        payloads = request_payloads(64, args.input_words, args.output_tokens, cfg.model.served_name, args.seed)
        clients = ClientPool(args.clients, url + "/v1/chat/completions", payloads)
        probe = CpuProbe(router_pids, stub_pids, clients.pids)
        report["pids"] = {"router": router_pids, "stubs": stub_pids, "clients": clients.pids}

        # one short unmeasured run: imports, tokenizer caches, connections
        warm = argparse.Namespace(**{**vars(args), "duration": 2.0, "warmup": 0.5})
        _run_one_level(clients, None, "warm-up", "closed", min(8, max(concurrency or [8])), warm)

        print("\nTTFT: send to the first read with a token; ITL: gap between reads that carry tokens (client "
              "side); CPU %: of one core over the measured window; rtr CPU/req: router CPU ms per completed "
              "request", flush=True)
        if concurrency:
            print(f"\nclosed loop: N streams kept open (each client slot sends its next request when the last "
                  f"ends)\n{TABLE_HEADER}\n{TABLE_UNITS}", flush=True)
            base_ttft = None
            for c in concurrency:
                lv = _run_one_level(clients, probe, f"c={c}", "closed", c, args)
                report["closed_loop"].append(lv)
                print(table_row(lv), flush=True)
                if base_ttft is None and lv.get("ttft_p99_ms"):
                    base_ttft = lv["ttft_p99_ms"]
                if lv["error_rate"] > 0.5 or (base_ttft and lv.get("ttft_p99_ms")
                                              and lv["ttft_p99_ms"] > 100 * base_ttft):
                    print("  (stopping the closed-loop sweep: far past saturation)", flush=True)
                    break
        closed = analyze_closed_loop(report["closed_loop"], growth=args.growth, ttft_factor=args.ttft_factor,
                                     max_error_rate=args.max_error_rate) if report["closed_loop"] else {}

        if rates is None:
            cap = closed.get("capacity_rps") or 0.0
            rates = [round(f * cap, 1) for f in DEFAULT_RATE_FRACTIONS if f * cap > 0]
        if rates:
            print(f"\nopen loop: Poisson arrivals at a fixed rate (req/s offered)\n{TABLE_HEADER}\n{TABLE_UNITS}", flush=True)
            for r in rates:
                lv = _run_one_level(clients, probe, f"{r:g}/s", "open", r, args)
                report["open_loop"].append(lv)
                print(table_row(lv) + (f"  dropped {lv['dropped_by_client']}" if lv["dropped_by_client"] else ""),
                      flush=True)
        opened = analyze_open_loop(report["open_loop"], ttft_limit_ms=closed.get("ttft_p99_limit_ms"),
                                   max_error_rate=args.max_error_rate) if report["open_loop"] else {}
    finally:
        if clients is not None:
            clients.close()
        try:
            if args.ray_address:
                serve.delete(args.app_name)
            else:
                serve.shutdown()
        finally:
            import ray

            ray.shutdown()

    report["analysis"] = {"closed_loop": closed, "open_loop": opened}
    print_summary(report, args)
    report["elapsed_s"] = time.monotonic() - t_begin
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2, default=str))
        print(f"\nfigures written to {args.json_out}", flush=True)
    return 0


if __name__ == "__main__":
    from pdserve.bench import cluster_runtime
    from pdserve.cluster import runtime

    cluster_runtime.use(runtime)  # this script is the program: its entry point is a composition root
    sys.exit(main())
