"""A small open-loop load client for OpenAI-compatible servers, and latency maths."""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import httpx


@dataclass
class RequestResult:
    ok: bool
    status: int
    ttft: Optional[float] = None
    e2e: Optional[float] = None
    output_tokens: int = 0
    itls: list[float] = field(default_factory=list)
    path: Optional[str] = None
    fallback_cause: Optional[str] = None
    started_at: float = 0.0  # time.perf_counter() when the request was sent
    error: Optional[str] = None

    def record_tokens(self, t0: float, n: int = 1) -> None:
        """Note ``n`` output tokens arriving now, for a request sent at ``t0``."""
        now = time.perf_counter()
        if self.ttft is None:
            self.ttft = now - t0
        else:
            self.itls.append(now - (t0 + self.e2e))
        self.e2e = now - t0
        self.output_tokens += n

    @property
    def tpot(self) -> Optional[float]:
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(results: list[RequestResult]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out: dict[str, Any] = {"completed": len(ok), "failed": len(results) - len(ok)}
    for name, vals in (("ttft", [r.ttft for r in ok if r.ttft is not None]),
                       ("tpot", [r.tpot for r in ok if r.tpot is not None]),
                       ("e2e", [r.e2e for r in ok if r.e2e is not None])):
        for q in (50, 95):
            out[f"p{q}_{name}_ms"] = percentile(vals, q) * 1000 if vals else float("nan")
        out[f"mean_{name}_ms"] = sum(vals) / len(vals) * 1000 if vals else float("nan")
    paths: dict[str, int] = {}
    for r in ok:
        paths[r.path or "?"] = paths.get(r.path or "?", 0) + 1
    out["paths"] = paths
    return out


async def stream_one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> RequestResult:
    t0 = time.perf_counter()
    res = RequestResult(ok=False, status=0, started_at=t0)
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=dict(body, stream=True)) as r:
            res.status = r.status_code
            res.path = r.headers.get("x-pdserve-path")
            res.fallback_cause = r.headers.get("x-pdserve-fallback-cause")
            if r.status_code != 200:
                res.error = (await r.aread()).decode()[:200]
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if not chunk.get("choices"):
                    continue
                if chunk["choices"][0].get("delta", {}).get("content"):
                    res.record_tokens(t0)
        res.ok = res.ttft is not None
    except Exception as e:  # recorded, not raised: a benchmark counts failures
        res.error = repr(e)
    return res


async def run_poisson(url: str, bodies: list[dict[str, Any]], rate: float, seed: int = 0) -> list[RequestResult]:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        tasks = []
        for body in bodies:
            tasks.append(asyncio.create_task(stream_one(client, url, body)))
            await asyncio.sleep(rng.expovariate(rate))
        return await asyncio.gather(*tasks)
