"""Benchmark: what pdserve's serving path costs next to vLLM's own OpenAI server.

Both servers run one engine of the same config on the same core; vLLM's own benchmark client
(``vllm.benchmarks.serve``, pinned to another core) sends both the same workload, one server at
a time, in the order vLLM, pdserve, vLLM, pdserve, ... so that drift on a shared machine falls on
both. It prints each run's TTFT / TPOT / ITL medians and p99s and the ratios pdserve / vLLM of
the medians of the runs.

    python -m pdserve.bench.serving_cost [--rounds 2 --num-prompts 100 --rate 4 --warmup-prompts 100]

Both servers run the engine with its prefix cache off (``--prefix-caching`` keeps it on).
vLLM's random prompts are runs of consecutive token ids from a random start, and the built-in
tiny model's tokenizer has 818 of them: a server that has served a few hundred prompts has
seen many of the starts, and a growing share of its later prompts hit the cache whole. With
the cache on, one vLLM server's TTFT p50 fell from 70 to 39 ms over ten runs of 100 "new"
prompts as its hit rate rose; with it off, six such runs gave 72-84 ms with no trend
(2026-12-03). A run's figures then depend on how many prompts the server served before it,
not on its serving path.

Each server, once started, first serves an unmeasured run of ``--warmup-prompts`` other
prompts (the client's seed + 1) at the same rate, so that neither is measured on its first
requests.

pdserve runs monolithic (config ``--config``, shrunk to one replica on ``--core``, autoscaling
off): one Ray Serve router replica in front of one engine replica. vLLM's server gets the engine
settings and engine environment pdserve's engines run with (bench/vllm_server.py), so the
difference is the serving path: the router, Ray Serve's handle calls and the replica's stream.

Where vLLM's server runs (``--vllm-placements``, each run every round):

* ``engine``: vLLM's engine processes (the engine core and its worker, every thread) on
  ``--core``, its server process (HTTP front, engine frontend) free: where a pdserve engine
  replica runs the same parts. Its replica process (vLLM's engine frontend and serving layer)
  floats, as the router does, and its engine processes keep to the core set
  (engine/child_guard/). The like-for-like comparison.
* ``free``: only the engine's compute threads bound to ``--core`` (VLLM_CPU_OMP_THREADS_BIND),
  the rest of every process free, as ``vllm serve`` runs by default: the engine core's
  scheduling may then run on the client's core, beside the compute.
* ``confined``: every process of vLLM's server on ``--core``, the HTTP front too.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]

_VLLM_CLIENT = textwrap.dedent("""
    import json, sys
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    result = main(parser.parse_args(sys.argv[1:]))
    keep = [k for k in result if k.endswith(("_ttft_ms", "_tpot_ms", "_itl_ms", "_e2el_ms"))]
    print("RESULT " + json.dumps({k: result[k] for k in ("completed", "duration", *keep)}))
