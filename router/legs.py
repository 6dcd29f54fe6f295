"""The legs stage: runs the engine calls a plan needs, up to the first item of the answer.

P/D: pick a (prefill, decode) pair whose link's breaker lets it through; the
disaggregation decider (router/disaggregate.py) may then serve the request whole on one of
the two instead; else run the prefill leg (prefill/leg.py), start the decode leg with the
prefill's KV lease (decode/leg.py).
Every failure before the decode leg starts falls back: the untouched request on the
chosen decode replica while it is healthy, else on any healthy engine but the prefill
replica that failed. An engine lost before its first item (any plan) is replaced the
same way (``replica_lost``), up to ``fallback.max_stream_resumes`` times.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Optional

from fastapi.responses import JSONResponse

from pdserve.decode.leg import start_decode
from pdserve.engine.leg import Leg
from pdserve.fallback.policy import FallbackCause
from pdserve.prefill.leg import KVLease, run_prefill
from pdserve.router.context import RequestCtx

if TYPE_CHECKING:
    from pdserve.router.core import Router

logger = logging.getLogger("pdserve.router")


class LegRunner:
    def __init__(self, router: "Router") -> None:
        self.cfg = router.cfg
        self.pools = router.pools
        self.placement = router.placement
        self.breakers = router.breakers
        self.account = router.account
        self.metrics = router.metrics
        self.disaggregator = router.disaggregator

    async def pd_legs(self, ctx: RequestCtx) -> tuple[str, Optional[Leg], Optional[JSONResponse]]:
        """Run the prefill leg; return (path, decode leg, early error response or None)."""
        prefill, decode = self.pools["prefill"], self.pools["decode"]
        p, d, cause = self.placement.pick_pair(prefill, decode, self.disaggregator.selection_request(ctx))
        if cause is None:
            way = self.disaggregator.choose(ctx, p, d)
            if way != "pd":  # whole on one of the pair's engines: no prefill leg, no transfer
                pool, pick = (decode, d) if way == "decode_local" else (prefill, p)
                return way, Leg(pool, pick.replica_id, ctx.endpoint, ctx.body), None
        d_id = d.replica_id if d else None
        link = (p.replica_id, d_id) if cause is None and p is not None and d_id else None
        if link:
            self.breakers.begin(*link)
        if cause is None:
            ctx.headers["x-pdserve-prefill-replica"] = p.replica_id
            r = self.cfg.router
            try:
                result = await run_prefill(prefill, p.replica_id, ctx.endpoint, ctx.body, r.prefill_timeout_s,
                                           r.load_poll_interval_s)
            finally:
                self.disaggregator.prefill_over(ctx)
            if result.seconds is not None:
                self.metrics.prefill_leg.observe(result.seconds)
            if result.cause is None and result.client_error is None:
                self.disaggregator.observe_prefill_leg(ctx, p, result.seconds)
            if result.client_error is not None:  # the client's fault: a whole run would fail the same way
                if link:
                    self.breakers.abandon(*link)  # the link was not tried: free a half-open probe slot
                if ctx.checked.stream and decode.is_healthy(d_id):
                    # vLLM refuses some inputs of a stream inside it (200, then an error event) and
                    # others before it (400): the whole request on the decode engine is answered
                    # as vLLM's server answers it. The prefill leg, not streamed, cannot tell.
                    return "pd", Leg(decode, d_id, ctx.endpoint, ctx.body), None
                status, body = result.client_error
                self.account.answered("pd", ctx.endpoint, status)
                return "pd", None, JSONResponse(body, status_code=status, headers=ctx.headers)
            cause = result.cause
        if cause is not None:
            if link:
                self.breakers.abandon(*link)  # not the link's fault: free a half-open probe slot
            leg = self.fallback_leg(ctx, d_id, p.replica_id if p else None)
            if leg is not None:
                self.account.fallback(cause, ctx.headers)
            return "fallback", leg, None
        fb = self.cfg.fallback
        # The transfer's deadline comes out of the TTFT budget that the prefill leg left.
        deadline = KVLease.deadline_s(self.cfg.slo.ttft_ms / 1000, time.perf_counter() - ctx.t0,
                                      fb.min_transfer_deadline_s, fb.max_transfer_deadline_s)
        leg = start_decode(decode, d_id, ctx.endpoint, ctx.body, result.lease.for_decode(deadline),
                           result.seconds, link)
        return "pd", leg, None

    def fallback_leg(self, ctx: RequestCtx, d_id: Optional[str], failed_prefill: Optional[str]) -> Optional[Leg]:
        """The whole request on the chosen decode replica while it is healthy, else on any
        healthy engine but the prefill replica that just failed (None if there is none)."""
        decode = self.pools["decode"]
        if d_id and decode.is_healthy(d_id):
            return Leg(decode, d_id, ctx.endpoint, ctx.body)
        return self.placement.spare_leg(ctx.endpoint, ctx.body, gone=frozenset({failed_prefill}))

    async def first_item(self, ctx: RequestCtx, path: str, leg: Leg) -> tuple[str, Leg, Optional[tuple]]:
        """(path, leg, first item). A leg whose engine is lost before its first item (connection
        refused or dropped) moves to another healthy engine, whole (fallback); raises when none is left."""
        moves, limit = 0, self.cfg.fallback.max_stream_resumes
        while True:
            try:
                with leg.pool.track(leg.replica_id):
                    return path, leg, await asyncio.wait_for(leg.next_item(), self.cfg.router.request_timeout_s)
            except ConnectionError as e:
                leg.cancel()
                spare = self.replan(ctx, leg) if moves < limit else None
                if spare is None:
                    raise
                logger.warning("%s replica %s lost before its first item (%r); serving the request on %s replica %s",
                               leg.pool.name, leg.served_by or leg.replica_id, e, spare.pool.name, spare.replica_id)
                path, leg, moves = "fallback", spare, moves + 1
            except BaseException:
                leg.cancel()
                raise

    def replan(self, ctx: RequestCtx, dead: Leg) -> Optional[Leg]:
        """The untouched request on another healthy engine, after ``dead``'s engine was lost."""
        if dead.link is not None:
            self.breakers.abandon(*dead.link)  # the engine died, not the link
        spare = self.placement.spare_leg(ctx.endpoint, ctx.body, gone=frozenset({dead.replica_id, dead.served_by}))
        if spare is not None:
            self.account.fallback(FallbackCause.REPLICA_LOST, ctx.headers)
        return spare
