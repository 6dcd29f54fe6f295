"""Router capacity: how many streamed chat requests per second, and how many concurrent streams,
ONE router replica sustains before its own overhead (not the engines) sets the limit.

The engine pools are replaced by ``InstantStubEngine`` (bench/stub_engine.py), a STUB that
runs no model and answers at once with vLLM-format SSE chunks. The router is the real one
(router/app.py's RouterServer, unchanged, deployed with the same options as cluster/builder.py
gives it), so every cost it has in production is in the figures: HTTP via uvicorn, request
checks and chat-template tokenizing, admission, replica selection, the Ray handle calls, the
load polls, parsing every chunk for mid-stream resume, metrics. The P/D mode runs both legs
(prefill json leg, then the decode stream with its KV report) through stub prefill and decode
pools. The load clients run in separate processes and parse almost nothing (they count token
events in raw bytes), so that they are not the bottleneck; their CPU is reported to prove it.

It sweeps closed-loop concurrency (each level: warm-up, then a fixed measurement window),
then open-loop Poisson rates (by default fractions of the closed-loop capacity), and prints
per level: requests/s completed, tokens/s streamed, concurrent streams, TTFT and ITL p50/p99
as the client sees them, and the CPU of the router replica process, the stubs, the clients
and the whole machine. Then where it saturates, the limiting resource, and the router's
capacity against the engine pools' own (``--engine-capacity-rps``, measured on real engines)
with the goal "at least 10x".

    python -m pdserve.bench.router_capacity --engine-capacity-rps 4.0 --json-out router_capacity.json
    python -m pdserve.bench.router_capacity --mode pd --engine-capacity-rps 4.0 --json-out rc-pd.json

It starts its own local Ray instance (``ray.init(address="local")``) unless given
``--ray-address``, and a router on ``--port`` (default 8471). It needs the machine to itself:
anything else running takes CPU from the router and lowers the figures (it warns when the
machine is busy before it starts).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import sys
import time
from array import array
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from pdserve.bench.stub_engine import STUB_LABEL, STUB_NAME, InstantStubEngine, InstantStubReplica, StubSettings

__all__ = ["InstantStubEngine", "StubSettings", "stub_cluster_config", "build_stub_app", "analyze_closed_loop",
           "analyze_open_loop", "limiting_resource", "main"]

DEFAULT_CONCURRENCY = (1, 8, 32, 64, 128, 256)
DEFAULT_RATE_FRACTIONS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.2)
GOAL_RATIO = 10.0
APP_NAME = "router-capacity-stub"
_VOCAB = ("prefill decode cache block transfer engine router replica request latency throughput goodput stream "
          "queue budget tenant priority cluster fallback link token model memory compute network").split()


# ============================================================================================
# the stub cluster


def stub_cluster_config(mode: str = "monolithic", *, port: int = 8471, host: str = "127.0.0.1",
                        stub_replicas: int = 2, stub_max_ongoing: int = 10_000,
                        admission_max_inflight: int = 1_000_000, name: str = "router-capacity",
                        token_stream: str = "direct"):
    """A ClusterConfig that validates like a real one, for stub pools.

    device "cpu" requires a core set per replica, disjoint across pools: the stubs get labels
    "0", "1", ... to satisfy the validator, and pin nothing (InstantStubEngine never reads
    them). Admission's concurrency cap is lifted (its code still runs on every request), so
    the queueing it would add at the default cap (decode replicas x max_num_seqs) does not
    pass for router overhead; the stubs accept far more ongoing calls than the sweep sends.
    """
    from pdserve.settings.cluster import ClusterConfig

    def pool(first_core: int) -> dict[str, Any]:
        return {"replicas": stub_replicas, "cpu_cores": [str(first_core + i) for i in range(stub_replicas)],
                "max_ongoing_requests": stub_max_ongoing}

    data: dict[str, Any] = {
        "name": name, "mode": mode, "device": "cpu",
        "model": {"path": "builtin:tiny", "served_name": "tiny", "load_format": "dummy"},
        "router": {"host": host, "port": port, "token_stream": token_stream},
        "admission": {"max_inflight": admission_max_inflight},
    }
    if mode == "monolithic":
        data["monolithic"] = pool(0)
    elif mode == "pd":
        data["prefill"] = pool(0)
        data["decode"] = pool(stub_replicas)
    else:
        raise ValueError(f"mode must be 'monolithic' or 'pd', not {mode!r}")
    return ClusterConfig.model_validate(data)


def build_stub_app(cfg, settings: StubSettings = StubSettings()):
    """The router app (RouterServer, unchanged) bound to InstantStubEngine pools."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from pdserve.router.app import RouterServer
    from pdserve.router.targeting import TargetedRequestRouter

    config_dict = cfg.model_dump(mode="json")
    engines = {}
    for name, pool in cfg.pools().items():
        engines[name] = serve.deployment(
            InstantStubReplica,
            name=name,  # the pool names: the router's POOL_VIEWS and pool-size polls key on them
            num_replicas=pool.replicas,
            max_ongoing_requests=pool.max_ongoing_requests,
            ray_actor_options={"num_cpus": 0},
            request_router_config=RequestRouterConfig(request_router_class=TargetedRequestRouter),
            health_check_period_s=10,
            health_check_timeout_s=30,
            graceful_shutdown_timeout_s=5,
        ).bind(name, settings.to_dict())
    from pdserve.bench.cluster_runtime import runtime

    return serve.deployment(RouterServer, **runtime().router_deployment_options(cfg)).bind(config_dict, **engines)


