"""The engine's sections of a config: `model`, `engine` (vLLM's engine arguments) and the pools.

It imports nothing of pdserve, so any layer may read it (tests/test_import_contract.py);
settings/cluster.py composes it with the other layers' sections into ClusterConfig.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["AutoscalingSpec", "EngineOptions", "ModelSpec", "PoolSpec", "check_engine_kwargs", "parse_core_set"]


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
    "kv_events_config": "router.selection / router.disaggregation (engines publish KV events when the router reads them)",
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
