"""Per-tenant budgets: requests/min and tokens/min as token buckets, and a concurrency cap.

Budgets live in this router replica's memory; with several router replicas, give each its
share. Tokens are charged at admission as input + max_tokens and the unused part is
refunded on completion, so a tenant is never billed for tokens it did not get.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pdserve.admission.rejection import Rejection
from pdserve.admission.tenants import Tenant


@dataclass
class TokenBucket:
    capacity: float
    per_second: float
    level: float = -1.0
    last: float = 0.0

    def _refill(self, now: float) -> None:
        if self.level < 0:
            self.level, self.last = self.capacity, now
        self.level = min(self.capacity, self.level + (now - self.last) * self.per_second)
        self.last = now

    def wait_for(self, amount: float, now: float) -> float:
        """0 if ``amount`` is available now, else the seconds until it will be."""
        self._refill(now)
        return 0.0 if self.level >= amount else (amount - self.level) / self.per_second

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= amount

    def give(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)


@dataclass
class _TenantUsage:
    requests: Optional[TokenBucket]
    tokens: Optional[TokenBucket]
    concurrent: int = 0
    inflight_cap: Optional[int] = None


class TenantBudgets:
    def __init__(self, retry_after_s: float = 1.0) -> None:
        self.retry_after_s = retry_after_s
        self._usage: dict[str, _TenantUsage] = {}

    def _of(self, tenant: Tenant) -> _TenantUsage:
        u = self._usage.get(tenant.name)
        if u is None:
            b = tenant.budgets
            u = _TenantUsage(
                requests=TokenBucket(b.requests_per_min, b.requests_per_min / 60) if b.requests_per_min else None,
                tokens=TokenBucket(b.tokens_per_min, b.tokens_per_min / 60) if b.tokens_per_min else None,
                inflight_cap=b.concurrent_requests)
            self._usage[tenant.name] = u
        return u

    def charge(self, tenant: Tenant, tokens: int, now: float) -> None:
        """Checks every budget, then charges them all; raises 429 (or 400) without charging."""
        u = self._of(tenant)
        if u.tokens is not None and tokens > u.tokens.capacity:
            raise Rejection(400, "over_token_budget",
                            f"this request needs {tokens} tokens (input + max_tokens); tenant {tenant.name!r} "
                            f"may use {int(u.tokens.capacity)} per minute", param="max_tokens")
        if u.inflight_cap is not None and u.concurrent >= u.inflight_cap:
            raise Rejection(429, "budget_concurrency",
                            f"tenant {tenant.name!r} already has {u.concurrent} requests in flight "
                            f"(limit {u.inflight_cap})", self.retry_after_s)
        if u.requests is not None:
            wait = u.requests.wait_for(1, now)
            if wait > 0:
                raise Rejection(429, "budget_requests",
                                f"tenant {tenant.name!r} is over its requests-per-minute budget", wait)
        if u.tokens is not None:
            wait = u.tokens.wait_for(tokens, now)
            if wait > 0:
                raise Rejection(429, "budget_tokens",
                                f"tenant {tenant.name!r} is over its tokens-per-minute budget", wait)
        if u.requests is not None:
            u.requests.take(1, now)
        if u.tokens is not None:
            u.tokens.take(tokens, now)
        u.concurrent += 1

    def release(self, tenant: Tenant, charged_tokens: int, used_tokens: int, now: float) -> None:
        """Ends a charged request: frees its concurrency slot and refunds unused tokens (a request
        rejected after charging still counts against requests/min)."""
        u = self._of(tenant)
        u.concurrent = max(0, u.concurrent - 1)
        if u.tokens is not None and used_tokens < charged_tokens:
            u.tokens.give(charged_tokens - used_tokens, now)

    def concurrent(self, tenant: Tenant) -> int:
        return self._of(tenant).concurrent
