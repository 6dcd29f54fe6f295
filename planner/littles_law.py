"""Little's Law (L = λ × W) sizing, shared by the planner and the autoscaling policy.

W = E[TTFT] + E[output_tokens] × E[TPOT]; replicas = ceil(λ × W / (C_knee × safety));
queue threshold per replica = C_knee × (1 − safety). Pure functions: no I/O, no Ray.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

# Products like 6 × 12 / (24 × 0.75) can land a hair above an integer in binary floating
# point, and ceil would then add a whole replica; nine decimals is far below any real input.
_DECIMALS = 9


def _number(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _non_negative(name: str, value: float) -> float:
    v = _number(name, value)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return v


def _positive(name: str, value: float) -> float:
    v = _number(name, value)
    if v <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return v


def _safety(value: float) -> float:
    v = _number("safety", value)
    if not 0 < v <= 1:
        raise ValueError(f"safety must be in (0, 1], got {value!r} (the playbook uses 0.7-0.8)")
    return v


def in_flight(lam: float, w: float) -> float:
    """Mean requests in the system, L = λ × W (λ in req/s, W in s)."""
    return round(_non_negative("lam (arrival rate, req/s)", lam) * _non_negative("w (time in system, s)", w),
                 _DECIMALS)


def replicas_needed(lam: float, w: float, c_knee: float, safety: float,
                    min_replicas: int = 1, max_replicas: Optional[int] = None) -> int:
    """ceil(λ × W / (C_knee × safety)), clamped to [min_replicas, max_replicas]."""
    c = _positive("c_knee (concurrency at the goodput knee)", c_knee)
    s = _safety(safety)
    if isinstance(min_replicas, bool) or not isinstance(min_replicas, numbers.Integral) or min_replicas < 0:
        raise ValueError(f"min_replicas must be an integer >= 0, got {min_replicas!r}")
    if max_replicas is not None:
        if isinstance(max_replicas, bool) or not isinstance(max_replicas, numbers.Integral) or max_replicas < 1:
            raise ValueError(f"max_replicas must be an integer >= 1, got {max_replicas!r}")
        if max_replicas < min_replicas:
            raise ValueError(f"max_replicas ({max_replicas}) is below min_replicas ({min_replicas})")
    n = math.ceil(round(in_flight(lam, w) / (c * s), _DECIMALS))
    n = max(n, int(min_replicas))
    return n if max_replicas is None else min(n, int(max_replicas))


def queue_threshold(c_knee: float, safety: float) -> float:
    """Waiting requests per replica past which it is queue-bound: C_knee × (1 − safety)."""
    return round(_positive("c_knee (concurrency at the goodput knee)", c_knee) * (1 - _safety(safety)), _DECIMALS)


def service_time(ttft_s: float, output_tokens: float, tpot_s: float) -> float:
    """W = E[TTFT] + E[output_tokens] × E[TPOT], in seconds."""
    return round(_non_negative("ttft_s", ttft_s)
                 + _non_negative("output_tokens", output_tokens) * _non_negative("tpot_s", tpot_s), _DECIMALS)


@dataclass(frozen=True)
class ScalingPlan:
    rate_rps: float
    w_s: float
    c_knee: float
    safety: float
    in_flight: float
    usable_per_replica: float
    replicas: int
    queue_threshold: float


def plan(lam: float, w: float, c_knee: float, safety: float,
         min_replicas: int = 1, max_replicas: Optional[int] = None) -> ScalingPlan:
    return ScalingPlan(
        rate_rps=float(lam), w_s=float(w), c_knee=float(c_knee), safety=float(safety),
        in_flight=in_flight(lam, w),
        usable_per_replica=round(_positive("c_knee (concurrency at the goodput knee)", c_knee) * _safety(safety),
                                 _DECIMALS),
        replicas=replicas_needed(lam, w, c_knee, safety, min_replicas, max_replicas),
        queue_threshold=queue_threshold(c_knee, safety),
    )
