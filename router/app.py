"""The OpenAI-compatible front door: validates, picks a prefill/decode pair, runs both legs.

P/D flow for one request:
1. check the body (router/protocol.py) and pick a prefill and a decode replica
   (router/selection.py);
2. prefill leg: the same body with ``max_tokens=1`` and ``do_remote_decode``; the
   engine keeps the prompt's KV and answers with ``kv_transfer_params``;
3. decode leg: the original body plus those params; the decode engine pulls the KV
   (NIXL or gRPC, the router does not care) and streams tokens back to the client.
A prefill failure or timeout sends the request to a decode engine whole (fallback).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pdserve.admission.controller import CLASS_RANK, AdmissionController, Ticket
from pdserve.admission.fleet_gate import FleetState, kv_bytes_per_token
from pdserve.admission.rejection import Rejection
from pdserve.admission.tenants import TenantDirectory
from pdserve.engine.config import ClusterConfig, resolve_admin_key
from pdserve.engine.direct_stream import DirectStream
from pdserve.engine.tiny_model import resolve_model
from pdserve.fallback.breaker import STATE_VALUE, BreakerSettings, LinkBreakers
from pdserve.fallback.policy import FallbackCause
from pdserve.kv_transfer.registry import prefill_request_params
from pdserve.router.ab_split import TrafficSplit
from pdserve.router.admin import add_admin_routes
from pdserve.router.goodput import GoodputWindow
from pdserve.router.metrics import RouterMetrics
from pdserve.router.pools import Pool
from pdserve.router.protocol import ApiError, CheckedRequest, RequestChecker, error_body, parse_json_body
from pdserve.router.resume import StreamTracker, error_event
from pdserve.router.selection import least_loaded

logger = logging.getLogger("pdserve.router")


_PREFILL_DROP = ("stream_options", "max_completion_tokens", "logprobs", "top_logprobs", "n")


def _carries_token(chunk: str) -> bool:
    if chunk.startswith("data: [DONE]"):
        return False
    return '"content":"' in chunk.replace('"content":""', "") or '"text":"' in chunk.replace('"text":""', "")


def _breakdown_headers(leg: "_Leg") -> dict[str, str]:
    """Per-request P/D timing for non-streamed answers (streamed ones go to the TTFT breakdown metric)."""
    out = {}
    if leg.prefill_s is not None:
        out["x-pdserve-prefill-ms"] = f"{leg.prefill_s * 1000:.2f}"
    pull = leg.kv_pull
    if pull is not None:
        if pull["ok"]:
            mode = {True: "; mode=same-host", False: "; mode=inline"}.get(pull.get("same_host"), "")
            out["x-pdserve-kv-transfer"] = f"ok; ms={pull['seconds'] * 1000:.2f}; bytes={pull['bytes']}{mode}"
        else:
            out["x-pdserve-kv-transfer"] = f"failed; kind={pull.get('kind')}"
    return out


class _Ctx:
    """One admitted request as the router follows it to the end."""

    def __init__(self, ticket: Ticket, t0: float) -> None:
        self.ticket = ticket
        self.t0 = t0
        self.cls = ticket.priority_class
        self.output_tokens = 0


def _model_kv_bytes_per_token(cfg: ClusterConfig, model_path: str) -> int:
    from transformers import AutoConfig

    return kv_bytes_per_token(AutoConfig.from_pretrained(model_path).to_dict(), cfg.model.dtype)


class LegLost(ConnectionError):
    """The replica serving a leg was marked unhealthy while the router waited on it (its load
    polls timed out: the process hangs, or its host is partitioned and sends nothing, not
    even a reset). The leg is broken, like a stream cut: fallback before the first token,
    mid-stream resume after it."""


class _Leg:
    """One engine call: its stream of items, the replica serving it, and cleanup.

    The pool watches the leg (``Pool.watch``): when its load polls mark the replica serving
    it unhealthy, the pool calls ``lose()``, which ends the read the router is waiting on.
    No timer or syscall per item: the check runs once per load poll, not per token."""

    def __init__(self, pool: Pool, replica_id: Optional[str], endpoint: str, body: dict[str, Any]):
        self.pool = pool
        self.replica_id = replica_id
        self.gen = pool.stream(replica_id, endpoint, body)
        self._direct = isinstance(self.gen, DirectStream)
        self.served_by: Optional[str] = None
        self.prefill_s: Optional[float] = None  # the P/D prefill leg that came before this decode leg
        self.kv_pull: Optional[dict[str, Any]] = None  # the decode engine's report of its KV pull
        self.link: Optional[tuple[str, str]] = None  # (prefill, decode) replicas of a P/D decode leg
        self.lost: Optional[str] = None  # why the pool gave this leg up
        self._wake: Optional[asyncio.Future] = None  # ends a Ray-streamed read on lose()
        self._buffer: list[tuple] = []
        pool.watch(self)

    def watched_replica(self) -> Optional[str]:
        """The replica whose health decides this leg's: the one that answered, else the one asked."""
        return self.served_by or self.replica_id

    def lose(self, why: str) -> None:
        """Give the leg up: the read waiting on it (or the next one) raises ``LegLost``."""
        if self.lost is None:
            self.lost = why
            self.cancel()  # a direct stream's pending read ends as its connection is aborted
            if self._wake is not None and not self._wake.done():
                self._wake.set_result(None)

    async def next_item(self) -> Optional[tuple]:
        """The next response item, or None at the end of the stream; side items are kept on the leg."""
        while True:
            while self._buffer:
                item = self._buffer.pop(0)
                if item[0] == "meta":
                    self.served_by = item[1]["replica"]
                    continue
                if item[0] == "kv":
                    self.kv_pull = item[1]
                    continue
                return item
            try:
                if self._direct and self.lost is None:
                    batch = await self.gen.__anext__()  # lose() aborts the connection, which ends this read
                else:
                    batch = await self._read_raced()
                self._buffer = list(batch)
            except StopAsyncIteration:
                self.pool.unwatch(self)
                return None
            except Exception as e:
                if self.lost is not None:
                    raise LegLost(f"{self.pool.name} replica {self.watched_replica()} lost: {self.lost}") from e
                raise

    async def _read_raced(self) -> list:
        """A read of a leg given up, or of a Ray streaming call: Ray's cancel may wait on the
        lost replica, so the read is raced against lose()."""
        if self.lost is not None:
            raise ConnectionAbortedError("leg given up")
        self._wake = asyncio.get_running_loop().create_future()
        read = asyncio.ensure_future(self.gen.__anext__())
        try:
            await asyncio.wait({read, self._wake}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            pending = not read.done()
            if pending:
                read.cancel()
        if pending:
            raise ConnectionAbortedError("leg given up")
        return read.result()

    def ready_chunks(self) -> list[str]:
        """SSE chunks that arrived with the last message, without waiting for more."""
        chunks = [it[1] for it in self._buffer if it[0] == "sse"]
        self._buffer = [it for it in self._buffer if it[0] != "sse"]
        return chunks

    def cancel(self) -> None:
        self.pool.unwatch(self)
        try:
            self.gen.cancel()
        except Exception:
            pass


def build_http_app(server: "RouterServer") -> FastAPI:
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    app.add_api_route("/v1/models", server.models, methods=["GET"])
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", server.prometheus_metrics, methods=["GET"])
    app.add_api_route("/pdserve/status", server.status, methods=["GET"])
    add_admin_routes(app, server)
    return app


def bind_http_socket(host: str, port: int):
    """Bind now, so a port in use fails the deployment with a clear error at startup.

    No SO_REUSEPORT: a second cluster on the same port must fail, not silently share it.
    """
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise RuntimeError(f"router cannot listen on {host}:{port}: {e}") from e
    return sock


async def serve_http(app: FastAPI, sock) -> None:
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30)
    await uvicorn.Server(config).serve(sockets=[sock])


