"""The relay stage: turns a plan's first answer item into the client's response.

A JSON answer goes back whole (with the P/D timing headers); a stream is relayed chunk by
chunk (decode/relay.py, which resumes it elsewhere if its engine dies), and accounted for
when it ends, however it ends.

A stream whose engine sent its head (engine/server.py: vLLM accepted it, the engine has not
answered yet) starts at once, as vLLM's server starts it: the client's status line and
headers go out while the engine prefills, not after its first token. A P/D decode leg's
stream starts at its first token, whose KV pull report its headers carry.
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
        headed = False  # the engine has accepted a stream and not yet answered: its prefill runs on
        try:
            path, leg, first = await self.legs.first_item(ctx, path, leg)
            headed = first is not None and first[0] == "head"
        except (Exception, asyncio.TimeoutError) as e:
            logger.warning("engine call failed: %r", e)
            self.account.answered(path, ctx.endpoint, 503)
            retry = self.account.no_engine().headers()
            return JSONResponse(error_body(503, f"engine unavailable: {e!r}", "ServiceUnavailableError"),
                                status_code=503, headers={**headers, **retry})
        finally:
            if not headed:
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
        first_chunk = None if headed else first[1]
        body = self.stream(ctx, path, leg, first_chunk)
        return _SettledStreamingResponse(body, settle=lambda: self._never_started(ctx, path, leg, body),
                                         media_type="text/event-stream", headers=headers)

    def _never_started(self, ctx: RequestCtx, path: str, leg: Leg, body: "_Stream") -> None:
        """A stream Starlette gave up before starting its body (the client left before the
        status line went out): what the body's own cleanup would have done."""
        if body.started:
            return
        body.started = True  # settled once
        leg.cancel()  # abort the engine request
        self.account.stream_ended(ctx, path, self._relay(ctx, path, leg))

    def _detokenizer(self, body: dict) -> Optional[Callable[[list[int]], str]]:
        """Output token ids to text as the engines write it (the checker's tokenizer), for a resume."""
        tokenizer = getattr(self.checker, "tokenizer", None)
        if tokenizer is None:
            return None
        skip = body.get("skip_special_tokens", True)
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip)

    def _relay(self, ctx: RequestCtx, path: str, leg: Leg) -> StreamRelay:
        m = self.metrics
        return StreamRelay(ctx.endpoint, leg, ctx.body, served_name=self.cfg.model.served_name,
                           max_resumes=self.cfg.fallback.max_stream_resumes, t0=ctx.t0,
                           first_chunk_timeout_s=self.cfg.router.request_timeout_s,
                           move_whole=lambda dead: self.legs.replan(ctx, dead),
                           respawn=self.placement.respawn,
                           on_gap=lambda seconds: m.itl.labels(path, ctx.cls).observe(seconds),
                           on_resume=lambda outcome: m.stream_resumes.labels(outcome).inc(),
                           hide_ids=ctx.hide_ids, max_model_len=self.cfg.model.max_model_len,
                           detokenize=self._detokenizer(ctx.body))

    def stream(self, ctx: RequestCtx, path: str, leg: Leg, first_chunk: Optional[str]) -> "_Stream":
        """``first_chunk`` None: the stream's head came first, its prefill still runs."""
        return _Stream(self._relay_chunks(ctx, path, leg, first_chunk))

    async def _relay_chunks(self, ctx: RequestCtx, path: str, leg: Leg,
                            first_chunk: Optional[str]) -> AsyncIterator[str]:
        relay = self._relay(ctx, path, leg)
        chunks = relay.run(first_chunk)
        prefilling = first_chunk is None
        try:
            async for text in chunks:
                if prefilling:
                    self.disaggregator.prefill_over(ctx)  # the engine's first answer ends its prefill
                    prefilling = False
                yield text
        finally:
            await chunks.aclose()  # a client gone mid-stream: the relay lets go of its replica first
            if not relay.completed:
                relay.leg.cancel()  # client went away: abort the engine request
            self.account.stream_ended(ctx, "fallback" if relay.moves else path, relay)


class _Stream:
    """A response body that knows whether it was ever started."""

    def __init__(self, chunks: AsyncIterator[str]) -> None:
        self._chunks = chunks
        self.started = False

    def __aiter__(self) -> "_Stream":
        return self

    async def __anext__(self) -> str:
        self.started = True
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        await self._chunks.aclose()


class _SettledStreamingResponse(StreamingResponse):
    """A stream settled however the ASGI server ends it. Starlette cancels a response whose
    client has gone as soon as it learns of it, which can be before the body was started;
    a body never started never runs its own cleanup, so ``settle`` runs it then."""

    def __init__(self, content: _Stream, *, settle: Callable[[], None], **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._settle = settle

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._settle()
