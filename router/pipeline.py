"""The router as a pipeline of stages, each with one job:

    intake (authenticate, check)  router/intake.py
    admit                          router/admit.py
    plan the path                  router/plan.py
    run the legs                   router/legs.py    (prefill/leg.py, decode/leg.py)
    relay and resume               router/respond.py (decode/relay.py, decode/resume.py)
    account                        router/accounting.py

A stage that ends the request returns its response; otherwise the request goes on to the
next. The pipeline needs no socket and no Ray: the HTTP app (router/http_app.py) and the
Ray Serve replica (router/app.py) are shells around it, and tests drive it with in-memory
pools (tests/test_pipeline.py).

P/D flow for one request: the prefill leg is the same body with ``max_tokens=1`` and
``do_remote_decode``; the engine keeps the prompt's KV and answers with
``kv_transfer_params``; the decode leg is the original body plus those params; the decode
engine pulls the KV (NIXL or gRPC, the router does not care) and streams tokens back. A
prefill failure or timeout sends the request to a decode engine whole (fallback).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from fastapi.responses import Response, StreamingResponse

from pdserve.router.admit import Admit
from pdserve.router.context import RequestCtx
from pdserve.router.intake import Intake
from pdserve.router.plan import Planner

if TYPE_CHECKING:
    from pdserve.router.core import Router


class Pipeline:
    def __init__(self, router: "Router") -> None:
        self.intake = Intake(router)
        self.admit = Admit(router)
        self.planner = Planner(router)
        self.placement = router.placement
        self.legs = router.legs
        self.responder = router.responder
        self.account = router.account
        self.disaggregator = router.disaggregator

    async def serve(self, endpoint: str, request: Any) -> Response:
        """One request. ``request`` needs ``headers`` (a mapping) and an async ``body()``."""
        ctx = RequestCtx(endpoint, time.perf_counter(), request.headers)
        refused = await self.intake.take(ctx, request)
        if refused is None:
            refused = await self.admit.admit(ctx)
        if refused is not None:
            return refused
        handed_off = False
        try:
            response = await self._route(ctx)
            handed_off = isinstance(response, StreamingResponse)  # the stream accounts for itself
            return response
        finally:
            if not handed_off:
                self.account.release(ctx)

    async def _route(self, ctx: RequestCtx) -> Response:
        plan = self.planner.plan(ctx)
        if plan.path == "pd":
            path, leg, early = await self.legs.pd_legs(ctx)
            if early is not None:
                return early
        else:
            path, leg = plan.path, self.placement.spare_leg(ctx.endpoint, ctx.body, order=plan.order,
                                                            request=self.disaggregator.selection_request(ctx))
        if leg is None:
            return self.account.no_engine_response(ctx, path)
        return await self.responder.respond(ctx, path, leg)
