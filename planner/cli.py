"""``pdserve plan``: size a deployment offline from a model config, an accelerator and SLOs.

    pdserve plan --model-config llama-3-70b --rate 6 --context-len 10000 --avg-output-tokens 300 \\
        --accel-mem-gib 80 --accel-bw-gbps 3350 --gpus-per-node 8 --link-gbps 25 --json-out plan.json

Prints weight and KV sizes, the parallelism the playbook's decision tree picks, replicas from
Little's Law with W taken from the SLOs (the planning bound), the per-replica queue threshold,
the KV transfer per request against the TTFT budget, and whether P/D is worth it. Writes the
same as JSON with --json-out. Bad input: a message on stderr and exit code 2.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pdserve.planner import littles_law
from pdserve.planner.decide import Accelerator, choose_parallelism, decode_floor_s, pd_worth_it
from pdserve.planner.model_math import GIB, kv_transfer, load_shape


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="offline capacity plan: memory, parallelism, replicas, P/D verdict")
    p.add_argument("--model-config", required=True,
                   help="a config.json, a model directory holding one, or a preset (llama-3-8b, llama-3-70b, "
                        "llama-3.1-405b, mixtral-8x7b, deepseek-v3, tiny, tiny-wide)")
    p.add_argument("--dtype", default=None, help="override the weights' dtype (and the KV cache's), e.g. fp8")
    p.add_argument("--kv-dtype", default=None, help="override the KV cache dtype only, e.g. fp8")
    p.add_argument("--accel-mem-gib", type=float, default=80.0, help="memory per accelerator, GiB")
    p.add_argument("--accel-bw-gbps", type=float, default=3350.0, help="accelerator memory bandwidth, GB/s")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--headroom", type=float, default=0.20, help="memory fraction kept free (playbook: 0.15-0.25)")
    p.add_argument("--max-nodes", type=int, default=None, help="most nodes one replica may span")
    p.add_argument("--context-len", type=int, default=4096, help="prompt tokens per request (KV moved under P/D)")
    p.add_argument("--avg-output-tokens", type=int, default=256)
    p.add_argument("--rate", type=float, required=True, help="peak arrival rate λ, requests/s")
    p.add_argument("--ttft-slo-ms", type=float, default=500.0)
    p.add_argument("--tpot-slo-ms", type=float, default=50.0)
    p.add_argument("--c-knee", type=float, default=None,
                   help="measured concurrency at the goodput knee per replica (default: KV capacity / "
                        "E[KV per request], capped by --max-num-seqs)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="engine batch cap bounding a derived C_knee")
    p.add_argument("--safety", type=float, default=0.75, help="fraction of C_knee used (playbook: 0.7-0.8)")
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=None)
    p.add_argument("--link-gbps", type=float, default=50.0,
                   help="KV transfer link bandwidth per accelerator, GB/s (50: one 400 Gb/s RDMA NIC)")
    p.add_argument("--prefill-interference", action="store_true",
                   help="TPOT violations were measured and traced to prefill interference despite chunked prefill")
    p.add_argument("--split-sku", action="store_true", help="prefill and decode SKU economics differ per phase")
    p.add_argument("--json-out", default=None, help="write the plan as JSON here")
    p.set_defaults(fn=run)


def _check(args) -> None:
    for name in ("accel_mem_gib", "accel_bw_gbps", "ttft_slo_ms", "tpot_slo_ms", "link_gbps"):
        v = getattr(args, name)
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {v:g}")
    if not math.isfinite(args.rate) or args.rate < 0:
        raise ValueError(f"--rate must be >= 0 requests/s, got {args.rate:g}")
    if args.context_len < 1:
        raise ValueError(f"--context-len must be >= 1, got {args.context_len}")
    if args.avg_output_tokens < 0:
        raise ValueError(f"--avg-output-tokens must be >= 0, got {args.avg_output_tokens}")
    if args.max_num_seqs < 1:
        raise ValueError(f"--max-num-seqs must be >= 1, got {args.max_num_seqs}")
    if args.c_knee is not None and (not math.isfinite(args.c_knee) or args.c_knee <= 0):
        raise ValueError(f"--c-knee must be > 0, got {args.c_knee:g}")
    if not 0 < args.safety <= 1:
        raise ValueError(f"--safety must be in (0, 1], got {args.safety:g} (the playbook uses 0.7-0.8)")
    if args.max_nodes is not None and args.max_nodes < 1:
        raise ValueError(f"--max-nodes must be >= 1, got {args.max_nodes}")


def build_plan(args) -> dict[str, Any]:
    _check(args)
    shape = load_shape(args.model_config, dtype=args.dtype, kv_dtype=args.kv_dtype)
    acc = Accelerator(args.accel_mem_gib, args.accel_bw_gbps, args.gpus_per_node, args.headroom)
    notes: list[str] = []
    if not 0.15 <= args.headroom <= 0.25:
        notes.append(f"headroom {args.headroom:.0%} is outside the playbook's 15-25 %")
    choice = choose_parallelism(shape, acc, args.context_len, max_nodes=args.max_nodes)
    kv_req_tokens = args.context_len + args.avg_output_tokens
    kv_req = shape.kv_bytes(kv_req_tokens)

    if args.c_knee is not None:
        c_knee, c_source = args.c_knee, "given (--c-knee)"
    else:
        bound = int(choice.kv_capacity_bytes // kv_req) if kv_req else args.max_num_seqs
        if bound < 1:
            raise ValueError(f"one replica ({choice.label}) holds {choice.kv_capacity_bytes / GIB:.1f} GiB of KV, "
                             f"less than one average request ({kv_req / GIB:.2f} GiB for {kv_req_tokens} tokens): "
                             "lower --context-len, use larger accelerators, or give --c-knee")
        c_knee = min(bound, args.max_num_seqs)
        c_source = (f"derived: min(KV capacity / E[KV per request] = {bound}, --max-num-seqs {args.max_num_seqs}); "
                    "an upper bound, measure the real knee with the bench")
    w = littles_law.service_time(args.ttft_slo_ms / 1000, args.avg_output_tokens, args.tpot_slo_ms / 1000)
    scaling = littles_law.plan(args.rate, w, c_knee, args.safety, args.min_replicas, args.max_replicas)

    floor = decode_floor_s(shape, acc, choice, args.context_len)
    if floor * 1000 > args.tpot_slo_ms:
        notes.append(f"decode floor {floor * 1000:.1f} ms/token at batch 1 already exceeds the "
                     f"{args.tpot_slo_ms:g} ms TPOT SLO with {choice.label}")
    transfer = kv_transfer(shape, args.context_len, args.link_gbps)
    verdict = pd_worth_it(transfer, args.ttft_slo_ms, args.prefill_interference, args.split_sku)
    counts = shape.param_counts()
    return {
        "model": {
            "name": shape.name, "dtype": shape.dtype, "is_moe": shape.is_moe, "is_mla": shape.is_mla,
            "params_total": counts.total, "params_active": counts.active,
            "weight_bytes": shape.weight_bytes(), "weight_gib": shape.weight_bytes() / GIB,
            "kv_bytes_per_token": shape.kv_bytes_per_token,
            "kv_bytes_per_request": kv_req, "kv_tokens_per_request": kv_req_tokens,
            "kv_gib_per_request": kv_req / GIB,
        },
        "accelerator": {**asdict(acc), "usable_gib": acc.usable_bytes / GIB},
        "parallelism": {**asdict(choice), "kv_capacity_gib": choice.kv_capacity_bytes / GIB},
        "scaling": {**asdict(scaling), "c_knee_source": c_source,
                    "w_formula": "W = TTFT_SLO + avg_output_tokens × TPOT_SLO",
                    "replicas_n_plus_1": scaling.replicas + 1,
                    "gpus": scaling.replicas * choice.gpus_per_replica,
                    "gpus_n_plus_1": (scaling.replicas + 1) * choice.gpus_per_replica},
        "decode_floor_ms_per_token": floor * 1000,
        "kv_transfer": {**asdict(transfer), "link_gbps": args.link_gbps, "ms": transfer.seconds * 1000},
        "pd": asdict(verdict),
        "notes": notes,
    }


def render(plan: dict[str, Any]) -> str:
    m, par, s, t, pd = plan["model"], plan["parallelism"], plan["scaling"], plan["kv_transfer"], plan["pd"]
    acc = plan["accelerator"]
    moe = f", MoE ({m['params_active'] / 1e9:.1f}B active)" if m["is_moe"] else ""
    lines = [
        f"model {m['name']}: {m['params_total'] / 1e9:.2f}B parameters{moe}, {m['dtype']}",
        f"  weights            {m['weight_gib']:.1f} GiB",
        f"  KV per token       {m['kv_bytes_per_token']:,} B ({m['kv_bytes_per_token'] / (1 << 20):.3f} MiB)",
        f"  KV per request     {m['kv_gib_per_request']:.2f} GiB ({m['kv_tokens_per_request']} tokens)",
        f"accelerator: {acc['mem_gib']:g} GiB, {acc['mem_bw_gbps']:g} GB/s, {acc['gpus_per_node']}/node, "
        f"{acc['usable_gib']:.1f} GiB usable ({acc['headroom']:.0%} headroom)",
        f"parallelism: {par['label']}  ({par['gpus_per_replica']} accelerator(s), {par['nodes_per_replica']} "
        f"node(s) per replica; fits: {'yes' if par['fits'] else 'NO'})",
        *(f"  - {r}" for r in par["reasons"]),
        f"  weights per accelerator {par['weight_bytes_per_gpu'] / GIB:.1f} GiB; KV capacity per replica "
        f"{par['kv_capacity_gib']:.1f} GiB",
        f"  decode floor at batch 1: {plan['decode_floor_ms_per_token']:.2f} ms/token",
        "scaling (Little's Law):",
        f"  W = {s['w_s']:.3f} s ({s['w_formula']})",
        f"  C_knee = {s['c_knee']:g} per replica, {s['c_knee_source']}",
        f"  in flight = λ × W = {s['rate_rps']:g} × {s['w_s']:.3f} = {s['in_flight']:g}; usable per replica "
        f"{s['usable_per_replica']:g} (safety {s['safety']:g})",
        f"  replicas = {s['replicas']} ({s['gpus']} accelerators); with N+1 warm headroom "
        f"{s['replicas_n_plus_1']} ({s['gpus_n_plus_1']})",
        f"  queue threshold per replica = C_knee × (1 − safety) = {s['queue_threshold']:g}",
        f"KV transfer per request: {t['gib']:.2f} GiB, {t['ms']:.1f} ms at {t['link_gbps']:g} GB/s "
        f"(TTFT budget {pd['ttft_budget_ms']:g} ms)",
        f"P/D worth it: {'yes' if pd['worth_it'] else 'no'} (transfer feasible: {'yes' if pd['feasible'] else 'no'})",
        *(f"  - {r}" for r in pd["reasons"]),
    ]
    lines += [f"note: {n}" for n in plan["notes"]]
    return "\n".join(lines)


def run(args) -> int:
    try:
        plan = build_plan(args)
    except ValueError as e:
        print(f"pdserve plan: {e}", file=sys.stderr)
        return 2
    print(render(plan))
    if args.json_out:
        out = Path(args.json_out)
        try:
            out.write_text(json.dumps(plan, indent=2, ensure_ascii=False) + "\n")
        except OSError as e:
            print(f"pdserve plan: cannot write --json-out {args.json_out}: {e}", file=sys.stderr)
            return 2
        print(f"wrote {out}")
    return 0
