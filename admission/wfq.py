"""Weighted fair queuing by token cost between tenants (the playbook's rule, not its prose).

The tenant with the lowest served_cost / weight goes next. A request's cost is its input
tokens plus the tenant's expected output (a running mean of its past outputs, capped by
the request's max_tokens); it is charged when the request is dispatched and corrected by
the actual output on completion. Served cost halves per ``half_life_s`` of inactivity, so
a tenant returning after a quiet spell is not punished for old traffic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

_EMA_ALPHA = 0.2


@dataclass
class _Account:
    weight: float
    served: float = 0.0
    last_touch: Optional[float] = None
    expected_output: Optional[float] = None
    active: int = 0  # queued or in flight: no decay while the tenant is busy


class FairShare:
    def __init__(self, half_life_s: float = 60.0, default_output: int = 256) -> None:
        self.half_life_s = half_life_s
        self.default_output = default_output
        self._acc: dict[str, _Account] = {}

    def _account(self, tenant: str, weight: float, now: float) -> _Account:
        a = self._acc.get(tenant)
        if a is None:
            a = self._acc[tenant] = _Account(weight=weight, last_touch=now)
        a.weight = weight
        if a.active == 0 and a.last_touch is not None and now > a.last_touch:
            a.served *= 0.5 ** ((now - a.last_touch) / self.half_life_s)
        a.last_touch = now
        return a

    def estimate(self, tenant: str, weight: float, input_tokens: int, max_tokens: int, now: float) -> float:
        a = self._account(tenant, weight, now)
        out = a.expected_output if a.expected_output is not None else self.default_output
        return float(input_tokens + min(max_tokens, out))

    def priority(self, tenant: str, weight: float, now: float) -> float:
        """Normalized served cost; lower goes first."""
        a = self._account(tenant, weight, now)
        return a.served / a.weight

    def enqueue(self, tenant: str, weight: float, now: float) -> None:
        self._account(tenant, weight, now).active += 1

    def dispatch(self, tenant: str, weight: float, cost: float, now: float) -> None:
        self._account(tenant, weight, now).served += cost

    def drop(self, tenant: str, weight: float, now: float) -> None:
        """A queued request left without running (timeout, client gone)."""
        a = self._account(tenant, weight, now)
        a.active = max(0, a.active - 1)

    def complete(self, tenant: str, weight: float, estimated: float, actual: float, output_tokens: int,
                 now: float) -> None:
        a = self._account(tenant, weight, now)
        a.served = max(0.0, a.served + actual - estimated)
        a.active = max(0, a.active - 1)
        a.expected_output = (output_tokens if a.expected_output is None
                             else (1 - _EMA_ALPHA) * a.expected_output + _EMA_ALPHA * output_tokens)

    def served(self, tenant: str) -> float:
        a = self._acc.get(tenant)
        return a.served if a else 0.0
