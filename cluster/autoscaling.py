"""Little's-Law autoscaling for one engine pool, as a Ray Serve custom autoscaling policy.

Each replica reports its arrival rate λ and time in system W (engine/little_meter.py,
through ``record_autoscaling_stats``). The policy sums λ over the pool, takes W as the
arrival-weighted mean, and asks for

    replicas = ceil(λ × W / (c_knee × safety))      (pdserve.planner.littles_law)

within the pool's bounds, with a cooldown after each change (longer for scaling down),
so prefill and decode scale independently, each on its own signal.
"""
from __future__ import annotations

import logging
from typing import Any

from pdserve.planner.littles_law import replicas_needed

# The policy runs inside Ray Serve's controller: its logger is the one that reaches the controller log.
logger = logging.getLogger("ray.serve")

POLICY_PATH = "pdserve.cluster.autoscaling:LittlesLawPolicy"


def latest_values(raw: dict[str, dict[Any, Any]] | None) -> dict[str, dict[Any, float]]:
    """Each replica's most recent report per metric, from Ray's raw time series.

    The replicas' figures are already windowed (LittleMeter), so the latest point is the
    signal; Ray's own look-back average would smear it a second time.
    """
    out: dict[str, dict[Any, float]] = {}
    for name, per_replica in (raw or {}).items():
        for replica, series in per_replica.items():
            points = list(series or [])
            if points:
                out.setdefault(name, {})[replica] = float(getattr(points[-1], "value", points[-1]))
    return out


def pool_signal(per_metric: dict[str, dict[Any, float]] | None) -> tuple[float, float]:
    """(λ of the pool in req/s, W in s) from the replicas' latest reports."""
    if not per_metric:
        return 0.0, 0.0
    rates = {r: v for r, v in (per_metric.get("arrival_rps") or {}).items() if v is not None}
    waits = {r: v for r, v in (per_metric.get("w_s") or {}).items() if v is not None}
    lam = float(sum(rates.values()))
    if lam > 0:
        w = sum(float(rates[r]) * float(waits.get(r, 0.0)) for r in rates) / lam
    else:
        w = max((float(v) for v in waits.values()), default=0.0)
    return lam, w


class LittlesLawPolicy:
    def __init__(self, c_knee: float, safety: float, min_replicas: int, max_replicas: int,
                 upscale_cooldown_s: float, downscale_cooldown_s: float) -> None:
        self.c_knee = c_knee
        self.safety = safety
        self.min_replicas = min_replicas
        self.max_replicas = max_replicas
        self.upscale_cooldown_s = upscale_cooldown_s
        self.downscale_cooldown_s = downscale_cooldown_s

    def decide(self, lam: float, w: float, current: int, now: float, last_change: float | None) -> int:
        want = replicas_needed(lam, w, self.c_knee, self.safety, self.min_replicas, self.max_replicas)
        since = float("inf") if last_change is None else now - last_change
        if want > current and since >= self.upscale_cooldown_s:
            return want
        if want < current and since >= self.downscale_cooldown_s:
            return want
        return current

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        state = dict(ctx.policy_state or {})
        lam, w = pool_signal(latest_values(ctx.raw_metrics))
        now = ctx.current_time
        current = ctx.target_num_replicas
        target = self.decide(lam, w, current, now, state.get("last_change"))
        if target != current:
            state["last_change"] = now
            logger.info("%s: λ=%.2f req/s W=%.2f s -> %d replicas (was %d)", ctx.deployment_name, lam, w,
                        target, current)
        state.update(lam=lam, w=w, target=target)
        return target, state


def autoscaling_config(pool) -> dict[str, Any]:
    """Ray Serve's autoscaling_config for a pool with an ``autoscaling`` section."""
    a = pool.autoscaling
    return {
        "min_replicas": a.min_replicas,
        "max_replicas": a.max_replicas,
        "initial_replicas": pool.replicas,
        "metrics_interval_s": 1.0,
        "look_back_period_s": 2.0,
        # Ray holds a custom policy's decisions for these delays too (30 s up, 600 s down by
        # default); the policy's own cooldowns are the ones that should count.
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
        "policy": {"policy_function": POLICY_PATH, "policy_kwargs": {
            "c_knee": a.c_knee, "safety": a.safety, "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas, "upscale_cooldown_s": a.upscale_cooldown_s,
            "downscale_cooldown_s": a.downscale_cooldown_s}},
    }
