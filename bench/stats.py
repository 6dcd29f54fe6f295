"""Per-request records and the metrics over them, with vLLM ``bench serve`` semantics.

Field names follow vllm/benchmarks/serve.py where they mean the same thing (``completed``,
``request_goodput``, ``mean_ttft_ms``, ``p99_tpot_ms``, ``ttfts``, ...); pdserve additions
carry names vLLM does not use (``fallback_fraction``, ``status_counts``, ``per_tenant``, ...).
One deviation: a latency statistic over no values is ``None`` (vLLM reports 0, which reads as
"infinitely fast" in a table or plot).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import numpy as np

SLO_NAMES = ("ttft", "tpot", "e2el")
DEFAULT_PERCENTILES = (50.0, 90.0, 95.0, 99.0)
_MAX_ERROR_SAMPLES = 10


@dataclass
class RequestOutput:
    """One request as the client saw it; times in seconds, like vLLM's RequestFuncOutput."""

    success: bool = False
    status: int = 0  # HTTP status; 0 when no response came (connection error)
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0  # time of the last streamed choice chunk, from the send
    output_tokens: int = 0
    prompt_len: int = 0  # usage.prompt_tokens when the server reports it, else the target
    start_time: float = 0.0  # seconds since the run started
    path: Optional[str] = None  # x-pdserve-path
    fallback_cause: Optional[str] = None  # x-pdserve-fallback-cause
    tenant: Optional[str] = None
    error: str = ""
    # usage.prompt_tokens_details.cached_tokens: prompt tokens the engine found in its prefix
    # cache (None: the server reported none, e.g. vLLM without --enable-prompt-tokens-details)
    cached_tokens: Optional[int] = None
    generated_text: str = ""  # kept only when asked for (multi-turn sessions resend it)
    session: Optional[int] = None  # multi-turn: which session, and which of its turns (0 first)
    turn: Optional[int] = None

    @property
    def tpot(self) -> float:
        """(e2e - ttft) / (out - 1); 0 for a single-token output (vLLM counts that as within
        any TPOT SLO)."""
        if self.output_tokens <= 1:
            return 0.0
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def percentile_key(p: float) -> str:
    """vLLM's spelling of a percentile in a field name: 99 -> '99', 99.9 -> '99.9'."""
    return str(int(p)) if int(p) == p else str(p)


def metric_stats(name: str, values_s: Sequence[float], percentiles: Iterable[float]) -> dict[str, Optional[float]]:
    """mean/median/std (population, as np.std) and np.percentile (linear) of ``values_s``, in ms."""
    pcts = list(percentiles)
    if len(values_s) == 0:
        out: dict[str, Optional[float]] = {f"{k}_{name}_ms": None for k in ("mean", "median", "std")}
        out.update({f"p{percentile_key(p)}_{name}_ms": None for p in pcts})
        return out
    arr = np.asarray(values_s, dtype=float) * 1000.0
    out = {f"mean_{name}_ms": float(np.mean(arr)), f"median_{name}_ms": float(np.median(arr)),
           f"std_{name}_ms": float(np.std(arr))}
    for p in pcts:
        out[f"p{percentile_key(p)}_{name}_ms"] = float(np.percentile(arr, p))
    return out


def parse_goodput(pairs: Iterable[str]) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 500.0, 'tpot': 50.0} (ms); ValueError on bad input."""
    slos: dict[str, float] = {}
    for pair in pairs:
        name, sep, value = pair.partition(":")
        if not sep:
            raise ValueError(f"SLO {pair!r} is not NAME:MILLISECONDS (e.g. ttft:500)")
        if name not in SLO_NAMES:
            raise ValueError(f"SLO name {name!r} is not one of {', '.join(SLO_NAMES)}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"SLO {pair!r}: {value!r} is not a number of milliseconds") from None
        if not ms >= 0:
            raise ValueError(f"SLO {pair!r}: the value must be a non-negative number of milliseconds")
        slos[name] = ms
    return slos


def meets_slos(r: RequestOutput, slos_ms: dict[str, float]) -> bool:
    """True when a successful request met every given SLO (a value equal to the SLO meets it)."""
    if not r.success:
        return False
    measured = {"ttft": r.ttft, "tpot": r.tpot, "e2el": r.latency}
    return all(measured[name] <= ms / 1000.0 for name, ms in slos_ms.items())


def _peak_rates(ok: list[RequestOutput]) -> tuple[float, int]:
    """vLLM's max_output_tokens_per_s / max_concurrent_requests: peaks over 1 s buckets."""
    if not ok:
        return 0.0, 0
    t0 = min(r.start_time for r in ok)
    n = int(np.ceil(max(r.start_time + r.latency for r in ok) - t0)) + 1
    tokens = np.zeros(n)
    active = np.zeros(n)
    for r in ok:
        t = r.start_time + r.ttft
        for dt in [0.0, *r.itl]:
            t += dt
            b = int(t - t0)
            if 0 <= b < n:
                tokens[b] += 1
        for s in range(int(r.start_time - t0), int(r.start_time + r.latency - t0) + 1):
            active[s] += 1
    return float(tokens.max()), int(active.max())


