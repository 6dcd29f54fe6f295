"""The load client of every benchmark: streamed OpenAI requests over aiohttp, one record each
(bench/stats.py's RequestOutput), sent at open-loop arrival times or with a concurrency cap.

``pdserve bench`` and ``pdserve ab`` (bench/bench_cli.py), ``make bench`` (bench/pd_vs_mono.py)
and the chaos bench (bench/chaos_fallback.py) run a list of requests with ``run_load``; the
router-capacity bench's client processes (bench/capacity_load.py) send one request at a time
with ``send_request`` in their own time-boxed loops.
"""
from __future__ import annotations

import asyncio
import json
import math
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Iterator, Mapping, Optional

import aiohttp
import numpy as np

from pdserve.bench.stats import DEFAULT_PERCENTILES, RequestOutput, compute_metrics
from pdserve.bench.workloads import SampleRequest

ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
# vLLM's backend names for the same two endpoints
BACKENDS = {"chat": "openai-chat", "completions": "openai"}
JSON_HEADERS = {"Content-Type": "application/json"}


class ServerUnreachable(RuntimeError):
    pass


@dataclass(frozen=True)
class LoadSpec:
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: Optional[int] = None


# ---------------------------------------------------------------------------------------------
# arrivals


def interarrival_times(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Gaps between arrivals: gamma(shape=burstiness, mean=1/rate), as vLLM's bench serve draws
    them. burstiness 1 is a Poisson process; below 1 burstier, above 1 more regular."""
    if math.isinf(rate):
        return np.zeros(n)
    if math.isinf(burstiness):
        return np.full(n, 1.0 / rate)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


def arrival_offsets(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Send time of each of ``n`` requests from the run's start, in seconds.

    As vLLM does, the cumulative gaps are rescaled so the last request goes out at n/rate:
    a raw gamma sum misses it by a few percent, which would move throughput between seeds.
    """
    offsets = np.cumsum(interarrival_times(n, rate, burstiness, np.random.default_rng(seed)))
    if n and offsets[-1] > 0:
        offsets *= (n / rate) / offsets[-1]
    return [float(x) for x in offsets]


def arrival_gaps(rate: float, burstiness: float, seed: int, batch: int = 1024) -> Iterator[float]:
    """Endless gaps between arrivals (for a load that runs until a deadline, not a count)."""
    rng = np.random.default_rng(seed)
    while True:
        yield from (float(x) for x in interarrival_times(batch, rate, burstiness, rng))


# ---------------------------------------------------------------------------------------------
# one request


def request_body(endpoint: str, model: str, req: SampleRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": req.output_len, "temperature": 0,
                            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    return body


def request_headers(api_key: Optional[str] = None) -> dict[str, str]:
    return dict(JSON_HEADERS, **_auth(api_key))


def _auth(api_key: Optional[str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


# Markers in the compact JSON that vLLM and pdserve write. When every data line of a read is a
# chunk with choices or the [DONE], the read is tallied by counting bytes: parsing each chunk's
# JSON would cost the client ~3 us a token, which the router-capacity bench's client cannot
# spare. Any other line breaks the count: a usage or error chunk is then cut out and parsed and
# the lines around it counted; anything else (other JSON spacing) goes line by line. Generated
# text cannot fake a marker: JSON strings escape quotes and newlines, data lines are counted by
# the newline before them, and [DONE] only where it ends the read. (A usage
# block inside token chunks, as vLLM's continuous_usage_stats adds, is read from the final
# usage chunk.)
_CHOICES = b'"choices":[{'
_DATA = b"data:"
_DATA_LINE = b"\n" + _DATA
_DONE = b"[DONE]"
_DONE_LINE = _DATA + b" " + _DONE
_TEXT = {True: (b'"content":"', b'"content":""'), False: (b'"text":"', b'"text":""')}  # chat?: text, empty


class SSETally:
    """What one SSE stream has carried so far, fed complete lines. With ``keep_text`` every
    line is parsed and the generated text kept (``text``), for a client that resends it."""

    __slots__ = ("chat", "_text", "_no_text", "events", "texts", "done", "completion_tokens", "prompt_tokens",
                 "cached_tokens", "error", "keep_text", "pieces")

    def __init__(self, chat: bool = True, keep_text: bool = False) -> None:
        self.chat = chat  # a chat stream (text in delta.content), else completions (text in text)
        self.keep_text = keep_text
        self.pieces: list[str] = []
        self._text, self._no_text = _TEXT[chat]
        self.events = 0  # chunks with choices: token events, as vLLM's bench serve counts them
        self.texts = 0  # of those, the chunks whose content (chat) or text (completions) is not empty
        self.done = False  # data: [DONE] came
        self.completion_tokens: Optional[int] = None  # from a usage chunk
        self.prompt_tokens: Optional[int] = None
        self.cached_tokens: Optional[int] = None  # usage.prompt_tokens_details.cached_tokens
        self.error: Optional[str] = None  # an error event (e.g. pdserve's resume-exhausted 503)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def feed(self, lines: bytes) -> int:
        """Tally ``lines`` (ending at a line end); returns how many token events they carried."""
        before = self.events
        if self.keep_text:
            for line in lines.splitlines():
                self._line(line)
            return self.events - before
        while lines and not self.ended and self._counted(lines) is None:
            odd = min((i for i in (lines.find(b'"usage"'), lines.find(b'"error"')) if i >= 0), default=-1)
            if odd < 0:  # other JSON spacing, an unknown line: line by line
                for line in lines.splitlines():
                    self._line(line)
                break
            # most often the usage chunk, in a read with token chunks: count those in bulk
            start, end = lines.rfind(b"\n", 0, odd) + 1, lines.find(b"\n", odd) + 1 or len(lines)
            if self._counted(lines[:start]) is None:
                for line in lines[:start].splitlines():
                    self._line(line)
            self._line(lines[start:end])
            lines = lines[end:]
        return self.events - before

    @property
    def ended(self) -> bool:
        return self.done or self.error is not None

    def _line(self, line: bytes) -> None:
        line = line.strip()
        if line.startswith(_DATA) and not self.ended and (self.keep_text or self._counted(line) is None):
            self._parse(line[5:].strip())

    def _counted(self, lines: bytes) -> Optional[int]:
        """If ``lines`` hold token chunks and [DONE] only, tally them by counting bytes and return
        their token events; else None."""
        events = lines.count(_CHOICES)
        done = lines[-32:].rstrip().endswith(_DONE_LINE)  # it ends a stream; one elsewhere breaks the count
        if lines.count(_DATA_LINE) + lines.startswith(_DATA) != events + done:
            return None
        self.events += events
        self.texts += lines.count(self._text) - lines.count(self._no_text)
        if done:
            self.done = True
        return events

    def _parse(self, data: bytes) -> None:
        """Tally one data line's payload by parsing its JSON."""
        if data == _DONE:
            self.done = True
            return
        chunk = json.loads(data)
        if chunk.get("error"):
            err = chunk["error"]
            self.error = str(err.get("message", err) if isinstance(err, dict) else err)
            return
        usage = chunk.get("usage")
        if usage:
            self.completion_tokens = usage.get("completion_tokens", self.completion_tokens)
            self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens)
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            self.cached_tokens = cached if isinstance(cached, int) else self.cached_tokens
        choices = chunk.get("choices")
        if choices:
            self.events += 1
            c = choices[0]
            piece = (c.get("delta") or {}).get("content") if self.chat else c.get("text")
            if piece:
                self.texts += 1
                if self.keep_text:
                    self.pieces.append(piece)


async def send_request(session: aiohttp.ClientSession, url: str, body: bytes, *,
                       headers: Mapping[str, str] = JSON_HEADERS, t_origin: float = 0.0, prompt_len: int = 0,
                       tenant: Optional[str] = None, keep_text: bool = False) -> RequestOutput:
    """POST one streamed chat or completions request (``body``: its JSON) and time it.

    As vLLM's bench serve counts: every chunk with choices is a token event (vLLM sends a chat
    stream's role chunk with the first token), so TTFT and ITL agree with it; a token that
    decodes to no text yet (part of a UTF-8 character) still arrived. Events that come in one
    read share its arrival time: the ITLs after the first in a read are 0. The output length is
    usage.completion_tokens, or without a usage chunk the chunks that carried text; the prompt
    tokens found cached, usage.prompt_tokens_details.cached_tokens. ``keep_text`` parses every
    chunk and keeps the answer in ``generated_text``. A request
    succeeds when it streamed at least one token event and ended with data: [DONE]. Failures are
    recorded (status, error), never raised. ``start_time`` is seconds since ``t_origin``
    (a time.perf_counter() reading, the same clock in every process on Linux)."""
    out = RequestOutput(prompt_len=prompt_len, tenant=tenant)
    st = time.perf_counter()
    out.start_time = st - t_origin
    last = st
    tally = SSETally(chat=url.endswith(ENDPOINTS["chat"]), keep_text=keep_text)

    def timed(events: int, now: float) -> None:
        nonlocal last
        if tally.events == events:
            out.ttft = now - st
        else:
            out.itl.append(now - last)
        if events > 1:
            out.itl.extend([0.0] * (events - 1))
        last = now

    try:
        async with session.post(url, data=body, headers=headers) as r:
            out.status = r.status
            out.path = r.headers.get("x-pdserve-path")
            out.fallback_cause = r.headers.get("x-pdserve-fallback-cause")
            if r.status != 200:
                out.error = f"HTTP {r.status}: {(await r.read()).decode(errors='replace')[:300]}"
                return out
            buf = b""
            async for data in r.content.iter_any():
                if tally.done:
                    continue  # read to the end, so the connection can carry the next request
                now = time.perf_counter()
                buf += data
                cut = buf.rfind(b"\n") + 1
                if cut:
                    events = tally.feed(buf[:cut])
                    buf = buf[cut:]
                    if events:
                        timed(events, now)
                    if tally.error is not None:
                        break
            if buf.strip() and not tally.done and tally.error is None:  # a last line without its line end
                events = tally.feed(buf)
                if events:
                    timed(events, time.perf_counter())
        if tally.prompt_tokens is not None:
            out.prompt_len = tally.prompt_tokens
        out.cached_tokens = tally.cached_tokens
        out.generated_text = tally.text
        if tally.error is not None:
            out.error = f"stream error: {tally.error}"[:300]
        elif tally.events == 0:
            out.error = "the stream ended before any token"
        elif not tally.done:
            out.error = "the stream ended before data: [DONE]"
        else:
            out.latency = last - st
            out.output_tokens = tally.completion_tokens or tally.texts
            out.success = True
    except Exception as e:  # recorded, not raised: a benchmark counts failures
        out.error = f"{type(e).__name__}: {e}"[:300]
    return out


def open_session(timeout_s: Optional[float] = None, read_timeout_s: Optional[float] = None) -> aiohttp.ClientSession:
    """A session for load: no connection limit (the load sets how many are open), connections
    kept alive, 10 s to connect, ``timeout_s`` per request and ``read_timeout_s`` between reads.

    aiohttp, as vLLM's bench serve uses: httpx's streaming costs a few ms of client CPU per
    request, which on a small machine showed up as TTFT."""
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=10.0,
                                                               sock_read=read_timeout_s),
                                 connector=aiohttp.TCPConnector(limit=0), read_bufsize=1 << 20)


def discover_model(base_url: str, api_key: Optional[str] = None, timeout_s: float = 10.0) -> Optional[str]:
    """The first model id from GET /v1/models, or None if the server lists none; raises
    ServerUnreachable when nothing answers at ``base_url``."""
    req = urllib.request.Request(base_url + "/v1/models", headers=_auth(api_key))
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            data = json.loads(r.read()).get("data") or []
        return data[0]["id"] if data else None
    except urllib.error.HTTPError:  # it answered, with an error status
        return None
    except (urllib.error.URLError, OSError) as e:
        raise ServerUnreachable(f"cannot reach {base_url}: {type(e).__name__}: {e}") from None
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        return None


# ---------------------------------------------------------------------------------------------
# a list of requests at a load


async def run_load(base_url: str, endpoint: str, model: str, requests: list[SampleRequest], load: LoadSpec, *,
                   seed: int = 0, api_key: Optional[str] = None, timeout_s: float = 600.0,
                   progress: Optional[str] = None, t_origin: Optional[float] = None
                   ) -> tuple[list[RequestOutput], float]:
    """Send ``requests`` at ``load``'s arrival times (at most ``max_concurrency`` in flight);
    their records in order, and the run's duration. Arrivals count from ``t_origin`` (default:
    now); ``progress`` labels a progress bar."""
    url = base_url.rstrip("/") + ENDPOINTS[endpoint]
    bodies = [json.dumps(request_body(endpoint, model, req)).encode() for req in requests]
    offsets = arrival_offsets(len(requests), load.request_rate, load.burstiness, seed)
    sem = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None
    bar = None
    if progress is not None:
        from tqdm import tqdm

        bar = tqdm(total=len(requests), desc=progress, unit="req", leave=False)

    async def one(req: SampleRequest, body: bytes) -> RequestOutput:
        kw = dict(headers=request_headers(req.api_key or api_key), t_origin=t0, prompt_len=req.prompt_len,
                  tenant=req.tenant)
        if sem is None:
            res = await send_request(session, url, body, **kw)
        else:
            async with sem:
                res = await send_request(session, url, body, **kw)
        if bar is not None:
            bar.update(1)
        return res

    async with open_session(timeout_s=timeout_s) as session:
        t0 = time.perf_counter() if t_origin is None else t_origin
        tasks = []
        for req, body, at in zip(requests, bodies, offsets):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(req, body)))
        outputs = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    return list(outputs), duration


