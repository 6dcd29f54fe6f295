"""The router-capacity bench's load: client processes that send loadgen's streamed requests
in time-boxed levels (closed-loop slots or open-loop arrivals), and one level's figures from
their records.

The clients run in processes of their own (``ClientPool``), as many as ``--clients``, so that
the client is not what limits the router; bench/capacity_analysis.py's CpuProbe reports
their CPU to prove it.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from typing import Any, Optional

from pdserve.bench.loadgen import arrival_gaps, open_session, request_body, send_request
from pdserve.bench.stats import RequestOutput
from pdserve.bench.workloads import SampleRequest, numbered_prompts


def request_payloads(n: int, input_words: int, output_tokens: int, served_name: str = "tiny",
                     seed: int = 0) -> list[bytes]:
    """``n`` distinct streamed chat bodies, JSON-encoded once."""
    return [json.dumps(request_body("chat", served_name, SampleRequest(p, input_words, output_tokens))).encode()
            for p in numbered_prompts(n, input_words, seed)]


# ---------------------------------------------------------------------------------------------
# one client process's share of a level


async def _sleep_until(t: float) -> None:
    delay = t - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


class _Level:
    """The records of one level in one client process, and its count of requests in flight."""

    def __init__(self, session, url: str, t_origin: float) -> None:
        self.session, self.url, self.t_origin = session, url, t_origin
        self.records: list[RequestOutput] = []
        self.inflight = 0
        self.samples: list[int] = []
        self.dropped = 0

    async def send(self, payload: bytes) -> None:
        self.inflight += 1
        try:
            self.records.append(await send_request(self.session, self.url, payload, t_origin=self.t_origin))
        finally:
            self.inflight -= 1

    async def sample_inflight(self, ws: float, we: float, every: float = 0.05) -> None:
        await _sleep_until(ws)
        while time.perf_counter() < we:
            self.samples.append(self.inflight)
            await asyncio.sleep(every)


async def run_level(cmd: dict[str, Any], url: str, payloads: list[bytes]) -> dict[str, Any]:
    """One level as ``cmd`` says: from t_start (a time.perf_counter() reading), warm-up then the
    measured window, then up to drain_s for what is still in flight (the rest is cancelled)."""
    t0 = cmd["t_start"]
    ws = t0 + cmd["warmup_s"]
    we = ws + cmd["duration_s"]
    tasks: set[asyncio.Task] = set()
    async with open_session(read_timeout_s=cmd["read_timeout_s"]) as session:
        level = _Level(session, url, t0)
        await _sleep_until(t0)
        sampler = asyncio.create_task(level.sample_inflight(ws, we))
        if cmd["kind"] == "closed":
            async def stream_slot(slot: int) -> None:
                i = slot
                while time.perf_counter() < we:
                    await level.send(payloads[i % len(payloads)])
                    i += cmd["concurrency"]

            tasks = {asyncio.create_task(stream_slot(s + cmd["slot_offset"])) for s in range(cmd["concurrency"])}
        elif cmd["rate"] > 0:
            i = 0
            nxt = t0
            for gap in arrival_gaps(cmd["rate"], 1.0, cmd["seed"]):  # Poisson
                nxt += gap
                if nxt >= we:
                    break
                await _sleep_until(nxt)
                if level.inflight >= cmd["max_inflight"]:
                    if nxt >= ws:
                        level.dropped += 1
                    continue
                t = asyncio.create_task(level.send(payloads[(i + cmd["slot_offset"]) % len(payloads)]))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                i += 1
        await _sleep_until(we)
        pending = set(tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=cmd["drain_s"])
        unfinished = level.inflight
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    return {"records": level.records, "inflight_samples": level.samples, "dropped": level.dropped,
            "unfinished": unfinished}


def _client_worker(index: int, url: str, payloads: list[bytes], cmd_q, res_q) -> None:
    """A client process: runs each level it is sent, sends back its records."""
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # pragma: no cover
        run = asyncio.run
    import aiohttp  # noqa: F401 - import before saying ready

    res_q.put(("ready", index, os.getpid()))
    while True:
        cmd = cmd_q.get()
        if cmd is None:
            return
        try:
            res_q.put(("result", index, run(run_level(cmd, url, payloads))))
        except Exception as e:  # noqa: BLE001 - reported to the driver
            res_q.put(("failed", index, f"{type(e).__name__}: {e}"))


class ClientPool:
    """Load-client processes (multiprocessing, spawn), kept across levels."""

    def __init__(self, n: int, url: str, payloads: list[bytes], start_timeout_s: float = 120.0) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.cmd_qs = [ctx.Queue() for _ in range(n)]
        self.res_q = ctx.Queue()
        self.procs = [ctx.Process(target=_client_worker, args=(i, url, payloads, self.cmd_qs[i], self.res_q),
                                  name=f"router-capacity-client-{i}", daemon=True) for i in range(n)]
        for p in self.procs:
            p.start()
        self.pids: list[int] = []
        deadline = time.monotonic() + start_timeout_s
        while len(self.pids) < n:
            msg = self.res_q.get(timeout=max(1.0, deadline - time.monotonic()))
            if msg[0] == "ready":
                self.pids.append(msg[2])

    def submit(self, cmds: list[dict[str, Any]]) -> None:
        """One command per client process (they start at the command's t_start)."""
        for q, cmd in zip(self.cmd_qs, cmds):
            q.put(cmd)

    def collect(self, timeout_s: float) -> list[dict[str, Any]]:
        results: list[Optional[dict[str, Any]]] = [None] * len(self.procs)
        deadline = time.monotonic() + timeout_s
        got = 0
        while got < len(results):
            kind, i, payload = self.res_q.get(timeout=max(1.0, deadline - time.monotonic()))
            if kind == "failed":
                raise RuntimeError(f"load client {i} failed: {payload}")
            if kind == "result":
                results[i] = payload
                got += 1
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for q in self.cmd_qs:
            try:
                q.put(None)
            except Exception:  # noqa: BLE001
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()  # only our own client processes
                p.join(timeout=5)


# ---------------------------------------------------------------------------------------------
# a level's figures


def _pct(values, q: float) -> Optional[float]:
    import numpy as np

    return float(np.percentile(values, q)) if len(values) else None


def summarize_level(results: list[dict[str, Any]], ws: float, we: float) -> dict[str, Any]:
    """One level's figures from all clients' records; the window [ws, we] in seconds from the
    level's t_start. A request counts as completed in the window when its last token came in it;
    its TTFT, ITL and E2E count when it was sent in it."""
    import numpy as np

    records = [r for res in results for r in res["records"]]
    starts = np.array([r.start_time for r in records], dtype=float)
    oks = np.array([r.success for r in records], dtype=bool)
    ends = starts + np.array([r.latency for r in records], dtype=float)
    ttfts = np.array([r.ttft for r in records], dtype=float)
    ntoks = np.array([r.output_tokens for r in records], dtype=float)
    window = we - ws
    done = oks & (ends >= ws) & (ends <= we)
    issued = (starts >= ws) & (starts < we)
    lat = issued & oks
    # ITL here is the gap between reads that carry tokens: loadgen gives the tokens that share a read an ITL of 0
    itls = np.array([x for r, keep in zip(records, lat) if keep for x in r.itl if x > 0], dtype=float)
    failed = issued & ~oks
    statuses = Counter(r.status for r in records)
    errors = [r.error for r in records if r.error][:5]
    samples = [res["inflight_samples"] for res in results]
    # concurrent streams: the sum over clients of their sampled in-flight counts
    n = min((len(s) for s in samples if s), default=0)
    streams = [sum(s[i] for s in samples if len(s) > i) for i in range(n)]
    out = {
        "window_s": window,
        "completed": int(done.sum()),
        "rps": float(done.sum() / window),
        "tokens_per_s": float(ntoks[done].sum() / window),
        "streams_mean": float(np.mean(streams)) if streams else 0.0,
        "streams_max": int(max(streams)) if streams else 0,
        "issued": int(issued.sum()),
        "failed": int(failed.sum()),
        "error_rate": float(failed.sum() / issued.sum()) if issued.sum() else 0.0,
        "dropped_by_client": int(sum(res["dropped"] for res in results)),
        "unfinished": int(sum(res["unfinished"] for res in results)),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "error_samples": errors,
        "mean_output_tokens": float(ntoks[lat].mean()) if lat.any() else None,
    }
    for name, vals in (("ttft", ttfts[lat]), ("itl", itls), ("e2e", (ends - starts)[lat])):
        for q in (50, 99):
            v = _pct(vals, q)
            out[f"{name}_p{q}_ms"] = None if v is None else v * 1000.0
    return out