def aggregate(outputs: Sequence[RequestOutput], duration: float, percentiles: Iterable[float],
              slos_ms: dict[str, float]) -> dict[str, Any]:
    """The scalar metrics over ``outputs`` (the whole run, or one tenant's share of it)."""
    pcts = list(percentiles)
    ok = [r for r in outputs if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    good = sum(meets_slos(r, slos_ms) for r in ok) if slos_ms else 0
    paths = Counter(r.path for r in ok if r.path)
    with_path = sum(paths.values())
    reported = [r for r in ok if r.cached_tokens is not None]
    cached, reported_in = sum(r.cached_tokens for r in reported), sum(r.prompt_len for r in reported)
    out: dict[str, Any] = {
        "num_prompts": len(outputs),
        "completed": len(ok),
        "failed": len(outputs) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "request_goodput": (good / duration if duration > 0 else 0.0) if slos_ms else None,
        "output_throughput": total_out / duration if duration > 0 else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration > 0 else 0.0,
        # pdserve: the goodput numerator, and the share of all sent requests that met the SLOs
        "good_requests": good if slos_ms else None,
        "slo_attainment": (good / len(outputs) if outputs else 0.0) if slos_ms else None,
        "status_counts": dict(sorted(Counter(str(r.status) if r.status else "no_response"
                                             for r in outputs).items())),
        "paths": dict(sorted(paths.items())),
        # Share of completed requests the router served by fallback; None for a server that
        # sends no x-pdserve-path (not pdserve).
        "fallback_fraction": paths.get("fallback", 0) / with_path if with_path else None,
        "fallback_causes": dict(sorted(Counter(r.fallback_cause for r in ok if r.fallback_cause).items())),
        # pdserve: prompt tokens served from the engines' prefix caches, over the completed
        # requests whose usage said (None when none did)
        "total_cached_tokens": cached if reported else None,
        "prefix_cache_hit_rate": cached / reported_in if reported and reported_in else None,
    }
    out.update(metric_stats("ttft", [r.ttft for r in ok], pcts))
    # As vLLM: TPOT statistics leave out single-token outputs; goodput counts them as met.
    out.update(metric_stats("tpot", [r.tpot for r in ok if r.output_tokens > 1], pcts))
    out.update(metric_stats("itl", [x for r in ok for x in r.itl], pcts))
    out.update(metric_stats("e2el", [r.latency for r in ok], pcts))
    return out


def compute_metrics(outputs: Sequence[RequestOutput], duration: float, percentiles: Iterable[float] = DEFAULT_PERCENTILES,
                    slos_ms: Optional[dict[str, float]] = None) -> dict[str, Any]:
    """Everything a run reports: scalars, per-request lists (vLLM names) and per-tenant splits."""
    slos_ms = slos_ms or {}
    pcts = list(percentiles)
    out: dict[str, Any] = {"duration": duration}
    out.update(aggregate(outputs, duration, pcts, slos_ms))
    ok = [r for r in outputs if r.success]
    out["max_output_tokens_per_s"], out["max_concurrent_requests"] = _peak_rates(ok)
    out.update({
        "input_lens": [r.prompt_len for r in outputs],
        "output_lens": [r.output_tokens if r.success else 0 for r in outputs],
        "ttfts": [r.ttft for r in outputs],
        "itls": [r.itl for r in outputs],
        "latencies": [r.latency for r in outputs],
        "start_times": [r.start_time for r in outputs],
        "errors": [r.error for r in outputs],
        "http_statuses": [r.status for r in outputs],
        "request_paths": [r.path for r in outputs],
        "request_tenants": [r.tenant for r in outputs],
        "cached_tokens": [r.cached_tokens for r in outputs],
        "error_samples": list(dict.fromkeys(r.error for r in outputs if r.error))[:_MAX_ERROR_SAMPLES],
        "goodput_slos_ms": dict(slos_ms),
    })
    turns = sorted({r.turn for r in outputs if r.turn is not None})
    if turns:
        out["request_sessions"] = [r.session for r in outputs]
        out["request_turns"] = [r.turn for r in outputs]
        out["per_turn"] = {str(t): _turn_summary([r for r in outputs if r.turn == t]) for t in turns}
    tenants = sorted({r.tenant for r in outputs if r.tenant is not None})
    if tenants:
        out["per_tenant"] = {t: aggregate([r for r in outputs if r.tenant == t], duration, pcts, slos_ms)
                             for t in tenants}
    return out


def _turn_summary(outputs: Sequence[RequestOutput]) -> dict[str, Any]:
    """One turn number's requests across sessions: how long their prompts had grown, how much
    of them the caches held, and their TTFT."""
    ok = [r for r in outputs if r.success]
    reported = [r for r in ok if r.cached_tokens is not None]
    prompt = sum(r.prompt_len for r in reported)
    return {"num_prompts": len(outputs), "completed": len(ok),
            "mean_prompt_tokens": float(np.mean([r.prompt_len for r in ok])) if ok else None,
            "prefix_cache_hit_rate": sum(r.cached_tokens for r in reported) / prompt if prompt else None,
            "median_ttft_ms": float(np.median([r.ttft for r in ok])) * 1000 if ok else None}