""")
FIGURES = ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms")


def vllm_bench_serve(url: str, model: str, tokenizer: str, *, num_prompts: int, rate: float, input_len: int,
                     output_len: int, seed: int, client_core: Optional[int]) -> dict[str, Any]:
    """One run of vLLM's own client (chat endpoint, random prompts, Poisson arrivals)."""
    cmd = [sys.executable, "-c", _VLLM_CLIENT, "--backend", "openai-chat", "--base-url", url,
           "--endpoint", "/v1/chat/completions", "--model", model, "--tokenizer", tokenizer,
           "--dataset-name", "random", "--random-input-len", str(input_len), "--random-output-len", str(output_len),
           "--num-prompts", str(num_prompts), "--request-rate", str(rate), "--seed", str(seed),
           "--ignore-eos", "--temperature", "0", "--disable-tqdm", "--num-warmups", "4"]
    if client_core is not None:
        cmd = ["taskset", "-c", str(client_core), *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            if result["completed"] != num_prompts:
                raise RuntimeError(f"vLLM's client completed {result['completed']} of {num_prompts} requests")
            return result
    raise RuntimeError(f"vLLM's client failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def add_client_args(p: argparse.ArgumentParser, *, num_prompts: int, rate: float, rounds_help: str) -> None:
    """The runs and vLLM's client's workload, as the cost benchmarks take them."""
    p.add_argument("--client-core", type=int, default=0, help="the core vLLM's client runs on (-1: any)")
    p.add_argument("--rounds", type=int, default=2, help=rounds_help)
    p.add_argument("--num-prompts", type=int, default=num_prompts)
    p.add_argument("--rate", type=float, default=rate)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)


def client_settings(p: argparse.ArgumentParser, args: argparse.Namespace, tokenizer: str, seed: int) -> dict[str, Any]:
    """``vllm_bench_serve``'s keyword arguments from ``add_client_args``' (refused by ``p`` when out of range)."""
    if args.rounds < 1 or args.num_prompts < 1 or args.rate <= 0:
        p.error("--rounds and --num-prompts must be >= 1 and --rate > 0")
    return dict(tokenizer=tokenizer, num_prompts=args.num_prompts, rate=args.rate, input_len=args.input_len,
                output_len=args.output_len, seed=seed, client_core=None if args.client_core < 0 else args.client_core)


def one_engine(cfg, core: int, prefix_caching: bool = False):
    """``cfg`` served monolithic by one engine replica on ``core``, autoscaling off, and the
    engine's prefix cache as ``prefix_caching`` says (both servers run the engine settings
    this returns)."""
    mono = cfg.monolithic.model_copy(update={"replicas": 1, "cpu_cores": [str(core)], "autoscaling": None})
    engine = cfg.engine.model_copy(update={"enable_prefix_caching": prefix_caching})
    return cfg.model_copy(update={"mode": "monolithic", "monolithic": mono, "engine": engine})


PLACEMENTS = ("engine", "free", "confined")


def warm_then_measure(url: str, model: str, client: dict[str, Any], warmup_prompts: int) -> dict[str, Any]:
    """An unmeasured run of ``warmup_prompts`` other prompts (seed + 1), then the measured run."""
    if warmup_prompts > 0:
        vllm_bench_serve(url, model, **dict(client, num_prompts=warmup_prompts, seed=client["seed"] + 1))
    return vllm_bench_serve(url, model, **client)


def run_vllm(cfg, core: int, client: dict[str, Any], log_path: str, placement: str = "engine",
             warmup_prompts: int = 0) -> dict[str, Any]:
    from pdserve.bench.vllm_server import VllmServer

    with VllmServer(cfg, core=core, log_path=log_path, confined=placement == "confined",
                    engine_only=placement == "engine") as server:
        return warm_then_measure(server.url, cfg.model.served_name, client, warmup_prompts)


def run_pdserve(cfg, client: dict[str, Any], warmup_prompts: int = 0) -> dict[str, Any]:
    from pdserve.bench.cluster_runtime import runtime
    from pdserve.bench.ports import free_port

    rt = runtime()
    url = rt.start_cluster(cfg, port=free_port())
    try:
        return warm_then_measure(url, cfg.model.served_name, client, warmup_prompts)
    finally:
        rt.stop_cluster()


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians of each arm's runs, and pdserve over each vLLM arm (``vllm-<placement>``)."""
    medians = {arm: {k: statistics.median(r[k] for r in rs) for k in FIGURES} for arm, rs in runs.items() if rs}
    ratios = {arm: {k: medians["pdserve"][k] / m[k] for k in FIGURES if m[k]}
              for arm, m in medians.items() if arm != "pdserve"}
    # Each round's pdserve run over the same round's vLLM run, the median over rounds: runs next
    # to each other share the machine's speed, which drifts over minutes on a shared machine.
    paired = {arm: {k: statistics.median(p[k] / v[k] for p, v in zip(runs["pdserve"], rs) if v[k])
                    for k in FIGURES}
              for arm, rs in runs.items() if arm != "pdserve" and rs and runs["pdserve"]}
    return {"runs": runs, "medians": medians, "ratios": ratios, "paired_ratios": paired}


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\nvLLM bench serve, chat, {args.input_len} in / {args.output_len} out, Poisson {args.rate}/s, "
          f"{args.num_prompts} prompts per run after {args.warmup_prompts} unmeasured, "
          f"engine on core {args.core}, client on core {args.client_core}, "
          f"prefix cache {'on' if args.prefix_caching else 'off'}")
    print(f"{'run':<22}" + "".join(f"{k:>16}" for k in FIGURES))
    for arm, rs in report["runs"].items():
        for i, r in enumerate(rs):
            print(f"{arm + ' ' + str(i + 1):<22}" + "".join(f"{r[k]:>16.1f}" for k in FIGURES))
    for arm, ratios in report["ratios"].items():
        print(f"{'pdserve/' + arm:<22}" + "".join(f"{ratios.get(k, float('nan')):>15.2f}x" for k in FIGURES))
    print("each round's ratio, the median over rounds:")
    for arm, ratios in report["paired_ratios"].items():
        print(f"{'pdserve/' + arm:<22}" + "".join(f"{ratios.get(k, float('nan')):>15.2f}x" for k in FIGURES))
    print("goals: median TTFT <= 1.10x, median TPOT <= 1.05x")


