"""Admission's sections of a config: `auth` (tenants and their keys), `admission`, `ladder`.

It also names the priority classes, which the router's `slo` section keys its per-class
overrides by. It imports nothing of pdserve, so any layer may read it
(tests/test_import_contract.py).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PriorityClass = Literal["critical", "standard", "sheddable"]
CLASSES: tuple[str, ...] = ("critical", "standard", "sheddable")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class BudgetSpec(_Strict):
    """Per-tenant budgets; None means unlimited."""

    requests_per_min: Optional[int] = Field(None, ge=1)
    tokens_per_min: Optional[int] = Field(None, ge=1)
    concurrent_requests: Optional[int] = Field(None, ge=1)
    # input tokens + max_tokens allowed for one request (the model's context still applies)
    max_context: Optional[int] = Field(None, ge=16)


class TenantSpec(_Strict):
    name: str
    priority_class: PriorityClass = Field("standard", alias="class")
    weight: float = Field(1.0, gt=0)
    budgets: BudgetSpec = Field(default_factory=BudgetSpec)
    # served model names this tenant may call; None = all
    models: Optional[list[str]] = None
    # SHA-256 hex digests of the tenant's API keys (`pdserve admin hash-key KEY` prints one)
    key_sha256: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"tenant name {v!r} must be 1-64 characters of letters, digits, '_', '.', '-'")
        return v

    @field_validator("key_sha256")
    @classmethod
    def _check_digests(cls, v: list[str]) -> list[str]:
        for d in v:
            if not _HEX64.match(d):
                raise ValueError(f"key_sha256 entry {d[:16]!r}... is not a lowercase 64-hex SHA-256 digest")
        return v


class AuthSpec(_Strict):
    # Off: every request is the default tenant (the one-command demo). On: a key is required.
    enabled: bool = False
    tenants: list[TenantSpec] = Field(default_factory=list)
    # YAML file with more keys: {keys: [{tenant: NAME, sha256: HEX}, ...]}
    keys_file: Optional[str] = None
    default_tenant: TenantSpec = Field(default_factory=lambda: TenantSpec(name="default"))

    @model_validator(mode="after")
    def _check(self):
        names = [t.name for t in self.tenants]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"auth.tenants: tenant names appear twice: {sorted(dup)}")
        extra = load_keys_file(self.keys_file, set(names)) if self.keys_file else {}
        owner: dict[str, str] = {}
        for t in self.tenants:
            for d in t.key_sha256 + extra.get(t.name, []):
                if d in owner and owner[d] != t.name:
                    raise ValueError(f"auth: one API key is given to both {owner[d]!r} and {t.name!r}")
                owner[d] = t.name
        if self.enabled and not owner:
            raise ValueError("auth.enabled is true but no tenant has a key (key_sha256 or keys_file)")
        return self


def load_keys_file(path: str, tenants: set[str]) -> dict[str, list[str]]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"auth.keys_file: file not found: {path}")
    data = yaml.safe_load(p.read_text()) or {}
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"auth.keys_file {path}: expected a mapping with a 'keys' list")
    out: dict[str, list[str]] = {}
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or set(e) != {"tenant", "sha256"}:
            raise ValueError(f"auth.keys_file {path}: keys[{i}] must have exactly 'tenant' and 'sha256'")
        if e["tenant"] not in tenants:
            raise ValueError(f"auth.keys_file {path}: keys[{i}] names unknown tenant {e['tenant']!r}")
        if not _HEX64.match(str(e["sha256"])):
            raise ValueError(f"auth.keys_file {path}: keys[{i}].sha256 is not a 64-hex SHA-256 digest")
        out.setdefault(e["tenant"], []).append(e["sha256"])
    return out


ADMISSION_RULES = ("budgets", "size", "ladder", "fleet_gate")


class ClassKVCeiling(_Strict):
    """Projected decode-pool KV pressure after admitting the request must stay under these.
    The room above Standard's ceiling is Critical's KV reserve: a waiting request cannot make
    vLLM preempt a running one, so Critical needs free blocks to start at once."""

    critical: float = Field(1.0, gt=0, le=1)
    standard: float = Field(0.9, gt=0, le=1)
    sheddable: float = Field(0.8, gt=0, le=1)


class AdmissionSpec(_Strict):
    # The checks, in the playbook's order; drop one to switch it off.
    rules: list[str] = Field(default_factory=lambda: list(ADMISSION_RULES))
    # Requests the router lets into the engines at once: the cluster's goodput-knee
    # concurrency. None: decode (or monolithic) replicas x engine.max_num_seqs.
    max_inflight: Optional[int] = Field(None, ge=1)
    # Share of max_inflight held for Critical (accounting at admission, not a partition),
    # and the most that Sheddable may occupy.
    critical_reserve: float = Field(0.3, ge=0, lt=1)
    sheddable_max_share: float = Field(0.2, gt=0, le=1)
    # How long a queued request may wait for a slot before 503 + Retry-After. A request past
    # half of it is aged: it goes ahead of fair-queue order within its class.
    standard_max_queue_wait_s: float = Field(1.0, gt=0)
    critical_max_queue_wait_s: float = Field(10.0, gt=0)
    max_queue_depth: int = Field(1024, ge=1)
    # Past the knee by queue depth: mean engine 'waiting' per decode replica above this.
    engine_queue_threshold: float = Field(8.0, gt=0)
    kv_ceiling: ClassKVCeiling = Field(default_factory=ClassKVCeiling)
    retry_after_s: int = Field(1, ge=1)
    # Fair queuing: tenants' served cost halves per this many seconds of inactivity.
    debt_half_life_s: float = Field(60.0, gt=0)
    # Output-token estimate for a tenant with no history yet (capped by the request's max_tokens).
    default_output_estimate: int = Field(256, ge=1)

    @field_validator("rules")
    @classmethod
    def _check_rules(cls, v: list[str]) -> list[str]:
        bad = [r for r in v if r not in ADMISSION_RULES]
        if bad:
            raise ValueError(f"admission.rules: unknown rules {bad}; known: {list(ADMISSION_RULES)}")
        if len(set(v)) != len(v):
            raise ValueError("admission.rules: a rule is listed twice")
        order = [ADMISSION_RULES.index(r) for r in v]
        if order != sorted(order):
            raise ValueError(f"admission.rules must keep the playbook's order {list(ADMISSION_RULES)}")
        return v

    @model_validator(mode="after")
    def _check_shares(self):
        if self.sheddable_max_share > 1 - self.critical_reserve:
            raise ValueError("admission.sheddable_max_share cannot exceed 1 - critical_reserve")
        return self


class LadderSpec(_Strict):
    """The KV-driven degradation ladder (playbook); rung N includes every rung below it."""

    enabled: bool = True
    # KV-cache usage of the decode pool (mean over healthy replicas) that puts each rung on.
    stop_sheddable_above: float = Field(0.85, gt=0, le=1)
    cap_standard_above: float = Field(0.90, gt=0, le=1)
    degrade_standard_above: float = Field(0.95, gt=0, le=1)
    critical_only_above: float = Field(0.97, gt=0, le=1)
    # Feature flags: a rung switched off is skipped (its action never runs).
    stop_sheddable: bool = True
    cap_standard: bool = True
    degrade_standard: bool = True
    critical_only: bool = True
    standard_max_tokens_cap: int = Field(512, ge=1)
    # Where Standard goes on rung 3: "prefill" serves it whole on the prefill pool (P/D only),
    # leaving decode KV to Critical; "off" skips the rung.
    degraded_target: Optional[Literal["prefill", "off"]] = None
    # Preemptions per second in the decode pool that count as a storm (-> Critical only).
    preemption_storm_per_s: float = Field(2.0, gt=0)
    # A signal must hold this long before the ladder steps up.
    sustain_s: float = Field(0.5, ge=0)
    # Recovery: one rung down per this many seconds with the signal below that rung.
    stable_interval_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _check_order(self):
        t = [self.stop_sheddable_above, self.cap_standard_above, self.degrade_standard_above,
             self.critical_only_above]
        if t != sorted(t):
            raise ValueError("ladder thresholds must rise: stop_sheddable <= cap_standard <= "
                             "degrade_standard <= critical_only")
        return self
