"""The admit stage: a slot in admission (budgets, KV gate, the degradation ladder), and
what its ticket changes in the body (capped max_tokens, cache salt, priority) and headers."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from fastapi.responses import JSONResponse

from pdserve.admission.controller import CLASS_RANK, Ticket
from pdserve.admission.rejection import Rejection
from pdserve.router.context import RequestCtx
from pdserve.router.protocol import CheckedRequest

if TYPE_CHECKING:
    from pdserve.router.core import Router


def apply_ticket(t: Ticket, checked: CheckedRequest, priority_scheduling: bool) -> tuple[dict[str, str], str]:
    """Applies the admission decision to the body; returns the response headers it implies
    and the admission reason for the metric ("ok", "capped" or "degraded")."""
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
    if priority_scheduling:
        checked.body["priority"] = CLASS_RANK[t.priority_class]
    else:
        checked.body.pop("priority", None)  # fcfs engines refuse any priority but 0
    return headers, reason


class Admit:
    def __init__(self, router: "Router") -> None:
        self.router = router
        self.account = router.account
        self.metrics = router.metrics

    async def admit(self, ctx: RequestCtx) -> Optional[JSONResponse]:
        """Admits the request (``ctx.ticket``, ``ctx.headers``), or returns its rejection."""
        r = self.router
        if not any(pool.has_healthy() for pool in r.pools.values()):
            # at once: waiting would not bring one
            return self.account.rejected(self.account.no_engine(), ctx.cls, ctx.endpoint)
        checked = ctx.checked
        try:
            ticket = await r.admission.admit(ctx.tenant, checked.body.get("model") or r.cfg.model.served_name,
                                             checked.prompt_tokens, checked.max_tokens, checked.sequences)
        except Rejection as rej:
            return self.account.rejected(rej, ctx.cls, ctx.endpoint)
        ctx.admitted(ticket)
        ctx.headers, reason = apply_ticket(ticket, checked, r.cfg.engine.scheduling_policy == "priority")
        self.metrics.admissions.labels(ticket.priority_class, "admitted", reason).inc()
        self.metrics.queue_wait.labels(ticket.priority_class).observe(ticket.queue_wait_s)
        self.metrics.inflight.inc()
        return None
