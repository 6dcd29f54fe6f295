"""The whole config: ClusterConfig holds every layer's section, and load_config reads one from YAML.

Each section is typed beside the layer it configures (engine/config.py, kv_transfer/config.py,
fallback/config.py, admission/config.py, router/config.py, lab/spec.py); this module composes them
and checks what spans sections (pools against mode and cores, the admin key against the router's
host, the lab's Ray resources against the pools'). It imports only those config modules, so every
layer may import it without pulling in another layer's code (tests/test_import_contract.py).
Every model validates on load, so a bad config fails at startup with a message that names the field.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pdserve.admission.config import AdmissionSpec, AuthSpec, LadderSpec
from pdserve.engine.config import EngineOptions, ModelSpec, PoolSpec
from pdserve.fallback.config import FallbackSpec
from pdserve.kv_transfer.config import KVTransferSpec
from pdserve.lab.spec import LabSpec
from pdserve.router.config import DEV_ADMIN_KEY, ABSplitSpec, AdminSpec, RouterSpec, SLOSpec, is_loopback
from pdserve.settings.overrides import layered, merge


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    def _check_disaggregation(self):
        if self.router.disaggregation != "always" and self.mode != "pd":
            raise ValueError(f"router.disaggregation {self.router.disaggregation!r} needs mode 'pd': a monolithic "
                             "cluster never splits a request")
        if self.router.needs_kv_events() and not self.engine.enable_prefix_caching:
            raise ValueError("router.selection's prefix scorer and router.disaggregation 'adaptive' read the engines' "
                             "prefix cache: they need engine.enable_prefix_caching")
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
        if not is_loopback(self.router.host) and (a.key == DEV_ADMIN_KEY or not (a.key or a.key_env)):
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


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ClusterConfig:
    """The config at ``path``, with ``KEY=VALUE`` overrides (settings/overrides.py) laid on it."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: top level must be a mapping")
    if overrides:
        data = merge(data, layered(list(overrides)))
    return ClusterConfig.model_validate(data)
