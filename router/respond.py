"""The relay stage: turns a plan's first answer item into the client's response.

A JSON answer goes back whole (with the P/D timing headers); a stream is relayed chunk by
chunk (decode/relay.py, which resumes it elsewhere if its engine dies), and accounted for
when it ends, however it ends.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, AsyncIterator, Callable, Optional

from fastapi.responses import JSONResponse, StreamingResponse

from pdserve.decode.leg import breakdown_headers
from pdserve.decode.relay import StreamRelay
from pdserve.engine.errors import error_body
from pdserve.engine.leg import Leg
from pdserve.router.context import RequestCtx

if TYPE_CHECKING:
    from pdserve.router.core import Router

logger = logging.getLogger("pdserve.router")


class Responder:
    def __init__(self, router: "Router") -> None:
        self.cfg = router.cfg
        self.metrics = router.metrics
        self.account = router.account
        self.legs = router.legs
        self.placement = router.placement
        self.checker = router.checker
        self.disaggregator = router.disaggregator

    async def respond(self, ctx: RequestCtx, path: str, leg: Leg):
        headers = ctx.headers
        try:
            path, leg, first = await self.legs.first_item(ctx, path, leg)
        except (Exception, asyncio.TimeoutError) as e:
            logger.warning("engine call failed: %r", e)
            self.account.answered(path, ctx.endpoint, 503)
            retry = self.account.no_engine().headers()
            return JSONResponse(error_body(503, f"engine unavailable: {e!r}", "ServiceUnavailableError"),
                                status_code=503, headers={**headers, **retry})
        finally:
            self.disaggregator.prefill_over(ctx)  # its first item (or none) ends a whole request's prefill
        if leg.served_by:
            headers[f"x-pdserve-{'decode' if leg.pool.name == 'decode' else 'engine'}-replica"] = leg.served_by
        path = self.account.settle_link(leg, path, first, headers)
        headers["x-pdserve-path"] = path
        if first is None:
            self.account.answered(path, ctx.endpoint, 502)
            return JSONResponse(error_body(502, "engine returned no response", "BadGatewayError"),
                                status_code=502, headers=headers)
        kind = first[0]
        if kind == "error":
            self.account.answered(path, ctx.endpoint, first[1])
            return JSONResponse(first[2], status_code=first[1], headers=headers)
        if kind == "json":
            self.account.json_answered(ctx, path, first[1])
            headers.update(breakdown_headers(leg.prefill_s, leg.kv_pull))
            return JSONResponse(first[1], headers=headers)
        return StreamingResponse(self.stream(ctx, path, leg, first[1]), media_type="text/event-stream",
                                 headers=headers)

    def _detokenizer(self, body: dict) -> Optional[Callable[[list[int]], str]]:
        """Output token ids to text as the engines write it (the checker's tokenizer), for a resume."""
        tokenizer = getattr(self.checker, "tokenizer", None)
        if tokenizer is None:
            return None
        skip = body.get("skip_special_tokens", True)
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip)

    async def stream(self, ctx: RequestCtx, path: str, leg: Leg, first_chunk: str) -> AsyncIterator[str]:
        m = self.metrics
        relay = StreamRelay(ctx.endpoint, leg, ctx.body, served_name=self.cfg.model.served_name,
                            max_resumes=self.cfg.fallback.max_stream_resumes, t0=ctx.t0,
                            respawn=self.placement.respawn,
                            on_gap=lambda seconds: m.itl.labels(path, ctx.cls).observe(seconds),
                            on_resume=lambda outcome: m.stream_resumes.labels(outcome).inc(),
                            hide_ids=ctx.hide_ids, max_model_len=self.cfg.model.max_model_len,
                            detokenize=self._detokenizer(ctx.body))
        chunks = relay.run(first_chunk)
        try:
            async for text in chunks:
                yield text
        finally:
            await chunks.aclose()  # a client gone mid-stream: the relay lets go of its replica first
            if not relay.completed:
                relay.leg.cancel()  # client went away: abort the engine request
            self.account.stream_ended(ctx, path, relay)