def _getpid(_actor) -> int:
    return os.getpid()


def find_replica_pids(app: str, deployment: str) -> list[int]:
    """Pids of the Ray Serve replica processes of ``app``/``deployment``: asked of the replica
    actors themselves (named ``SERVE_REPLICA::<app>#<deployment>#<id>`` in namespace "serve"),
    or else found by process title (``ray::ServeReplica:<app>:<deployment>``)."""
    try:
        import ray

        prefix = f"SERVE_REPLICA::{app}#{deployment}#"
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a.get("namespace") == "serve" and a["name"].startswith(prefix)]
        pids = [ray.get(ray.get_actor(n, namespace="serve").__ray_call__.remote(_getpid), timeout=10) for n in names]
        if pids:
            return sorted(pids)
    except Exception:  # noqa: BLE001 - fall back to process titles
        pass
    return find_replica_pids_by_title(app, deployment)


def find_replica_pids_by_title(app: str, deployment: str) -> list[int]:
    import psutil

    pattern = re.compile(re.escape(f"ServeReplica:{app}:{deployment}") + r"(?![\w-])")
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info.get("cmdline") or [])
        except Exception:  # noqa: BLE001 - processes come and go
            continue
        if pattern.search(cmd):
            out.append(p.info["pid"])
    return sorted(out)


# ============================================================================================
# the load client (runs in its own processes)


