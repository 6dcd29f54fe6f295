"""The playbook's parallelism decision tree and its "is P/D worth it" test.

1. weights + KV fit one accelerator (keeping 15-25 % headroom) -> data parallelism (replicas);
2. they fit one node -> tensor parallelism within the node;
3. otherwise -> TP within the node × pipeline parallelism across nodes.
MoE: that choice shards attention and dense layers; the routed experts are sharded by expert
parallelism (EP) over the same accelerators. Every choice carries its reasons as text.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from pdserve.planner.model_math import GIB, KVTransfer, ModelShape


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Accelerator:
    mem_gib: float               # device memory per accelerator
    mem_bw_gbps: float           # device memory bandwidth, GB/s (10^9 B/s)
    gpus_per_node: int
    headroom: float = 0.20       # fraction of memory kept free (activations, CUDA graphs, fragmentation)

    def __post_init__(self) -> None:
        _positive("accelerator memory (GiB)", self.mem_gib)
        _positive("accelerator memory bandwidth (GB/s)", self.mem_bw_gbps)
        if isinstance(self.gpus_per_node, bool) or not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 1:
            raise ValueError(f"gpus per node must be an integer >= 1, got {self.gpus_per_node!r}")
        if not (isinstance(self.headroom, (int, float)) and 0 <= self.headroom < 1):
            raise ValueError(f"headroom must be in [0, 1), got {self.headroom!r} (the playbook keeps 0.15-0.25)")

    @property
    def usable_bytes(self) -> float:
        return self.mem_gib * GIB * (1 - self.headroom)


@dataclass(frozen=True)
class ParallelismChoice:
    strategy: str                # "DP", "TP" or "TP×PP"
    tp: int
    pp: int
    ep: int                      # expert-parallel degree for MoE expert layers (1: none)
    gpus_per_replica: int
    nodes_per_replica: int
    weight_bytes_per_gpu: float
    kv_bytes_per_gpu_one_request: float
    kv_capacity_bytes: float     # KV bytes one replica can hold after weights and headroom
    fits: bool
    label: str
    reasons: list[str] = field(default_factory=list)


def _kv_shards(shape: ModelShape, tp: int) -> int:
    # TP splits KV by KV heads; past n_kv_heads ranks the heads are replicated, not split.
    # MLA's latent is not split by heads at all.
    return 1 if shape.is_mla else max(1, min(tp, shape.n_kv_heads))


def _per_gpu(shape: ModelShape, tp: int, pp: int, kv_request: float, min_concurrency: int) -> tuple[float, float]:
    weights = shape.weight_bytes() / (tp * pp)
    kv = kv_request / (_kv_shards(shape, tp) * pp)
    return weights, kv * min_concurrency


def _kv_capacity(shape: ModelShape, acc: Accelerator, tp: int, pp: int) -> float:
    free_per_gpu = acc.usable_bytes - shape.weight_bytes() / (tp * pp)
    return max(0.0, free_per_gpu) * tp * pp * _kv_shards(shape, tp) / tp


def choose_parallelism(shape: ModelShape, acc: Accelerator, context_tokens: int, min_concurrency: int = 1,
                       max_nodes: Optional[int] = None) -> ParallelismChoice:
    """Smallest footprint that holds the weights plus ``min_concurrency`` requests of ``context_tokens``."""
    if isinstance(context_tokens, bool) or not isinstance(context_tokens, int) or context_tokens < 1:
        raise ValueError(f"context length must be an integer >= 1, got {context_tokens!r}")
    if isinstance(min_concurrency, bool) or not isinstance(min_concurrency, int) or min_concurrency < 1:
        raise ValueError(f"min concurrency must be an integer >= 1, got {min_concurrency!r}")
    kv_req = float(shape.kv_bytes(context_tokens))
    usable = acc.usable_bytes
    need = f"weights {shape.weight_bytes() / GIB:.1f} GiB + KV for {min_concurrency} × {context_tokens}-token " \
           f"request(s) {kv_req * min_concurrency / GIB:.2f} GiB"
    budget = f"{usable / GIB:.1f} GiB usable of {acc.mem_gib:g} GiB with {acc.headroom:.0%} headroom"

    def build(strategy: str, tp: int, pp: int, fits: bool, reasons: list[str]) -> ParallelismChoice:
        w, kv = _per_gpu(shape, tp, pp, kv_req, 1)
        gpus = tp * pp
        ep = gpus if shape.is_moe and gpus > 1 else 1
        label = "DP" if strategy == "DP" else " × ".join(
            part for part, degree in ((f"TP={tp}", tp), (f"PP={pp}", pp)) if degree > 1)
        if shape.is_moe:
            if ep > 1:
                label += f" (attention/dense layers) + EP={ep} (expert layers)"
                reasons.append(f"MoE ({shape.n_experts} experts, {shape.experts_per_token} per token): "
                               f"TP/DP for the dense layers, expert parallelism EP={ep} places "
                               f"{shape.n_experts / ep:g} experts per accelerator instead of slicing every expert")
            else:
                reasons.append(f"MoE ({shape.n_experts} experts) fits one accelerator: experts stay whole, "
                               "replicate with DP; EP only pays once the experts must be spread")
        return ParallelismChoice(
            strategy=strategy, tp=tp, pp=pp, ep=ep, gpus_per_replica=gpus, nodes_per_replica=pp,
            weight_bytes_per_gpu=w, kv_bytes_per_gpu_one_request=kv,
            kv_capacity_bytes=_kv_capacity(shape, acc, tp, pp), fits=fits, label=label, reasons=reasons)

    def fits(tp: int, pp: int) -> bool:
        w, kv = _per_gpu(shape, tp, pp, kv_req, min_concurrency)
        return w + kv <= usable

    if fits(1, 1):
        return build("DP", 1, 1, True, [f"{need} fit one accelerator ({budget}): data parallelism, "
                                        "scale by adding replicas"])
    tps = [t for t in (2, 4, 8, 16, 32, 64) if t <= acc.gpus_per_node and shape.n_heads % t == 0]
    for tp in tps:
        if fits(tp, 1):
            return build("TP", tp, 1, True, [
                f"{need} exceed one accelerator ({budget})",
                f"TP={tp} within one node ({acc.gpus_per_node} accelerators/node) fits: tensor parallelism "
                "stays on the node's fast interconnect"])
    tp = tps[-1] if tps else 1
    max_pp = shape.n_layers if max_nodes is None else min(shape.n_layers, max_nodes)
    for pp in range(2, max_pp + 1):
        if fits(tp, pp):
            return build("TP×PP", tp, pp, True, [
                f"{need} exceed one node ({tp} accelerators × {usable / GIB:.1f} GiB usable)",
                f"TP={tp} within each node × PP={pp} stages across {pp} nodes: only activations cross nodes"])
    limit = f"{max_nodes} node(s)" if max_nodes is not None else f"{max_pp} pipeline stages (one per layer)"
    return build("TP×PP" if max_pp > 1 else "TP", tp, max_pp, False, [
        f"{need} do not fit even TP={tp} × {limit}: shorten the context, quantize, or use larger accelerators"])


def decode_floor_s(shape: ModelShape, acc: Accelerator, choice: ParallelismChoice, context_tokens: int) -> float:
    """TPOT lower bound at batch 1: every step reads the active weights and one request's KV from
    device memory; TP ranks read their shards in parallel, PP stages run one after another."""
    weights = shape.active_weight_bytes() / choice.tp
    kv = shape.kv_bytes(context_tokens) / _kv_shards(shape, choice.tp)
    return (weights + kv) / (acc.mem_bw_gbps * 1e9)


@dataclass(frozen=True)
class PDVerdict:
    feasible: bool            # the KV transfer fits inside the TTFT budget
    worth_it: bool
    transfer_gib: float
    transfer_ms: float
    ttft_budget_ms: float
    budget_fraction: float    # transfer time / TTFT budget
    reasons: list[str]


# Above this share of the TTFT budget the transfer leaves too little for queueing and prefill
# (the playbook says only "budget it inside TTFT"; a quarter is our default).
MAX_TRANSFER_SHARE = 0.25


def pd_worth_it(transfer: KVTransfer, ttft_slo_ms: float, prefill_interference: bool = False,
                split_sku: bool = False, max_share: float = MAX_TRANSFER_SHARE) -> PDVerdict:
    budget = _positive("TTFT SLO (ms)", ttft_slo_ms)
    ms = transfer.seconds * 1000
    share = ms / budget
    reasons = [f"KV transfer {transfer.gib:.2f} GiB ({transfer.tokens} tokens) takes {ms:.1f} ms = "
               f"{share:.0%} of the {budget:g} ms TTFT budget"]
    feasible = share <= max_share
    if share > 1:
        reasons.append("the transfer alone exceeds the TTFT SLO: P/D cannot meet it on this link")
    elif not feasible:
        reasons.append(f"above {max_share:.0%} of the budget, too little is left for queueing and prefill")
    else:
        reasons.append(f"within {max_share:.0%} of the budget: the transfer can be budgeted inside TTFT")
    measured = []
    if prefill_interference:
        measured.append("TPOT violations were traced to prefill interference despite chunked prefill")
    if split_sku:
        measured.append("prefill and decode SKU economics differ per phase")
    if measured:
        reasons.extend(f"adoption criterion met: {m}" for m in measured)
    else:
        reasons.append("no adoption criterion met: the playbook adopts P/D only when TPOT violations are "
                       "measured and traced to prefill interference despite chunked prefill, or when SKU "
                       "economics differ per phase; otherwise serve monolithic")
    worth = feasible and bool(measured)
    if worth:
        reasons.append("keep the monolithic fallback route on the decode pool configured and tested, "
                       "and size the decode pool N+1 (its loss has no fallback)")
    return PDVerdict(feasible=feasible, worth_it=worth, transfer_gib=transfer.gib, transfer_ms=ms,
                     ttft_budget_ms=budget, budget_fraction=share, reasons=reasons)
