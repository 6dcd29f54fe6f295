"""Benchmark: KV transfer throughput and per-request latency, gRPC vs NIXL, beside memory bandwidth.

    python -m pdserve.bench.kv_transfer [--models tiny,tiny-wide] [--transports grpc,nixl]

Three parts, one run:
1. the machine's memory-copy bandwidth (a large torch tensor copy): the physical limit;
2. the gRPC stream alone, in-process over loopback (server thread -> puller thread, checksums on),
   for the same sizes, with the bytes inline and by same-host reference;
3. real P/D clusters (Ray Serve, vLLM engines on their own cores) for each transport and model:
   prompts of several lengths, one at a time, each with a fresh prefix so decode pulls every block;
   the decode engine's own transfer counters give the bytes and seconds of each pull.

Transports: ``nixl``; ``grpc`` (same-host pairs copy by reference, kv_transfer/same_host.py);
``grpc-inline`` (the bytes travel in the stream, as they must between hosts).

The tiny model holds 1 KiB of KV per token (latency-bound); ``tiny-wide`` holds 32 KiB per token,
so a 2,000-token prompt moves ~62 MiB (bandwidth-bound).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pdserve.bench.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
_CONFIGS = {"grpc": "cpu-pd-grpc.yaml", "grpc-inline": "cpu-pd-grpc.yaml", "nixl": "cpu-pd.yaml"}


def memcpy_gbps(size: int, repeats: int = 5) -> float:
    src = torch.ones(size // 2, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return size / best / 1e9


def grpc_loopback_gbps(size: int, repeats: int = 3, same_host_refs: bool = False) -> float:
    """One layer of ``size`` bytes in 64 KiB blocks, pulled through the real server and puller."""
    from pdserve.kv_transfer.faults import FaultSwitch
    from pdserve.kv_transfer.kv_layout import BlockLayout
    from pdserve.kv_transfer.kv_puller import KVPuller, PullJob
    from pdserve.kv_transfer.kv_server import KVStreamServicer, LeaseTable, start_server

    block = 64 * 1024
    n = max(1, size // block)
    src = {"l": torch.ones(n, block // 2, dtype=torch.bfloat16)}
    dst = {"l": torch.zeros(n, block // 2, dtype=torch.bfloat16)}
    table = LeaseTable()
    port = free_port()
    server = start_server(KVStreamServicer("e", table, BlockLayout(src, n), 4 * MiB, FaultSwitch(None)),
                          f"127.0.0.1:{port}", 64 * MiB, None)
    puller = KVPuller(BlockLayout(dst, n), deadline_s=60, max_message_bytes=64 * MiB, tls=None,
                      same_host_refs=same_host_refs)
    best = float("inf")
    try:
        for i in range(repeats):
            table.add(f"r{i}", list(range(n)), time.monotonic() + 60)
            t = time.perf_counter()
            pulled = puller.pull(PullJob(f"d{i}", f"r{i}", "e", "127.0.0.1", port, list(range(n)), 0))
            assert pulled.same_host == same_host_refs, pulled
            best = min(best, time.perf_counter() - t)
    finally:
        puller.close()
        server.stop(grace=0)
    return n * block / best / 1e9


def _decode_totals(url: str) -> tuple[int, int, float]:
    import httpx

    reps = httpx.get(url + "/pdserve/status", timeout=30).json()["pools"]["decode"]
    return (sum(r["kv_transfers_total"] or 0 for r in reps), sum(r["kv_transfer_bytes_total"] or 0 for r in reps),
            sum(r["kv_transfer_seconds_total"] or 0.0 for r in reps))


def cluster_transfers(transport: str, model: str, lengths: list[int], repeats: int) -> list[dict]:
    import httpx

    from pdserve.bench.cluster_runtime import runtime
    from pdserve.settings.cluster import load_config

    rt = runtime()
    cfg = load_config(ROOT / "configs" / _CONFIGS[transport], ["router.disaggregation=always"])  # every prompt moves
    if transport == "grpc-inline":
        grpc = cfg.kv_transfer.grpc.model_copy(update={"same_host_refs": False})
        cfg = cfg.model_copy(update={"kv_transfer": cfg.kv_transfer.model_copy(update={"grpc": grpc})})
    cfg = cfg.model_copy(update={
        "name": f"kvbench-{transport}",
        "model": cfg.model.model_copy(update={"path": f"builtin:{model}", "max_model_len": 4096}),
        "engine": cfg.engine.model_copy(update={"max_num_batched_tokens": 4096}),
    })
    url = rt.start_cluster(cfg, port=free_port())
    rows = []
    try:
        with httpx.Client(timeout=300) as client:
            for i, words in enumerate(lengths):
                samples = []
                for r in range(repeats + 1):  # the first pull of each size warms the path up
                    before = _decode_totals(url)
                    body = {"model": "tiny", "prompt": f"run {i}-{r}-{time.time_ns()} " + "token " * words,
                            "max_tokens": 2, "temperature": 0, "ignore_eos": True}
                    resp = client.post(url + "/v1/completions", json=body)
                    resp.raise_for_status()
                    assert resp.headers["x-pdserve-path"] == "pd", resp.headers
                    mode = resp.headers.get("x-pdserve-kv-transfer", "")
                    if transport.startswith("grpc") and r:
                        want = "mode=inline" if transport == "grpc-inline" else "mode=same-host"
                        assert want in mode, mode
                    prompt_tokens = resp.json()["usage"]["prompt_tokens"]
                    deadline = time.time() + 10
                    while (after := _decode_totals(url))[0] == before[0] and time.time() < deadline:
                        time.sleep(0.1)
                    nbytes, secs = after[1] - before[1], after[2] - before[2]
                    if r and nbytes and secs:
                        samples.append((nbytes, secs))
                if samples:
                    nbytes = sum(b for b, _ in samples) / len(samples)
                    secs = sorted(s for _, s in samples)[len(samples) // 2]
                    rows.append({"transport": transport, "model": model, "words": words, "prompt_tokens": prompt_tokens,
                                 "bytes": int(nbytes), "p50_ms": secs * 1000, "gb_s": nbytes / secs / 1e9})
                    print(f"  {transport:11} {model:9} {prompt_tokens:5d} tok {nbytes / MiB:8.2f} MiB "
                          f"p50 {secs * 1000:8.2f} ms  {nbytes / secs / 1e9:6.2f} GB/s", flush=True)
    finally:
        rt.stop_cluster()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,tiny-wide")
    p.add_argument("--transports", default="grpc,grpc-inline,nixl")
    p.add_argument("--words", default="50,200,800,1600", help="prompt lengths in words (~1.2 tokens each)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    out: dict = {"memcpy_gb_s": {}, "grpc_loopback_gb_s": {}, "grpc_loopback_same_host_gb_s": {}, "cluster": []}

    print("physical limit and the bare gRPC stream (in-process, loopback, CRC-32C on):")
    for mib in (1, 16, 64, 256):
        out["memcpy_gb_s"][mib] = memcpy_gbps(mib * MiB)
        out["grpc_loopback_gb_s"][mib] = grpc_loopback_gbps(mib * MiB)
        out["grpc_loopback_same_host_gb_s"][mib] = grpc_loopback_gbps(mib * MiB, same_host_refs=True)
        print(f"  {mib:4d} MiB: torch copy {out['memcpy_gb_s'][mib]:6.2f} GB/s | "
              f"gRPC stream inline {out['grpc_loopback_gb_s'][mib]:5.2f} GB/s, "
              f"same-host {out['grpc_loopback_same_host_gb_s'][mib]:5.2f} GB/s", flush=True)

    print("\nP/D clusters (decode engine's own transfer counters; median of repeats):")
    lengths = [int(w) for w in args.words.split(",")]
    for model in args.models.split(","):
        for transport in args.transports.split(","):
            out["cluster"].extend(cluster_transfers(transport, model, lengths, args.repeats))

    print("\ngRPC / NIXL throughput, same prompt, same run:")
    by = {(r["transport"], r["model"], r["words"]): r for r in out["cluster"]}
    for (t, model, words), row in sorted(by.items()):
        other = by.get(("nixl", model, words))
        n = row["prompt_tokens"]
        if t.startswith("grpc") and other:
            print(f"  {model:9} {n:5d} tok: {t:11} {row['gb_s']:.2f} GB/s vs NIXL {other['gb_s']:.2f} GB/s "
                  f"= {row['gb_s'] / other['gb_s']:.2f}x; latency {row['p50_ms']:.2f} vs {other['p50_ms']:.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    from pdserve.bench import cluster_runtime
    from pdserve.cluster import runtime

    cluster_runtime.use(runtime)  # this script is the program: its entry point is a composition root
    raise SystemExit(main())
