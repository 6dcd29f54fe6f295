"""The plan stage: which path a request takes before any engine is called.

* ``monolithic`` (whole on one engine): the ladder sent the request to its degraded target
  (a prefill engine, so decode KV stays for Critical), the cluster is monolithic, or the
  A/B split put the request's session on its monolithic arm, or the request asks for
  several choices (``n`` other than 1: router/protocol.py ``serves_whole``; its response
  says ``x-pdserve-monolithic-cause: several_choices``);
* ``decode_local`` (whole on a decode engine): a P/D cluster with
  ``router.disaggregation: never``;
* ``pd``: a prefill leg, then a decode leg. Its fallbacks are decided as its legs run
  (router/legs.py), since most of them are failures only the legs can see; so is the adaptive
  decider's choice (router/disaggregate.py), which needs the pair the legs stage picks.

Each whole-request plan names the pools to try in order: the first with a healthy replica
serves it, so no call waits on a pool with none.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from pdserve.router.context import RequestCtx
from pdserve.router.protocol import serves_whole

if TYPE_CHECKING:
    from pdserve.router.core import Router


@dataclass(frozen=True)
class Plan:
    path: str  # "pd" or "monolithic"
    reason: str  # "pd", "degraded", "monolithic_cluster" or "ab_monolithic"
    order: tuple[str, ...] = ()  # the pools that may serve a whole request, in order


PD = Plan("pd", "pd")
DEGRADED = Plan("monolithic", "degraded", ("prefill", "decode"))  # on decode if no prefill is healthy
MONOLITHIC_CLUSTER = Plan("monolithic", "monolithic_cluster", ("monolithic",))
AB_MONOLITHIC = Plan("monolithic", "ab_monolithic", ("decode", "prefill"))  # prefill if no decode is healthy
SEVERAL_CHOICES = Plan("monolithic", "several_choices", ("decode", "prefill"))
NEVER_SPLIT = Plan("decode_local", "never", ("decode", "prefill"))  # router.disaggregation: never


def choose_plan(mode: str, degraded_target: Optional[str], ab_arm: Callable[[], str], whole: bool = False) -> Plan:
    """The path decision. ``whole``: the request must be served whole (several choices).
    ``ab_arm`` is asked only for a P/D cluster's undegraded request that may be split."""
    if degraded_target == "prefill":
        return DEGRADED
    if mode == "monolithic":
        return MONOLITHIC_CLUSTER
    if whole:
        return SEVERAL_CHOICES
    if ab_arm() == "monolithic":
        return AB_MONOLITHIC
    return PD


class Planner:
    def __init__(self, router: "Router") -> None:
        self.router = router

    def plan(self, ctx: RequestCtx) -> Plan:
        plan = choose_plan(self.router.mode, ctx.ticket.degraded_target, lambda: self.ab_arm(ctx),
                           whole=serves_whole(ctx.endpoint, ctx.body))
        if plan is SEVERAL_CHOICES:
            ctx.headers["x-pdserve-monolithic-cause"] = plan.reason
        if plan is PD and self.router.cfg.router.disaggregation == "never":
            plan = NEVER_SPLIT
            self.router.metrics.disaggregation.labels(plan.path, plan.reason).inc()
            ctx.headers["x-pdserve-decision"] = plan.reason
        return plan

    def ab_arm(self, ctx: RequestCtx) -> str:
        """The request's A/B arm ("pd" while the split is off), recorded in a header and a metric."""
        split = self.router.split
        if split.fraction <= 0:
            return "pd"
        arm = split.arm(ctx.request_headers, ctx.body)
        ctx.headers["x-pdserve-arm"] = arm
        self.router.metrics.ab_requests.labels(arm).inc()
        return arm
