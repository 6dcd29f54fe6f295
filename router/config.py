"""The router's sections of a config: `router`, `ab_split`, `admin` and `slo`, and the admin-key helpers.

The SLO section lives here because the router reads it (live goodput, the KV transfer's deadline
from the TTFT budget); its per-class overrides use admission's priority classes. This module
imports only other config modules, so any layer may read it (tests/test_import_contract.py).
"""
from __future__ import annotations

import os
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pdserve.admission.config import CLASSES
from pdserve.router.decider_config import DeciderSpec, Disaggregation
from pdserve.router.selection_config import SelectionSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RouterSpec(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    # A body up to this size is checked (parsed, validated, its prompt counted) on the event
    # loop: a few hundred microseconds at most, where a worker thread's hop costs a request up
    # to the interpreter's switch interval (5 ms) while the loop streams other requests. Larger
    # bodies, whose prompts take milliseconds to tokenize, go to a worker thread. 0: always a thread.
    inline_check_max_bytes: int = Field(8192, ge=0)
    request_timeout_s: float = Field(300.0, gt=0)
    prefill_timeout_s: float = Field(30.0, gt=0)
    load_poll_interval_s: float = Field(0.25, gt=0)
    # Between polls while no engine call has run for IDLE_AFTER_S (router/polling.py): an idle
    # router need not ask for load four times a second, and each ask costs CPU in the router
    # and the replica. Never shorter than load_poll_interval_s.
    idle_load_poll_interval_s: float = Field(1.0, gt=0)
    # A decode replica is eligible while its KV usage stays below this.
    decode_kv_headroom: float = Field(0.95, gt=0, le=1)
    # How each engine call's items reach the router: "direct" (one TCP connection per call to
    # the replica, engine/direct_stream.py; Ray carries only control) or "ray" (a Ray Serve
    # streaming call, one Ray message per batch of items).
    token_stream: Literal["direct", "ray"] = "direct"
    # A replica being stopped lets its direct streams finish for up to this long.
    stream_drain_timeout_s: float = Field(15.0, ge=0)
    # Custom Ray resources the router replica asks for (it asks for no CPU), e.g.
    # {"router_group": 1} to pin it to the node group whose pods advertise router_group and
    # carry the router's port, probes and Kubernetes Service. Empty: any node.
    ray_resources: dict[str, float] = Field(default_factory=dict)
    # Each pool's replica selection: filters, weighted scorers, picker (router/selection_config.py).
    selection: SelectionSpec = Field(default_factory=SelectionSpec)
    # Whether a P/D cluster splits each request: always, never, or adaptive per request
    # (router/decider_config.py), and the adaptive decider's settings.
    disaggregation: Disaggregation = "always"
    decider: DeciderSpec = Field(default_factory=DeciderSpec)

    def needs_kv_events(self) -> bool:
        """Whether the engines publish their KV cache events: the router's prefix index reads
        them for the prefix scorer and the adaptive decider."""
        return self.selection.uses("prefix") or self.disaggregation == "adaptive"

    @field_validator("ray_resources")
    @classmethod
    def _check_resources(cls, v):
        bad = {k: q for k, q in v.items() if not q > 0}
        if bad:
            raise ValueError(f"router.ray_resources: quantities must be positive, got {bad}")
        return v


class ABSplitSpec(_Strict):
    """Online A/B of P/D against monolithic serving on the same cluster (mode pd only)."""

    # Share of sessions served monolithically (whole request on one decode engine).
    monolithic_fraction: float = Field(0.0, ge=0, le=1)
    # Sessions are sticky by this header, else the OpenAI 'user' field.
    session_header: str = "x-session-id"


DEV_ADMIN_KEY = "pdserve-dev-admin"
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


class AdminSpec(_Strict):
    # Key for the admin API (/admin/...). The development key is accepted only on a router
    # bound to loopback, and then only from loopback clients; anything else sets its own,
    # inline or (better) through an environment variable.
    key: Optional[str] = None
    key_env: Optional[str] = None

    @model_validator(mode="after")
    def _one_source(self):
        if self.key and self.key_env:
            raise ValueError("admin: give 'key' or 'key_env', not both")
        if self.key is not None and len(self.key) < 12:
            raise ValueError("admin.key must be at least 12 characters")
        return self


class ClassSLO(_Strict):
    ttft_ms: Optional[float] = Field(None, gt=0)
    tpot_ms: Optional[float] = Field(None, gt=0)
    e2e_ms: Optional[float] = Field(None, gt=0)


class SLOSpec(_Strict):
    ttft_ms: float = Field(500.0, gt=0)
    tpot_ms: float = Field(50.0, gt=0)
    e2e_ms: Optional[float] = Field(None, gt=0)
    # Per-class overrides (critical / standard / sheddable); unset fields use the above.
    classes: dict[str, ClassSLO] = Field(default_factory=dict)
    # Width of the sliding window behind the live goodput gauge.
    goodput_window_s: float = Field(60.0, gt=0)

    @field_validator("classes")
    @classmethod
    def _check_classes(cls, v):
        bad = [k for k in v if k not in CLASSES]
        if bad:
            raise ValueError(f"slo.classes: unknown classes {bad}; known: {list(CLASSES)}")
        return v

    def for_class(self, priority_class: str) -> dict[str, Optional[float]]:
        """The SLO in force for a class, in milliseconds."""
        o = self.classes.get(priority_class) or ClassSLO()
        return {"ttft_ms": o.ttft_ms or self.ttft_ms, "tpot_ms": o.tpot_ms or self.tpot_ms,
                "e2e_ms": o.e2e_ms or self.e2e_ms}


def is_loopback(host: str) -> bool:
    return host in _LOOPBACK


def resolve_admin_key(admin: AdminSpec) -> Optional[str]:
    """The admin key in force, or None (admin API off). Fails loudly on a missing env var."""
    if admin.key_env:
        key = os.environ.get(admin.key_env)
        if not key:
            raise ValueError(f"admin.key_env names {admin.key_env!r}, which is not set")
        return key
    return admin.key