def main(argv: Optional[list[str]] = None) -> int:
    from pdserve.engine.tiny_model import resolve_model
    from pdserve.settings.cluster import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "cpu-monolithic.yaml"))
    p.add_argument("--core", type=int, default=1, help="the core both servers' engine runs on")
    add_client_args(p, num_prompts=100, rate=4.0, rounds_help="runs per server, alternating")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-prompts", type=int, default=100,
                   help="an unmeasured run of this many other prompts on each server before its measured run (0: none)")
    p.add_argument("--prefix-caching", action="store_true",
                   help="keep the engines' prefix cache on (off by default: with the built-in tiny model's "
                        "818-token vocabulary, vLLM's random prompts repeat and hit it)")
    p.add_argument("--vllm-placements", default=",".join(PLACEMENTS),
                   help="where vLLM's server runs, each every round: engine (its engine processes on --core, "
                        "as pdserve places them), free (only the compute threads bound), confined (all on --core)")
    p.add_argument("--json", default=None, help="also write the report here")
    args = p.parse_args(argv)
    placements = [x.strip() for x in args.vllm_placements.split(",") if x.strip()]
    if not placements or set(placements) - set(PLACEMENTS):
        p.error(f"--vllm-placements: a comma-separated subset of {','.join(PLACEMENTS)}, got {args.vllm_placements!r}")
    if args.warmup_prompts < 0:
        p.error(f"--warmup-prompts must be >= 0, got {args.warmup_prompts}")
    cfg = load_config(args.config)
    if cfg.router.needs_kv_events() and not args.prefix_caching:
        p.error(f"{args.config} routes on the engines' prefix cache: run it with --prefix-caching")
    cfg = one_engine(cfg, args.core, args.prefix_caching)
    client = client_settings(p, args, resolve_model(cfg.model.path), args.seed)
    runs: dict[str, list[dict[str, Any]]] = {**{f"vllm-{x}": [] for x in placements}, "pdserve": []}
    log = ROOT / "bench" / "results" / "serving_cost_vllm_server.log"  # vLLM's server's output, kept out of git
    log.parent.mkdir(parents=True, exist_ok=True)
    log = str(log)

    def record(arm: str, result: dict[str, Any], i: int) -> None:
        runs[arm].append(result)
        print(f"round {i + 1}: {arm:<14} " + json.dumps({k: round(result[k], 1) for k in FIGURES}), flush=True)

    for i in range(args.rounds):
        for x in placements:
            record(f"vllm-{x}", run_vllm(cfg, args.core, client, log, x, args.warmup_prompts), i)
        record("pdserve", run_pdserve(cfg, client, args.warmup_prompts), i)
    report = summarize(runs)
    print_report(report, args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    from pdserve.bench import cluster_runtime
    from pdserve.cluster import runtime

    cluster_runtime.use(runtime)  # this script is the program: its entry point is a composition root
    raise SystemExit(main())
