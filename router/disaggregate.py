"""Where a P/D cluster's request goes once its (prefill, decode) pair is chosen, per
``router.disaggregation``, and what the router measures for that choice.

``always``: P/D. ``adaptive``: router/decider.py's ``decide`` over the live measurements
(router/measure.py) and this request's situation: its class SLOs, the two replicas' queues and
how much of its prompt each already caches (router/prefix_index.py). (``never`` is decided in
the plan stage, router/plan.py: no prefill replica is needed.) Each choice is counted by way and
reason (``pdserve_disaggregation_total``) and named in the response
(``x-pdserve-path``, ``x-pdserve-decision``).

The observations go the other way: each finished request tells the measurements what its
prefill, its decode steps and its KV transfer took (``observe_*``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from pdserve.admission.config import CLASSES
from pdserve.router.decider import Decision, Situation, decide
from pdserve.router.measure import LiveMeasurements
from pdserve.router.prefill_backlog import Pending, PrefillBacklog
from pdserve.router.prefix_index import PromptKeys
from pdserve.router.selection import Candidate, SelectionRequest

if TYPE_CHECKING:
    from pdserve.router.context import RequestCtx
    from pdserve.router.core import Router

WHOLE_WAYS = ("decode_local", "prefill_whole")


def ahead(c: Candidate) -> int:
    """Requests already on a replica: as it reports them, or as this router sent them if more."""
    return max(c.running + c.waiting, c.inflight)


def waiting_besides(c: Candidate, pending_requests: int) -> int:
    """Requests waiting on a replica other than this router's pending prefills there (which the
    backlog counts in tokens): another router's, as the replica's last load report shows them."""
    return max(0, c.waiting - pending_requests)


def _ahead_of(pending: Optional[Pending], replica: str) -> tuple[Optional[int], int]:
    """(tokens, requests) of the prefill backlog a request found on ``replica`` when it was sent
    there; (0, 0) for one the decider did not place (``never``); (None, 0) for one placed on
    another replica (a replaced engine served it: not this choice's measure)."""
    if pending is None:
        return 0, 0
    if pending.replica != replica:
        return None, 0
    return pending.tokens_ahead, pending.requests_ahead


class Disaggregator:
    def __init__(self, router: "Router") -> None:
        self.cfg = router.cfg
        self.mode = router.cfg.router.disaggregation
        self.index = router.prefix_index
        self.metrics = router.metrics
        self.kv_bytes_per_token = router.kv_bytes_per_token
        d = router.cfg.router.decider
        self.measure = LiveMeasurements(d.ewma_alpha, d.min_samples)
        self.backlog = PrefillBacklog()
        self._exported: set[str] = set()
        self._backlog_exported: set[str] = set()
        slo = router.cfg.slo
        self._running_tpot_s = min(slo.for_class(c)["tpot_ms"] for c in CLASSES) / 1000
        cap = d.prefill_whole_max_running
        self._prefill_whole_max = router.cfg.engine.max_num_seqs if cap is None else cap

    # ------------------------------------------------------------------ the request
    def selection_request(self, ctx: "RequestCtx") -> SelectionRequest:
        """What the selection pipelines and the decider know of the request (made once)."""
        if ctx.selection is None:
            ids = getattr(ctx.checked, "prompt_token_ids", None)
            salt = ctx.body.get("cache_salt")
            prompt = PromptKeys(ids, salt if isinstance(salt, str) else None) if ids and self.index else None
            ctx.selection = SelectionRequest(prompt, ctx.checked.prompt_tokens)
        return ctx.selection

    def cached(self, sel: Optional[SelectionRequest], replica: str) -> int:
        if sel is None or sel.prompt is None or self.index is None:
            return 0
        if replica not in sel.cached:
            sel.cached[replica] = self.index.cached_tokens(replica, sel.prompt)
        return sel.cached[replica]

    def choose(self, ctx: "RequestCtx", p: Candidate, d: Candidate) -> str:
        """The way for a request whose pair is (p, d): "pd", "decode_local" or "prefill_whole".
        Its prefill is pending on the engine that runs it until ``prefill_over``."""
        if self.mode != "adaptive":
            decision = Decision("pd", "always")
        else:
            decision = decide(self.measure.snapshot(), self.situation(ctx, p, d))
        self.metrics.disaggregation.labels(decision.way, decision.reason).inc()
        ctx.headers["x-pdserve-decision"] = decision.reason
        on = d if decision.way == "decode_local" else p
        sel = self.selection_request(ctx)
        ctx.prefill = self.backlog.add(on.replica_id, ctx.checked.prompt_tokens - self.cached(sel, on.replica_id))
        return decision.way

    def prefill_over(self, ctx: "RequestCtx") -> None:
        """The request's prefill is done (its first item, its prefill leg's answer) or will not
        run (the request ended first): no longer pending. Idempotent."""
        if ctx.prefill is not None:
            self.backlog.done(ctx.prefill)

    def situation(self, ctx: "RequestCtx", p: Candidate, d: Candidate) -> Situation:
        sel = self.selection_request(ctx)
        slo = self.cfg.slo.for_class(ctx.cls)
        r = self.cfg.router
        b = self.backlog
        p_pending, d_pending = b.requests(p.replica_id), b.requests(d.replica_id)
        return Situation(
            prompt_tokens=ctx.checked.prompt_tokens, kv_bytes_per_token=self.kv_bytes_per_token,
            ttft_slo_s=slo["ttft_ms"] / 1000, tpot_slo_s=slo["tpot_ms"] / 1000,
            running_tpot_slo_s=self._running_tpot_s,
            prefill_cached=self.cached(sel, p.replica_id), decode_cached=self.cached(sel, d.replica_id),
            prefill_tokens_ahead=b.tokens(p.replica_id), decode_tokens_ahead=b.tokens(d.replica_id),
            prefill_ahead=max(0, ahead(p) - p_pending), prefill_running=max(p.running, p.inflight),
            prefill_waiting=waiting_besides(p, p_pending),
            decode_running=max(d.running, d.inflight), decode_waiting=waiting_besides(d, d_pending),
            prefill_room=ahead(p) < self._prefill_whole_max and p.kv_cache_usage < r.decode_kv_headroom,
            headroom=r.decider.slo_headroom, tie_margin=r.decider.whole_tie_margin)

    # ------------------------------------------------------------------ what requests measured
    def observe_prefill_leg(self, ctx: "RequestCtx", p: Candidate, seconds: Optional[float]) -> None:
        """A P/D prefill leg that produced its KV, as the router timed it: its tokens and the
        backlog it found on the prefill engine, against its seconds shared with the requests
        there that the backlog does not count (as the decider predicts it)."""
        uncached = self.count_hit(ctx, "prefill", p.replica_id)
        tokens_ahead, requests_ahead = _ahead_of(ctx.prefill, p.replica_id)
        if seconds is not None and tokens_ahead is not None:
            work = uncached + tokens_ahead
            self.measure.prefill_done("pd", work, seconds, max(0, ahead(p) - requests_ahead),
                                      own_share=uncached / work if work else 1.0)

    def count_hit(self, ctx: "RequestCtx", pool: str, replica: str) -> int:
        """Counts the prompt and the part of it ``replica`` held; returns the uncached tokens."""
        n = ctx.checked.prompt_tokens
        cached = self.cached(ctx.selection, replica)
        if ctx.selection is not None and ctx.selection.prompt is not None:
            self.metrics.prefix_tokens.labels(pool, "prompt").inc(n)
            self.metrics.prefix_tokens.labels(pool, "cached").inc(cached)
        return n - cached

    def observe_stream(self, ctx: "RequestCtx", path: str, leg, ttft_s: float, tpot_s: Optional[float],
                       tokens: int) -> None:
        """A finished stream: its decode steps (on a decode engine), and for a whole request on a
        P/D pool's engine its TTFT, which is mostly that engine's prefill."""
        sel = ctx.selection
        picked = sel.picked.get(leg.replica_id) if sel is not None else None
        if picked is None:
            return  # served elsewhere than the replica chosen (a replaced engine): not this choice's measure
        pool = leg.pool.name
        if pool == "decode" and tpot_s is not None:
            self.measure.decoded(tpot_s, max(picked.running, picked.inflight), tokens)
        if leg.link is None and path in (*WHOLE_WAYS, "monolithic"):  # not a fallback: its TTFT holds a failure
            uncached = self.count_hit(ctx, pool, leg.replica_id)
            tokens_ahead, requests_ahead = _ahead_of(ctx.prefill, leg.replica_id)
            if pool in ("prefill", "decode") and tokens_ahead is not None:
                wait = ctx.ticket.queue_wait_s if ctx.ticket is not None else 0.0
                # The prefill work ahead of it and its own, as the prediction counts them; the
                # requests the engine runs slow it down, and the pool's fit keeps that.
                self.measure.prefill_done(pool, uncached + tokens_ahead, max(0.0, ttft_s - wait),
                                          waiting_besides(picked, requests_ahead))

    def observe_poll(self, prefill_replicas: int) -> None:
        """Once per load poll: the prefill engines' busy share, and /metrics."""
        self.measure.poll(prefill_replicas)
        for name, value in self.measure.gauges().items():
            self.metrics.decider_input.labels(name).set(value)
        pending = self.backlog.snapshot()
        for replica in self._backlog_exported - set(pending):
            self.metrics.prefill_backlog_tokens.labels(replica).set(0)
        for replica, tokens in pending.items():
            self.metrics.prefill_backlog_tokens.labels(replica).set(tokens)
        self._backlog_exported |= set(pending)
        if self.index is not None:
            now = set(self.index.replicas())
            for replica in now:
                self.metrics.prefix_index_blocks.labels(replica).set(self.index.blocks(replica))
            for gone in self._exported - now:
                self.metrics.prefix_index_blocks.remove(gone)
            self._exported = now