class RouterServer:
    """The router replica. It serves HTTP itself (no Ray Serve proxy in front): on a
    small machine every hop a token takes costs CPU that the engines need."""

    async def __init__(self, config: dict[str, Any], prefill=None, decode=None, monolithic=None) -> None:
        cfg = ClusterConfig.model_validate(config)
        direct = cfg.router.token_stream == "direct"
        handles = (("prefill", prefill), ("decode", decode), ("monolithic", monolithic))
        self._setup(cfg, {name: Pool(name, h, direct_streams=direct) for name, h in handles if h is not None})
        sock = bind_http_socket(self.cfg.router.host, self.cfg.router.port)
        self._poller = asyncio.get_running_loop().create_task(self._poll_forever())
        await self._refresh()
        self._http = asyncio.get_running_loop().create_task(
            serve_http(build_http_app(self), sock))

    def _setup(self, cfg: ClusterConfig, pools: dict[str, Pool]) -> None:
        """Everything but the HTTP socket and the load poller (tests build a router from this)."""
        self.cfg = cfg
        self.mode = cfg.mode
        self.pools = pools
        self.prefill_pick = least_loaded()
        self.decode_pick = least_loaded(kv_headroom=self.cfg.router.decode_kv_headroom)
        model_path = resolve_model(self.cfg.model.path)
        self.checker = RequestChecker(self.cfg.model.served_name, model_path, self.cfg.model.max_model_len)
        self.metrics = RouterMetrics()
        self.tenants = TenantDirectory(self.cfg.auth, salt_secret=f"pdserve-cache-salt:{self.cfg.name}")
        serving = self.cfg.decode if self.mode == "pd" else self.cfg.monolithic
        capacity = self.cfg.admission.max_inflight or serving.max_replicas * self.cfg.engine.max_num_seqs
        self.kv_bytes_per_token = _model_kv_bytes_per_token(self.cfg, model_path)
        self.admission = AdmissionController(self.cfg.admission, self.cfg.ladder, capacity, self.kv_bytes_per_token)
        self.goodput = GoodputWindow(self.cfg.slo)
        ab = self.cfg.ab_split
        self.split = TrafficSplit(ab.monolithic_fraction, ab.session_header, salt=f"pdserve-ab:{self.cfg.name}")
        self._preempt_seen: Optional[tuple[float, int]] = None
        self._kv_seen: dict[str, tuple[int, float, int]] = {}  # decode replica -> (bytes, seconds, count)
        self._last_serve_poll = 0.0
        fb = self.cfg.fallback
        self.breakers = LinkBreakers(
            BreakerSettings(fb.link_failure_threshold, fb.link_open_seconds, fb.link_half_open_probes),
            on_change=lambda p, d, state: self.metrics.link_state.labels(p, d).set(STATE_VALUE[state]))
        self.admin_key = resolve_admin_key(self.cfg)

    async def check_health(self) -> None:
        if self._http.done():
            raise RuntimeError(f"HTTP server stopped: {self._http.exception()!r}")

    # ------------------------------------------------------------------ load polling
    async def _refresh(self) -> None:
        for pool in self.pools.values():
            try:
                await pool.refresh()
            except Exception as e:  # a pool that cannot be reached is simply unhealthy
                pool.last_error = repr(e)
                logger.warning("load poll of %s failed: %r", pool.name, e)
                for st in pool.replicas.values():
                    st.healthy = False
                pool.sweep()
            for st in pool.replicas.values():
                self.metrics.replica_kv.labels(pool.name, st.replica_id).set(st.load.get("kv_cache_usage", 0.0))
                self.metrics.replica_running.labels(pool.name, st.replica_id).set(st.load.get("running", 0))
                self.metrics.replica_waiting.labels(pool.name, st.replica_id).set(st.load.get("waiting", 0))
                self.metrics.replica_preemptions.labels(pool.name, st.replica_id).set(
                    st.load.get("preemptions_total", 0))
        self._observe_fleet()
        self._count_kv_transfers()
        if time.monotonic() - self._last_serve_poll >= 2.0:
            self._last_serve_poll = time.monotonic()
            await self._poll_pool_sizes()

    def _count_kv_transfers(self) -> None:
        """Turns the decode replicas' running KV totals into this router's counters."""
        pool = self.pools.get("decode")
        transport = self.cfg.kv_transfer.transport
        for st in (pool.replicas.values() if pool else []):
            now = (int(st.load.get("kv_transfer_bytes_total", 0)), float(st.load.get("kv_transfer_seconds_total", 0.0)),
                   int(st.load.get("kv_transfers_total", 0)))
            seen = self._kv_seen.get(st.replica_id, (0, 0.0, 0))
            if now[0] >= seen[0]:  # a restarted replica starts from zero again
                self.metrics.kv_transfer_bytes.labels(transport).inc(now[0] - seen[0])
                self.metrics.kv_transfer_busy.labels(transport).inc(max(0.0, now[1] - seen[1]))
                self.metrics.kv_transfers.labels(transport).inc(max(0, now[2] - seen[2]))
            self._kv_seen[st.replica_id] = now

    async def _poll_pool_sizes(self) -> None:
        """Ray Serve's replica counts per pool (what its autoscaler is holding), for /metrics."""
        from ray import serve

        try:
            app = serve.get_replica_context().app_name
            status = await asyncio.to_thread(serve.status)
            deployments = status.applications[app].deployments
        except Exception as e:  # noqa: BLE001 - metrics only; never break serving over them
            logger.debug("serve.status failed: %r", e)
            return
        for name in self.pools:
            d = deployments.get(name)
            if d is not None:
                live = sum(n for state, n in d.replica_states.items() if str(getattr(state, "value", state))
                           in ("STARTING", "UPDATING", "RECOVERING", "RUNNING"))
                self.metrics.autoscaler_target.labels(name).set(live)

    def _observe_fleet(self) -> None:
        """Feeds the serving (decode or monolithic) pool's KV pressure to admission and the ladder."""
        pool = self.pools.get("decode" if self.mode == "pd" else "monolithic")
        live = [st for st in pool.replicas.values() if st.healthy] if pool else []
        now = time.monotonic()
        preempted = sum(int(st.load.get("preemptions_total", 0)) for st in live)
        rate = 0.0
        if self._preempt_seen is not None and now > self._preempt_seen[0]:
            rate = max(0, preempted - self._preempt_seen[1]) / (now - self._preempt_seen[0])
        self._preempt_seen = (now, preempted)
        n = len(live)
        fleet = FleetState(
            kv_usage=sum(float(st.load.get("kv_cache_usage", 0.0)) for st in live) / n if n else 0.0,
            kv_capacity_bytes=float(sum(int(st.load.get("kv_capacity_tokens", 0)) for st in live)
                                    * self.kv_bytes_per_token),
            waiting_per_replica=sum(int(st.load.get("waiting", 0)) for st in live) / n if n else 0.0,
            healthy_replicas=n)
        self.metrics.rung.set(self.admission.observe_fleet(fleet, rate))

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.router.load_poll_interval_s)
            await self._refresh()

    # ------------------------------------------------------------------ endpoints
    async def chat_completions(self, request: Request):
        return await self._serve("chat", request)

    async def completions(self, request: Request):
        return await self._serve("completions", request)

    async def models(self):
        m = self.cfg.model
        return {"object": "list", "data": [{
            "id": m.served_name, "object": "model", "created": 0, "owned_by": "pdserve",
            "root": m.path, "parent": None, "max_model_len": m.max_model_len,
        }]}

    async def health(self):
        missing = [n for n, p in self.pools.items() if not any(s.healthy for s in p.replicas.values())]
        if missing:
            return JSONResponse({"status": "unhealthy", "pools_without_healthy_replica": missing}, status_code=503)
        return {"status": "ok", "mode": self.mode}

    async def prometheus_metrics(self):
        for cls, rps in self.goodput.rates(time.monotonic()).items():
            self.metrics.goodput_rps.labels(cls).set(rps)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def status(self):
        return {"name": self.cfg.name, "mode": self.mode, "transport": self.cfg.kv_transfer.transport,
                "pools": {n: p.status() for n, p in self.pools.items()},
                "links": [{"prefill": p, "decode": d, "state": st.value}
                          for (p, d), st in self.breakers.states().items()],
                "ladder": self.admission.ladder.state(),
                "ab_split": self.split.state(),
                "admission": {"capacity": self.admission.slots.capacity,
                              "inflight": dict(self.admission.slots.inflight),
                              "queued": self.admission.queue_depth()},
                "poll_errors": {n: p.last_error for n, p in self.pools.items() if p.last_error}}

    # ------------------------------------------------------------------ serving
    async def _serve(self, endpoint: str, request: Request):
        t0 = time.perf_counter()
        cls = "none"
        try:
            tenant = self.tenants.authenticate(request.headers)
            cls = tenant.priority_class
            raw = await request.body()
            body = parse_json_body(raw, self.cfg.router.max_body_bytes)
            checked = self.checker.check(endpoint, body)
            if checked.stream:
                # Token ids let a broken stream resume elsewhere exactly where it stopped (resume.py).
                checked.body["return_token_ids"] = True
        except ApiError as e:
            self.metrics.requests.labels("none", endpoint, str(e.status)).inc()
            return JSONResponse(e.body(), status_code=e.status)
        except Rejection as r:
            return self._rejected(r, cls, endpoint)
        if not any(pool.has_healthy() for pool in self.pools.values()):
            return self._rejected(self._no_engine(), cls, endpoint)  # at once: waiting would not bring one
        try:
            ticket = await self.admission.admit(tenant, checked.body.get("model") or self.cfg.model.served_name,
                                                checked.prompt_tokens, checked.max_tokens)
        except Rejection as r:
            return self._rejected(r, cls, endpoint)
        ctx = _Ctx(ticket, t0)
        headers = self._admitted(ctx, checked)
        self.metrics.inflight.inc()
        handed_off = False
        try:
            if ticket.degraded_target == "prefill":
                # whole on a prefill engine, so decode KV stays for Critical; on decode if none is healthy
                path, leg = "monolithic", self._spare_leg(endpoint, checked.body, order=("prefill", "decode"))
            elif self.mode == "monolithic":
                path, leg = "monolithic", self._spare_leg(endpoint, checked.body, order=("monolithic",))
            elif self._ab_arm(request, checked, headers) == "monolithic":
                # the A/B's monolithic arm: the whole request on one decode engine (prefill if none is healthy)
                path, leg = "monolithic", self._spare_leg(endpoint, checked.body, order=("decode", "prefill"))
            else:
                path, leg, early = await self._pd_legs(endpoint, checked, headers, t0)
                if early is not None:
                    return early
            if leg is None:
                return self._no_engine_response(endpoint, path, headers)
            response = await self._respond(endpoint, path, leg, checked, headers, ctx)
            handed_off = isinstance(response, StreamingResponse)
            return response
        finally:
            if not handed_off:
                self.metrics.inflight.dec()
                self._finish(ctx)

    def _spare_leg(self, endpoint: str, body: dict[str, Any], gone: frozenset = frozenset(),
                   order: tuple[str, ...] = ("decode", "monolithic", "prefill")) -> Optional["_Leg"]:
        """One healthy engine serves ``body`` whole (every engine holds full weights): the
        least-loaded replica, not in ``gone``, of the first pool in ``order`` that has one.
        None if there is none: never a call to a pool with no healthy replica, which Ray
        Serve would hold until it restarts one."""
        for name in order:
            pool = self.pools.get(name)
            if pool is None:
                continue
            picker = self.prefill_pick if name == "prefill" else self.decode_pick
            pick = picker.pick([c for c in pool.candidates() if c.replica_id not in gone])
            if pick is not None:
                return _Leg(pool, pick.replica_id, endpoint, body)
        return None

    def _no_engine(self) -> Rejection:
        return Rejection(503, "no_healthy_engine", "no engine replica of this cluster is healthy right now; "
                         "retry shortly", self.cfg.admission.retry_after_s)

    def _no_engine_response(self, endpoint: str, path: str, headers: dict[str, str]) -> JSONResponse:
        r = self._no_engine()
        self.metrics.requests.labels(path, endpoint, "503").inc()
        return JSONResponse(r.body(), status_code=503, headers={**headers, **r.headers()})

    def _ab_arm(self, request: Request, checked: CheckedRequest, headers: dict[str, str]) -> str:
        if self.split.fraction <= 0:
            return "pd"
        arm = self.split.arm(request.headers, checked.body)
        headers["x-pdserve-arm"] = arm
        self.metrics.ab_requests.labels(arm).inc()
        return arm

    def _rejected(self, r: Rejection, cls: str, endpoint: str) -> JSONResponse:
        self.metrics.admissions.labels(cls, "rejected", r.reason).inc()
        self.metrics.requests.labels("none", endpoint, str(r.status)).inc()
        return JSONResponse(r.body(), status_code=r.status, headers=r.headers())

    def _admitted(self, ctx: _Ctx, checked: CheckedRequest) -> dict[str, str]:
        """Applies the admission decision to the body; returns the response headers it implies."""
        t = ctx.ticket
        headers = {"x-pdserve-class": t.priority_class}
        reason = "ok"
        if t.capped_from is not None:
            key = "max_completion_tokens" if "max_completion_tokens" in checked.body else "max_tokens"
            checked.body[key] = t.max_tokens
            checked.max_tokens = t.max_tokens
            headers["x-pdserve-degraded"] = f"max-tokens-capped; from={t.capped_from}; to={t.max_tokens}"
            reason = "capped"
        if t.degraded_target is not None:
            headers["x-pdserve-degraded"] = f"degraded-target={t.degraded_target}" + (
                f"; max-tokens-capped={t.max_tokens}" if t.capped_from is not None else "")
            reason = "degraded"
        if t.tenant.cache_salt is not None:
            checked.body["cache_salt"] = t.tenant.cache_salt  # overrides any salt the client sent
        if self.cfg.engine.scheduling_policy == "priority":
            checked.body["priority"] = CLASS_RANK[t.priority_class]
        else:
            checked.body.pop("priority", None)  # fcfs engines refuse any priority but 0
        self.metrics.admissions.labels(t.priority_class, "admitted", reason).inc()
        self.metrics.queue_wait.labels(t.priority_class).observe(t.queue_wait_s)
        return headers

    def _finish(self, ctx: _Ctx) -> None:
        t = ctx.ticket
        self.admission.finish(t, ctx.output_tokens)
        self.metrics.tenant_tokens.labels(t.tenant.name, "input").inc(t.prompt_tokens)
        self.metrics.tenant_tokens.labels(t.tenant.name, "output").inc(ctx.output_tokens)

    def _judge(self, ctx: _Ctx, ttft: float, tpot: Optional[float], e2e: float) -> None:
        met = self.goodput.judge(ctx.cls, ttft, tpot, e2e, time.monotonic())
        self.metrics.slo_requests.labels(ctx.cls, "true" if met else "false").inc()
        if met:
            self.metrics.goodput_requests.labels(ctx.cls).inc()

    async def _pd_legs(self, endpoint: str, checked: CheckedRequest, headers: dict[str, str], t0: float):
        """Run the prefill leg; return (path, decode leg, early error response or None)."""
        prefill, decode = self.pools["prefill"], self.pools["decode"]
        p, d, cause = self._pick_pair(prefill, decode)
        d_id = d.replica_id if d else None
        kv_params = None
        prefill_s: Optional[float] = None
        link = (p.replica_id, d_id) if cause is None and p is not None and d_id else None
        if link:
            self.breakers.begin(*link)
        if cause is None:
            headers["x-pdserve-prefill-replica"] = p.replica_id
            pbody = {k: v for k, v in checked.body.items() if k not in _PREFILL_DROP}
            pbody.update(max_tokens=1, stream=False, kv_transfer_params=prefill_request_params())
            t = time.perf_counter()
            leg = _Leg(prefill, p.replica_id, endpoint, pbody)
            with prefill.track(p.replica_id):
                item, cause = await self._await_prefill(leg, prefill, p.replica_id)
            if cause is None and item is None:
                cause = FallbackCause.PREFILL_ERROR  # the stream ended without an answer
            elif cause is None:
                prefill_s = time.perf_counter() - t
                self.metrics.prefill_leg.observe(prefill_s)
            if item is not None and item[0] == "error":
                status = item[1]
                if 400 <= status < 500:
                    self.metrics.requests.labels("pd", endpoint, str(status)).inc()
                    return "pd", None, JSONResponse(item[2], status_code=status, headers=headers)
                cause = FallbackCause.PREFILL_ERROR
            elif item is not None:
                kv_params = item[1].get("kv_transfer_params")
                if not kv_params:
                    cause = FallbackCause.NO_KV_PARAMS
        if cause is not None:
            if link:
                self.breakers.abandon(*link)  # not the link's fault: free a half-open probe slot
            leg = self._fallback_leg(endpoint, checked.body, d_id, p.replica_id if p else None)
            if leg is not None:
                self.metrics.fallbacks.labels(cause.value).inc()
                headers["x-pdserve-fallback-cause"] = cause.value
            return "fallback", leg, None
        # The transfer's deadline comes out of the TTFT budget that the prefill leg left.
        budget = self.cfg.slo.ttft_ms / 1000 - (time.perf_counter() - t0)
        fb = self.cfg.fallback
        kv_params = dict(kv_params, transfer_deadline_s=round(
            min(fb.max_transfer_deadline_s, max(fb.min_transfer_deadline_s, budget)), 3))
        dbody = dict(checked.body, kv_transfer_params=kv_params)
        leg = _Leg(decode, d_id, endpoint, dbody)
        leg.prefill_s = prefill_s
        leg.link = link
        return "pd", leg, None

    def _fallback_leg(self, endpoint: str, body: dict[str, Any], d_id: Optional[str],
                      failed_prefill: Optional[str]) -> Optional["_Leg"]:
        """The whole request on the chosen decode replica while it is healthy, else on any
        healthy engine but the prefill replica that just failed (None if there is none)."""
        decode = self.pools["decode"]
        if d_id and decode.is_healthy(d_id):
            return _Leg(decode, d_id, endpoint, body)
        return self._spare_leg(endpoint, body, gone=frozenset({failed_prefill}))

    def _pick_pair(self, prefill: Pool, decode: Pool):
        """(prefill, decode, None) for P/D, or a fallback cause. Links with an open breaker are skipped."""
        d_all = decode.candidates()
        if not any(c.healthy for c in d_all):
            return None, None, FallbackCause.NO_DECODE_REPLICA  # whole on a prefill engine, not a wait
        p_cands = prefill.candidates()
        if not any(c.healthy for c in p_cands):
            return None, self.decode_pick.pick(d_all), FallbackCause.NO_PREFILL_REPLICA
        tried: set[str] = set()
        while True:
            p = self.prefill_pick.pick([c for c in p_cands if c.replica_id not in tried])
            if p is None:
                return None, self.decode_pick.pick(d_all), FallbackCause.LINK_OPEN
            tried.add(p.replica_id)
            d = self.decode_pick.pick([c for c in d_all if self.breakers.available(p.replica_id, c.replica_id)])
            if d is not None:
                return p, d, None

    async def _await_prefill(self, leg: _Leg, pool: Pool, replica_id: str):
        """Wait for the prefill answer; give up early if its replica is seen to die."""
        task = asyncio.ensure_future(leg.next_item())
        deadline = time.perf_counter() + self.cfg.router.prefill_timeout_s
        try:
            while True:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    return None, FallbackCause.PREFILL_TIMEOUT
                done, _ = await asyncio.wait({task}, timeout=min(remaining, self.cfg.router.load_poll_interval_s))
                if done:
                    return task.result(), None
                if not pool.is_healthy(replica_id):
                    return None, FallbackCause.PREFILL_REPLICA_LOST
        except LegLost:
            return None, FallbackCause.PREFILL_REPLICA_LOST
        except Exception as e:
            logger.warning("prefill leg on %s failed: %r", replica_id, e)
            return None, FallbackCause.PREFILL_ERROR
        finally:
            if not task.done():
                task.cancel()
                leg.cancel()

    async def _first_item(self, endpoint: str, path: str, leg: _Leg, checked: CheckedRequest,
                          headers: dict[str, str]) -> tuple[str, _Leg, Optional[tuple]]:
        """(path, leg, first item). A leg whose engine is lost before its first item (connection
        refused or dropped) moves to another healthy engine, whole (fallback); raises when none is left."""
        moves, limit = 0, self.cfg.fallback.max_stream_resumes
        while True:
            try:
                with leg.pool.track(leg.replica_id):
                    return path, leg, await asyncio.wait_for(leg.next_item(), self.cfg.router.request_timeout_s)
            except ConnectionError as e:
                leg.cancel()
                spare = self._replan(leg, endpoint, checked, headers) if moves < limit else None
                if spare is None:
                    raise
                logger.warning("%s replica %s lost before its first item (%r); serving the request on %s replica %s",
                               leg.pool.name, leg.served_by or leg.replica_id, e, spare.pool.name, spare.replica_id)
                path, leg, moves = "fallback", spare, moves + 1
            except BaseException:
                leg.cancel()
                raise

    def _replan(self, dead: _Leg, endpoint: str, checked: CheckedRequest, headers: dict[str, str]) -> Optional[_Leg]:
        """The untouched request on another healthy engine, after ``dead``'s engine was lost."""
        if dead.link is not None:
            self.breakers.abandon(*dead.link)  # the engine died, not the link
        spare = self._spare_leg(endpoint, checked.body, gone=frozenset({dead.replica_id, dead.served_by}))
        if spare is not None:
            cause = FallbackCause.REPLICA_LOST
            self.metrics.fallbacks.labels(cause.value).inc()
            headers["x-pdserve-fallback-cause"] = cause.value
        return spare

    async def _respond(self, endpoint, path, leg: _Leg, checked: CheckedRequest, headers, ctx: _Ctx):
        t0 = ctx.t0
        try:
            path, leg, first = await self._first_item(endpoint, path, leg, checked, headers)
        except (Exception, asyncio.TimeoutError) as e:
            logger.warning("engine call failed: %r", e)
            self.metrics.requests.labels(path, endpoint, "503").inc()
            retry = self._no_engine().headers()
            return JSONResponse(error_body(503, f"engine unavailable: {e!r}", "ServiceUnavailableError"),
                                status_code=503, headers={**headers, **retry})
        if leg.served_by:
            headers[f"x-pdserve-{'decode' if leg.pool.name == 'decode' else 'engine'}-replica"] = leg.served_by
        path = self._settle_link(leg, path, first, headers)
        headers["x-pdserve-path"] = path
        if first is None:
            self.metrics.requests.labels(path, endpoint, "502").inc()
            return JSONResponse(error_body(502, "engine returned no response", "BadGatewayError"),
                                status_code=502, headers=headers)
        kind = first[0]
        if kind == "error":
            self.metrics.requests.labels(path, endpoint, str(first[1])).inc()
            return JSONResponse(first[2], status_code=first[1], headers=headers)
        if kind == "json":
            e2e = time.perf_counter() - t0
            self.metrics.e2e.labels(path, ctx.cls).observe(e2e)
            self.metrics.requests.labels(path, endpoint, "200").inc()
            usage = first[1].get("usage") or {}
            ctx.output_tokens = int(usage.get("completion_tokens") or 0)
            self._judge(ctx, e2e, None, e2e)
            headers.update(_breakdown_headers(leg))
            return JSONResponse(first[1], headers=headers)
        return StreamingResponse(self._stream(endpoint, path, leg, first[1], ctx, checked),
                                 media_type="text/event-stream",
                                 headers=headers)

    def _resume_leg(self, dead: "_Leg", tracker: StreamTracker, checked: CheckedRequest) -> Optional["_Leg"]:
        """A continuation of a broken stream on another healthy engine (decode pool first, then any)."""
        leg = self._spare_leg("completions", tracker.continuation(checked.body, self.cfg.model.served_name),
                              gone=frozenset({dead.replica_id, dead.served_by}))
        if leg is not None:
            logger.warning("resuming a stream on %s replica %s after %d tokens", leg.pool.name, leg.replica_id,
                           len(tracker.sent_ids))
        return leg

    def _settle_link(self, leg: "_Leg", path: str, first: Optional[tuple], headers: dict[str, str]) -> str:
        """Feed the P/D link's breaker, and relabel a request whose KV transfer failed.

        Decode engines run with kv_load_failure_policy "recompute": a failed transfer is
        followed by a full local prefill in the same engine, i.e. monolithic fallback with
        no extra hop, before the first token. The engine reports the failure (its "kv"
        item) ahead of that token, so the headers can still say so.
        """
        if leg.link is None:
            return path
        pull = leg.kv_pull
        if first is None or first[0] == "error":
            self.breakers.abandon(*leg.link)
            return path
        failed = pull is not None and not pull.get("ok")
        self.breakers.record(*leg.link, ok=not failed)
        if pull is not None and pull.get("ok"):
            self.metrics.kv_transfer_seconds.labels(self.cfg.kv_transfer.transport).observe(pull["seconds"])
        if not failed:
            return path
        kind = pull.get("kind") or "unknown"
        cause = FallbackCause.KV_DEADLINE if kind == "deadline" else FallbackCause.KV_TRANSFER_FAILED
        self.metrics.kv_transfer_failures.labels(self.cfg.kv_transfer.transport, kind).inc()
        self.metrics.fallbacks.labels(cause.value).inc()
        headers["x-pdserve-fallback-cause"] = cause.value
        return "fallback"

    def _observe_breakdown(self, leg: "_Leg", ttft: float, queue_s: float) -> None:
        """Splits a P/D request's TTFT: admission queue, prefill leg, KV transfer, and the rest
        (routing, decode queue, first step)."""
        if leg.prefill_s is None:
            return
        pull = leg.kv_pull
        transfer = pull["seconds"] if pull and pull.get("ok") else 0.0
        b = self.metrics.ttft_breakdown
        b.labels("queue").observe(queue_s)
        b.labels("prefill").observe(leg.prefill_s)
        if pull and pull.get("ok"):
            b.labels("kv_transfer").observe(transfer)
        b.labels("decode_first_token").observe(max(0.0, ttft - queue_s - leg.prefill_s - transfer))

    async def _stream(self, endpoint, path, leg: _Leg, first_chunk: str, ctx: _Ctx,
                      checked: CheckedRequest) -> AsyncIterator[str]:
        t0 = ctx.t0
        ttft = None
        last = None
        tokens = 0
        completed = False
        tracker = StreamTracker(endpoint)
        resumes = 0
        status = "200"  # as counted in pdserve_requests_total; 499 if the client left
        try:
            with leg.pool.track(leg.replica_id):
                pending: list[str] = [first_chunk] + leg.ready_chunks()
                while True:
                    if pending:
                        text = "".join(pending)
                        if resumes:
                            text = tracker.rewrite(text)
                        before = len(tracker.sent_ids)
                        tracker.observe(text)
                        # Stream chunks carry their token ids; count text chunks only where none do.
                        n = len(tracker.sent_ids) - before or sum(1 for c in pending if _carries_token(c))
                        if n:
                            now = time.perf_counter()
                            if ttft is None:
                                ttft = now - t0
                            elif last is not None:
                                self.metrics.itl.labels(path, ctx.cls).observe(now - last)
                            tokens += n
                            last = now
                        if text:
                            yield text
                    if tracker.done:
                        break
                    try:
                        item = await leg.next_item()
                    except Exception as e:  # noqa: BLE001 - the engine or its replica died mid-stream
                        logger.warning("stream from %s broke after %d tokens: %r", leg.served_by or leg.replica_id,
                                       len(tracker.sent_ids), e)
                        item = None
                    if item is not None:
                        pending = [item[1]] + leg.ready_chunks()
                        continue
                    # The stream ended before [DONE]: resume it elsewhere, or end it cleanly.
                    new_leg = None
                    if resumes < self.cfg.fallback.max_stream_resumes and tracker.can_resume(checked.body):
                        new_leg = self._resume_leg(leg, tracker, checked)
                    if new_leg is None:
                        self.metrics.stream_resumes.labels("exhausted").inc()
                        status = "503"
                        yield error_event("the engine serving this stream failed and it could not be resumed")
                        break
                    self.metrics.stream_resumes.labels("resumed").inc()
                    leg.cancel()
                    leg, resumes, pending = new_leg, resumes + 1, []
            completed = True
        finally:
            if not completed:
                leg.cancel()  # client went away: abort the engine request
            self.metrics.inflight.dec()
            ctx.output_tokens = tokens
            self._finish(ctx)
            self.metrics.requests.labels(path, endpoint, status if completed else "499").inc()
            if ttft is not None:
                self.metrics.ttft.labels(path, ctx.cls).observe(ttft)
                self._observe_breakdown(leg, ttft, ctx.ticket.queue_wait_s)
                self.metrics.e2e.labels(path, ctx.cls).observe(last - t0)
                tpot = (last - t0 - ttft) / (tokens - 1) if tokens > 1 else None
                if tpot is not None:
                    self.metrics.tpot.labels(path, ctx.cls).observe(tpot)
                if completed and status == "200":
                    self._judge(ctx, ttft, tpot, last - t0)

