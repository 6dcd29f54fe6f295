"""Turns a ClusterConfig into one Ray Serve application graph.

The builder only wires deployments together; the servers it wires live in prefill/,
decode/ and router/ and know nothing of it.
"""
from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from pdserve.cluster.autoscaling import autoscaling_config
from pdserve.decode.deployment import DecodeServer, MonolithicServer
from pdserve.engine.config import ClusterConfig, PoolSpec
from pdserve.prefill.deployment import PrefillServer
from pdserve.router.app import RouterServer
from pdserve.router.targeting import TargetedRequestRouter

_SERVERS = {"prefill": PrefillServer, "decode": DecodeServer, "monolithic": MonolithicServer}


def _actor_options(cfg: ClusterConfig, pool: PoolSpec) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if cfg.device == "cpu":
        # Logical CPUs make Ray place replicas where cores are free; the real
        # isolation is the core binding each replica applies to itself.
        opts["num_cpus"] = len(pool.cores_for(0))
    else:
        opts["num_cpus"] = 1
        opts["num_gpus"] = pool.gpus_per_replica * pool.tensor_parallel_size
    if pool.ray_resources:
        opts["resources"] = dict(pool.ray_resources)
    return opts


def _engine_deployment(cfg: ClusterConfig, name: str, pool: PoolSpec, config_dict: dict):
    scaling = ({"autoscaling_config": autoscaling_config(pool)} if pool.autoscaling
               else {"num_replicas": pool.replicas})
    return serve.deployment(
        _SERVERS[name],
        name=name,
        **scaling,
        max_ongoing_requests=pool.max_ongoing_requests,
        ray_actor_options=_actor_options(cfg, pool),
        request_router_config=RequestRouterConfig(request_router_class=TargetedRequestRouter),
        health_check_period_s=10,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=20,
    ).bind(config_dict)


def build_app(cfg: ClusterConfig):
    config_dict = cfg.model_dump(mode="json")
    engines = {name: _engine_deployment(cfg, name, pool, config_dict) for name, pool in cfg.pools().items()}
    router = serve.deployment(
        RouterServer,
        name="router",
        num_replicas=1,
        max_ongoing_requests=10_000,
        ray_actor_options={"num_cpus": 0},
    )
    return router.bind(config_dict, **engines)


def cpus_needed(cfg: ClusterConfig) -> int:
    if cfg.device != "cpu":
        return 0
    return sum(len(p.cores_for(i)) for p in cfg.pools().values() for i in range(p.max_replicas))
