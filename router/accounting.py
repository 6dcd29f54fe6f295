"""The pipeline's last stage: what every request leaves behind in metrics, goodput,
admission and the P/D links' breakers. Nothing here decides where a request goes."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Optional

from fastapi.responses import JSONResponse

from pdserve.admission.rejection import Rejection
from pdserve.decode.leg import failure_kind, pull_failed, pull_ok, recompute_cause, ttft_stages
from pdserve.decode.relay import StreamRelay
from pdserve.engine.leg import Leg
from pdserve.fallback.policy import FallbackCause
from pdserve.router.context import RequestCtx

if TYPE_CHECKING:
    from pdserve.router.core import Router


class Accounting:
    def __init__(self, router: "Router") -> None:
        self.cfg = router.cfg
        self.metrics = router.metrics
        self.admission = router.admission
        self.goodput = router.goodput
        self.breakers = router.breakers
        self.disaggregator = router.disaggregator

    # ------------------------------------------------------------------ answers without an engine
    def no_engine(self) -> Rejection:
        return Rejection(503, "no_healthy_engine", "no engine replica of this cluster is healthy right now; "
                         "retry shortly", self.cfg.admission.retry_after_s)

    def no_engine_response(self, ctx: RequestCtx, path: str) -> JSONResponse:
        r = self.no_engine()
        self.metrics.requests.labels(path, ctx.endpoint, "503").inc()
        return JSONResponse(r.body(), status_code=503, headers={**ctx.headers, **r.headers()})

    def rejected(self, r: Rejection, cls: str, endpoint: str) -> JSONResponse:
        self.metrics.admissions.labels(cls, "rejected", r.reason).inc()
        self.metrics.requests.labels("none", endpoint, str(r.status)).inc()
        return JSONResponse(r.body(), status_code=r.status, headers=r.headers())

    def answered(self, path: str, endpoint: str, status: int | str) -> None:
        self.metrics.requests.labels(path, endpoint, str(status)).inc()

    # ------------------------------------------------------------------ fallback and links
    def fallback(self, cause: FallbackCause, headers: dict[str, str]) -> None:
        self.metrics.fallbacks.labels(cause.value).inc()
        headers["x-pdserve-fallback-cause"] = cause.value

    def settle_link(self, leg: Leg, path: str, first: Optional[tuple], headers: dict[str, str]) -> str:
        """Feed the P/D link's breaker, and relabel a request whose KV transfer failed (its
        decode engine recomputed the prompt locally: decode/leg.py)."""
        if leg.link is None:
            return path
        pull = leg.kv_pull
        if first is None or first[0] == "error":
            self.breakers.abandon(*leg.link)
            return path
        failed = pull_failed(pull)
        self.breakers.record(*leg.link, ok=not failed)
        transport = self.cfg.kv_transfer.transport
        if pull_ok(pull):
            self.metrics.kv_transfer_seconds.labels(transport).observe(pull["seconds"])
        cause = recompute_cause(pull)
        if cause is None:
            return path
        self.metrics.kv_transfer_failures.labels(transport, failure_kind(pull)).inc()
        self.fallback(cause, headers)
        return "fallback"

    # ------------------------------------------------------------------ the end of a request
    def release(self, ctx: RequestCtx) -> None:
        """An admitted request is over: its in-flight slot and tenant tokens."""
        self.metrics.inflight.dec()
        self.finish(ctx)

    def finish(self, ctx: RequestCtx) -> None:
        self.disaggregator.prefill_over(ctx)  # a request that ended before its first item
        t = ctx.ticket
        self.admission.finish(t, ctx.output_tokens)
        self.metrics.tenant_tokens.labels(t.tenant.name, "input").inc(t.prompt_tokens)
        self.metrics.tenant_tokens.labels(t.tenant.name, "output").inc(ctx.output_tokens)

    def judge(self, ctx: RequestCtx, ttft: float, tpot: Optional[float], e2e: float) -> None:
        met = self.goodput.judge(ctx.cls, ttft, tpot, e2e, time.monotonic())
        self.metrics.slo_requests.labels(ctx.cls, "true" if met else "false").inc()
        if met:
            self.metrics.goodput_requests.labels(ctx.cls).inc()

    def json_answered(self, ctx: RequestCtx, path: str, body: dict) -> None:
        """A non-streamed answer: its TTFT is its E2E."""
        e2e = time.perf_counter() - ctx.t0
        self.metrics.e2e.labels(path, ctx.cls).observe(e2e)
        self.answered(path, ctx.endpoint, 200)
        usage = body.get("usage") or {}
        ctx.output_tokens = int(usage.get("completion_tokens") or 0)
        self.judge(ctx, e2e, None, e2e)

    def stream_ended(self, ctx: RequestCtx, path: str, relay: StreamRelay) -> None:
        """A streamed answer ended (completed, exhausted, or the client went away)."""
        self.metrics.inflight.dec()
        ctx.output_tokens = relay.tokens
        self.finish(ctx)
        self.answered(path, ctx.endpoint, relay.status if relay.completed else "499")
        if relay.ttft is None:
            return
        m, t0 = self.metrics, ctx.t0
        m.ttft.labels(path, ctx.cls).observe(relay.ttft)
        for stage, seconds in ttft_stages(relay.leg.prefill_s, relay.leg.kv_pull, relay.ttft,
                                          ctx.ticket.queue_wait_s):
            m.ttft_breakdown.labels(stage).observe(seconds)
        m.e2e.labels(path, ctx.cls).observe(relay.last - t0)
        tokens = relay.tokens
        tpot = (relay.last - t0 - relay.ttft) / (tokens - 1) if tokens > 1 else None
        if tpot is not None:
            m.tpot.labels(path, ctx.cls).observe(tpot)
        if relay.completed and relay.status == "200":
            self.disaggregator.observe_stream(ctx, path, relay.leg, relay.ttft, tpot, tokens)
        if relay.completed and relay.status == "200":
            self.judge(ctx, relay.ttft, tpot, relay.last - t0)
