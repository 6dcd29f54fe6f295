"""Benchmark: what a KV connector costs an engine that serves whole requests, with no transfer.

    python -m pdserve.bench.connector_cost [--config configs/cpu-pd.yaml] [--rounds 2 --num-prompts 200 --rate 8]

Every engine of a P/D pool carries a KV connector, and under `router.disaggregation: adaptive`
most of their requests are whole ones that never touch it. This runs vLLM's own OpenAI server
(bench/vllm_server.py: the config's engine settings and pdserve's engine environment) with its
engine processes on ``--core``, three ways, one at a time, each round in turn:

* ``none``: no KV connector;
* ``vllm-nixl``: vLLM's own NixlConnector, as ``vllm serve --kv-transfer-config`` gives it;
* ``pdserve``: the connector a P/D engine of the config gets (kv_transfer/registry.py), e.g.
  pdserve's NixlConnector, whose NIXL progress thread sleeps between events
  (kv_transfer/nixl_internals.py) where vLLM's spins on the engine's core;
* ``events`` (on request): no connector, but the engine publishes its KV cache events, as
  every engine does whose router reads them (the prefix scorer, ``disaggregation: adaptive``);
  nothing subscribes, so this is the engine's side of their cost;
* ``pdserve-events`` (on request): both, what an engine of an adaptive P/D pool carries.

vLLM's own client (``vllm.benchmarks.serve``, chat, random prompts, Poisson arrivals, on
``--client-core``) sends each the same workload. It prints each run's TTFT / TPOT / ITL
medians and p99s and each arm's medians over ``none``'s.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Optional

from pdserve.bench.serving_cost import FIGURES, add_client_args, client_settings, vllm_bench_serve

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("none", "vllm-nixl", "pdserve", "events", "pdserve-events")
DEFAULT_ARMS = ("none", "vllm-nixl", "pdserve")


def kv_transfer_config(arm: str, cfg) -> Optional[dict[str, Any]]:
    """The ``--kv-transfer-config`` of ``arm`` for vLLM's server (None: no connector)."""
    if arm in ("none", "events"):
        return None
    if arm == "vllm-nixl":
        return {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": cfg.kv_transfer.buffer_device}
    if arm in ("pdserve", "pdserve-events"):
        from pdserve.bench.ports import free_port
        from pdserve.kv_transfer.registry import kv_transfer_config_for

        # the decode engine's connector (prefill and decode differ only in kv_role); its own KV
        # port free, as an engine replica's is
        return dict(kv_transfer_config_for(cfg, "decode", port=free_port(), host="127.0.0.1"), kv_role="kv_both")
    raise ValueError(f"unknown arm {arm!r}: one of {', '.join(ARMS)}")


def kv_events_config(arm: str) -> Optional[dict[str, Any]]:
    """The ``--kv-events-config`` of ``arm`` (None: no events): an engine replica's
    (engine/server.py), on free loopback ports."""
    if arm not in ("events", "pdserve-events"):
        return None
    from pdserve.bench.ports import free_port
    from pdserve.engine.server import kv_events_fields

    return kv_events_fields("connector-cost", endpoint=f"tcp://127.0.0.1:{free_port()}",
                            replay_endpoint=f"tcp://127.0.0.1:{free_port()}")


def with_connector(cfg, arm: str):
    """``cfg`` with ``arm``'s connector (and KV events) added to its engine arguments."""
    kv, events = kv_transfer_config(arm, cfg), kv_events_config(arm)
    kwargs = {k: v for k, v in cfg.engine.engine_kwargs.items() if k not in ("kv_transfer_config", "kv_events_config")}
    if kv is not None:
        kwargs["kv_transfer_config"] = kv
    if events is not None:
        kwargs["kv_events_config"] = events
    return cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"engine_kwargs": kwargs})})


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Each arm's medians over its runs, and each arm's medians over ``none``'s."""
    medians = {arm: {k: statistics.median(r[k] for r in rs) for k in FIGURES} for arm, rs in runs.items() if rs}
    base = medians.get("none")
    ratios = {arm: {k: m[k] / base[k] for k in FIGURES if base[k]} for arm, m in medians.items()
              if base and arm != "none"}
    return {"runs": runs, "medians": medians, "ratios_to_none": ratios}


def main(argv: Optional[list[str]] = None) -> int:
    from pdserve.bench.vllm_server import VllmServer
    from pdserve.engine.tiny_model import resolve_model
    from pdserve.settings.cluster import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "cpu-pd.yaml"),
                   help="a P/D config: its engine settings and its KV transport")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--core", type=int, default=1, help="the core the engine runs on")
    add_client_args(p, num_prompts=200, rate=8.0, rounds_help="runs per arm, in turn")
    p.add_argument("--json", default=None, help="also write the report here")
    args = p.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or set(arms) - set(ARMS) or len(set(arms)) != len(arms):
        p.error(f"--arms: each of {','.join(ARMS)} at most once, got {args.arms!r}")
    cfg = load_config(args.config)
    if cfg.kv_transfer is None or cfg.mode != "pd":
        p.error(f"{args.config} is not a P/D config: its engines carry no KV connector")
    client = client_settings(p, args, resolve_model(cfg.model.path), seed=0)
    log = ROOT / "bench" / "results" / "connector_cost_vllm_server.log"  # kept out of git
    log.parent.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
    for i in range(args.rounds):
        for arm in arms[i % len(arms):] + arms[:i % len(arms)]:  # each round starts with the next arm
            with VllmServer(with_connector(cfg, arm), core=args.core, log_path=str(log), engine_only=True) as s:
                result = vllm_bench_serve(s.url, cfg.model.served_name, **dict(client, seed=i))
            runs[arm].append(result)
            print(f"round {i + 1}: {arm:<14} " + json.dumps({k: round(result[k], 2) for k in FIGURES}), flush=True)
    report = summarize(runs)
    print(f"\nvLLM's server, vLLM bench serve, chat, {args.input_len} in / {args.output_len} out, Poisson "
          f"{args.rate}/s, {args.num_prompts} prompts per run; medians over {args.rounds} rounds")
    print(f"{'arm':<20}" + "".join(f"{k:>16}" for k in FIGURES))
    for arm, m in report["medians"].items():
        print(f"{arm:<20}" + "".join(f"{m[k]:>16.2f}" for k in FIGURES))
    for arm, r in report["ratios_to_none"].items():
        print(f"{arm + '/none':<20}" + "".join(f"{r.get(k, float('nan')):>15.2f}x" for k in FIGURES))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
