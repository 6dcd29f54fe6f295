"""Benchmark: the same workload through pdserve P/D (KV over NIXL, and over our gRPC stream),
pdserve monolithic, and one engine called directly (vLLM AsyncLLM in-process, no HTTP).
Prints TTFT / TPOT / E2E p50 and p95 for each arm and the ratios between them; all arms
measured in one run.

    python -m pdserve.bench.pd_vs_mono [--requests 80 --rate 4 --input-words 200 --output 64]

The workload mirrors the vLLM figures in ../shared/anchors.md (≈256 prompt tokens,
64 output tokens, Poisson arrivals at 4 req/s).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import time
from pathlib import Path

from pdserve.bench.client import RequestResult, run_poisson, summarize

ROOT = Path(__file__).resolve().parents[1]
_VOCAB = ("prefill decode cache block transfer engine router replica request latency throughput goodput stream "
          "queue budget tenant priority cluster fallback link token model memory compute network").split()


def make_bodies(n: int, input_words: int, output_tokens: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    bodies = []
    for i in range(n):
        text = f"Req {i}: " + " ".join(rng.choice(_VOCAB) for _ in range(input_words))
        bodies.append({"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": output_tokens,
                       "temperature": 0, "ignore_eos": True})
    return bodies


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cluster_arm(config: str, bodies, rate: float, warmup) -> dict:
    from pdserve.bench.cluster_runtime import runtime
    from pdserve.settings.cluster import load_config

    rt = runtime()
    cfg = load_config(ROOT / "configs" / config)
    url = rt.start_cluster(cfg, port=_free_port())
    try:
        asyncio.run(run_poisson(url, warmup, rate=50))
        results = asyncio.run(run_poisson(url, bodies, rate))
    finally:
        rt.stop_cluster()
    return summarize(results)


async def _direct(bodies, rate: float, warmup) -> list[RequestResult]:
    """One monolithic engine on core 0, called through AsyncLLM.generate directly."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from pdserve.settings.cluster import load_config
    from pdserve.engine.server import EngineServer

    cfg = load_config(ROOT / "configs" / "cpu-monolithic.yaml")
    server = EngineServer(cfg, "monolithic", 0)
    await server.start()
    from transformers import AutoTokenizer

    from pdserve.engine.tiny_model import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(cfg.model.path))

    async def one(i, body) -> RequestResult:
        ids = tok.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True)
        ids = ids if isinstance(ids, list) else ids["input_ids"]
        sp = SamplingParams(max_tokens=body["max_tokens"], temperature=0, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
        t0 = time.perf_counter()
        res = RequestResult(ok=True, status=200, path="direct")
        async for out in server.engine.generate({"prompt_token_ids": ids}, sp, request_id=f"direct-{i}-{t0}"):
            if out.outputs[0].token_ids:
                res.record_tokens(t0, len(out.outputs[0].token_ids))
        return res

    try:
        await asyncio.gather(*(one(-i - 1, b) for i, b in enumerate(warmup)))
        rng = random.Random(0)
        tasks = []
        for i, b in enumerate(bodies):
            tasks.append(asyncio.create_task(one(i, b)))
            await asyncio.sleep(rng.expovariate(rate))
        return await asyncio.gather(*tasks)
    finally:
        await server.shutdown()


_ARMS = {
    "pd": ("cpu-pd.yaml", "pdserve P/D (NIXL)"),
    "pd-grpc": ("cpu-pd-grpc.yaml", "pdserve P/D (gRPC)"),
    "monolithic": ("cpu-monolithic.yaml", "pdserve monolithic"),
    "direct": (None, "direct AsyncLLM"),
}


def _fmt(s: dict) -> str:
    return (f"TTFT p50 {s['p50_ttft_ms']:7.1f} ms  p95 {s['p95_ttft_ms']:7.1f} ms | "
            f"TPOT p50 {s['p50_tpot_ms']:6.2f} ms  p95 {s['p95_tpot_ms']:6.2f} ms | "
            f"E2E p50 {s['p50_e2e_ms']:7.1f} ms  p95 {s['p95_e2e_ms']:7.1f} ms | ok {s['completed']} fail {s['failed']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=80)
    p.add_argument("--rate", type=float, default=4.0)
    p.add_argument("--input-words", type=int, default=200, help="≈256 prompt tokens with the tiny tokenizer")
    p.add_argument("--output", type=int, default=64)
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--arms", default=",".join(_ARMS),
                   help=f"comma-separated subset of {','.join(_ARMS)}")
    args = p.parse_args(argv)

    bodies = make_bodies(args.requests, args.input_words, args.output)
    warmup = make_bodies(4, args.input_words, 8, seed=99)
    arms = {}
    print(f"workload: {args.requests} chat requests, ~{args.input_words} words in, {args.output} tokens out, "
          f"Poisson {args.rate} req/s, streaming, greedy", flush=True)
    for arm in args.arms.split(","):
        if arm not in _ARMS:
            p.error(f"unknown arm {arm!r}; choose from {', '.join(_ARMS)}")
        config, label = _ARMS[arm]
        if config is None:
            arms[arm] = summarize(asyncio.run(_direct(bodies, args.rate, warmup)))
        else:
            arms[arm] = run_cluster_arm(config, bodies, args.rate, warmup)
        print(f"{label:<22}:", _fmt(arms[arm]), flush=True)

    print("\nratios (same run):")
    for a, b in (("pd", "monolithic"), ("pd-grpc", "monolithic"), ("pd-grpc", "pd"), ("pd", "direct"),
                 ("pd-grpc", "direct"), ("monolithic", "direct")):
        if a not in arms or b not in arms:
            continue
        r = {m: arms[a][f"p50_{m}_ms"] / arms[b][f"p50_{m}_ms"] for m in ("ttft", "tpot", "e2e")}
        print(f"  {a:>10} / {b:<10}: TTFT p50 {r['ttft']:.2f}x  TPOT p50 {r['tpot']:.2f}x  E2E p50 {r['e2e']:.2f}x")
    print("\nvLLM's own P/D behind a minimal proxy on this machine (anchors.md): TTFT p50 78.5 ms, TPOT p50 12.0 ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "arms": arms}, indent=2))
    return 0


if __name__ == "__main__":
    from pdserve.bench import cluster_runtime
    from pdserve.cluster import runtime

    cluster_runtime.use(runtime)  # this script is the program: its entry point is a composition root
    raise SystemExit(main())