def warm_up(base_url: str, endpoint: str, model: str, requests: list[SampleRequest], api_key: Optional[str] = None,
            timeout_s: float = 600.0) -> None:
    """Send ``requests`` all at once and wait for them; nothing is measured."""
    if requests:
        asyncio.run(run_load(base_url, endpoint, model, requests, LoadSpec(), api_key=api_key, timeout_s=timeout_s))


def run_benchmark(base_url: str, endpoint: str, model: str, requests: list[SampleRequest], load: LoadSpec, *,
                  seed: int = 0, percentiles: Iterable[float] = DEFAULT_PERCENTILES,
                  slos_ms: Optional[dict[str, float]] = None, api_key: Optional[str] = None,
                  timeout_s: float = 600.0, progress: bool = True) -> dict[str, Any]:
    """One run at one load; returns the vLLM-named result dict."""
    desc = f"rate {load.request_rate:g}" + (f" conc {load.max_concurrency}" if load.max_concurrency else "")
    outputs, duration = asyncio.run(run_load(base_url, endpoint, model, requests, load, seed=seed, api_key=api_key,
                                             timeout_s=timeout_s, progress=desc if progress else None))
    result = result_head(base_url, endpoint, model, load.request_rate, load, seed)
    result.update(compute_metrics(outputs, duration, percentiles, slos_ms))
    return result


def result_head(base_url: str, endpoint: str, model: str, request_rate: float, load: LoadSpec,
                seed: int) -> dict[str, Any]:
    """The fields of a result that say what was run, with vLLM's names."""
    return {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "endpoint_type": BACKENDS[endpoint],
        "backend": BACKENDS[endpoint],
        "model_id": model,
        "base_url": base_url,
        "request_rate": request_rate if math.isfinite(request_rate) else "inf",
        "burstiness": load.burstiness,
        "max_concurrency": load.max_concurrency,
        "seed": seed,
    }
