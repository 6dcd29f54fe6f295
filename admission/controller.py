"""Admission control: the router asks ``admit`` before any engine work and ``finish`` after.

The rules run in the playbook's order, each one a small function that passes or raises a
``Rejection``; ``admission.rules`` in the config picks which run:

1. budgets     requests/min, tokens/min, concurrent requests (429 + Retry-After)
2. size        input tokens + max_tokens within the tenant's context policy (400)
3. (class)     the tenant's class: critical / standard / sheddable
4. ladder      the degradation rung's action for that class (429 / 503 / capped / degraded)
   fleet_gate  predicted KV against the decode pool's free KV, and engine queue depth:
               Sheddable is shed at once; Standard waits in the queue for KV room

Then the request waits for a slot: classes in priority order, tenants within a class by
weighted fair queuing. Sheddable never waits (429 at once); Standard and Critical wait up to
their class deadline, then get 503 + Retry-After.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

from pdserve.admission.budgets import TenantBudgets
from pdserve.admission.config import AdmissionSpec, LadderSpec
from pdserve.admission.fleet_gate import FleetState, fleet_gate, kv_fits
from pdserve.admission.ladder import DegradationLadder
from pdserve.admission.rejection import Rejection
from pdserve.admission.slots import ClassSlots
from pdserve.admission.tenants import Tenant, TenantDirectory
from pdserve.admission.wfq import FairShare

CLASS_RANK = {"critical": 0, "standard": 1, "sheddable": 2}


@dataclass
class Ticket:
    tenant: Tenant
    priority_class: str
    prompt_tokens: int
    max_tokens: int  # after any ladder cap
    charged_tokens: int
    enqueued_at: float
    estimated_cost: float = 0.0
    admitted_at: Optional[float] = None
    capped_from: Optional[int] = None  # the client's max_tokens when the ladder capped it
    degraded_target: Optional[str] = None
    finished: bool = False
    # sequences the request generates (n choices, per prompt of a list), each up to max_tokens
    sequences: int = 1

    @property
    def output_bound(self) -> int:
        return self.max_tokens * self.sequences

    @property
    def tokens_bound(self) -> int:
        """Prompt plus every sequence at max_tokens: what is charged, committed and sized as KV."""
        return self.prompt_tokens + self.output_bound

    @property
    def queue_wait_s(self) -> float:
        return (self.admitted_at or self.enqueued_at) - self.enqueued_at


@dataclass
class _Waiter:
    ticket: Ticket
    seq: int
    max_wait_s: float
    future: asyncio.Future
    dispatched: bool = False


def check_size(tenant: Tenant, prompt_tokens: int, max_tokens: int) -> None:
    limit = tenant.budgets.max_context
    if limit is not None and prompt_tokens + max_tokens > limit:
        raise Rejection(400, "oversize",
                        f"input ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is over tenant "
                        f"{tenant.name!r}'s limit of {limit} tokens per request", param="max_tokens")


class AdmissionController:
    def __init__(self, spec: AdmissionSpec, ladder: LadderSpec, capacity: int, kv_bytes_per_token: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self.rules = set(spec.rules)
        self.ladder = DegradationLadder(ladder)
        self.kv_bytes_per_token = kv_bytes_per_token
        self.clock = clock
        self.budgets = TenantBudgets(spec.retry_after_s)
        self.fair = FairShare(spec.debt_half_life_s, spec.default_output_estimate)
        self.slots = ClassSlots(capacity, spec.critical_reserve, spec.sheddable_max_share)
        self.fleet = FleetState()
        self.committed_tokens = 0  # prompt + max_tokens of admitted requests bound for the decode pool
        self._waiting: list[_Waiter] = []
        self._seq = itertools.count()

    # ------------------------------------------------------------------ signals
    def observe_fleet(self, fleet: FleetState, preemptions_per_s: float) -> int:
        self.fleet = fleet
        rung = self.ladder.observe(self._current_fleet().pressure, preemptions_per_s, self.clock())
        self.pump()  # KV may have freed up for a waiting request
        return rung

    def _current_fleet(self) -> FleetState:
        """The last fleet report with this router's committed KV as of now."""
        return replace(self.fleet, committed_kv_bytes=self.committed_tokens * self.kv_bytes_per_token)

    def queue_depth(self, priority_class: Optional[str] = None) -> int:
        return sum(1 for w in self._waiting if priority_class in (None, w.ticket.priority_class))

    # ------------------------------------------------------------------ admission
    async def admit(self, tenant: Tenant, model: str, prompt_tokens: int, max_tokens: int,
                    sequences: int = 1) -> Ticket:
        now = self.clock()
        TenantDirectory.authorize_model(tenant, model)
        cls = tenant.priority_class
        charged = 0
        ticket: Optional[Ticket] = None
        if "budgets" in self.rules:
            self.budgets.charge(tenant, prompt_tokens + max_tokens * sequences, now)
            charged = prompt_tokens + max_tokens * sequences
        try:
            if "size" in self.rules:
                check_size(tenant, prompt_tokens, max_tokens * sequences)
            ticket = Ticket(tenant, cls, prompt_tokens, max_tokens, charged, now, sequences=sequences)
            if "ladder" in self.rules:
                self._apply_ladder(ticket)
            if "fleet_gate" in self.rules and ticket.degraded_target is None:
                fleet_gate(self.spec, cls, ticket.tokens_bound * self.kv_bytes_per_token,
                           self._current_fleet())
            await self._acquire(ticket)
            return ticket
        except BaseException:
            if charged and not (ticket is not None and ticket.finished):  # finish() already refunded
                self.budgets.release(tenant, charged, 0, self.clock())
            raise

    def _apply_ladder(self, t: Ticket) -> None:
        a = self.ladder.actions()
        rung = self.ladder.current
        if t.priority_class == "sheddable" and a.shed_sheddable:
            raise Rejection(429, "ladder", f"degradation rung {rung}: sheddable traffic is paused",
                            self.spec.retry_after_s)
        if t.priority_class != "standard":
            return
        if a.shed_standard:
            raise Rejection(503, "ladder", f"degradation rung {rung}: only critical traffic is served",
                            self.spec.retry_after_s)
        if a.standard_max_tokens is not None and t.max_tokens > a.standard_max_tokens:
            t.capped_from, t.max_tokens = t.max_tokens, a.standard_max_tokens
        if a.degrade_standard:
            t.degraded_target = self.ladder.spec.degraded_target

    def _can_start(self, t: Ticket) -> bool:
        if not self.slots.can_start(t.priority_class):
            return False
        if "fleet_gate" not in self.rules or t.degraded_target is not None:
            return True
        return kv_fits(self.spec, t.priority_class, t.tokens_bound * self.kv_bytes_per_token,
                       self._current_fleet())

    async def _acquire(self, t: Ticket) -> None:
        name, weight, cls = t.tenant.name, t.tenant.weight, t.priority_class
        now = self.clock()
        self.fair.enqueue(name, weight, now)
        t.estimated_cost = self.fair.estimate(name, weight, t.prompt_tokens, t.output_bound, now)
        if self._can_start(t):
            self._start(t)
            return
        if cls == "sheddable":
            self.fair.drop(name, weight, now)
            raise Rejection(429, "capacity", "the cluster is at capacity; sheddable traffic is shed",
                            self.spec.retry_after_s)
        if len(self._waiting) >= self.spec.max_queue_depth:
            self.fair.drop(name, weight, now)
            raise Rejection(503, "queue_full", "the admission queue is full", self.spec.retry_after_s)
        max_wait = (self.spec.critical_max_queue_wait_s if cls == "critical"
                    else self.spec.standard_max_queue_wait_s)
        w = _Waiter(t, next(self._seq), max_wait, asyncio.get_running_loop().create_future())
        self._waiting.append(w)
        try:
            await asyncio.wait_for(asyncio.shield(w.future), max_wait)
        except asyncio.TimeoutError:
            if w.dispatched:
                return
            self._abandon(w)
            raise Rejection(503, "queue_timeout", f"no capacity within {max_wait:g} s for this {cls} request",
                            self.spec.retry_after_s)
        except asyncio.CancelledError:  # the client went away while queued
            if w.dispatched:
                self.finish(t, 0)
            else:
                self._abandon(w)
            raise

    def _abandon(self, w: _Waiter) -> None:
        if w in self._waiting:
            self._waiting.remove(w)
        self.fair.drop(w.ticket.tenant.name, w.ticket.tenant.weight, self.clock())

    def _start(self, t: Ticket) -> None:
        t.admitted_at = self.clock()
        self.slots.start(t.priority_class)
        if t.degraded_target is None:
            self.committed_tokens += t.tokens_bound
        self.fair.dispatch(t.tenant.name, t.tenant.weight, t.estimated_cost, t.admitted_at)

    def _next_waiter(self, now: float) -> Optional[_Waiter]:
        ready = [w for w in self._waiting if self._can_start(w.ticket)]
        if not ready:
            return None

        def order(w: _Waiter):
            aged = now - w.ticket.enqueued_at >= w.max_wait_s / 2
            tenant = w.ticket.tenant
            return (CLASS_RANK[w.ticket.priority_class], not aged,
                    self.fair.priority(tenant.name, tenant.weight, now), w.seq)

        return min(ready, key=order)

    def pump(self) -> None:
        while True:
            w = self._next_waiter(self.clock())
            if w is None:
                return
            self._waiting.remove(w)
            self._start(w.ticket)
            w.dispatched = True
            if not w.future.done():
                w.future.set_result(None)

    def finish(self, t: Ticket, output_tokens: int) -> None:
        """Once per admitted request, however it ended."""
        if t.finished:
            return
        t.finished = True
        now = self.clock()
        self.slots.finish(t.priority_class)
        if t.degraded_target is None:
            self.committed_tokens = max(0, self.committed_tokens - t.tokens_bound)
        actual = t.prompt_tokens + output_tokens
        self.fair.complete(t.tenant.name, t.tenant.weight, t.estimated_cost, actual, output_tokens, now)
        if t.charged_tokens:
            self.budgets.release(t.tenant, t.charged_tokens, actual, now)
        self.pump()
