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
import math
import time
from collections import Counter
from pathlib import Path

from pdserve.bench.loadgen import LoadSpec, arrival_offsets, run_load, warm_up
from pdserve.bench.ports import free_port
from pdserve.bench.stats import RequestOutput, metric_stats
from pdserve.bench.workloads import SampleRequest, numbered_prompts

ROOT = Path(__file__).resolve().parents[1]


def make_requests(n: int, input_words: int, output_tokens: int, seed: int = 0) -> list[SampleRequest]:
    return [SampleRequest(prompt=p, prompt_len=input_words, output_len=output_tokens)
            for p in numbered_prompts(n, input_words, seed)]


def summarize(outputs: list[RequestOutput]) -> dict:
    """Completed and failed requests; TTFT, TPOT and E2E p50, p95 and mean in ms (NaN when no
    request has the figure); completed requests per x-pdserve-path ("?": none)."""
    ok = [r for r in outputs if r.success]
    out: dict = {"completed": len(ok), "failed": len(outputs) - len(ok)}
    for name, values in (("ttft", [r.ttft for r in ok]), ("tpot", [r.tpot for r in ok if r.output_tokens > 1]),
                         ("e2e", [r.latency for r in ok])):
        stats = metric_stats(name, values, (50, 95))
        for key in (f"p50_{name}_ms", f"p95_{name}_ms", f"mean_{name}_ms"):
            out[key] = math.nan if stats[key] is None else stats[key]
    out["paths"] = dict(Counter(r.path or "?" for r in ok))
    return out


def run_cluster_arm(config: str, requests: list[SampleRequest], rate: float, warmup: list[SampleRequest]) -> dict:
    from pdserve.bench.cluster_runtime import runtime
    from pdserve.settings.cluster import load_config

    rt = runtime()
    # the P/D arms split every request: this compares the P/D path itself with monolithic serving
    cfg = load_config(ROOT / "configs" / config)
    if cfg.mode == "pd":
        cfg = load_config(ROOT / "configs" / config, ["router.disaggregation=always"])
    url = rt.start_cluster(cfg, port=free_port())
    try:
        warm_up(url, "chat", cfg.model.served_name, warmup)
        outputs, _ = asyncio.run(run_load(url, "chat", cfg.model.served_name, requests, LoadSpec(rate)))
    finally:
        rt.stop_cluster()
    return summarize(outputs)


async def _direct(requests: list[SampleRequest], rate: float, warmup: list[SampleRequest]) -> list[RequestOutput]:
    """One monolithic engine on core 0, called through AsyncLLM.generate directly, at the same
    arrival times as the cluster arms' requests."""
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

    async def one(i: int, req: SampleRequest, t0: float) -> RequestOutput:
        ids = tok.apply_chat_template([{"role": "user", "content": req.prompt}], add_generation_prompt=True,
                                      tokenize=True)
        ids = ids if isinstance(ids, list) else ids["input_ids"]
        sp = SamplingParams(max_tokens=req.output_len, temperature=0, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
        out = RequestOutput(status=200, path="direct", prompt_len=len(ids))
        st = last = time.perf_counter()
        out.start_time = st - t0
        async for step in server.engine.generate({"prompt_token_ids": ids}, sp, request_id=f"direct-{i}-{st}"):
            n = len(step.outputs[0].token_ids)
            if n:  # timed as loadgen.send_request times a read: tokens that come together, ITL 0
                now = time.perf_counter()
                if out.output_tokens == 0:
                    out.ttft = now - st
                else:
                    out.itl.append(now - last)
                out.itl.extend([0.0] * (n - 1))
                out.output_tokens += n
                last = now
        out.latency = last - st
        out.success = out.output_tokens > 0
        out.error = "" if out.success else "the engine produced no token"
        return out

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(-i - 1, r, t0) for i, r in enumerate(warmup)))
        t0 = time.perf_counter()
        tasks = []
        for i, (req, at) in enumerate(zip(requests, arrival_offsets(len(requests), rate, 1.0, seed=0))):
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i, req, t0)))
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

    requests = make_requests(args.requests, args.input_words, args.output)
    warmup = make_requests(4, args.input_words, 8, seed=99)
    arms = {}
    print(f"workload: {args.requests} chat requests, ~{args.input_words} words in, {args.output} tokens out, "
          f"Poisson {args.rate} req/s, streaming, greedy", flush=True)
    for arm in args.arms.split(","):
        if arm not in _ARMS:
            p.error(f"unknown arm {arm!r}; choose from {', '.join(_ARMS)}")
        config, label = _ARMS[arm]
        if config is None:
            arms[arm] = summarize(asyncio.run(_direct(requests, args.rate, warmup)))
        else:
            arms[arm] = run_cluster_arm(config, requests, args.rate, warmup)
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
