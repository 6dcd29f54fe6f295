"""The load generator: arrivals, streamed OpenAI requests, one run per request rate."""
from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Optional

import aiohttp
import httpx
import numpy as np

from pdserve.bench.stats import DEFAULT_PERCENTILES, RequestOutput, compute_metrics
from pdserve.bench.workloads import SampleRequest

ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
# vLLM's backend names for the same two endpoints
BACKENDS = {"chat": "openai-chat", "completions": "openai"}


class ServerUnreachable(RuntimeError):
    pass


@dataclass(frozen=True)
class LoadSpec:
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: Optional[int] = None


def interarrival_times(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Gaps between arrivals: gamma(shape=burstiness, mean=1/rate), as vLLM's bench serve draws
    them. burstiness 1 is a Poisson process; below 1 burstier, above 1 more regular."""
    if math.isinf(rate):
        return np.zeros(n)
    if math.isinf(burstiness):
        return np.full(n, 1.0 / rate)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


def arrival_offsets(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Send time of each request from the run's start, in seconds.

    As vLLM does, the cumulative gaps are rescaled so the last request goes out at n/rate:
    a raw gamma sum misses it by a few percent, which would move throughput between seeds.
    """
    offsets = np.cumsum(interarrival_times(n, rate, burstiness, np.random.default_rng(seed)))
    if n and offsets[-1] > 0:
        offsets *= (n / rate) / offsets[-1]
    return [float(x) for x in offsets]


def request_body(endpoint: str, model: str, req: SampleRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": req.output_len, "temperature": 0,
                            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    return body


def _auth(api_key: Optional[str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def send_request(client: aiohttp.ClientSession, base_url: str, endpoint: str, model: str, req: SampleRequest,
                       api_key: Optional[str], t_origin: float) -> RequestOutput:
    out = RequestOutput(prompt_len=req.prompt_len, tenant=req.tenant)
    st = time.perf_counter()
    out.start_time = st - t_origin
    last = st
    chunks = text_chunks = 0
    usage_tokens: Optional[int] = None
    try:
        # aiohttp, as vLLM's bench serve uses: httpx's streaming costs a few ms of client CPU per
        # request, which on a small machine showed up as TTFT.
        async with client.post(base_url + ENDPOINTS[endpoint], json=request_body(endpoint, model, req),
                               headers=_auth(req.api_key or api_key)) as r:
            out.status = r.status
            out.path = r.headers.get("x-pdserve-path")
            out.fallback_cause = r.headers.get("x-pdserve-fallback-cause")
            if r.status != 200:
                out.error = f"HTTP {r.status}: {(await r.read()).decode(errors='replace')[:300]}"
                return out
            async for raw in r.content:
                line = raw.decode("utf-8", errors="replace").strip()
                if not line.startswith("data:"):
                    continue  # blank separators and ": ping" comments
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if chunk.get("error"):  # an error event mid-stream (e.g. pdserve's resume-exhausted 503)
                    err = chunk["error"]
                    out.error = f"stream error: {err.get('message', err) if isinstance(err, dict) else err}"[:300]
                    return out
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                    if chunk["usage"].get("prompt_tokens") is not None:
                        out.prompt_len = chunk["usage"]["prompt_tokens"]
                choices = chunk.get("choices")
                if not choices:
                    continue
                # As vLLM's bench serve counts: every chunk with choices is a token event (vLLM
                # sends a chat stream's role chunk with the first token), so TTFT and ITL agree
                # with it; a token that decodes to no text yet (part of a UTF-8 character) still
                # arrived.
                if chunks == 0:
                    out.ttft = now - st
                else:
                    out.itl.append(now - last)
                chunks += 1
                last = now
                c = choices[0]
                if (c.get("delta", {}).get("content") if endpoint == "chat" else c.get("text")):
                    text_chunks += 1
        if chunks == 0:
            out.error = "the stream ended before any token"
            return out
        out.latency = last - st
        # without a usage chunk, count the chunks that carried text (not the role or finish chunk)
        out.output_tokens = usage_tokens if usage_tokens else text_chunks
        out.success = True
    except Exception as e:  # recorded, not raised: a benchmark counts failures
        out.error = f"{type(e).__name__}: {e}"[:300]
    return out


def discover_model(base_url: str, api_key: Optional[str] = None, timeout_s: float = 10.0) -> Optional[str]:
    """The first model id from GET /v1/models, or None if the server lists none; raises
    ServerUnreachable when nothing answers at ``base_url``."""
    try:
        r = httpx.get(base_url + "/v1/models", headers=_auth(api_key), timeout=timeout_s)
    except httpx.HTTPError as e:
        raise ServerUnreachable(f"cannot reach {base_url}: {type(e).__name__}: {e}") from None
    if r.status_code != 200:
        return None
    try:
        data = r.json().get("data") or []
        return data[0]["id"] if data else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


async def _run_load(base_url: str, endpoint: str, model: str, requests: list[SampleRequest], load: LoadSpec,
                    seed: int, api_key: Optional[str], timeout_s: float, progress: Optional[str]
                    ) -> tuple[list[RequestOutput], float]:
    from tqdm import tqdm

    offsets = arrival_offsets(len(requests), load.request_rate, load.burstiness, seed)
    sem = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None
    bar = tqdm(total=len(requests), desc=progress, disable=progress is None, unit="req", leave=False)

    async def one(req: SampleRequest) -> RequestOutput:
        if sem is None:
            res = await send_request(client, base_url, endpoint, model, req, api_key, t0)
        else:
            async with sem:
                res = await send_request(client, base_url, endpoint, model, req, api_key, t0)
        bar.update(1)
        return res

    timeout = aiohttp.ClientTimeout(total=timeout_s, connect=10.0)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, read_bufsize=1 << 20) as client:
        t0 = time.perf_counter()
        tasks = []
        for req, at in zip(requests, offsets):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(req)))
        outputs = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    bar.close()
    return list(outputs), duration


def warm_up(base_url: str, endpoint: str, model: str, requests: list[SampleRequest], api_key: Optional[str] = None,
            timeout_s: float = 600.0) -> None:
    """Send ``requests`` all at once and wait for them; nothing is measured."""
    if requests:
        asyncio.run(_run_load(base_url, endpoint, model, requests, LoadSpec(), 0, api_key, timeout_s, None))


def run_benchmark(base_url: str, endpoint: str, model: str, requests: list[SampleRequest], load: LoadSpec, *,
                  seed: int = 0, percentiles: Iterable[float] = DEFAULT_PERCENTILES,
                  slos_ms: Optional[dict[str, float]] = None, api_key: Optional[str] = None,
                  timeout_s: float = 600.0, progress: bool = True) -> dict[str, Any]:
    """One run at one load; returns the vLLM-named result dict."""
    desc = f"rate {load.request_rate:g}" + (f" conc {load.max_concurrency}" if load.max_concurrency else "")
    outputs, duration = asyncio.run(_run_load(base_url.rstrip("/"), endpoint, model, requests, load, seed, api_key,
                                              timeout_s, desc if progress else None))
    result: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "endpoint_type": BACKENDS[endpoint],
        "backend": BACKENDS[endpoint],
        "model_id": model,
        "base_url": base_url,
        "request_rate": load.request_rate if math.isfinite(load.request_rate) else "inf",
        "burstiness": load.burstiness,
        "max_concurrency": load.max_concurrency,
        "seed": seed,
    }
    result.update(compute_metrics(outputs, duration, percentiles, slos_ms))
    return result
