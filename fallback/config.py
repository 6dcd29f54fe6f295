"""The `fallback` section of a config: the per-link breakers and the bounds of a KV transfer's deadline.

It imports nothing of pdserve, so any layer may read it (tests/test_import_contract.py).
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FallbackSpec(_Strict):
    # Per prefill->decode link: consecutive transfer failures that open its breaker, how
    # long it stays open before a probe, and how many probes run at once when half-open.
    link_failure_threshold: int = Field(3, ge=1)
    link_open_seconds: float = Field(5.0, gt=0)
    link_half_open_probes: int = Field(1, ge=1)
    # A P/D request's KV transfer deadline is what its TTFT budget (slo.ttft_ms) has left
    # after the prefill leg, kept within these bounds (gRPC transport).
    min_transfer_deadline_s: float = Field(0.5, gt=0)
    max_transfer_deadline_s: float = Field(10.0, gt=0)
    # How many times one stream may be resumed on another engine after its engine died.
    max_stream_resumes: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _check_bounds(self):
        if self.min_transfer_deadline_s > self.max_transfer_deadline_s:
            raise ValueError("fallback.min_transfer_deadline_s exceeds max_transfer_deadline_s")
        return self