def request_payloads(n: int, input_words: int, output_tokens: int, served_name: str = "tiny",
                     seed: int = 0) -> list[bytes]:
    """``n`` distinct streamed chat bodies, JSON-encoded once."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = f"Req {i}: " + " ".join(rng.choice(_VOCAB) for _ in range(input_words))
        body = {"model": served_name, "messages": [{"role": "user", "content": text}], "max_tokens": output_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        out.append(json.dumps(body).encode())
    return out


_TOKEN = b'"content":"'
_EMPTY = b'"content":""'
_DONE = b"data: [DONE]"
_ERROR = b'data: {"error"'
_HEADERS = {"Content-Type": "application/json"}


class _Recorder:
    """Per-request records of one client process, in flat arrays (cheap to ship back)."""

    def __init__(self) -> None:
        self.starts = array("d")
        self.ends = array("d")
        self.ttfts = array("d")
        self.ntoks = array("l")
        self.oks = array("b")
        self.itl_counts = array("l")
        self.itls = array("f")
        self.statuses: Counter = Counter()
        self.errors: list[str] = []
        self.inflight = 0
        self.samples = array("l")
        self.dropped = 0
        self.unfinished = 0

    def add(self, start, end, ttft, ntok, ok, status, itls, err) -> None:
        self.starts.append(start)
        self.ends.append(end)
        self.ttfts.append(ttft)
        self.ntoks.append(ntok)
        self.oks.append(1 if ok else 0)
        self.itl_counts.append(len(itls))
        self.itls.extend(itls)
        self.statuses[status] += 1
        if err is not None and len(self.errors) < 5:
            self.errors.append(err[:300])

    def result(self) -> dict[str, Any]:
        return {"starts": self.starts, "ends": self.ends, "ttfts": self.ttfts, "ntoks": self.ntoks, "oks": self.oks,
                "itl_counts": self.itl_counts, "itls": self.itls, "statuses": dict(self.statuses),
                "errors": self.errors, "inflight_samples": self.samples, "dropped": self.dropped,
                "unfinished": self.unfinished}


async def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def _stream_once(session, url: str, payload: bytes, rec: _Recorder) -> None:
    """One streamed request; tokens are counted in the raw bytes (no JSON parsing)."""
    t0 = time.monotonic()
    ttft = end = math.nan
    ntok = status = 0
    ok = False
    err: Optional[str] = None
    itls: list[float] = []
    rec.inflight += 1
    try:
        async with session.post(url, data=payload, headers=_HEADERS) as resp:
            status = resp.status
            if status != 200:
                err = f"HTTP {status}: {(await resp.read())[:200]!r}"
            else:
                buf = b""
                last = None
                done = False
                async for data in resp.content.iter_any():
                    buf += data
                    cut = buf.rfind(b"\n\n")
                    if cut < 0:
                        continue
                    part, buf = buf[:cut + 2], buf[cut + 2:]
                    n = part.count(_TOKEN) - part.count(_EMPTY)
                    if n > 0:
                        now = time.monotonic()
                        if last is None:
                            ttft = now - t0
                        else:
                            itls.append(now - last)
                        last = now
                        ntok += n
                    if _ERROR in part and err is None:
                        err = "error event in the stream: " + part[part.find(_ERROR):][:200].decode(errors="replace")
                    if not done and _DONE in part:
                        done = True
                        end = time.monotonic()
                # read on to the end of the body so the connection is kept for the next request
                if not done and err is None:
                    err = "the stream ended before data: [DONE]"
                ok = done and err is None and ntok > 0
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - recorded, not raised: a benchmark counts failures
        err = f"{type(e).__name__}: {e}"
    finally:
        rec.inflight -= 1
    rec.add(t0, end, ttft, ntok, ok, status, itls, err)


async def _sample_inflight(rec: _Recorder, ws: float, we: float, every: float = 0.05) -> None:
    await _sleep_until(ws)
    while time.monotonic() < we:
        rec.samples.append(rec.inflight)
        await asyncio.sleep(every)


async def _run_level(cmd: dict[str, Any], url: str, payloads: list[bytes]) -> dict[str, Any]:
    import aiohttp

    rec = _Recorder()
    t0 = cmd["t_start"]
    ws = t0 + cmd["warmup_s"]
    we = ws + cmd["duration_s"]
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=cmd["read_timeout_s"])
    tasks: set[asyncio.Task] = set()
    rng = random.Random(cmd["seed"])
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await _sleep_until(t0)
        sampler = asyncio.create_task(_sample_inflight(rec, ws, we))
        if cmd["kind"] == "closed":
            async def stream_slot(slot: int) -> None:
                i = slot
                while time.monotonic() < we:
                    await _stream_once(session, url, payloads[i % len(payloads)], rec)
                    i += cmd["concurrency"]

            tasks = {asyncio.create_task(stream_slot(s + cmd["slot_offset"])) for s in range(cmd["concurrency"])}
        elif cmd["rate"] > 0:
            i = 0
            nxt = t0
            while True:
                nxt += rng.expovariate(cmd["rate"])
                if nxt >= we:
                    break
                await _sleep_until(nxt)
                if rec.inflight >= cmd["max_inflight"]:
                    if nxt >= ws:
                        rec.dropped += 1
                    continue
                t = asyncio.create_task(_stream_once(session, url, payloads[(i + cmd["slot_offset"]) % len(payloads)],
                                                     rec))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                i += 1
        await _sleep_until(we)
        pending = set(tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=cmd["drain_s"])
        rec.unfinished = rec.inflight
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    return rec.result()


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
            res_q.put(("result", index, run(_run_level(cmd, url, payloads))))
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


# ============================================================================================
# CPU accounting (driver side)


def _thread_name(pid: int, tid: int) -> str:
    try:
        return Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    except OSError:
        return "?"


class CpuProbe:
    """CPU seconds of the router process (and its busiest threads), the stubs, the clients and
    the machine, between two snapshots."""

    def __init__(self, router_pids: list[int], stub_pids: dict[str, list[int]], client_pids: list[int]) -> None:
        import psutil

        self.psutil = psutil
        self.router_pids = router_pids
        self.stub_pids = stub_pids
        self.client_pids = client_pids
        self.ncores = psutil.cpu_count(logical=True) or os.cpu_count() or 1

    def _proc_time(self, pid: int) -> Optional[float]:
        try:
            t = self.psutil.Process(pid).cpu_times()
            return t.user + t.system
        except Exception:  # noqa: BLE001 - gone
            return None

    def snapshot(self) -> dict[str, Any]:
        threads: dict[int, float] = {}
        if len(self.router_pids) == 1:
            try:
                threads = {th.id: th.user_time + th.system_time
                           for th in self.psutil.Process(self.router_pids[0]).threads()}
            except Exception:  # noqa: BLE001
                threads = {}
        return {
            "t": time.monotonic(),
            "router": {pid: self._proc_time(pid) for pid in self.router_pids},
            "threads": threads,
            "stubs": {pool: {pid: self._proc_time(pid) for pid in pids} for pool, pids in self.stub_pids.items()},
            "clients": {pid: self._proc_time(pid) for pid in self.client_pids},
            "system": self.psutil.cpu_times(percpu=True),
        }

    def delta(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        wall = max(1e-9, b["t"] - a["t"])

        def pct(x: Optional[float], y: Optional[float]) -> Optional[float]:
            return None if x is None or y is None else 100.0 * (y - x) / wall

        def pcts(da: dict[int, Optional[float]], db: dict[int, Optional[float]]) -> list[float]:
            return [v for v in (pct(da.get(p), db.get(p)) for p in db) if v is not None]

        router = pcts(a["router"], b["router"])
        stubs = {pool: pcts(a["stubs"][pool], b["stubs"][pool]) for pool in b["stubs"]}
        clients = pcts(a["clients"], b["clients"])
        top = sorted(((pct(a["threads"].get(tid), t) or 0.0, tid) for tid, t in b["threads"].items()),
                     reverse=True)[:3]
        rpid = self.router_pids[0] if len(self.router_pids) == 1 else None
        busy = []
        for x, y in zip(a["system"], b["system"]):
            tot = sum(y) - sum(x)
            idle = (y.idle - x.idle) + (getattr(y, "iowait", 0.0) - getattr(x, "iowait", 0.0))
            busy.append(max(0.0, (tot - idle) / tot) if tot > 0 else 0.0)
        stub_all = [v for vs in stubs.values() for v in vs]
        machine_cores = sum(busy)
        known = (sum(router) + sum(stub_all) + sum(clients)) / 100.0
        return {
            "router_pct": sum(router) if router else None,
            "router_threads_pct": [{"thread": _thread_name(rpid, tid) if rpid else "?", "pct": round(v, 1)}
                                   for v, tid in top],
            "stubs_pct": {pool: round(sum(vs), 1) for pool, vs in stubs.items()},
            "stubs_total_pct": sum(stub_all),
            "stub_max_pct": max(stub_all) if stub_all else None,
            "clients_pct": sum(clients),
            "client_max_pct": max(clients) if clients else None,
            "machine_busy_cores": machine_cores,
            "machine_busy_pct": 100.0 * machine_cores / max(1, len(busy)),
            "busiest_core_pct": 100.0 * max(busy) if busy else None,
            "other_busy_cores": max(0.0, machine_cores - known),  # Ray's own processes and anything else
            "ncores": len(busy),
        }


# ============================================================================================
# statistics and analysis


def _pct(values, q: float) -> Optional[float]:
    import numpy as np

    return float(np.percentile(values, q)) if len(values) else None


def summarize_level(results: list[dict[str, Any]], ws: float, we: float) -> dict[str, Any]:
    """One level's figures from all clients' records; window [ws, we] (monotonic seconds)."""
    import numpy as np

    def cat(key: str, dtype) -> "np.ndarray":
        parts = [np.frombuffer(r[key], dtype=dtype) if len(r[key]) else np.zeros(0, dtype) for r in results]
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    starts, ends, ttfts = cat("starts", np.float64), cat("ends", np.float64), cat("ttfts", np.float64)
    ntoks, oks = cat("ntoks", np.dtype("l")), cat("oks", np.int8).astype(bool)
    itl_counts, itls = cat("itl_counts", np.dtype("l")), cat("itls", np.float32)
    window = we - ws
    with np.errstate(invalid="ignore"):
        done = oks & (ends >= ws) & (ends <= we)
    issued = (starts >= ws) & (starts < we)
    lat = issued & oks
    itl_sel = itls[np.repeat(lat, itl_counts)].astype(np.float64) if len(itls) else np.zeros(0)
    failed = issued & ~oks
    statuses: Counter = Counter()
    errors: list[str] = []
    samples: list[list[int]] = []
    for r in results:
        statuses.update({int(k): v for k, v in r["statuses"].items()})
        errors.extend(r["errors"][:max(0, 5 - len(errors))])
        samples.append(list(r["inflight_samples"]))
    # concurrent streams: the sum over clients of their sampled in-flight counts
    n = min((len(s) for s in samples if s), default=0)
    streams = [sum(s[i] for s in samples if len(s) > i) for i in range(n)]
    ms = 1000.0
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
        "dropped_by_client": int(sum(r["dropped"] for r in results)),
        "unfinished": int(sum(r["unfinished"] for r in results)),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "error_samples": errors,
        "mean_output_tokens": float(ntoks[lat].mean()) if lat.any() else None,
    }
    for name, vals in (("ttft", ttfts[lat]), ("itl", itl_sel), ("e2e", (ends - starts)[lat])):
        for q in (50, 99):
            v = _pct(vals, q)
            out[f"{name}_p{q}_ms"] = None if v is None else v * ms
    return out


def _healthy(level: dict[str, Any], ttft_limit_ms: float, max_error_rate: float) -> bool:
    return (level.get("completed", 0) > 0 and level.get("ttft_p99_ms") is not None
            and level["ttft_p99_ms"] <= ttft_limit_ms and level["error_rate"] <= max_error_rate)


def analyze_closed_loop(levels: list[dict[str, Any]], *, growth: float = 0.10, ttft_factor: float = 10.0,
                        max_error_rate: float = 0.01) -> dict[str, Any]:
    """Where the closed-loop sweep saturates.

    The knee is the level after which req/s stops growing by more than ``growth``, or after
    which p99 TTFT exceeds ``ttft_factor`` x its value at the lowest level (or errors exceed
    ``max_error_rate``). The capacity is the highest req/s of any level still within those
    latency and error bounds; the concurrent streams figure is the most streams held within them.
    """
    valid = [lv for lv in levels if lv.get("completed", 0) > 0 and lv.get("ttft_p99_ms") is not None]
    if not valid:
        return {"saturated": None, "reason": "no level completed any request"}
    base = valid[0]["ttft_p99_ms"]
    limit = ttft_factor * base
    knee_i: Optional[int] = None
    reason = None
    for i in range(1, len(valid)):
        prev, cur = valid[i - 1], valid[i]
        if cur["error_rate"] > max_error_rate:
            knee_i, reason = i - 1, (f"errors: {cur['error_rate']:.1%} of requests failed at {cur['label']} "
                                     f"(bound {max_error_rate:.0%})")
        elif cur["ttft_p99_ms"] > limit:
            knee_i, reason = i - 1, (f"p99 TTFT {cur['ttft_p99_ms']:.1f} ms at {cur['label']} is over "
                                     f"{ttft_factor:g}x the low-load {base:.1f} ms")
        elif cur["rps"] < prev["rps"] * (1 + growth):
            knee_i, reason = i - 1, (f"req/s grew only {cur['rps'] / prev['rps'] - 1:+.1%} from {prev['label']} to "
                                     f"{cur['label']} (needs > +{growth:.0%})")
        if knee_i is not None:
            break
    sustained = [lv for lv in valid if _healthy(lv, limit, max_error_rate)] or [valid[0]]
    best = max(sustained, key=lambda lv: lv["rps"])
    streams = max(sustained, key=lambda lv: lv["streams_mean"])
    out = {
        "low_load_ttft_p99_ms": base,
        "ttft_p99_limit_ms": limit,
        "saturated": knee_i is not None,
        "knee_level": valid[knee_i]["label"] if knee_i is not None else None,
        "knee_rps": valid[knee_i]["rps"] if knee_i is not None else None,
        "reason": reason or f"req/s still grew by > {growth:.0%} at every level: not saturated within the sweep",
        "capacity_rps": best["rps"],
        "capacity_tokens_per_s": best["tokens_per_s"],
        "capacity_level": best["label"],
        "max_streams_within_bounds": streams["streams_mean"],
        "max_streams_level": streams["label"],
        "judged_level": (valid[knee_i + 1] if knee_i is not None and knee_i + 1 < len(valid) else valid[-1])["label"],
    }
    return out


def analyze_open_loop(levels: list[dict[str, Any]], *, ttft_limit_ms: Optional[float], keep_up: float = 0.95,
                      max_error_rate: float = 0.01) -> dict[str, Any]:
    """The highest offered rate the router kept up with (completed >= keep_up x offered) within bounds."""
    ok = [lv for lv in levels if lv.get("completed", 0) > 0 and lv["rps"] >= keep_up * lv["offered_rps"]
          and _healthy(lv, math.inf if ttft_limit_ms is None else ttft_limit_ms, max_error_rate)]
    if not ok:
        return {"sustained_rate_rps": None, "sustained_level": None}
    best = max(ok, key=lambda lv: lv["offered_rps"])
    return {"sustained_rate_rps": best["offered_rps"], "achieved_rps": best["rps"], "sustained_level": best["label"]}


def limiting_resource(level: dict[str, Any], *, busy: float = 85.0) -> dict[str, str]:
    """What held the router back at a saturated level, from its CPU figures."""
    cpu = level.get("cpu") or {}
    router = cpu.get("router_pct")
    n = cpu.get("ncores") or 1
    if cpu.get("client_max_pct") is not None and cpu["client_max_pct"] >= busy:
        return {"resource": "load client",
                "detail": (f"a client process used {cpu['client_max_pct']:.0f}% of a core: the client, not the router, "
                           "may be the limit here; run with more --clients")}
    if router is not None and router >= busy:
        return {"resource": "router replica CPU",
                "detail": (f"the router process used {router:.0f}% of a core: one Python interpreter, so its event "
                           "loops and the GIL top out near 100%; more router work per request lowers capacity")}
    if cpu.get("machine_busy_pct") is not None and cpu["machine_busy_pct"] >= 90.0:
        return {"resource": "machine CPU",
                "detail": (f"{cpu['machine_busy_cores']:.1f} of {n} cores busy (router {router or 0:.0f}%, stubs "
                           f"{cpu.get('stubs_total_pct', 0):.0f}%, clients {cpu.get('clients_pct', 0):.0f}%, Ray and "
                           f"others {100 * cpu.get('other_busy_cores', 0):.0f}%): the router cannot get more CPU on "
                           "this machine; its CPU cost per request (below) is the portable figure")}
    if cpu.get("stub_max_pct") is not None and cpu["stub_max_pct"] >= busy:
        return {"resource": "stub engine replica",
                "detail": (f"a stub replica used {cpu['stub_max_pct']:.0f}% of a core: run with more "
                           "--stub-replicas")}
    if router is None:
        return {"resource": "unknown", "detail": "the router process was not found, so its CPU is unknown"}
    return {"resource": "none saturated (latency-bound)",
            "detail": (f"router {router:.0f}%, machine {cpu.get('machine_busy_pct', 0):.0f}%: no CPU was full; the "
                       "limit is round-trip latency through HTTP and Ray at this concurrency")}


# ============================================================================================
# the driver


def _levels_arg(text: str, kind=int) -> list:
    return [kind(x) for x in text.split(",") if x.strip()] if text else []


def _f(v: Optional[float], spec: str = "8.1f") -> str:
    """``v`` formatted with ``spec``, or a dash as wide."""
    if v is not None:
        return format(v, spec)
    width = re.match(r"\d*", spec).group()
    return "-".rjust(int(width)) if width else "-"


_HEADER = (f"{'level':>12} {'req/s':>8} {'tok/s':>9} {'streams':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
           f"{'ITL p50':>8} {'ITL p99':>8} {'router':>7} {'rtr ms':>7} {'stubs':>6} {'client':>7} {'machine':>8} "
           f"{'err':>5}")
_UNITS = (f"{'':>12} {'':>8} {'':>9} {'(mean)':>8} {'ms':>9} {'ms':>9} {'ms':>8} {'ms':>8} {'CPU %':>7} "
          f"{'CPU/req':>7} {'CPU %':>6} {'CPU %':>7} {'CPU %':>8} {'':>5}")


def _row(lv: dict[str, Any]) -> str:
    cpu = lv.get("cpu") or {}
    ms_req = lv.get("router_cpu_ms_per_req")
    return (f"{lv['label']:>12} {lv['rps']:8.1f} {lv['tokens_per_s']:9.0f} {lv['streams_mean']:8.1f} "
            f"{_f(lv.get('ttft_p50_ms'), '9.2f')} {_f(lv.get('ttft_p99_ms'), '9.2f')} "
            f"{_f(lv.get('itl_p50_ms'), '8.2f')} {_f(lv.get('itl_p99_ms'), '8.2f')} "
            f"{_f(cpu.get('router_pct'), '7.0f')} {_f(ms_req, '7.2f')} {_f(cpu.get('stubs_total_pct'), '6.0f')} "
            f"{_f(cpu.get('clients_pct'), '7.0f')} {_f(cpu.get('machine_busy_pct'), '8.0f')} "
            f"{lv['error_rate'] * 100:4.1f}%")


def _run_one_level(clients: ClientPool, probe: Optional[CpuProbe], label: str, kind: str, value: float,
                   args: argparse.Namespace) -> dict[str, Any]:
    n = len(clients.procs)
    t_start = time.monotonic() + 0.5
    ws = t_start + args.warmup
    we = ws + args.duration
    cmds = []
    for i in range(n):
        cmd = {"kind": kind, "t_start": t_start, "warmup_s": args.warmup, "duration_s": args.duration,
               "drain_s": args.drain, "read_timeout_s": args.read_timeout, "seed": args.seed * 1000 + i,
               "slot_offset": i * 7919, "max_inflight": args.max_inflight_per_client}
        if kind == "closed":
            cmd["concurrency"] = int(value) // n + (1 if i < int(value) % n else 0)
        else:
            cmd["concurrency"] = 0
            cmd["rate"] = value / n
        cmds.append(cmd)
    # the clients start at t_start; the CPU window is the measurement window
    clients.submit(cmds)
    time.sleep(max(0.0, ws - time.monotonic()))
    a = probe.snapshot() if probe else None
    time.sleep(max(0.0, we - time.monotonic()))
    b = probe.snapshot() if probe else None
    lv = summarize_level(clients.collect(args.drain + 120), ws, we)
    lv.update(label=label, kind=kind)
    if kind == "closed":
        lv["concurrency"] = int(value)
    else:
        lv["offered_rps"] = float(value)
    lv["cpu"] = probe.delta(a, b) if probe else None
    rp = (lv["cpu"] or {}).get("router_pct")
    lv["router_cpu_ms_per_req"] = (rp / 100 * lv["window_s"] / lv["completed"] * 1000
                                   if rp is not None and lv["completed"] else None)
    lv["router_cpu_us_per_token"] = (rp / 100 * lv["window_s"] / (lv["tokens_per_s"] * lv["window_s"]) * 1e6
                                     if rp is not None and lv["tokens_per_s"] else None)
    return lv


def _start_ray(address: Optional[str], num_cpus: int) -> None:
    import ray

    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    else:
        # "local": a Ray instance of our own even when another one runs on this machine
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)


def _machine_busy_before(seconds: float = 1.0) -> float:
    import psutil

    return psutil.cpu_percent(interval=seconds)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("monolithic", "pd"), default="monolithic",
                   help="monolithic: one stub pool; pd: stub prefill + decode pools (both P/D legs)")
    p.add_argument("--concurrency", default=",".join(map(str, DEFAULT_CONCURRENCY)),
                   help="closed-loop levels (streams kept open), comma-separated; empty to skip")
    p.add_argument("--rates", default="auto",
                   help="open-loop Poisson rates in req/s, comma-separated; 'auto': "
                        f"{', '.join(map(str, DEFAULT_RATE_FRACTIONS))} x the closed-loop capacity; empty to skip")
    p.add_argument("--duration", type=float, default=10.0, help="measurement window per level, s")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured load before each window, s")
    p.add_argument("--drain", type=float, default=30.0, help="wait for in-flight requests after a window, s")
    p.add_argument("--read-timeout", type=float, default=60.0, help="client socket read timeout, s")
    p.add_argument("--output-tokens", type=int, default=64, help="tokens streamed per request")
    p.add_argument("--input-words", type=int, default=200,
                   help="prompt words (~256 tokens with the tiny tokenizer, which the router runs on every request)")
    p.add_argument("--clients", type=int, default=1, help="load-client processes")
    p.add_argument("--max-inflight-per-client", type=int, default=4096, help="open loop: arrivals past this are "
                   "dropped (counted)")
    p.add_argument("--stub-replicas", type=int, default=2, help="InstantStubEngine replicas per pool")
    p.add_argument("--token-stream", choices=("direct", "ray"), default="direct",
                   help="router.token_stream: items over a direct connection per call, or Ray streaming calls")
    p.add_argument("--tokens-per-message", type=int, default=1,
                   help="token chunks per Ray message from the stub (a real engine at low load: 1)")
    p.add_argument("--stub-itl-ms", type=float, default=0.0,
                   help="pause between a stub stream's messages (0: instant); e.g. an engine's TPOT, to hold many "
                        "slow streams open")
    p.add_argument("--admission-max-inflight", type=int, default=1_000_000,
                   help="admission concurrency cap (lifted by default so only overhead is measured)")
    p.add_argument("--engine-capacity-rps", type=float, default=None,
                   help="the engine pools' own measured capacity (req/s, same request shape) to compare against")
    p.add_argument("--engine-capacity-streams", type=float, default=None,
                   help="optional: the engine pools' concurrent-stream capacity, for the same comparison")
    p.add_argument("--goal-ratio", type=float, default=GOAL_RATIO)
    p.add_argument("--growth", type=float, default=0.10, help="saturation: req/s growing less than this")
    p.add_argument("--ttft-factor", type=float, default=10.0,
                   help="saturation: p99 TTFT over this many times its lowest-level value")
    p.add_argument("--max-error-rate", type=float, default=0.01)
    p.add_argument("--port", type=int, default=8471)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a local one")
    p.add_argument("--ray-num-cpus", type=int, default=4)
    p.add_argument("--app-name", default=APP_NAME)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None, help="write every figure here (JSON)")
    args = p.parse_args(argv)
    concurrency = _levels_arg(args.concurrency, int)
    if args.rates.strip() == "auto":
        rates: Optional[list[float]] = None
    else:
        rates = _levels_arg(args.rates, float)
    if not concurrency and rates is None:
        p.error("--rates auto needs the closed-loop sweep (--concurrency); give explicit rates")
    if args.clients < 1 or args.stub_replicas < 1:
        p.error("--clients and --stub-replicas must be at least 1")

    settings = StubSettings(tokens_per_message=args.tokens_per_message, message_interval_s=args.stub_itl_ms / 1000,
                            default_max_tokens=args.output_tokens)
    cfg = stub_cluster_config(args.mode, port=args.port, host=args.host, stub_replicas=args.stub_replicas,
                              admission_max_inflight=args.admission_max_inflight, token_stream=args.token_stream)
    url = f"http://{args.host}:{args.port}"
    ncores = os.cpu_count() or 1
    busy_before = _machine_busy_before()
    print("router capacity benchmark: ONE router replica (RouterServer, unchanged) in front of STUB engines",
          flush=True)
    print(f"  engines: {STUB_LABEL}", flush=True)
    print(f"  mode {args.mode}; token stream {args.token_stream}; {args.stub_replicas} stub replica(s) per pool; "
          f"{args.tokens_per_message} token(s) per message; stub ITL {args.stub_itl_ms:g} ms", flush=True)
    print(f"  requests: streamed chat, ~{args.input_words} prompt words, {args.output_tokens} output tokens, usage on",
          flush=True)
    print(f"  machine: {ncores} cores, {busy_before:.0f}% busy before start; {args.clients} client process(es); "
          f"levels {args.warmup:g} s warm-up + {args.duration:g} s measured", flush=True)
    if busy_before > 15:
        print(f"  WARNING: the machine was {busy_before:.0f}% busy before the benchmark started: other work takes "
              "CPU from the router and lowers every figure below", flush=True)

    from ray import serve

    from pdserve.bench.cluster_runtime import runtime

    wait_ready = runtime().wait_ready

    report: dict[str, Any] = {
        "benchmark": "router_capacity", "stub_engine": STUB_LABEL, "stub_settings": settings.to_dict(),
        "args": vars(args), "machine": {"cores": ncores, "busy_pct_before": busy_before},
        "config": cfg.model_dump(mode="json"), "closed_loop": [], "open_loop": [],
    }
    clients: Optional[ClientPool] = None
    t_begin = time.monotonic()
    _start_ray(args.ray_address, args.ray_num_cpus)
    try:
        serve.start(http_options={"location": "NoServer"})
        serve.run(build_stub_app(cfg, settings), name=args.app_name, route_prefix=None, blocking=False)
        wait_ready(url, timeout_s=300)
        router_pids: list[int] = []
        deadline = time.monotonic() + 30
        while not router_pids and time.monotonic() < deadline:
            router_pids = find_replica_pids(args.app_name, "router")
            if not router_pids:
                time.sleep(0.5)
        stub_pids = {pool: find_replica_pids(args.app_name, pool) for pool in cfg.pools()}
        if len(router_pids) != 1:
            print(f"  WARNING: found {len(router_pids)} router processes ({router_pids}) for "
                  f"ServeReplica:{args.app_name}:router: router CPU figures are "
                  f"{'missing' if not router_pids else 'summed'}", flush=True)
        print(f"  router up at {url}: router pid {router_pids}, stub pids {stub_pids}", flush=True)

        payloads = request_payloads(64, args.input_words, args.output_tokens, cfg.model.served_name, args.seed)
        clients = ClientPool(args.clients, url + "/v1/chat/completions", payloads)
        probe = CpuProbe(router_pids, stub_pids, clients.pids)
        report["pids"] = {"router": router_pids, "stubs": stub_pids, "clients": clients.pids}

        # one short unmeasured run: imports, tokenizer caches, connections
        warm = argparse.Namespace(**{**vars(args), "duration": 2.0, "warmup": 0.5})
        _run_one_level(clients, None, "warm-up", "closed", min(8, max(concurrency or [8])), warm)

        print("\nTTFT: send to the first read with a token; ITL: gap between reads that carry tokens (client "
              "side); CPU %: of one core over the measured window; rtr CPU/req: router CPU ms per completed "
              "request", flush=True)
        if concurrency:
            print(f"\nclosed loop: N streams kept open (each client slot sends its next request when the last "
                  f"ends)\n{_HEADER}\n{_UNITS}", flush=True)
            base_ttft = None
            for c in concurrency:
                lv = _run_one_level(clients, probe, f"c={c}", "closed", c, args)
                report["closed_loop"].append(lv)
                print(_row(lv), flush=True)
                if base_ttft is None and lv.get("ttft_p99_ms"):
                    base_ttft = lv["ttft_p99_ms"]
                if lv["error_rate"] > 0.5 or (base_ttft and lv.get("ttft_p99_ms")
                                              and lv["ttft_p99_ms"] > 100 * base_ttft):
                    print("  (stopping the closed-loop sweep: far past saturation)", flush=True)
                    break
        closed = analyze_closed_loop(report["closed_loop"], growth=args.growth, ttft_factor=args.ttft_factor,
                                     max_error_rate=args.max_error_rate) if report["closed_loop"] else {}

        if rates is None:
            cap = closed.get("capacity_rps") or 0.0
            rates = [round(f * cap, 1) for f in DEFAULT_RATE_FRACTIONS if f * cap > 0]
        if rates:
            print(f"\nopen loop: Poisson arrivals at a fixed rate (req/s offered)\n{_HEADER}\n{_UNITS}", flush=True)
            for r in rates:
                lv = _run_one_level(clients, probe, f"{r:g}/s", "open", r, args)
                report["open_loop"].append(lv)
                print(_row(lv) + (f"  dropped {lv['dropped_by_client']}" if lv["dropped_by_client"] else ""),
                      flush=True)
        opened = analyze_open_loop(report["open_loop"], ttft_limit_ms=closed.get("ttft_p99_limit_ms"),
                                   max_error_rate=args.max_error_rate) if report["open_loop"] else {}
    finally:
        if clients is not None:
            clients.close()
        try:
            if args.ray_address:
                serve.delete(args.app_name)
            else:
                serve.shutdown()
        finally:
            import ray

            ray.shutdown()

    report["analysis"] = {"closed_loop": closed, "open_loop": opened}
    _print_summary(report, args)
    report["elapsed_s"] = time.monotonic() - t_begin
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2, default=str))
        print(f"\nfigures written to {args.json_out}", flush=True)
    return 0


def _print_summary(report: dict[str, Any], args: argparse.Namespace) -> None:
    closed = report["analysis"]["closed_loop"]
    opened = report["analysis"]["open_loop"]
    print(f"\nsummary (engines are {STUB_NAME} STUBS: these are the router's limits, not serving figures)")
    levels = {lv["label"]: lv for lv in report["closed_loop"]}
    cmp: dict[str, Any] = {"goal_ratio": args.goal_ratio}
    if closed.get("capacity_rps") is not None:
        print(f"  low-load p99 TTFT {closed['low_load_ttft_p99_ms']:.2f} ms; latency bound "
              f"{args.ttft_factor:g}x = {closed['ttft_p99_limit_ms']:.2f} ms")
        if closed["saturated"]:
            print(f"  saturates after {closed['knee_level']} ({closed['knee_rps']:.1f} req/s): {closed['reason']}")
        else:
            print(f"  not saturated within the sweep ({closed['reason']}); the capacity below is a lower bound")
        print(f"  router capacity: {closed['capacity_rps']:.1f} req/s, {closed['capacity_tokens_per_s']:.0f} tokens/s "
              f"(at {closed['capacity_level']}, within the latency and error bounds)")
        print(f"  concurrent streams within bounds: {closed['max_streams_within_bounds']:.0f} "
              f"(at {closed['max_streams_level']})")
        judged = levels.get(closed["judged_level"])
        if judged is not None:
            lim = limiting_resource(judged)
            closed["limiting_resource"] = lim
            print(f"  limiting resource at {judged['label']}: {lim['resource']}: {lim['detail']}")
            cpu = judged.get("cpu") or {}
            if cpu.get("router_threads_pct"):
                tops = ", ".join(f"{t['thread']} {t['pct']:.0f}%" for t in cpu["router_threads_pct"])
                print(f"  router's busiest threads there: {tops}")
            ms_req = judged.get("router_cpu_ms_per_req")
            if ms_req:
                per_core = 1000.0 / ms_req
                closed["router_cpu_ms_per_req"] = ms_req
                closed["router_rps_per_dedicated_core"] = per_core
                print(f"  router CPU cost: {ms_req:.2f} ms per request ({judged['router_cpu_us_per_token']:.0f} us per "
                      f"token); a router with one core to itself would top out near {per_core:.0f} req/s "
                      "(extrapolated: 1000 / ms per request)")
    if opened.get("sustained_rate_rps") is not None:
        print(f"  open loop: kept up with {opened['sustained_rate_rps']:g} req/s offered "
              f"({opened['achieved_rps']:.1f} completed) within the bounds")
    elif report["open_loop"]:
        print("  open loop: no offered rate was kept up with within the bounds")

    cap = closed.get("capacity_rps")
    print(f"\ncomparison with the engine pools (goal: router capacity >= {args.goal_ratio:g}x engine capacity)")
    if args.engine_capacity_rps:
        ratio = cap / args.engine_capacity_rps if cap else None
        cmp.update(engine_capacity_rps=args.engine_capacity_rps, router_capacity_rps=cap, ratio=ratio,
                   goal_met=bool(ratio is not None and ratio >= args.goal_ratio))
        print(f"  router capacity (stub engines, measured here): {_f(cap, '.1f')} req/s")
        print(f"  engine-pool capacity (--engine-capacity-rps):  {args.engine_capacity_rps:g} req/s")
        if ratio is not None:
            print(f"  ratio: {ratio:.1f}x  -> goal {'MET' if cmp['goal_met'] else 'NOT MET'}")
        if closed.get("router_rps_per_dedicated_core"):
            r2 = closed["router_rps_per_dedicated_core"] / args.engine_capacity_rps
            cmp["ratio_dedicated_core_extrapolated"] = r2
            print(f"  (extrapolated, router on a dedicated core: {r2:.1f}x)")
    else:
        print("  engine-pool capacity not given: pass --engine-capacity-rps (the real pools' measured req/s for the "
              "same request shape) to get the ratio")
    if args.engine_capacity_streams and closed.get("max_streams_within_bounds") is not None:
        sr = closed["max_streams_within_bounds"] / args.engine_capacity_streams
        cmp.update(engine_capacity_streams=args.engine_capacity_streams, streams_ratio=sr)
        print(f"  concurrent streams: router {closed['max_streams_within_bounds']:.0f} vs engines "
              f"{args.engine_capacity_streams:g} -> {sr:.1f}x")
    report["comparison"] = cmp


if __name__ == "__main__":
    from pdserve.bench import cluster_runtime
    from pdserve.cluster import runtime

    cluster_runtime.use(runtime)  # this script is the program: its entry point is a composition root
    sys.exit(main())
