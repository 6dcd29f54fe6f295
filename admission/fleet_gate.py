"""The fleet-state gate: is there room in the decode pool for this request right now?

Predicted KV need is (input tokens + max_tokens) x KV bytes per token from the model's
config, set against the KV the decode pool has free (what is in use now, or what the
admitted requests will hold at their max_tokens, whichever is more). Each class has a
ceiling on the projected pool usage: the room above Standard's ceiling is Critical's KV
reserve, and Critical's default of 1.0 means it is never gated on KV here.
"""
from __future__ import annotations

from dataclasses import dataclass

from pdserve.admission.config import AdmissionSpec
from pdserve.admission.rejection import Rejection
from pdserve.planner.model_math import shape_from_config


@dataclass(frozen=True)
class FleetState:
    kv_usage: float = 0.0           # mean over healthy decode replicas, 0..1
    kv_capacity_bytes: float = 0.0  # whole decode pool; 0 when not yet known
    waiting_per_replica: float = 0.0
    healthy_replicas: int = 0
    # KV the admitted requests will hold at their max_tokens (bytes): where usage is heading
    committed_kv_bytes: float = 0.0

    @property
    def pressure(self) -> float:
        """KV pressure 0..1: the larger of the usage now and the committed share."""
        if self.kv_capacity_bytes <= 0:
            return self.kv_usage
        return max(self.kv_usage, self.committed_kv_bytes / self.kv_capacity_bytes)


def kv_bytes_per_token(hf_config: dict, dtype: str) -> int:
    """2 x layers x KV heads x head_dim x bytes per element (the playbook's formula; MLA models
    by their compressed KV), as the capacity planner computes it."""
    return shape_from_config(hf_config, dtype=dtype).kv_bytes_per_token


def kv_fits(spec: AdmissionSpec, priority_class: str, predicted_kv_bytes: float, fleet: FleetState) -> bool:
    """Whether the projected KV pressure with this request stays under its class ceiling."""
    ceiling = getattr(spec.kv_ceiling, priority_class)
    if fleet.kv_capacity_bytes <= 0 or ceiling >= 1.0:
        return True
    used = fleet.kv_capacity_bytes * fleet.pressure
    return (used + predicted_kv_bytes) / fleet.kv_capacity_bytes <= ceiling


def fleet_gate(spec: AdmissionSpec, priority_class: str, predicted_kv_bytes: float, fleet: FleetState) -> None:
    """Sheddable is shed (429) when KV or the engine queues say the pool is past its knee;
    Standard is refused (503) only if the request could never fit under its ceiling, and
    otherwise waits for room in the admission queue (controller.py)."""
    ceiling = getattr(spec.kv_ceiling, priority_class)
    if priority_class == "sheddable" and not kv_fits(spec, priority_class, predicted_kv_bytes, fleet):
        projected = (fleet.kv_capacity_bytes * fleet.pressure + predicted_kv_bytes) / fleet.kv_capacity_bytes
        raise Rejection(429, "kv_budget",
                        f"predicted KV for this request ({predicted_kv_bytes / 2**20:.1f} MiB) would take the "
                        f"decode pool to {projected:.2f} of its KV cache; the sheddable limit is {ceiling:.2f}",
                        spec.retry_after_s)
    if (priority_class == "standard" and fleet.kv_capacity_bytes > 0
            and predicted_kv_bytes > ceiling * fleet.kv_capacity_bytes):
        raise Rejection(503, "kv_budget",
                        f"predicted KV for this request ({predicted_kv_bytes / 2**20:.1f} MiB) is more than the "
                        f"standard share of the decode pool's KV cache", spec.retry_after_s)
    if priority_class == "sheddable" and fleet.waiting_per_replica > spec.engine_queue_threshold:
        raise Rejection(429, "queue_depth",
                        f"the decode pool is past its knee ({fleet.waiting_per_replica:.1f} requests waiting per "
                        f"replica); sheddable traffic is shed", spec.retry_after_s)
